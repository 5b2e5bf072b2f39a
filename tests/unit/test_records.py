"""The per-earn records (fastpath/records.pyx: Lot, Grant, Earn, EarnRecord) and MemberRules behave as the
frozen slots dataclasses they replaced — construction, equality, hash, repr, immutability, replace, pickling, no
ordering — and the cyclic garbage collector does not track them, nor the tuples that hold only them, nor
what a run of the state machine with the program in force keeps of them."""

from __future__ import annotations

import copy
import dataclasses
import gc
import pickle
import random
from typing import Any

import pytest

from processor import rules
from processor.program import NO_RULES, EarnRecord, MemberRules
from tests.unit.test_batch_log import DAY, NOW, machine_with_program, operation
from processor.domain import Method

pytestmark = pytest.mark.timeout(120)


# --- the dataclasses as they were (processor/rules.py and processor/program.py before the compiled ones) ---


@dataclasses.dataclass(frozen=True, slots=True)
class Lot:
    lot_id: int
    amount: int
    expires_at_us: int | None
    issuer_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    promotion_id: str
    sponsor_id: str
    amount: int


@dataclasses.dataclass(frozen=True, slots=True)
class Earn:
    base: int
    uplift: int = 0
    grants: tuple[Grant, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Record:  # EarnRecord (named so in its repr below)
    member_id: str
    merchant_id: str
    version: int
    earn: Earn
    acquirer_id: str | None
    acquiring: int
    refunded_base: int = 0
    made_at_us: int = 0


Record.__qualname__ = "EarnRecord"


@dataclasses.dataclass(frozen=True, slots=True)
class Rules:  # MemberRules (named so in its repr below)
    acquirer_id: str | None = None
    referrer_id: str | None = None
    referral_paid: bool = False
    level: str = ""
    levels_reached: int = 0
    qualifying: int = 0
    day_buckets: tuple[tuple[int, int], ...] = ()


Rules.__qualname__ = "MemberRules"
PAIRS = [(rules.Lot, Lot), (rules.Grant, Grant), (rules.Earn, Earn), (EarnRecord, Record), (MemberRules, Rules)]


def _values(rng: random.Random, compiled: type) -> tuple[Any, ...]:
    """Field values for `compiled` (nested records built as the compiled classes)."""

    def number() -> Any:
        return rng.choice((0, 1, True, -5, 2**63 - 1, rng.randrange(10**9)))

    def grant() -> Any:
        return rules.Grant(rng.choice(("promo", "p2")), rng.choice(("shop", "operator")), number())

    if compiled is rules.Lot:
        return (number(), number(), rng.choice((None, 0, 1_800_000_000_000_000)), rng.choice(("", "shop")))
    if compiled is rules.Grant:
        made = grant()
        return made.promotion_id, made.sponsor_id, number()
    if compiled is rules.Earn:
        return number(), number(), tuple(grant() for _ in range(rng.randrange(3)))
    if compiled is MemberRules:
        days = tuple((20_000 + d, number()) for d in range(rng.choice((0, 0, 3))))
        some = rng.choice((None, "shop", "m2"))
        return (
            some,
            rng.choice((None, "m3")),
            rng.choice((True, False, 0, 1)),
            rng.choice(("", "gold")),
            number(),
            number(),
            days,
        )
    earn = rules.Earn(number(), number(), tuple(grant() for _ in range(rng.randrange(3))))
    return ("m1", "shop", rng.choice((1, 2)), earn, rng.choice((None, "cafe")), number(), number(), number())


def _as_dataclass(value: Any) -> Any:
    """The dataclass twin of a compiled record (its nested records too)."""
    for compiled, dataclass in PAIRS:
        if type(value) is compiled:
            return dataclass(*(_as_dataclass(getattr(value, name)) for name in compiled._fields))
    if type(value) is tuple:
        return tuple(map(_as_dataclass, value))
    return value


@pytest.mark.parametrize(("compiled", "dataclass"), PAIRS, ids=[c.__name__ for c, _ in PAIRS])
def test_a_record_has_the_dataclass_fields_in_order(compiled, dataclass):
    assert compiled._fields == tuple(f.name for f in dataclasses.fields(dataclass)) == compiled.__match_args__
    assert compiled.__name__ == dataclass.__qualname__


@pytest.mark.parametrize(("compiled", "dataclass"), PAIRS, ids=[c.__name__ for c, _ in PAIRS])
def test_equality_hash_and_repr_are_the_dataclasses(compiled, dataclass):
    rng = random.Random(14)
    made = [compiled(*_values(rng, compiled)) for _ in range(300)]
    made += [compiled(*(getattr(m, n) for n in compiled._fields)) for m in made[:50]]  # equal, not the same
    for a in made[:80]:
        twin_a = _as_dataclass(a)
        assert hash(a) == hash(twin_a)
        assert repr(a) == repr(twin_a)
        for b in made:
            twin_b = _as_dataclass(b)
            assert (a == b) is (twin_a == twin_b)
            assert (a != b) is (twin_a != twin_b)
    value = made[0]
    assert value != tuple(getattr(value, n) for n in compiled._fields)  # another type: never equal
    assert value.__eq__(object()) is NotImplemented
    with pytest.raises(TypeError):
        value < value  # no ordering, as the dataclasses (eq without order)


def test_construction_by_position_or_keyword_with_the_same_defaults():
    assert rules.Earn(5) == rules.Earn(base=5, uplift=0, grants=())
    assert rules.Earn(5).total == 5
    earn = rules.Earn(10, 3, (rules.Grant("p", "shop", 2), rules.Grant("q", "operator", 4)))
    assert earn.total == 19 == Earn(10, 3, (Grant("p", "shop", 2), Grant("q", "operator", 4))).base + 9
    record = EarnRecord("m", "shop", 1, earn, None, 0)
    assert (record.refunded_base, record.made_at_us) == (0, 0)
    assert MemberRules() == NO_RULES and _as_dataclass(NO_RULES) == Rules()
    assert MemberRules(level="gold", qualifying=5) == MemberRules(None, None, False, "gold", 0, 5, ())
    assert record == EarnRecord(
        member_id="m", merchant_id="shop", version=1, earn=earn, acquirer_id=None, acquiring=0, made_at_us=0
    )
    lot = rules.Lot(lot_id=7, amount=5, expires_at_us=None, issuer_id="shop")
    assert lot.key == (7, None) and lot.live(NOW)
    assert rules.Lot(7, 5, NOW, "shop").key == (7, NOW) and not rules.Lot(7, 5, NOW, "shop").live(NOW)
    for call in (
        lambda: rules.Lot(1, 2, 3),
        lambda: rules.Grant("p", "s"),
        lambda: EarnRecord("m", "s", 1, earn, None),
    ):
        with pytest.raises(TypeError):
            call()
    with pytest.raises(TypeError):
        rules.Lot(1, 2, 3, "s", 5)
    with pytest.raises(TypeError):
        rules.Lot(1, 2, 3, issuer="s")


@pytest.mark.parametrize("compiled", [c for c, _ in PAIRS], ids=[c.__name__ for c, _ in PAIRS])
def test_a_record_is_frozen(compiled):
    value = compiled(*_values(random.Random(3), compiled))
    for name in compiled._fields:
        with pytest.raises(AttributeError):
            setattr(value, name, 0)
        with pytest.raises(AttributeError):
            delattr(value, name)
    with pytest.raises(AttributeError):
        value.other = 1


@pytest.mark.parametrize("compiled", [c for c, _ in PAIRS], ids=[c.__name__ for c, _ in PAIRS])
def test_replace_is_dataclasses_replace(compiled):
    rng = random.Random(5)
    value = compiled(*_values(rng, compiled))
    other = compiled(*_values(rng, compiled))
    twin = _as_dataclass(value)
    assert value.replace() == value and value.replace() is not value
    for name in compiled._fields:
        changed = value.replace(**{name: getattr(other, name)})
        expected = dataclasses.replace(twin, **{name: _as_dataclass(getattr(other, name))})
        assert _as_dataclass(changed) == expected and type(changed) is compiled
        assert getattr(changed, name) is getattr(other, name)
    with pytest.raises(TypeError):
        value.replace(not_a_field=1)
    with pytest.raises(TypeError):
        value.replace(getattr(other, compiled._fields[0]))  # keyword only


@pytest.mark.parametrize("compiled", [c for c, _ in PAIRS], ids=[c.__name__ for c, _ in PAIRS])
def test_a_record_pickles_and_copies_as_an_equal_value_of_the_same_types(compiled):
    value = compiled(*_values(random.Random(8), compiled))
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(value, protocol=protocol))
        assert back == value and type(back) is compiled
        assert [type(getattr(back, n)) for n in compiled._fields] == [type(getattr(value, n)) for n in compiled._fields]
    assert copy.copy(value) == value and copy.deepcopy(value) == value


