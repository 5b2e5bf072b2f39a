"""processor/rules_rows.py: the program rules' rows of consecutive batches coalesced to each row's latest
state, as a projection of several batches writes them (Store._write_many). No database: what the rows
do in Postgres is tests/integration/test_rules_group_write.py's."""

from __future__ import annotations

import datetime as dt

from processor import rules
from processor.program import EarnRecord, MemberRules, RulesWrite
from processor.rules_rows import coalesce

AT = [dt.datetime(2026, 12, 6, 3, 0, second, tzinfo=dt.timezone.utc) for second in range(5)]
EXPIRES = 1_900_000_000_000_000


def test_one_batch_is_its_own_rows():
    lot, changed = rules.Lot(1, 10, EXPIRES, "shop"), rules.Lot(2, 5, EXPIRES, "shop")
    r = RulesWrite(
        program_id="p",
        members={"m": MemberRules(acquirer_id="shop", qualifying=3), "n": MemberRules(qualifying=1)},
        lots={"m": ([(3, EXPIRES)], [lot, changed])},
        new_lots={"m": {(1, EXPIRES)}},
        budgets={"promo": 4},
    )
    rows = coalesce([(r, AT[0])])
    assert rows.members is r.members and rows.pieces is r.pieces and rows.earns is r.earns
    assert rows.linked_at == {"m": AT[0]}
    assert rows.lots_gone == [("m", 3, EXPIRES)]
    assert rows.lots_created == [("m", 1, EXPIRES, "shop", 10)]
    assert rows.lots_changed == [("m", 2, EXPIRES, "shop", 5)]
    assert rows.budgets == {"p": {"promo": 4}}


def test_a_member_changed_in_three_batches_ends_with_the_thirds_state():
    states = [MemberRules(level="registered", qualifying=q) for q in (10, 20, 30)]
    rows = coalesce([(RulesWrite(program_id="p", members={"m": s}), at) for s, at in zip(states, AT)])
    assert rows.members == {"m": states[2]}
    assert rows.linked_at == {}


def test_a_links_time_is_the_first_batch_with_the_link():
    writes = [
        (RulesWrite(program_id="p", members={"m": MemberRules(qualifying=1)}), AT[0]),
        (RulesWrite(program_id="p", members={"m": MemberRules(acquirer_id="shop", qualifying=2)}), AT[1]),
        (RulesWrite(program_id="p", members={"m": MemberRules(acquirer_id="shop", qualifying=3)}), AT[2]),
    ]
    assert coalesce(writes).linked_at == {"m": AT[1]}


def test_a_lot_consumed_in_one_batch_and_restored_in_the_next_is_upserted():
    lot = rules.Lot(7, 50, EXPIRES, "shop")  # from before the group
    rows = coalesce(
        [
            (RulesWrite(program_id="p", lots={"m": ([(7, EXPIRES)], [])}), AT[0]),
            (RulesWrite(program_id="p", lots={"m": ([], [lot])}), AT[1]),
        ]
    )
    assert rows.lots_gone == [] and rows.lots_created == []
    assert rows.lots_changed == [("m", 7, EXPIRES, "shop", 50)]


def test_a_lot_created_and_consumed_within_the_group_is_never_written():
    lot = rules.Lot(8, 50, EXPIRES, "shop")
    rows = coalesce(
        [
            (RulesWrite(program_id="p", lots={"m": ([], [lot])}, new_lots={"m": {(8, EXPIRES)}}), AT[0]),
            (RulesWrite(program_id="p", lots={"m": ([], [rules.Lot(8, 20, EXPIRES, "shop")])}), AT[1]),
            (RulesWrite(program_id="p", lots={"m": ([(8, EXPIRES)], [])}), AT[2]),
        ]
    )
    assert rows.lots_gone == rows.lots_created == rows.lots_changed == []


def test_a_lot_created_then_changed_is_inserted_with_its_last_amount():
    rows = coalesce(
        [
            (
                RulesWrite(
                    program_id="p",
                    lots={"m": ([], [rules.Lot(9, 50, EXPIRES, "shop")])},
                    new_lots={"m": {(9, EXPIRES)}},
                ),
                AT[0],
            ),
            (RulesWrite(program_id="p", lots={"m": ([], [rules.Lot(9, 20, EXPIRES, "shop")])}), AT[1]),
        ]
    )
    assert rows.lots_created == [("m", 9, EXPIRES, "shop", 20)] and rows.lots_changed == rows.lots_gone == []


def test_pieces_earns_and_budgets_keep_the_latest_and_know_what_the_group_created():
    piece = rules.Lot(1, 5, EXPIRES, "shop")
    earn = EarnRecord("m", "shop", 1, rules.Earn(100), acquirer_id=None, acquiring=0)
    rows = coalesce(
        [
            (
                RulesWrite(
                    program_id="p",
                    pieces={(2, 10): (piece,), (1, 3): ()},
                    new_pieces={(2, 10)},
                    earns={10: earn},
                    new_earns={10},
                    budgets={"a": 1},
                ),
                AT[0],
            ),
            (
                RulesWrite(
                    program_id="p",
                    pieces={(2, 10): ()},
                    earns={10: earn.replace(refunded_base=30), 4: earn.replace(refunded_base=60)},
                    budgets={"a": 2, "b": 1},
                ),
                AT[1],
            ),
            (RulesWrite(program_id="q", budgets={"a": 9}), AT[2]),
        ]
    )
    assert rows.pieces == {(2, 10): (), (1, 3): ()} and rows.pieces_new == {(2, 10)}
    assert rows.earns == {10: earn.replace(refunded_base=30), 4: earn.replace(refunded_base=60)}
    assert rows.earns_new == {10}  # inserted with its refund so far; 4's refunded_base updated
    assert rows.budgets == {"p": {"a": 2, "b": 1}, "q": {"a": 9}}
