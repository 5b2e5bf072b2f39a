"""state_machine._check_balanced: the check every batch passes before it is written (entries of each
transaction sum to zero per asset), kept equal to the plain per-(transaction, asset) sum it replaced."""

import random

import pytest

import fastpath._core
import fastpath._reference

from processor import domain
from processor.domain import InvariantViolation
from processor.state_machine import _check_balanced
from processor.store import BatchWrite


def _write(entries: list[tuple]) -> BatchWrite:
    write = BatchWrite(created_at=None)  # type: ignore[arg-type]
    write.entries = entries
    return write


def _reference(entries: list[tuple]) -> str | None:
    """The message of the first unbalanced (transaction, asset), or None when all balance."""
    sums: dict[tuple[int, str], int] = {}
    for entry in entries:
        if not entry[1] > 0:
            return f"transaction {entry[0]} posts to an account without an id"
        key = (entry[0], entry[3] if len(entry) > 3 else domain.ASSET_POINTS)
        sums[key] = sums.get(key, 0) + entry[2]
    unbalanced = [key for key, total in sums.items() if total]
    return None if not unbalanced else "unbalanced"


def test_balanced_entries_pass_with_points_named_or_not():
    _check_balanced(_write([(1, 10, 5), (1, 11, -5), (2, 10, 7), (2, 12, -3, domain.ASSET_POINTS), (2, 13, -4)]))
    _check_balanced(_write([(3, 10, 2, "VOUCHERS"), (3, 14, -2, "VOUCHERS"), (3, 10, 1), (3, 15, -1)]))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([(1, 10, 5), (1, 11, -4)], "transaction 1 entries of POINTS sum to 1"),
        (
            [(1, 10, 5), (1, 11, -5, domain.ASSET_POINTS), (1, 12, 1, domain.ASSET_POINTS)],
            "transaction 1 entries of POINTS sum to 1",
        ),
        ([(4, 10, 5), (4, 11, -5), (4, 12, 3, "VOUCHERS")], "transaction 4 entries of VOUCHERS sum to 3"),
        ([(5, 0, 5), (5, 11, -5)], "transaction 5 posts to an account without an id"),
    ],
)
def test_an_unbalanced_batch_is_refused_with_its_transaction_and_asset(entries, message):
    with pytest.raises(InvariantViolation, match=message):
        _check_balanced(_write(entries))


def test_it_agrees_with_the_plain_sum_on_random_entries():
    rng = random.Random(14)
    for _ in range(500):
        entries: list[tuple] = []
        for transaction_id in range(rng.randrange(1, 6)):
            for _ in range(rng.randrange(1, 5)):
                amount = rng.randrange(-3, 4)
                account_id = rng.randrange(0 if rng.random() < 0.02 else 1, 5)
                asset = rng.choice([None, None, domain.ASSET_POINTS, "VOUCHERS"])
                entries.append(
                    (transaction_id, account_id, amount)
                    if asset is None
                    else (transaction_id, account_id, amount, asset)
                )
        rng.shuffle(entries)
        expected = _reference(entries)
        if expected is None:
            _check_balanced(_write(entries))
        else:
            with pytest.raises(InvariantViolation):
                _check_balanced(_write(entries))


@pytest.mark.parametrize("module", [fastpath._core, fastpath._reference], ids=["compiled", "twin"])
def test_the_compiled_check_and_its_twin_agree_with_the_plain_sum(module):
    # entries of a transaction adjacent (as batches write them) or apart, amounts near int64's bounds
    rng = random.Random(15)
    for _ in range(1_000):
        entries: list[tuple] = []
        for transaction_id in range(rng.randrange(1, 6)):
            legs = [rng.choice([rng.randrange(-3, 4), rng.choice([1, -1]) * (2**62 - rng.randrange(3))])]
            for _ in range(rng.randrange(0, 4)):
                legs.append(-legs[-1] if rng.random() < 0.7 else rng.randrange(-3, 4))
            for amount in legs:
                account_id = rng.randrange(0 if rng.random() < 0.01 else 1, 5)
                asset = rng.choice([None, None, None, domain.ASSET_POINTS, "VOUCHERS"])
                entries.append(
                    (transaction_id, account_id, amount)
                    if asset is None
                    else (transaction_id, account_id, amount, asset)
                )
        if rng.random() < 0.3:
            rng.shuffle(entries)
        expected = _reference(entries)
        problem = module.Ledger.unbalanced_entries(entries, domain.ASSET_POINTS)
        assert (problem is None) == (expected is None), (entries, problem)
        if expected is not None and expected != "unbalanced":
            assert problem == expected


@pytest.mark.parametrize("module", [fastpath._core, fastpath._reference], ids=["compiled", "twin"])
def test_sums_past_int64_are_exact(module):
    big = 2**62
    assert (
        module.Ledger.unbalanced_entries([(1, 10, big), (1, 11, big), (1, 12, -big), (1, 13, -big)], "POINTS") is None
    )
    assert (
        module.Ledger.unbalanced_entries([(1, 10, big), (1, 11, big), (1, 12, big), (1, 13, -big)], "POINTS")
        == f"transaction 1 entries of POINTS sum to {2 * big}"
    )
