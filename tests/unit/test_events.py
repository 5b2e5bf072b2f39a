"""The change feed's pure parts (processor/events.py, events_servicer.py, events_nats.py): cursors round
trip and refuse what the feed did not issue; the member's balance after each transaction of a batch is
walked back exactly from the fast path's final balance; filters; NATS subjects. No database: the reads
and the ordering are tested against Postgres in tests/integration/test_events.py."""

from __future__ import annotations

import datetime as dt
import types

import pytest

import fastpath
from points.v1 import events_pb2
from processor import events
from processor.domain import Code, Rejection
from processor.events_nats import subject
from processor.events_servicer import event_message, feed_filter


@pytest.mark.parametrize(
    "position", [events.START, events.Position(1, 0), events.Position(7, 3), events.Position(2**63 - 1, 2**63 - 1)]
)
def test_a_cursor_round_trips(position):
    assert events.decode_cursor(events.encode_cursor(position)) == position


def test_the_empty_cursor_is_the_start():
    assert events.decode_cursor("") == events.START


@pytest.mark.parametrize(
    "cursor", ["x", "c1", "c1.1", "c1.1.2.3", "c2.1.2", "c1.-1.0", "c1. 1.0", "c1.1.0 ", f"c1.{2**63}.0", "c1.a.b"]
)
def test_a_cursor_the_feed_did_not_issue_is_invalid_argument(cursor):
    with pytest.raises(Rejection) as raised:
        events.decode_cursor(cursor)
    assert raised.value.code is Code.INVALID_ARGUMENT
    assert raised.value.reason == "INVALID_CURSOR" and raised.value.field == "cursor"


def test_positions_order_transactions_before_the_member_events_recorded_after_them():
    transaction = events.Position(5, 0)
    member_event = events.Position(5, 9)  # recorded after transaction 5 committed
    next_transaction = events.Position(6, 0)
    assert transaction < member_event < next_transaction
    assert events.event_id(transaction) == "tx-5" and events.event_id(member_event) == "me-9"


def test_balances_after_walks_back_from_the_fast_paths_final_balance():
    ledger = fastpath.Ledger(16, 16, 16)
    ann = ledger.load_member("ann", 480, 10)  # the fast path after the whole batch
    ledger.load_member("bob", 70, 11)  # new in the batch
    assert ledger.balance(ann)[0] == 480
    write = types.SimpleNamespace(
        new_members=[("bob", 11)],
        transactions=[
            (101, 1, "shop", "ann", 100),
            (102, 3, "shop", "ann", 30),
            (103, 1, "shop", "bob", 50),
            (104, 14, "shop", "", 5),  # a merchant's voucher spend: no member
            (105, 11, "operator", "ann", 7),  # moves only vouchers of ann
            (106, 16, "shop", "ann", 20),  # ann gives bob 20 points (a transfer)
            (107, 1, "shop", "bob", 0),
        ],
        entries=[
            (101, 10, 100),
            (101, 900, -100),  # the merchant's side
            (102, 10, -30),
            (102, 901, 30),
            (103, 11, 50),
            (103, 900, -50),
            (104, 902, 5, "VOUCHERS"),
            (104, 903, -5, "VOUCHERS"),
            (105, 10, 7, "VOUCHERS"),  # not points: the points balance does not move
            (105, 904, -7, "VOUCHERS"),
            (106, 10, -20),
            (106, 11, 20),
        ],
    )
    assert events.balances_after(write, ledger) == {101: 530, 102: 500, 103: 50, 105: 500, 106: 480, 107: 70}


def test_a_merchant_keys_feed_is_its_merchants_transactions_only():
    caller = types.SimpleNamespace(kind="merchant", merchant_ids=frozenset({"shop"}))
    wanted = feed_filter(events_pb2.EventFilter(), caller)
    assert wanted.merchant_ids == {"shop"} and wanted.transactions and not wanted.member_events
    asked = feed_filter(events_pb2.EventFilter(types=[events_pb2.EVENT_TYPE_MEMBER_FROZEN]), caller)
    assert asked.types == {events.TRANSACTION} and not asked.member_events
    with pytest.raises(Rejection) as raised:
        feed_filter(events_pb2.EventFilter(merchant_ids=["other"]), caller)
    assert raised.value.code is Code.PERMISSION_DENIED and "other" in raised.value.message


def test_an_operator_sees_member_events_unless_it_filters_on_merchants():
    operator = types.SimpleNamespace(kind="operator", merchant_ids=frozenset())
    assert feed_filter(events_pb2.EventFilter(), operator).member_events
    assert not feed_filter(events_pb2.EventFilter(merchant_ids=["shop"]), operator).member_events
    only_frozen = feed_filter(events_pb2.EventFilter(types=[events_pb2.EVENT_TYPE_MEMBER_FROZEN]), operator)
    assert only_frozen.member_events and not only_frozen.transactions
    with pytest.raises(Rejection) as raised:
        feed_filter(events_pb2.EventFilter(types=[99]), operator)
    assert raised.value.code is Code.INVALID_ARGUMENT and raised.value.field == "filter.types"


def _transaction_event(merchant_id: str) -> events.FeedEvent:
    row = events.TransactionRow(7, 1, merchant_id, "ann", 100, 1000, 2, None, None, 100, 0, 530)
    return events.FeedEvent(events.Position(7, 0), events.TRANSACTION, "ann", dt.datetime.now(dt.timezone.utc), row)


def test_an_event_message_carries_the_transaction_and_the_balance_after():
    message = event_message(_transaction_event("shop"))
    assert message.event_id == "tx-7" and message.cursor == "c1.7.0"
    assert message.type == events_pb2.EVENT_TYPE_TRANSACTION
    assert message.transaction.transaction_id == "txn_7"
    assert message.transaction.member_balance_after_point_units == 530
    assert not message.transaction.authorization_id


def test_nats_subjects_name_the_merchant_or_the_member_event():
    assert subject(_transaction_event("shop-1")) == "points.events.shop-1"
    frozen = events.FeedEvent(
        events.Position(7, 2), events.FROZEN, "ann", dt.datetime.now(dt.timezone.utc), detail={"reason": "x"}
    )
    assert subject(frozen) == "points.members.frozen"
    assert event_message(frozen).member_frozen.frozen is True
