"""The one table of transaction kinds (processor/kinds.py) against the proto enum, the fast path's and
the rules' constants, and the table in docs/RULES.md."""

from __future__ import annotations

import pathlib
import re

import pytest

import fastpath
from points.v1 import points_pb2 as pb
from processor import domain, kinds, rules

RULES_MD = pathlib.Path(__file__).resolve().parents[2] / "docs" / "RULES.md"
ROW = re.compile(r"^\| (\d+) \| `(\w+)` \| ([+−0]) \|", re.M)
SIGN = {"+": 1, "−": -1, "0": 0}


def test_every_proto_kind_has_one_row_and_every_row_a_proto_kind():
    enum = {v.number: v.name for v in pb.TransactionKind.DESCRIPTOR.values if v.number}
    assert {k.code: "TRANSACTION_KIND_" + k.name.upper() for k in kinds.KINDS} == enum


def test_the_constants_elsewhere_are_the_tables_numbers():
    assert kinds.BY_NAME["earn"].code == fastpath.KIND_EARN
    assert kinds.BY_NAME["refund_of_earn"].code == fastpath.KIND_REFUND_EARN
    for name in (
        "expiry",
        "tier_bonus",
        "referral_bonus",
        "acquiring_reward",
        "acquiring_reversal",
        "dividend",
        "split_redeem",
        "split_refund",
        "merchant_voucher_spend",
        "conversion",
        # issue 16, the seed systems
        "merchant_match",
        "merchant_match_reversal",
        "signup_bonus",
        "fan_reward",
        "fan_reward_reversal",
    ):
        assert kinds.BY_NAME[name].code == getattr(rules, "KIND_" + name.upper()), name


def test_rules_md_lists_every_kind_with_its_number_name_and_member_sign():
    rows = [(int(n), name, SIGN[sign]) for n, name, sign in ROW.findall(RULES_MD.read_text())]
    assert rows == [(k.code, k.name, k.member_sign) for k in kinds.KINDS]


def test_program_kinds_have_shapes_over_known_account_kinds_and_refunds_their_labels():
    assert set(kinds.SHAPED) == {k.code for k in kinds.KINDS if k.code > fastpath.KIND_REFUND_EARN}
    for shape in kinds.SHAPED.values():
        for pair in shape.accounts:
            account, asset = pair.split("/")
            assert asset in rules.ACCOUNT_ASSETS[account], pair
    assert kinds.REFUNDS == {fastpath.KIND_REFUND_REDEMPTION: "redemption", fastpath.KIND_REFUND_EARN: "earn"}


def test_an_unknown_kind_is_an_invariant_violation_not_a_key_error():
    with pytest.raises(domain.InvariantViolation):
        kinds.kind(99)
