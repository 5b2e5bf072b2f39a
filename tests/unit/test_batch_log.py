"""The batch log's payload (processor/batch_log.py): a batch's BatchWrite must come back exactly from its
payload (until projected the log row is the only truth) — format 3 (all but the idempotency records,
which go in the batch's idempotency_batches row: processor/idempotency_records.py) for batches the state
machine makes and for random ones holding every kind of record, format 2 and format 1 (written by the
versions before, records included) for the same batches and for a payload such a version wrote — a
payload of another format is refused with a message that says what to do, and the format's fingerprint
moves with the dataclasses' fields."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import io
import operator
import pickle
import random
import time
from typing import Any

import orjson
import pytest

import fastpath._core
from processor import batch_log, domain, idempotency_records, rules
from processor.config import Settings
from processor.domain import Method, Operation
from processor.member_postings import MemberStatus, MemberWrite
from processor.program import EarnRecord, MemberRules, ProgramState, RulesWrite, SplitRecord, VoucherHold
from processor.state_machine import IdAllocator, LedgerStateMachine, Merchants
from processor.store import BatchWrite, MerchantRow, to_json

pytestmark = pytest.mark.timeout(60)

NOW = 1_800_000_000_000_000
DAY = 86_400 * 1_000_000
SHOP = MerchantRow(
    "shop",
    1,
    1_000,
    "active",
    issued_account_id=11,
    redeemed_account_id=12,
    fees_account_id=13,
    acquiring_account_id=14,
)
OPERATOR = {
    name: number
    for number, name in enumerate(
        (getattr(module, n) for module in (domain, rules) for n in dir(module) if n.startswith("ACCOUNT_OPERATOR_")),
        start=1,
    )
}


def machine_with_program() -> LedgerStateMachine:
    machine = LedgerStateMachine(Settings())
    machine.ledger = fastpath._core.Ledger(10_000, 10_000, 10_000)
    machine.merchants = Merchants([SHOP])
    machine.operator_accounts = dict(OPERATOR)
    machine.ids = IdAllocator(1, 1)
    machine.account_ids = list(range(1_000, 20_000))
    version = rules.ProgramVersion(
        "loyalty",
        1,
        0,
        levels=(rules.Level("member", 0), rules.Level("gold", 1_000, bonus_point_units=500)),
        expiry_period_us=DAY,
    )
    machine.program = ProgramState(rules.Program("loyalty", (version,)))
    return machine


_keys = iter(range(1, 10_000_000))


def operation(method: Method, **fields) -> Operation:
    return Operation(method, SHOP.merchant_id, SHOP.merchant_slot, f"key-{next(_keys)}", dict(fields), **fields)


def program_batches(operations: int) -> list[BatchWrite]:
    """Two batches of a program in force: earns reaching a level (bonus, lots), redeems, then expiry."""
    machine = machine_with_program()
    earns = [
        operation(Method.EARN, member_id=f"m{i % 500}", points=700, purchase_amount=7_000) for i in range(operations)
    ]
    _, first = machine.apply(earns, {}, NOW)
    machine.commit()
    redeems = [operation(Method.REDEEM, member_id=f"m{i % 500}", points=10) for i in range(operations)]
    _, second = machine.apply(redeems, {}, NOW + 2 * DAY)  # and the lots of the first batch expire
    machine.commit()
    return [first, second]


# --- format 1, as the versions before format 2 wrote it (processor/batch_log.py at de874fc) -----------


def _format_1_reducer(cls: type) -> Any:
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or hasattr(cls, "__post_init__"):
        return None
    fields = dataclasses.fields(cls)
    if not fields or not all(f.init for f in fields):
        return None
    values = operator.attrgetter(*(f.name for f in fields))
    if len(fields) == 1:
        return lambda obj: (cls, (values(obj),))
    return lambda obj: (cls, values(obj))


class _Format1Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        reducer = _format_1_reducer(type(obj))
        return NotImplemented if reducer is None else reducer(obj)


def encode_format_1(write: BatchWrite) -> bytes:
    buffer = io.BytesIO()
    _Format1Pickler(buffer, protocol=5).dump(write)
    return buffer.getvalue()


def encode_format_2(write: BatchWrite, memo: bool = False) -> bytes:
    """A format-2 payload as the versions before format 3 wrote it: format 3 with the records in it
    (and, with `memo`, as the versions before the memo-less pickling wrote it)."""
    values = list(batch_log._BATCH_GETTER(write))
    values[batch_log._RULES] = batch_log._pack_rules(values[batch_log._RULES])
    values[batch_log._MEMBERS] = batch_log._pack_members(values[batch_log._MEMBERS])
    if memo:
        return pickle.dumps(values, protocol=5)
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=5)
    pickler.fast = True
    pickler.dump(values)
    return buffer.getvalue()


def without_records(write: BatchWrite) -> BatchWrite:
    """What a format-3 payload decodes to: the batch without its idempotency records (in their row)."""
    return dataclasses.replace(write, idempotency=[])


def same_records(write: BatchWrite) -> None:
    """The batch's records come back from their idempotency_batches row's values, value for value."""
    row = idempotency_records.encode(write.idempotency)
    if not write.idempotency:
        assert row is None
        return
    assert row is not None and row.operations == len(write.idempotency)
    keys = idempotency_records.decode_keys(row.keys)
    methods, requests, outcomes, responses, messages = idempotency_records.decode_records(row.records)
    assert keys == [(r[0], r[1]) for r in write.idempotency]
    assert [
        (
            m,
            k,
            method,
            orjson.dumps(request).decode(),
            outcome,
            None if response is None else orjson.dumps(response).decode(),
            message,
        )
        for (m, k), method, request, outcome, response, message in zip(
            keys, methods, requests, outcomes, responses, messages
        )
    ] == [_texts(r) for r in write.idempotency]


def _texts(record: tuple) -> tuple:
    """A record with its request and response as JSON texts (the state machine records their values;
    their row holds them as store.to_json writes them)."""
    merchant_id, key, method, request, outcome, response, message = record
    if type(request) is not str:
        request, response = to_json(request), None if response is None else to_json(response)
    return (merchant_id, key, method, request, outcome, response, message)


# A payload de874fc's batch_log.encode wrote (format 1): SAMPLE_WRITE below, one record of each kind.
FORMAT_1_SAMPLE = base64.b64decode(
    """
