"""fastpath/lot_chain.pyx (a member's lots: a tuple of at most CHUNK_LOTS_MAX, a chain of chunks beyond)
held to its definition: the flat tuple of lots it stands for. Random sequences of what ProgramState and the kernel's runs do to a member's lots
(appends at the tail, spends at the head that take lots whole or in part, expiries of a prefix, whole
rebuilds) and of rollbacks (an older chain kept by reference and made current again) run on the compiled
builders, on their twin (fastpath/lot_chain_reference.py) and on a plain tuple: the same lots, the same
chunks from both builders, every chain's chunks within bounds, every older chain unchanged, and a change
that copies only what it changes."""

from __future__ import annotations

import gc
import pickle
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath import lot_chain as compiled
from fastpath import lot_chain_reference as twin
from fastpath.lot_chain import CHAIN_LOTS_MIN, CHUNK_LOTS_MAX, LotChain
from fastpath.records import Lot

pytestmark = pytest.mark.timeout(120)


def _valid(lots: tuple[Lot, ...] | LotChain) -> None:
    """The form a member's lots take: a tuple of at most CHAIN_LOTS_MIN, a chain of valid chunks beyond
    CHUNK_LOTS_MAX, either between (a chain shrinks back to a tuple only at CHAIN_LOTS_MIN)."""
    if len(lots) <= CHAIN_LOTS_MIN:
        assert type(lots) is tuple
    if len(lots) > CHUNK_LOTS_MAX:
        assert type(lots) is LotChain
    if type(lots) is tuple:
        return
    assert type(lots) is LotChain
    assert all(type(chunk) is tuple and 0 < len(chunk) <= CHUNK_LOTS_MAX for chunk in lots.chunks)
    assert lots.length == len(lots) == sum(map(len, lots.chunks))


def _lots(start: int, count: int, rng: random.Random) -> list[Lot]:
    return [Lot(lot_id, rng.randrange(1, 100), 1_000 + lot_id, "shop") for lot_id in range(start, start + count)]


def _chunks(lots: tuple[Lot, ...] | LotChain) -> tuple[tuple[Lot, ...], ...]:
    return lots.chunks if type(lots) is LotChain else (lots,)  # type: ignore[union-attr,return-value]


def _fresh(after: tuple[Lot, ...] | LotChain, before: tuple[Lot, ...] | LotChain) -> int:
    """Lots held in chunks of `after` that are not chunks of `before` (what the change built)."""
    shared = {id(chunk) for chunk in _chunks(before)}
    return sum(len(chunk) for chunk in _chunks(after) if id(chunk) not in shared)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32))
def test_random_changes_and_rollbacks_keep_the_lots_of_the_plain_tuple(seed):
    rng = random.Random(seed)
    model: tuple[Lot, ...] = ()
    chains: dict[str, tuple[Lot, ...] | LotChain] = {"compiled": (), "twin": ()}
    history: list[tuple[tuple[Lot, ...], Any, Any]] = []  # rollback points
    next_id = 1
    for _ in range(rng.randrange(1, 120)):
        kind = rng.choice(["append"] * 4 + ["spend"] * 3 + ["expire", "rebuild", "mark", "rollback"])
        if kind == "mark":
            history.append((model, chains["compiled"], chains["twin"]))
            continue
        if kind == "rollback":
            if history:
                model, chains["compiled"], chains["twin"] = history.pop(rng.randrange(len(history)))
            continue
        if kind == "rebuild":  # a rare path (a restore, a merge) chains the member's lots again
            chains = {"compiled": compiled.chained(model), "twin": twin.chained(model)}
            continue
        passed, head, tail = 0, [], []
        if kind == "append":  # a run's (or credit_lot's) new lots: they expire last
            count = rng.choice([1, 1, 2, 5, 70, 200])
            tail = _lots(next_id, count, rng)
            next_id += count
        elif kind == "spend":  # the lots a spend passed: those it took whole go, the last may be left in part
            passed = rng.randrange(0, len(model) + 1)
            if passed:
                last = model[passed - 1]
                taken_whole = rng.random() < 0.3 or last.amount == 1
                head = [] if taken_whole else [last.replace(amount=rng.randrange(1, last.amount))]
        else:  # the expiry of a prefix
            passed = rng.randrange(0, min(len(model), 100) + 1)
        model = tuple(head) + model[passed:] + tuple(tail)
        before = chains["compiled"]
        for name, module in (("compiled", compiled), ("twin", twin)):
            chains[name] = module.spliced(chains[name], passed, head, tail)
        made = chains["compiled"]
        _valid(made)
        _valid(chains["twin"])
        assert _chunks(made) == _chunks(chains["twin"])  # the same chunks from both builders
        assert made == model and model == made and list(made) == list(model)
        assert tuple(reversed(made)) == model[::-1] and (type(made) is tuple or made.lots() == model)
        # what the change built: the lots it passed or appended, and at most two chunks' worth around them
        # (the rest of the chunk the passed lots end in, the last chunk the new lots join)
        assert _fresh(made, before) <= len(head) + len(tail) + 2 * CHUNK_LOTS_MAX
        for old_model, old_compiled, old_twin in history:  # every chain kept for a rollback is unchanged
            assert old_compiled == old_model and old_twin == old_model


