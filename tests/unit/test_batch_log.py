"""The batch log's payload (processor/batch_log.py): a batch's BatchWrite, pickled, must come back
exactly (until projected the log row is the only truth), a payload of another format is refused with a
message that says what to do, and the format's fingerprint moves with the dataclasses' fields."""

from __future__ import annotations

import dataclasses
import pickle
import time

import pytest

import fastpath._core
from processor import batch_log, domain, rules
from processor.config import Settings
from processor.domain import Method, Operation
from processor.program import ProgramState
from processor.state_machine import IdAllocator, LedgerStateMachine, Merchants
from processor.store import BatchWrite, MerchantRow

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


def test_a_program_batch_comes_back_from_its_payload_field_for_field():
    for write in program_batches(200):
        assert write.transactions and write.entries and write.idempotency and write.rules is not None
        decoded = batch_log.decode(7, batch_log.FORMAT_VERSION, batch_log.encode(write))
        assert decoded is not write
        assert dataclasses.asdict(decoded) == dataclasses.asdict(write)
        assert decoded == write


def test_a_payload_of_another_format_is_refused_with_what_to_do():
    payload = batch_log.encode(BatchWrite(created_at=None))  # type: ignore[arg-type]
    with pytest.raises(batch_log.BatchLogFormatError) as refused:
        batch_log.decode(42, batch_log.FORMAT_VERSION + 1, payload)
    message = str(refused.value)
    assert "batch 42" in message and "not projected" in message and "upgrade" in message


def test_a_payload_that_is_not_a_batch_write_is_refused():
    with pytest.raises(batch_log.BatchLogFormatError):
        batch_log.decode(1, batch_log.FORMAT_VERSION, pickle.dumps({"not": "a batch"}))


def test_the_format_fingerprint_pins_the_fields_of_the_write_dataclasses():
    # Changing a field of BatchWrite, RulesWrite or MemberWrite changes what a payload holds: bump
    # batch_log.FORMAT_VERSION and set FIELDS_FINGERPRINT to the new value (an unprojected tail written
    # by the old version is then refused at start, with a message, rather than misread)
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