gAWVMwUAAAAAAACMD3Byb2Nlc3Nvci5zdG9yZZSMCkJhdGNoV3JpdGWUk5QpgZR9lCiMCmNyZWF0ZWRfYXSUjAhkYXRldGltZZSMCGRhdGV0aW1l
lJOUQwoH6wEPCAAAAAAAlGgGjAh0aW1lem9uZZSTlGgGjAl0aW1lZGVsdGGUk5RLAEsASwCHlFKUhZRSlIaUUpSMC25ld19tZW1iZXJzlF2UjAJt
MJRN6AOGlGGMDHRyYW5zYWN0aW9uc5RdlChLB0sBjARzaG9wlGgWTbwCTVgbTk6MBWtleS0xlEsAdJRhjAdlbnRyaWVzlF2UKEsHTegDTbwCh5RL
B0sLSkT9//+HlGWMB3JlZnVuZHOUXZSMCW5ld19ob2xkc5RdlIwOcmVzb2x2ZWRfaG9sZHOUXZSMDWV4cGlyZWRfaG9sZHOUXZSMC2lkZW1wb3Rl
bmN5lF2UKGgaaBuMBEVhcm6UjBJ7Im1lbWJlcl9pZCI6Im0wIn2UjAJPS5SMDnsicG9pbnRzIjo3MDB9lIwAlHSUYYwFcnVsZXOUjBFwcm9jZXNz
b3IucHJvZ3JhbZSMClJ1bGVzV3JpdGWUk5QpgZROfZQojApwcm9ncmFtX2lklIwHbG95YWx0eZSMB21lbWJlcnOUfZRoFmgyjAtNZW1iZXJSdWxl
c5STlChOTomMBGdvbGSUSwJNvAJNYVFNvAKGlIWUdJRSlHOMBGxvdHOUfZRoFl2USwOKBwCAmCgXZQaGlGFdlIwPcHJvY2Vzc29yLnJ1bGVzlIwD
TG90lJOUKEsHTbwCigcA4G9GK2UGaBp0lFKUYYaUc4wIbmV3X2xvdHOUfZRoFo+UKEsHigcA4G9GK2UGhpSQc4wGcGllY2VzlH2USwJLCIaUaEko
SwNLBU5oGnSUUpSFlHOMCm5ld19waWVjZXOUj5QoaFOQjAdidWRnZXRzlH2UjAVlYXJuc5R9lEsHaDKMCkVhcm5SZWNvcmSUk5QoaBZoGksBaEdo
K5OUTVgCS2RoR4wFR3JhbnSUk5SMBXByb21vlGgaSzKHlFKUhZSHlFKUTksASwBLAXSUUpRzjAluZXdfZWFybnOUj5QoSweQjAt0aWVyX2V2ZW50
c5RdlIwGc3BsaXRzlH2USwloMowLU3BsaXRSZWNvcmSUk5QoaBZoGksDSwRLAUsAdJRSlHOMCm5ld19zcGxpdHOUj5SMEGRpdmlkZW5kc19wb3N0
ZWSUXZSMDXZvdWNoZXJfaG9sZHOUfZRLBWgyjAtWb3VjaGVySG9sZJSTlChoFmgaSwNLAUsCigcAgJgoF2UGSwFOdJRSlHN1hpRijAxuZXdfYWNj
b3VudHOUXZSME2xhc3RfdHJhbnNhY3Rpb25faWSUSwmMFWxhc3RfYXV0aG9yaXphdGlvbl9pZJRLBWg5jBlwcm9jZXNzb3IubWVtYmVyX3Bvc3Rp
bmdzlIwLTWVtYmVyV3JpdGWUk5QpgZROfZQojAthZGp1c3RtZW50c5RdlIwJcmV2ZXJzYWxzlF2UjAhzdGF0dXNlc5R9lCiMAm0xlGiDjAxNZW1i
ZXJTdGF0dXOUk5SMBmZyb3plbpSMBWZyYXVklIoHAICYKBdlBoeUUpSMAm0ylE51jAZldmVudHOUXZSMB2FsaWFzZXOUXZSMCmhvdXNlaG9sZHOU
XZSMC21lbWJlcnNoaXBzlF2UjAl0cmFuc2ZlcnOUXZSMBm1lcmdlc5RdlHWGlGKMFW1lbWJlcl9iYWxhbmNlc19hZnRlcpR9lEsHTbwCc3ViLg==
"""
)
SAMPLE_WRITE = BatchWrite(
    created_at=dt.datetime(2027, 1, 15, 8, 0, tzinfo=dt.timezone.utc),
    new_members=[("m0", 1000)],
    transactions=[(7, 1, "shop", "m0", 700, 7000, None, None, "key-1", 0)],
    entries=[(7, 1000, 700), (7, 11, -700)],
    idempotency=[("shop", "key-1", "Earn", '{"member_id":"m0"}', "OK", '{"points":700}', "")],
    rules=RulesWrite(
        program_id="loyalty",
        members={"m0": MemberRules(level="gold", levels_reached=2, qualifying=700, day_buckets=((20833, 700),))},
        lots={"m0": ([(3, 1_800_000_000_000_000)], [rules.Lot(7, 700, 1_800_086_400_000_000, "shop")])},
        new_lots={"m0": {(7, 1_800_086_400_000_000)}},
        pieces={(2, 8): (rules.Lot(3, 5, None, "shop"),)},
        new_pieces={(2, 8)},
        earns={
            7: EarnRecord("m0", "shop", 1, rules.Earn(600, 100, (rules.Grant("promo", "shop", 50),)), None, 0, 0, 1)
        },
        new_earns={7},
        splits={9: SplitRecord("m0", "shop", 3, 4, 1)},
        voucher_holds={5: VoucherHold("m0", "shop", 3, 1, 2, 1_800_000_000_000_000)},
    ),
    last_transaction_id=9,
    last_authorization_id=5,
    members=MemberWrite(statuses={"m1": MemberStatus("frozen", "fraud", 1_800_000_000_000_000), "m2": None}),
    member_balances_after={7: 700},
)


# --- random batches holding every kind of record ------------------------------------------------------


def random_write(rng: random.Random) -> BatchWrite:
    """A BatchWrite of random rows and records: every field of the writes and their records filled (or
    left empty, or None where a field may be), a record field often the same in every record (a packed
    column of one value) and equal values of two types (1 and True, 0 and False) side by side."""
    members = [f"member-{rng.randrange(50)}" for _ in range(rng.randrange(1, 30))]
    merchants = ["shop", "cafe", "merchant-7"]
    now_us = 1_800_000_000_000_000 + rng.randrange(10**12)
    ids = iter(range(rng.randrange(1, 10**6), 10**9))

    def some(make, most: int = 8) -> list:
        return [make() for _ in range(rng.choice((0, 1, rng.randrange(2, most + 1))))]

    def maybe(value: Any) -> Any:
        return value if rng.random() < 0.6 else None

    def number(upper: int = 10**6) -> int:
        # a bool now and then where an int goes: a column of equal values of two types must keep both
        return rng.choice((0, 1, True, False, rng.randrange(upper), -rng.randrange(upper)))

    def lot() -> rules.Lot:
        return rules.Lot(
            next(ids), number(), rng.choice((None, now_us, now_us + rng.randrange(10**10))), rng.choice(merchants)
        )

    def earn() -> rules.Earn:
        grants = tuple(
            rules.Grant(f"promo-{rng.randrange(3)}", rng.choice(merchants), number())
            for _ in range(rng.choice((0, 0, 1, 2)))
        )
        return rules.Earn(number(), number(), grants)

    def member_rules() -> MemberRules:
        days = tuple((20_000 + d, number()) for d in range(rng.choice((0, 0, 3))))
        return MemberRules(
            maybe(rng.choice(merchants)),
            maybe(rng.choice(members)),
            rng.random() < 0.5,
            rng.choice(("", "gold", "silver")),
            number(16),
            number(),
            days,
        )

    uniform = rng.random() < 0.3  # every record of a kind built alike: columns of one value
    fixed_earn = earn()
    rules_write = None
    if rng.random() < 0.8:
        rules_write = RulesWrite(
            program_id=rng.choice(("", "loyalty")),
            members={m: member_rules() for m in rng.sample(members, rng.randrange(len(members) + 1))},
            lots={
                m: (some(lambda: (next(ids), now_us)), some(lot))
                for m in rng.sample(members, rng.randrange(len(members) + 1))
            },
            new_lots={
                m: set(some(lambda: (next(ids), now_us))) for m in rng.sample(members, rng.randrange(len(members) + 1))
            },
            pieces={(rng.choice((1, 2)), next(ids)): tuple(some(lot, 3)) for _ in range(rng.randrange(5))},
            new_pieces=set(some(lambda: (2, next(ids)))),
            budgets={f"promo-{i}": number() for i in range(rng.randrange(3))},
            earns={
                next(ids): EarnRecord(
                    rng.choice(members),
                    rng.choice(merchants),
                    rng.choice((1, 2)),
                    fixed_earn if uniform else earn(),
                    maybe(rng.choice(merchants)),
                    number(),
                    number(),
                    now_us,
                )
                for _ in range(rng.randrange(20))
            },
            new_earns=set(some(lambda: next(ids))),
            tier_events=some(lambda: (next(ids), rng.choice(members), "silver", "gold")),
            splits={
                next(ids): SplitRecord(
                    rng.choice(members), rng.choice(merchants), number(), number(), number(), number()
                )
                for _ in range(rng.randrange(4))
            },
            new_splits=set(some(lambda: next(ids))),
            dividends_posted=some(lambda: (rng.randrange(9), "member", rng.choice(members), next(ids))),
            voucher_holds={
                next(ids): VoucherHold(
                    rng.choice(members),
                    rng.choice(merchants),
                    number(),
                    number(),
                    number(),
                    now_us,
                    rng.choice((1, 2, 3, 4)),
                    maybe(next(ids)),
                )
                for _ in range(rng.randrange(4))
            },
        )
    member_write = None
    if rng.random() < 0.4:
        member_write = MemberWrite(
            adjustments=some(lambda: (next(ids), rng.choice(members), number(), 1, "note", "key-1")),
            reversals=some(lambda: (next(ids), next(ids), 2, "", "key-2")),
            statuses={
                m: maybe(MemberStatus(rng.choice(("frozen", "closed")), "fraud", now_us))
                for m in rng.sample(members, min(len(members), rng.randrange(4)))
            },
            events=some(lambda: (rng.choice(members), "merged", {"into": rng.choice(members), "points": number()})),
            aliases=some(lambda: (f"alias-{rng.randrange(9)}", maybe(rng.choice(members)))),
            households=some(lambda: (f"household-{rng.randrange(9)}", rng.choice(members))),
            memberships=some(lambda: (rng.choice(members), maybe(f"household-{rng.randrange(9)}"))),
            transfers=some(lambda: (next(ids), rng.choice(members), rng.choice(members), number(), number())),
            merges=some(lambda: (rng.choice(members), rng.choice(members), maybe(next(ids)), number())),
        )
    return BatchWrite(
        created_at=dt.datetime.fromtimestamp(now_us / 1e6, dt.timezone.utc),
        new_members=some(lambda: (rng.choice(members), next(ids))),
        transactions=some(
            lambda: (
                next(ids),
                rng.randrange(1, 9),
                rng.choice(merchants),
                rng.choice(members),
                number(),
                maybe(number()),
                maybe(next(ids)),
                maybe(next(ids)),
                f"key-{next(ids)}",
                number(),
            )
        ),
        entries=some(
            lambda: rng.choice(((next(ids), next(ids), number()), (next(ids), next(ids), number(), "VOUCHER")))
        ),
        refunds=some(lambda: (next(ids), number())),
        new_holds=some(
            lambda: (next(ids), rng.choice(merchants), rng.choice(members), number(), now_us, f"key-{next(ids)}")
        ),
        resolved_holds=some(lambda: (next(ids), rng.choice((2, 3, 4)), number(), maybe(next(ids)))),
        expired_holds=some(lambda: next(ids)),
        idempotency=some(
            lambda: (rng.choice(merchants), f"key-{next(ids)}", "Earn", '{"points":1}', "OK", maybe('{"a":1}'), "")
        ),
        rules=rules_write,
        new_accounts=some(lambda: (next(ids), "voucher", rng.choice(members), "VOUCHER")),
        last_transaction_id=next(ids),
        last_authorization_id=next(ids),
        members=member_write,
        member_balances_after={next(ids): number() for _ in range(rng.randrange(4))},
    )


def same(decoded: BatchWrite, write: BatchWrite) -> None:
    """Equal field for field, and every value of the same type as the one written (1 is not True)."""
    assert decoded is not write
    assert decoded == write
    assert _typed(decoded) == _typed(write)


def _typed(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return (type(value).__name__, tuple(_typed(getattr(value, f.name)) for f in dataclasses.fields(value)))
    if type(value) in (rules.Lot, rules.Grant, rules.Earn, EarnRecord, MemberRules):  # fastpath/records.pyx
        return (type(value).__name__, tuple(_typed(getattr(value, name)) for name in type(value)._fields))
    if isinstance(value, dict):
        return (dict, sorted((repr(_typed(k)), repr(_typed(v))) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return (type(value), sorted(repr(_typed(v)) for v in value))
    if isinstance(value, (list, tuple)):
        return (type(value), [_typed(v) for v in value])
    return (type(value), value)


# --- the tests ----------------------------------------------------------------------------------------


def test_a_program_batch_comes_back_from_its_payload_field_for_field():
    for write in program_batches(200):
        assert write.transactions and write.entries and write.idempotency and write.rules is not None
        same(batch_log.decode(7, batch_log.FORMAT_VERSION, batch_log.encode(write)), without_records(write))
        same_records(write)


def test_random_batches_with_every_kind_of_record_come_back_from_both_formats():
    rng = random.Random(14)
    kinds = {
        name: 0 for name in ("members", "lots", "pieces", "earns", "grants", "splits", "voucher_holds", "statuses")
    }
    for _ in range(400):
        write = random_write(rng)
        same(batch_log.decode(3, 3, batch_log.encode(write)), without_records(write))
        same_records(write)
        same(batch_log.decode(3, 2, encode_format_2(write)), write)
        same(batch_log.decode(3, 1, encode_format_1(write)), write)
        if write.rules is not None:
            for name in ("members", "lots", "pieces", "earns", "splits", "voucher_holds"):
                kinds[name] += bool(getattr(write.rules, name))
            kinds["grants"] += any(r.earn.grants for r in write.rules.earns.values())
        if write.members is not None:
            kinds["statuses"] += None in write.members.statuses.values() and len(write.members.statuses) > 1
    assert min(kinds.values()) >= 20, kinds  # every kind of record was there, many times


def test_a_payload_the_previous_version_wrote_still_decodes():
    # a log left unprojected by a version before format 2 projects after the upgrade
    assert batch_log.FORMATS_READ == (1, 2, 3)
    same(batch_log.decode(5, 1, FORMAT_1_SAMPLE), SAMPLE_WRITE)
    same(batch_log.decode(5, 1, encode_format_1(SAMPLE_WRITE)), SAMPLE_WRITE)
    same(batch_log.decode(5, 2, encode_format_2(SAMPLE_WRITE)), SAMPLE_WRITE)
    same(batch_log.decode(5, 3, batch_log.encode(SAMPLE_WRITE)), without_records(SAMPLE_WRITE))


def test_a_format_2_payload_pickles_no_class_but_the_batch_time():
    # every record goes as columns of plain values: a class pickled in it would be rebuilt by its
    # __reduce__ or __init__, one Python call per record (what format 2 is for)
    rng = random.Random(2)
    for write in program_batches(50) + [SAMPLE_WRITE] + [random_write(rng) for _ in range(50)]:
        classes: set[tuple[str, str]] = set()

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                classes.add((module, name))
                return super().find_class(module, name)

        Unpickler(io.BytesIO(batch_log.encode(write))).load()
        assert classes <= {("datetime", "datetime"), ("datetime", "timezone"), ("datetime", "timedelta")}


def test_a_payload_of_another_format_is_refused_with_what_to_do():
    payload = batch_log.encode(BatchWrite(created_at=None))  # type: ignore[arg-type]
    for version in (0, batch_log.FORMAT_VERSION + 1):
        with pytest.raises(batch_log.BatchLogFormatError) as refused:
            batch_log.decode(42, version, payload)
        message = str(refused.value)
        assert "batch 42" in message and f"format {version}" in message and "formats 1, 2" in message
        assert "not projected" in message and "upgrade" in message


def test_a_payload_that_is_not_a_batch_write_is_refused():
    with pytest.raises(batch_log.BatchLogFormatError):
        batch_log.decode(1, 1, pickle.dumps({"not": "a batch"}))
    with pytest.raises(batch_log.BatchLogFormatError):
        batch_log.decode(1, 2, pickle.dumps({"not": "a batch"}))
    with pytest.raises(batch_log.BatchLogFormatError):
        batch_log.decode(1, 2, encode_format_1(SAMPLE_WRITE))  # format 1 read as format 2


def test_the_format_fingerprint_pins_the_fields_of_the_writes_and_their_records():
    # Changing a field of BatchWrite, RulesWrite, MemberWrite or a record class they hold changes what a
    # payload holds: bump batch_log.FORMAT_VERSION, set FIELDS_FINGERPRINT to the new value and drop (or
    # convert) the older formats in FORMATS_READ: both rebuild records by field position, so an
    # unprojected tail written with the old fields is then refused at start, with a message, not misread
    assert batch_log.fields_fingerprint() == batch_log.FIELDS_FINGERPRINT


def test_the_log_row_names_the_batch_transaction_range_and_operation_count():
    first, second = program_batches(50)
    assert batch_log.transaction_range(first) == (first.transactions[0][0], first.transactions[-1][0])
    assert batch_log.transaction_range(first)[1] < batch_log.transaction_range(second)[0]
    assert batch_log.operation_count(first) == 50
    assert batch_log.transaction_range(BatchWrite(created_at=None)) == (None, None)  # type: ignore[arg-type]


def test_encoding_cost_per_operation_is_reported():
    """Not an assertion of time (the machine is shared): prints what docs/DESIGN.md quotes."""
    batches = program_batches(1_000)
    operations = sum(batch_log.operation_count(b) for b in batches)
    started = time.perf_counter()
    payloads = [batch_log.encode(b) for b in batches for _ in range(5)]
    encode_us = (time.perf_counter() - started) / (5 * operations) * 1e6
    started = time.perf_counter()
    for payload in payloads:
        batch_log.decode(1, batch_log.FORMAT_VERSION, payload)
    decode_us = (time.perf_counter() - started) / (5 * operations) * 1e6
    size = sum(len(p) for p in payloads[::5]) / operations
    print(f"\nbatch log payload: encode {encode_us:.2f} µs/op, decode {decode_us:.2f} µs/op, {size:.0f} bytes/op")
    assert size > 0