def test_a_chain_is_read_as_a_sequence_of_its_lots():
    rng = random.Random(5)
    lots = tuple(_lots(1, 200, rng))
    chain = twin.spliced(compiled.chained(lots[:130]), 3, [lots[2].replace(amount=1)], lots[130:])
    assert type(chain) is LotChain
    model = (lots[2].replace(amount=1), *lots[3:])
    assert len(chain) == len(model) and bool(chain) and not LotChain(())
    assert [chain[index] for index in range(len(model))] == list(model)
    assert [chain[-index] for index in range(1, len(model) + 1)] == [
        model[-index] for index in range(1, len(model) + 1)
    ]
    assert chain[10:75] == model[10:75] and chain[::-1] == model[::-1]
    with pytest.raises(IndexError):
        chain[len(model)]
    with pytest.raises(IndexError):
        chain[-len(model) - 1]
    # equal to a tuple or a chain of the same lots, whatever the chunks; hashed as its lots
    other = LotChain([tuple(model[index : index + 1]) for index in range(len(model))])
    assert chain == other and chain == model and model == chain and hash(chain) == hash(other) == hash(model)
    assert chain != model[1:] and chain != other.lots()[:-1] and chain != list(model)
    assert pickle.loads(pickle.dumps(chain)) == chain
    assert pickle.loads(pickle.dumps(chain)).chunks == chain.chunks


@pytest.mark.parametrize("module", [compiled, twin], ids=["compiled", "twin"])
def test_a_chain_and_its_tuples_are_not_tracked_by_the_cyclic_collector(module):
    """Untracked when made (no young pass walks a new chunk's lots), where the collector's own pass
    would untrack the tuples only after walking them."""
    chain = module.spliced(module.chained(_lots(1, 100, random.Random(1))), 1, [], _lots(200, 3, random.Random(2)))
    assert not gc.is_tracked(chain) and not gc.is_tracked(chain.chunks)
    assert not any(map(gc.is_tracked, chain.chunks))
    # a spend and an earn at once (the first chunk and the last new), from a chain of many chunks
    lots = _lots(1, 300, random.Random(3))
    spent = module.spliced(module.chained(lots[:290]), 70, [lots[69].replace(amount=1)], lots[290:])
    assert spent == (lots[69].replace(amount=1), *lots[70:]) and type(spent) is LotChain
    assert not gc.is_tracked(spent.chunks) and not any(map(gc.is_tracked, spent.chunks))
    if module is compiled:  # (a tuple the twin builds is the collector's to untrack)
        assert not gc.is_tracked(module.spliced(chain, 90, [], []))  # the small form
    # a chunk holding something the collector tracks is left to it, and so is the tuple holding that chunk
    odd = LotChain([tuple(_lots(1, 40, random.Random(4))), ([],)])  # type: ignore[list-item]
    assert gc.is_tracked(odd.chunks[1]) and gc.is_tracked(odd.chunks) and not gc.is_tracked(odd.chunks[0])
    for grown in (module.spliced(odd, 0, [], [Lot(99, 1, 4, "shop")]), module.spliced(odd, 1, [], [])):
        assert type(grown) is LotChain and gc.is_tracked(grown.chunks)  # it holds a chunk the collector walks


@pytest.mark.parametrize("module", [compiled, twin], ids=["compiled", "twin"])
def test_a_splice_refuses_what_is_not_a_chain_or_passes_more_than_it_holds(module):
    small, chain = module.chained(_lots(1, 5, random.Random(1))), module.chained(_lots(1, 70, random.Random(1)))
    assert type(small) is tuple and type(chain) is LotChain
    with pytest.raises(ValueError, match="6 lots passed of 5"):
        module.spliced(small, 6, [], [])
    with pytest.raises(ValueError, match="71 lots passed of 70"):
        module.spliced(chain, 71, [], [])
    with pytest.raises(TypeError, match="a tuple of at most 64 or a LotChain, not tuple of 70"):
        module.spliced(tuple(chain), 1, [], [])
    with pytest.raises(TypeError, match="not list of 5"):
        module.spliced(list(small), 1, [], [])
    assert module.spliced(chain, 0, [], []) is chain and module.spliced(small, 0, [], []) is small  # no change
    assert module.spliced((), 0, [], []) == () and module.spliced(small, 5, [], []) == ()
    # a chain stays one down to CHAIN_LOTS_MIN lots (no change of form at every earn and spend about a chunk's)
    assert type(module.spliced(chain, 6, [], [])) is LotChain and type(module.spliced(chain, 38, [], [])) is tuple
    assert type(module.spliced(small, 0, [], chain)) is LotChain and type(module.chained(chain[:64])) is tuple


def test_a_chain_refuses_empty_or_oversized_chunks():
    lot = Lot(1, 1, 2, "shop")
    with pytest.raises(ValueError, match="1 to 64"):
        LotChain([()])
    with pytest.raises(ValueError, match="1 to 64"):
        LotChain([(lot,) * (CHUNK_LOTS_MAX + 1)])
    with pytest.raises(TypeError, match="a tuple"):
        LotChain([[lot]])
