"""The ledger state machine's state, read from Postgres at a start or a resync: the fast path's balances
and open holds, the program rules' state, and the decoders of the rows a batch prefetches."""

from __future__ import annotations

import collections
import json

import fastpath
from processor import domain, rules, velocity
from processor.config import Settings
from processor.presence_store import PresenceStore
from processor.program import EarnRecord, MemberRules, ProgramState, VoucherHold
from processor.state_machine import Merchants
from processor.store import NEVER_US, Store, from_micros, micros


async def load_ledger(store: Store, settings: Settings, merchants: Merchants, now_us: int):
    """Rebuilds the fast path from Postgres: every member's posted balance and every open hold."""
    ledger = fastpath.Ledger(settings.members_max, settings.holds_max, settings.transactions_resident_max)
    async for chunk in store.member_balances():
        for member_id, balance, account_id in chunk:
            ledger.load_member(member_id, balance, account_id)
    for hold in await store.open_holds(from_micros(now_us)):
        ledger.load_hold(
            hold.authorization_id,
            ledger.member_slot(hold.member_id),
            merchants.by_id[hold.merchant_id].merchant_slot,
            hold.amount,
            hold.expires_at_us,
            fastpath.HOLD_OPEN,
        )
    ledger.check_invariants()
    return ledger


async def load_program(store: Store, settings: Settings, now_us: int) -> ProgramState:
    """The program's versions and the rules' state (links, tiers, lots, consumed pieces, budgets)."""
    state = ProgramState(await store.program(settings.program_id))
    rows = await store.program_state(settings.program_id)
    for r in rows["members"]:
        buckets = tuple(sorted((int(day), amount) for day, amount in json.loads(r["day_buckets"]).items()))
        state.load_member(
            r["member_id"],
            MemberRules(
                r["acquirer_id"],
                r["referrer_id"],
                r["referral_paid"],
                r["level"],
                r["levels_reached"],
                r["qualifying_point_units"],
                buckets,
            ),
        )
    lots: dict[str, list] = collections.defaultdict(list)
    for r in rows["lots"]:
        lots[r["member_id"]].append(rules.Lot(r["lot_id"], r["amount"], r["expires_at_us"], r["issuer_id"]))
    for member_id, member_lots in lots.items():
        state.load_lots(member_id, tuple(sorted(member_lots, key=rules._order)))
    pieces: dict[tuple[int, int], list] = collections.defaultdict(list)
    for r in rows["pieces"]:
        expires = None if r["expires_at_us"] == NEVER_US else r["expires_at_us"]
        pieces[(r["owner_kind"], r["owner_id"])].append(rules.Lot(r["lot_id"], r["amount"], expires, r["issuer_id"]))
    for owner, owner_pieces in pieces.items():
        state.load_pieces(owner, tuple(owner_pieces))
    state.granted = {r["promotion_id"]: r["granted"] for r in rows["budgets"]}
    vouchers = await store.voucher_state(settings.program_id)
    for r in vouchers["accounts"]:
        kind, owner, balance = r["kind"], r["owner_id"], r["balance"]
        state.voucher_accounts[(kind, owner)] = r["account_id"]
        if kind == domain.ACCOUNT_MEMBER:
            state.vouchers[(rules.HOLDER_MEMBER, owner)] = balance
        elif kind == rules.ACCOUNT_MERCHANT_VOUCHERS:
            state.vouchers[(rules.HOLDER_MERCHANT, owner)] = balance
        elif kind == rules.ACCOUNT_MEMBER_VOUCHER_CREDIT and balance:
            state.credit[owner] = -balance
        elif kind == rules.ACCOUNT_MERCHANT_VOUCHER_CREDIT and balance:  # issue 16
            state.merchant_credit[owner] = -balance
        elif kind == rules.ACCOUNT_MERCHANT_POINTS and balance:  # issue 16
            state.merchant_points[owner] = balance
    for r in await store.voucher_holds():
        state.load_voucher_hold(r["authorization_id"], voucher_hold(r))
    for member_id, at_us, points in await PresenceStore(store).spends_since(now_us - velocity.WINDOW_US_MAX):
        state.load_spend(member_id, points, at_us)
    state.rounds = vouchers["rounds"][0]["round_number"] if vouchers["rounds"] else 0
    state.dividends_unposted = vouchers["unposted"] > 0
    return state


def voucher_hold(r) -> VoucherHold:
    return VoucherHold(
        r["member_id"],
        r["merchant_id"],
        r["vouchers"],
        r["from_credit"],
        r["points"],
        r["expires_at_us"],
        r["status"],
        r["transaction_id"],
    )


def earn_record(r) -> EarnRecord:
    grants = tuple(rules.Grant(p, sponsor, amount) for p, sponsor, amount in json.loads(r["grants"]))
    return EarnRecord(
        r["member_id"],
        r["merchant_id"],
        r["program_version"],
        rules.Earn(r["base_point_units"], r["uplift_point_units"], grants),
        r["acquirer_id"],
        r["acquiring_point_units"],
        r["refunded_base_point_units"],
        micros(r["created_at"]),
    )
