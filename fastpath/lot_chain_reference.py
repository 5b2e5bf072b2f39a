"""The pure-Python twin of fastpath/lot_chain.pyx's builders (`chained`, `spliced`): the same chunks, built
by the LotChain constructor. POINTS_FASTPATH=python runs these; tests/unit/test_lot_chain.py compares the
two chunk for chunk. (LotChain itself is a compiled value both build, as fastpath/records.pyx's are.)"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from fastpath.lot_chain import CHUNK_LOTS_MAX, LotChain
from fastpath.records import Lot


def _chunks_of(lots: Sequence[Lot]) -> list[tuple[Lot, ...]]:
    """lots as chunks of CHUNK_LOTS_MAX, in order (the last may be shorter)."""
    return [tuple(lots[start : start + CHUNK_LOTS_MAX]) for start in range(0, len(lots), CHUNK_LOTS_MAX)]


def chained(lots: Iterable[Lot]) -> LotChain:
    """The chain of `lots` (sorted soonest-expiring first), in full chunks from the head."""
    return LotChain(_chunks_of(list(lots)))


def spliced(chain: LotChain | tuple[()], passed: int, head: Iterable[Lot], tail: Iterable[Lot]) -> LotChain:
    """`chain` (a LotChain, or () for none) with its first `passed` lots replaced by `head` (sorted, all
    before the lots that follow) and `tail` appended (sorted, all after them): a new chain sharing the
    chunks the change does not reach."""
    if isinstance(chain, LotChain):
        chunks, length = chain.chunks, chain.length
    elif chain == ():
        chunks, length = (), 0
    else:
        raise TypeError(f"lots to splice are a LotChain or (), not {type(chain).__name__}")
    if passed < 0 or passed > length:
        raise ValueError(f"{passed} lots passed of a chain of {length}")
    head, tail = list(head), list(tail)
    if not passed and not head and not tail:
        return chain if length else LotChain(())  # type: ignore[return-value]  # a LotChain when length
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
