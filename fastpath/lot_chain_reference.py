"""The pure-Python twin of fastpath/lot_chain.pyx's builders (`chained`, `spliced`): the same values (a tuple
of a few lots, a LotChain of many with the same chunks, built by its constructor).
POINTS_FASTPATH=python runs these; tests/unit/test_lot_chain.py compares the two chunk for chunk. (LotChain
itself is a compiled value both build, as fastpath/records.pyx's are.)"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from fastpath.lot_chain import CHAIN_LOTS_MIN, CHUNK_LOTS_MAX, LotChain
from fastpath.records import Lot


def _chunks_of(lots: Sequence[Lot]) -> list[tuple[Lot, ...]]:
    """lots as chunks of CHUNK_LOTS_MAX, in order (the last may be shorter)."""
    return [tuple(lots[start : start + CHUNK_LOTS_MAX]) for start in range(0, len(lots), CHUNK_LOTS_MAX)]


def chained(lots: Iterable[Lot]) -> tuple[Lot, ...] | LotChain:
    """A member's lots (sorted soonest-expiring first) as ProgramState holds them: a tuple of at most
    CHUNK_LOTS_MAX lots, else a LotChain in full chunks from the head."""
    items = tuple(lots)
    return items if len(items) <= CHUNK_LOTS_MAX else LotChain(_chunks_of(items))


def spliced(
    lots: tuple[Lot, ...] | LotChain, passed: int, head: Iterable[Lot], tail: Iterable[Lot]
) -> tuple[Lot, ...] | LotChain:
    """A member's `lots` (a tuple of at most CHUNK_LOTS_MAX, or a LotChain) with its first `passed` lots
    replaced by `head` (sorted, all before the lots that follow) and `tail` appended (sorted, all after
    them): a tuple of CHAIN_LOTS_MIN lots or fewer, or of up to CHUNK_LOTS_MAX when `lots` is a tuple; else a
    chain, which shares the chunks of `lots` the change does not reach."""
    if isinstance(lots, LotChain):
        chunks, length = lots.chunks, lots.length
    elif type(lots) is tuple and len(lots) <= CHUNK_LOTS_MAX:
        chunks, length = (), len(lots)
    else:
        raise TypeError(
            f"a member's lots are a tuple of at most {CHUNK_LOTS_MAX} or a LotChain, not "
            f"{type(lots).__name__} of {len(lots)}"
        )
    if passed < 0 or passed > length:
        raise ValueError(f"{passed} lots passed of {length}")
    head, tail = list(head), list(tail)
    if not passed and not head and not tail:
        return lots
    size = length - passed + len(head) + len(tail)
    if size <= CHAIN_LOTS_MIN or type(lots) is tuple:
        # one tuple (a chain shrinks back to one only at CHAIN_LOTS_MIN lots: a member holding about
        # CHUNK_LOTS_MAX would change form at every earn and spend), or a tuple grown past a chunk: chained
        return chained((*head, *itertools.islice(lots, passed, None), *tail))
    # the chunks the passed lots cover whole, then how many of the next one they cover
    index, offset = 0, passed
    while index < len(chunks) and offset >= len(chunks[index]):
        offset -= len(chunks[index])
        index += 1
    front = head
    if offset:  # the rest of a chunk the passed lots end inside
        front += chunks[index][offset:]
        index += 1
    if front and index < len(chunks) and len(front) + len(chunks[index]) <= CHUNK_LOTS_MAX:
        front += chunks[index]  # a small front joins the next chunk
        index += 1
    made = _chunks_of(front) + list(chunks[index:])
    if tail:
        room = CHUNK_LOTS_MAX - len(made[-1]) if made else 0
        if room > 0:
            made[-1] += tuple(tail[:room])
            tail = tail[room:]
        made += _chunks_of(tail)
    return LotChain(made)