def test_the_collector_tracks_neither_the_records_nor_the_tuples_of_them():
    grants = (rules.Grant("p", "shop", 2), rules.Grant("q", "operator", 4))
    earn = rules.Earn(10, 3, grants)
    made = [
        rules.Lot(1, 5, None, "shop"),
        rules.Lot(2, 5, NOW, "shop").replace(amount=4),
        *grants,
        earn,
        EarnRecord("m", "shop", 1, earn, None, 0),
        EarnRecord("m", "shop", 1, earn, None, 0).replace(refunded_base=3),
        MemberRules(level="gold", day_buckets=((20_000, 5),)),
        NO_RULES.replace(qualifying=7),
    ]
    assert not any(map(gc.is_tracked, made))
    lots = tuple(value for value in made if type(value) is rules.Lot)
    gc.collect()  # a tuple holding only untracked objects is untracked at the collector's next pass
    assert not gc.is_tracked(lots) and not gc.is_tracked(grants)
    # what the dataclasses were: tracked, each of them
    assert gc.is_tracked(Lot(1, 5, None, "shop")) and gc.is_tracked(Earn(1))


def test_what_a_program_run_keeps_per_earn_is_untracked():
    # the state machine with a program in force (the kernel's path for plain earns and redeems, and the
    # rules' own path for refunds and expiry): its lots, pieces and earn records are compiled values, and
    # after a collection the members' tuples of lots are untracked too
    machine = machine_with_program()
    earns = [operation(Method.EARN, member_id=f"m{i % 50}", points=700, purchase_amount=7_000) for i in range(400)]
    machine.apply(earns, {}, NOW)
    machine.commit()
    redeems = [operation(Method.REDEEM, member_id=f"m{i % 50}", points=10) for i in range(100)]
    machine.apply(redeems, {}, NOW + DAY // 2)
    machine.commit()
    program = machine.program
    assert program is not None and program.earns and program.lots and program.pieces
    kept = [*program.earns.values(), *(lot for lots in program.lots.values() for lot in lots)]
    kept += [piece for pieces in program.pieces.values() for piece in pieces]
    kept += list(program.members.values())
    assert {type(value) for value in kept} == {EarnRecord, rules.Lot, MemberRules}
    assert not any(map(gc.is_tracked, kept))
    assert not any(gc.is_tracked(record.earn) for record in program.earns.values())
    gc.collect()
    assert not any(map(gc.is_tracked, program.lots.values()))
    assert not any(map(gc.is_tracked, program.pieces.values()))
