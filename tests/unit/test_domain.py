"""Pure domain rules: earn rounding, id formats, the per-merchant token bucket."""

import pytest

from processor import domain


@pytest.mark.parametrize(
    "purchase,bps,points",
    [
        (12_345, 1000, 1234),
        (100_000, 2000, 20_000),
        (1, 300, 0),
        (33, 300, 0),
        (34, 300, 1),
        (10**13, 2000, 2 * 10**12),
    ],
)
def test_earn_rounds_down_to_the_point_unit(purchase, bps, points):
    assert domain.earn_point_units(purchase, bps) == points


def test_ids_round_trip_and_reject_foreign_forms():
    assert domain.parse_transaction_id(domain.format_transaction_id(42)) == 42
    assert domain.parse_authorization_id(domain.format_authorization_id(7)) == 7
    for bad in ("", "txn_", "txn_-1", "auth_1", "txn_1x", "txn_" + "9" * 19, "txn_١٢", "txn_01", "txn_00"):
        with pytest.raises(domain.Rejection) as raised:
            domain.parse_transaction_id(bad)
        assert raised.value.code is domain.Code.INVALID_ARGUMENT


def test_token_bucket_allows_the_burst_then_the_rate():
    buckets = domain.TokenBuckets(rate=10.0, burst=3)
    assert [buckets.take("m", 100.0) for _ in range(4)] == [True, True, True, False]
    assert buckets.take("other", 100.0)  # buckets are per merchant
    assert not buckets.take("m", 100.05)  # half a token refilled
    assert buckets.take("m", 100.2)  # enough for one more
    assert domain.TokenBuckets(rate=0, burst=1).take("m", 0.0)  # 0 = no limit


def test_differing_field_names_the_first_field_that_differs():
    assert (
        domain.differing_field({"points": 5, "member_id": "a"}, "Redeem", {"points": 6, "member_id": "a"}, "Redeem")
        == "points"
    )
    assert domain.differing_field({"points": 5}, "Redeem", {"points": 5}, "Authorize") == "method"
    assert domain.differing_field({"points": 5}, "Redeem", {"points": 5}, "Redeem") is None
