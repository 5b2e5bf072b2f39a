"""The alliance report's attribution of redemptions to issuers (processor/reports.py): first in, first
out; a refund of an earn takes its merchant's own points first; a refund of a redemption puts back the
pieces it took, last taken first, never more than was taken."""

from __future__ import annotations

import collections
import datetime as dt

from processor import kinds, reports


def queue(*lots):
    return collections.deque([list(lot) for lot in lots])


def test_a_spend_takes_the_oldest_points_first_across_issuers():
    q = queue(("a", 100), ("b", 50), ("c", 10))
    assert reports._take(q, 120, None) == [["a", 100], ["b", 20]]
    assert list(q) == [["b", 30], ["c", 10]]


def test_a_refund_of_an_earn_takes_its_merchants_points_first():
    q = queue(("a", 100), ("b", 50), ("b", 20))
    assert reports._take(q, 60, "b") == [["b", 50], ["b", 10]]
    assert [lot for lot in q if lot[1]] == [["a", 100], ["b", 10]]


def test_more_than_the_points_held_is_shown_unattributed():
    q = queue(("a", 10))
    assert reports._take(q, 15, None) == [["a", 10], [reports.UNATTRIBUTED, 5]]
    assert not q


def test_refunds_put_back_the_pieces_taken_last_first_and_never_more():
    q = queue(("a", 100), ("b", 100))
    pieces = reports._take(q, 150, None)  # a 100, b 50
    reports._restore(q, pieces, 60, "shop")  # b 50 back, then a 10
    assert list(q) == [["a", 10], ["b", 50], ["b", 50]]
    reports._restore(q, pieces, 90, "shop")  # what is left of the redemption: a 90
    assert list(q)[0] == ["a", 90]
    assert pieces == []
    reports._restore(q, pieces, 5, "shop")  # beyond what was taken: the refunding merchant's, shown
    assert list(q)[0] == ["shop", 5]


def _row(member, transaction_id, kind, merchant_id, amount, original=None, original_kind=None, original_merchant=None):
    return {
        "owner_id": member,
        "transaction_id": transaction_id,
        "kind": kind,
        "merchant_id": merchant_id,
        "original_transaction_id": original,
        "created_at": dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc),
        "amount": amount,
        "original_kind": original_kind,
        "original_merchant_id": original_merchant,
    }


EARN, REDEEM = kinds.BY_NAME["earn"].code, kinds.BY_NAME["redeem"].code


def test_the_operators_reversal_of_a_redemption_gives_its_points_back_to_their_issuers():
    """The points a reversed redemption returns are still the issuers' in later flows, not the operator's."""
    attribution = reports.Attribution(0)
    for row in (
        _row("m", 1, EARN, "issuer-a", 100),
        _row("m", 2, REDEEM, "shop-x", -60),
        _row("m", 3, kinds.KIND_REVERSAL_CREDIT, "operator", 60, 2, REDEEM, "shop-x"),
        _row("m", 4, REDEEM, "shop-y", -100),
    ):
        attribution.add(row)
    assert dict(attribution.flows) == {("issuer-a", "shop-x"): 60, ("issuer-a", "shop-y"): 100}


def test_the_operators_reversal_of_an_earn_takes_that_earns_merchants_points_first():
    attribution = reports.Attribution(0)
    for row in (
        _row("m", 1, EARN, "issuer-a", 100),
        _row("m", 2, EARN, "issuer-b", 40),
        _row("m", 3, kinds.KIND_REVERSAL_DEBIT, "operator", -40, 2, EARN, "issuer-b"),
        _row("m", 4, REDEEM, "shop-y", -100),
    ):
        attribution.add(row)
    assert dict(attribution.flows) == {("issuer-a", "shop-y"): 100}
