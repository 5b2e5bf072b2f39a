"""The program rules' posting paths of the ledger state machine, apart from its batch loop and the earn
paths: the posting helpers (_post, _credit, _move_member, _voucher_account, _entries), merchants' dividends
and voucher spends, split tender (redeem, authorize, resolve, refund, with their voucher holds and
_restore_hold), lot expiry, conversion and linking.

PostingsMixin is a base of LedgerStateMachine (processor/state_machine.py) and holds no state of its own:
each method takes the state machine as self and works on its ledger, program state, merchants and ids.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import fastpath
from processor import domain, metrics, rules
from processor.domain import Code, Method, Operation, Outcome, Rejection, require
from processor.program import OWNER_HOLD, OWNER_TRANSACTION, EarnRecord, SplitRecord, VoucherHold
from processor.outcomes import ledger_rejection
from processor.machine_parts import MachineParts
from processor.store import BatchWrite, from_micros

if TYPE_CHECKING:
    from processor.store import MerchantRow


class PostingsMixin(MachineParts):
    """The posting paths of LedgerStateMachine; see the module's docstring."""

    def _post(
        self,
        write: BatchWrite,
        kind: int,
        merchant_id: str,
        member_id: str,
        amount: int,
        entries: list[tuple[Any, ...]],
        key: str,
        version: "rules.ProgramVersion | None",
        original: int | None = None,
    ) -> int:
        """A transaction the rules set off (not a merchant's request): its row and entries, each
        (account_id, amount) in points or (account_id, amount, asset)."""
        created = self.ids.transaction()
        write.transactions.append(
            (
                created,
                kind,
                merchant_id,
                member_id,
                amount,
                None,
                None,
                original,
                key,
                0,
                version.version if version is not None else None,
            )
        )
        _entries(write, created, entries)
        return created

    def _voucher_account(self, write: BatchWrite, kind: str, owner: str) -> int:
        """The id of a voucher account (member, member_voucher_credit, merchant_vouchers, merchant_redeemed
        or merchant_voucher_credit in VOUCHERS), opened in this batch if it is new."""
        return self._rule_account(write, kind, owner, rules.ASSET_VOUCHERS)

    def _rule_account(self, write: BatchWrite, kind: str, owner: str, asset: str) -> int:
        """The id of an account a rule opens when it first moves it (voucher accounts; a merchant's
        merchant_points in POINTS, issue 16), in this batch if it is new; (kind, owner) -> id, loaded at
        start-up (each such kind holds one asset)."""
        account_id = self.program.voucher_accounts.get((kind, owner))
        if account_id is None:
            account_id = self.account_ids.pop()
            write.new_accounts.append((account_id, kind, owner, asset))
            self.program.set_voucher_account((kind, owner), account_id)
        return account_id

    # --- the seed systems' rules (issue 16; docs/RULES.md section 11) ---

    def _signup(self, write: BatchWrite, op: Operation, version: "rules.ProgramVersion | None", now_us: int) -> None:
        """Seed 003: the sign-up bonus of a member this operation enrols (kind 29), credited before the
        operation itself, as a lot of its own; the member is created once, so it is paid once."""
        if version is None or not version.signup_bonus_point_units:
            return
        self._credit(
            write,
            rules.KIND_SIGNUP_BONUS,
            op.merchant_id,
            op.member_id,
            version.signup_bonus_point_units,
            self.operator_accounts[rules.ACCOUNT_OPERATOR_SIGNUP_BONUSES],
            f"signup:{op.member_id}",
            version,
            now_us,
        )

    def _match(self, write: BatchWrite, op: Operation, version: "rules.ProgramVersion", base: int, earn_id: int) -> int:
        """众店: the earn's merchant receives merchant_match_bps of the member's base points (kind 27),
        funded by the operator, into its merchant_points holding. Returns the point-units matched."""
        match = rules.merchant_match(version, base)
        if match:
            self._post(
                write,
                rules.KIND_MERCHANT_MATCH,
                op.merchant_id,
                op.member_id,
                match,
                [
                    (self.operator_accounts[rules.ACCOUNT_OPERATOR_MERCHANT_MATCH], -match),
                    (
                        self._rule_account(write, rules.ACCOUNT_MERCHANT_POINTS, op.merchant_id, domain.ASSET_POINTS),
                        match,
                    ),
                ],
                f"match:{earn_id}",
                version,
                original=earn_id,
            )
            self.program.move_merchant_points(op.merchant_id, match)
        return match

    def _reverse_match(
        self,
        write: BatchWrite,
        version: "rules.ProgramVersion | None",
        record: EarnRecord | None,
        member_id: str,
        base_points: int,
        earn_id: int,
        refund_id: int,
    ) -> None:
        """The proportional reversal of an earn's merchant match (kind 28) when `base_points` of it are
        refunded, under the version the earn was made under (record: the earn's, before this refund)."""
        if version is None or record is None:
            return
        match = rules.merchant_match(version, record.earn.base)
        reversal = rules.merchant_match_reversal(match, record.earn.base, record.refunded_base, base_points)
        if reversal:
            self._post(
                write,
                rules.KIND_MERCHANT_MATCH_REVERSAL,
                record.merchant_id,
                member_id,
                reversal,
                [
                    (self.operator_accounts[rules.ACCOUNT_OPERATOR_MERCHANT_MATCH], reversal),
                    (
                        self._rule_account(
                            write, rules.ACCOUNT_MERCHANT_POINTS, record.merchant_id, domain.ASSET_POINTS
                        ),
                        -reversal,
                    ),
                ],
                f"match-reversal:{refund_id}",
                version,
                original=earn_id,
            )
            self.program.move_merchant_points(record.merchant_id, -reversal)

    def _fan_reward(
        self,
        write: BatchWrite,
        version: "rules.ProgramVersion",
        acquirer: str,
        member_id: str,
        reward: int,
        earn_id: int,
    ) -> None:
        """众店: the acquirer's share of its fan's spend in vouchers (kind 30), from operator_fan_rewards; what
        the merchant owes is repaid first, the rest goes to its vouchers."""
        program, vouchers = self.program, rules.ASSET_VOUCHERS
        repaid, paid_out = rules.apply_dividend(program.merchant_credit.get(acquirer, 0), reward)
        self._post(
            write,
            rules.KIND_FAN_REWARD,
            acquirer,
            member_id,
            reward,
            [
                (self.operator_accounts[rules.ACCOUNT_OPERATOR_FAN_REWARDS], -reward, vouchers),
                (
                    self._voucher_account(write, rules.ACCOUNT_MERCHANT_VOUCHER_CREDIT, acquirer) if repaid else 0,
                    repaid,
                    vouchers,
                ),
                (
                    self._voucher_account(write, rules.ACCOUNT_MERCHANT_VOUCHERS, acquirer) if paid_out else 0,
                    paid_out,
                    vouchers,
                ),
            ],
            f"fan-reward:{earn_id}",
            version,
            original=earn_id,
        )
        program.move_merchant_credit(acquirer, -repaid)
        program.move_vouchers((rules.HOLDER_MERCHANT, acquirer), paid_out)

    def _fan_reward_reversal(
        self,
        write: BatchWrite,
        version: "rules.ProgramVersion | None",
        acquirer: str,
        member_id: str,
        reversal: int,
        earn_id: int,
        refund_id: int,
    ) -> None:
        """The proportional reversal of a fan reward (kind 31): from the vouchers the acquirer holds, and
        what it already spent becomes vouchers it owes (repaid first out of the next it receives)."""
        program, vouchers = self.program, rules.ASSET_VOUCHERS
        from_held = min(reversal, program.vouchers.get((rules.HOLDER_MERCHANT, acquirer), 0))
        owed = reversal - from_held
        self._post(
            write,
            rules.KIND_FAN_REWARD_REVERSAL,
            acquirer,
            member_id,
            reversal,
            [
                (self.operator_accounts[rules.ACCOUNT_OPERATOR_FAN_REWARDS], reversal, vouchers),
                (
                    self._voucher_account(write, rules.ACCOUNT_MERCHANT_VOUCHERS, acquirer) if from_held else 0,
                    -from_held,
                    vouchers,
                ),
                (
                    self._voucher_account(write, rules.ACCOUNT_MERCHANT_VOUCHER_CREDIT, acquirer) if owed else 0,
                    -owed,
                    vouchers,
                ),
            ],
            f"fan-reward-reversal:{refund_id}",
            version,
            original=earn_id,
        )
        program.move_vouchers((rules.HOLDER_MERCHANT, acquirer), -from_held)
        program.move_merchant_credit(acquirer, owed)

    def _sale_fee(
        self,
        write: BatchWrite,
        transaction_id: int,
        merchant: MerchantRow,
        version: "rules.ProgramVersion",
        purchase_amount: int,
    ) -> int:
        """Seed 000: the operator's fee on the sale amount of an earn (fee_sale_bps), less the merchant's
        star rebate, posted in the earn: merchant's fees account to fee revenue. Returns it."""
        fee = rules.sale_fee(version, purchase_amount)
        fee -= rules.star_fee_rebate(version, merchant.merchant_id, fee)
        if fee:
            write.entries.append((transaction_id, merchant.fees_account_id, -fee))
            write.entries.append((transaction_id, self.operator_accounts[domain.ACCOUNT_OPERATOR_FEE_REVENUE], fee))
        return fee

    def _post_dividends(self, write: BatchWrite, rows: list[Any], now_us: int) -> None:
        """Posts a chunk of a decided round's allocations: one kind-11 transaction per holder; a member's
        vouchers repay its voucher credit first."""
        program, vouchers = self.program, rules.ASSET_VOUCHERS
        funding = self.operator_accounts[rules.ACCOUNT_OPERATOR_DIVIDENDS]
        version = program.version(now_us)
        for r in rows:
            number, holder_kind, holder, amount = r["round_number"], r["holder_kind"], r["holder_id"], r["amount"]
            entries = [(funding, -amount, vouchers)]
            if holder_kind == rules.HOLDER_MEMBER:
                repaid, paid_out = rules.apply_dividend(program.credit.get(holder, 0), amount)
                if repaid:
                    entries.append(
                        (self._voucher_account(write, rules.ACCOUNT_MEMBER_VOUCHER_CREDIT, holder), repaid, vouchers)
                    )
                    program.move_credit(holder, -repaid)
                if paid_out:
                    entries.append((self._voucher_account(write, domain.ACCOUNT_MEMBER, holder), paid_out, vouchers))
                    program.move_vouchers((rules.HOLDER_MEMBER, holder), paid_out)
                merchant_id, member_id = domain.OPERATOR_ID, holder
            else:
                # vouchers a merchant owes (issue 16: spent on credit, or fan rewards reversed) are repaid first
                repaid, paid_out = rules.apply_dividend(program.merchant_credit.get(holder, 0), amount)
                if repaid:
                    entries.append(
                        (self._voucher_account(write, rules.ACCOUNT_MERCHANT_VOUCHER_CREDIT, holder), repaid, vouchers)
                    )
                    program.move_merchant_credit(holder, -repaid)
                if paid_out:
                    entries.append(
                        (self._voucher_account(write, rules.ACCOUNT_MERCHANT_VOUCHERS, holder), paid_out, vouchers)
                    )
                    program.move_vouchers((rules.HOLDER_MERCHANT, holder), paid_out)
                merchant_id, member_id = holder, ""
            created = self._post(
                write,
                rules.KIND_DIVIDEND,
                merchant_id,
                member_id,
                amount,
                entries,
                f"dividend:{number}:{holder_kind}:{holder}",
                version,
            )
            program.dividend_posted(number, holder_kind, holder, created)

    def _split_redeem(
        self,
        op: Operation,
        write: BatchWrite,
        now_us: int,
        version: "rules.ProgramVersion | None",
        slot: int,
        created: int,
    ) -> Outcome:
        """A redeem paid with vouchers (the member's own first, then its voucher credit) and points."""
        program, ledger, member_id = self.program, self.ledger, op.member_id
        posted, held = ledger.balance(slot)
        # vouchers and credit reserved by open split-tender holds are not spendable
        _, from_credit = rules.voucher_sources(
            program.voucher_available(member_id), program.credit_headroom(version, member_id, posted), op.vouchers
        )
        if op.points:
            self._expire_member(write, member_id, now_us)
            status, slot, amount, posted, available, kind = self._kernel_one(op, slot, op.points, 0, created, 0, now_us)
            if status != fastpath.OK:
                return self._applied(op, write, now_us, created, status, slot, amount, posted, available, kind)
            program.consume(member_id, (OWNER_TRANSACTION, created), op.points, available + op.points, now_us)
        self._post_split(op, write, version, created, slot, member_id, op.points, op.vouchers, from_credit, None)
        posted, held = ledger.balance(slot)
        return Outcome(
            Code.OK,
            {
                "transaction_id": created,
                "points": op.points,
                "balance": posted,
                "available": posted - held,
                "vouchers": op.vouchers,
                "voucher_balance": program.vouchers.get((rules.HOLDER_MEMBER, member_id), 0),
                "voucher_credit_used": program.credit.get(member_id, 0),
            },
        )

    def _post_split(
        self,
        op: Operation,
        write: BatchWrite,
        version: "rules.ProgramVersion | None",
        created: int,
        slot: int,
        member_id: str,
        points: int,
        vouchers: int,
        from_credit: int,
        authorization_id: int | None,
    ) -> None:
        """A SPLIT_REDEEM (kind 12) of a redeem or a capture whose points the kernel has taken: `vouchers`
        of which `from_credit` on the member's credit, the rest its own; the fee on both tenders (a
        voucher-unit is worth a point-unit to the merchant, which is owed both in clearing); its record
        for refunds."""
        program, merchant, asset = self.program, self.merchants.by_id[op.merchant_id], rules.ASSET_VOUCHERS
        from_balance = vouchers - from_credit
        fee = self._fee(write, created, merchant, points + vouchers, "fee_redeemed_bps")
        write.transactions.append(
            (
                created,
                rules.KIND_SPLIT_REDEEM,
                op.merchant_id,
                member_id,
                points + vouchers,
                None,
                authorization_id,
                None,
                op.idempotency_key,
                fee,
                version.version if version is not None else None,
            )
        )
        _entries(
            write,
            created,
            [
                (self.ledger.member_account(slot), -points),
                (merchant.redeemed_account_id, points),
                (
                    self._voucher_account(write, domain.ACCOUNT_MEMBER, member_id) if from_balance else 0,
                    -from_balance,
                    asset,
                ),
                (
                    self._voucher_account(write, rules.ACCOUNT_MEMBER_VOUCHER_CREDIT, member_id) if from_credit else 0,
                    -from_credit,
                    asset,
                ),
                (
                    self._voucher_account(write, domain.ACCOUNT_MERCHANT_REDEEMED, op.merchant_id) if vouchers else 0,
                    vouchers,
                    asset,
                ),
            ],
        )
        program.move_vouchers((rules.HOLDER_MEMBER, member_id), -from_balance)
        program.move_credit(member_id, from_credit)
        program.split(created, SplitRecord(member_id, op.merchant_id, vouchers, points, from_credit), new=True)

    def _split_authorize(
        self,
        op: Operation,
        write: BatchWrite,
        now_us: int,
        version: "rules.ProgramVersion | None",
        slot: int,
        created: int,
        expires: int,
    ) -> Outcome:
        """A split-tender hold: vouchers (the member's own first, then its credit) reserved beside an
        ordinary hold of the points, under one authorization id. Nothing is posted until the capture."""
        program, ledger, member_id = self.program, self.ledger, op.member_id
        if len(program.voucher_holds) >= self.settings.holds_max:  # the same bound as the fast path's holds
            return ledger_rejection(fastpath.CAPACITY, op)
        posted, held = ledger.balance(slot)
        from_balance, from_credit = rules.voucher_sources(
            program.voucher_available(member_id), program.credit_headroom(version, member_id, posted), op.vouchers
        )
        available = posted - held
        if op.points:
            self._expire_member(write, member_id, now_us)
            status, slot, amount, posted, available, kind = self._kernel_one(
                op, slot, op.points, 0, created, expires, now_us
            )
            if status != fastpath.OK:
                return self._applied(op, write, now_us, created, status, slot, amount, posted, available, kind)
            program.consume(member_id, (OWNER_HOLD, created), amount, available + amount, now_us)
            write.new_holds.append(
                (created, op.merchant_id, member_id, op.points, from_micros(expires), op.idempotency_key)
            )
        program.hold_vouchers(
            created, VoucherHold(member_id, op.merchant_id, op.vouchers, from_credit, op.points, expires)
        )
        return Outcome(
            Code.OK,
            {
                "authorization_id": created,
                "available": available,
                "points": op.points,
                "expires_at_us": expires,
                "vouchers": op.vouchers,
                "voucher_available": program.voucher_available(member_id),
            },
        )

    def _split_resolve(
        self,
        op: Operation,
        write: BatchWrite,
        now_us: int,
        version: "rules.ProgramVersion | None",
        created: int,
        hold: VoucherHold,
    ) -> Outcome:
        """Capture or void of a split-tender hold. A capture takes the points and vouchers asked (both 0:
        the whole hold), each up to its held part, the own vouchers before the credit, and posts them as
        one SPLIT_REDEEM (refunded as one unit); the rest is released."""
        program, ledger, authorization_id = self.program, self.ledger, op.authorization_id
        refusal = _HOLD_REFUSAL.get(hold.status)
        if hold.merchant_id != op.merchant_id:
            refusal = fastpath.WRONG_MERCHANT
        elif refusal is None and hold.expires_at_us <= now_us:
            refusal = fastpath.HOLD_EXPIRED
            program.resolve_voucher_hold(authorization_id, fastpath.HOLD_STATUS_EXPIRED)
            if hold.points:  # the fast path marks its part expired and the lots come back
                outcome = self._applied(
                    op,
                    write,
                    now_us,
                    created,
                    *self._kernel_one(
                        op, ledger.member_slot(hold.member_id), 0, authorization_id, 0, 0, now_us, Method.VOID
                    ),
                )
                self._restore_hold(authorization_id, now_us)
                return outcome
        if refusal is not None:
            return ledger_rejection(refusal, op, expires_at_us=hold.expires_at_us)
        capture = op.method is Method.CAPTURE
        points, vouchers = (op.points, op.vouchers) if op.points or op.vouchers else (hold.points, hold.vouchers)
        if capture and (points > hold.points or vouchers > hold.vouchers):
            metrics.rejections.labels("capture_exceeds_hold").inc()
            return Outcome(
                Code.FAILED_PRECONDITION,
                reason="capture_exceeds_hold",
                message=(
                    f"capture of {points} point-units and {vouchers} voucher-units exceeds the {hold.points} point-units "
                    f"and {hold.vouchers} voucher-units held by {domain.format_authorization_id(authorization_id)}"
                ),
            )
        if not capture:
            points = vouchers = 0
        member_id = hold.member_id
        slot = ledger.member_slot(member_id)
        posted, held = ledger.balance(slot)
        available = posted - held
        grace = version.restore_grace_us if version is not None else 0
        if hold.points:
            kernel = Method.CAPTURE if points else Method.VOID
            status, slot, amount, posted, available, kind = self._kernel_one(
                op, slot, points, authorization_id, created if points else 0, 0, now_us, kernel
            )
            if status != fastpath.OK:  # the fast path's copy of the hold disagrees: refuse, change nothing
                return self._applied(op, write, now_us, created, status, slot, amount, posted, available, kind)
            released = hold.points - points
            program.restore(
                member_id,
                (OWNER_HOLD, authorization_id),
                released if points else None,
                available - released,
                now_us,
                grace,
                keep_as=(OWNER_TRANSACTION, created) if points else None,
            )
            write.resolved_holds.append(
                (
                    authorization_id,
                    fastpath.HOLD_STATUS_CAPTURED if capture else fastpath.HOLD_STATUS_VOIDED,
                    points,
                    created if capture else None,
                )
            )
        if not capture:
            program.resolve_voucher_hold(authorization_id, fastpath.HOLD_STATUS_VOIDED)
            return Outcome(
                Code.OK, {"released": hold.points, "available": available, "vouchers_released": hold.vouchers}
            )
        program.resolve_voucher_hold(authorization_id, fastpath.HOLD_STATUS_CAPTURED, created)
        from_credit = vouchers - min(hold.from_balance, vouchers)  # own vouchers before credit
        self._post_split(op, write, version, created, slot, member_id, points, vouchers, from_credit, authorization_id)
        posted, held = ledger.balance(slot)
        return Outcome(
            Code.OK,
            {
                "transaction_id": created,
                "points": points,
                "released": hold.points - points,
                "balance": posted,
                "available": posted - held,
                "vouchers": vouchers,
                "vouchers_released": hold.vouchers - vouchers,
            },
        )

    def _split_refund(
        self,
        op: Operation,
        write: BatchWrite,
        now_us: int,
        version: "rules.ProgramVersion | None",
        created: int,
    ) -> Outcome:
        """A refund of a split redeem, both assets as one unit, in proportion; vouchers repay credit first."""
        program, ledger = self.program, self.ledger
        split = program.splits[op.transaction_id]
        transaction = domain.format_transaction_id(op.transaction_id)
        if split.merchant_id != op.merchant_id:
            return Outcome(
                Code.PERMISSION_DENIED,
                reason="wrong_merchant",
                message=(f"{transaction} belongs to another merchant; only that merchant may refund it"),
            )
        remaining = split.vouchers + split.points - split.refunded
        if op.points > remaining:
            return Outcome(
                Code.FAILED_PRECONDITION,
                reason="refund_exceeds_remaining",
                message=(
                    f"refund of {op.points} exceeds the {remaining} (vouchers and points) that remain unrefunded "
                    f"of {transaction}"
                ),
            )
        portion = rules.refund_tender(split.tender, split.refunded, op.points)
        member_id = split.member_id
        slot = ledger.member_slot(member_id)
        if portion.points:
            status, slot, amount, posted, available, kind = self._kernel_one(
                op, slot, portion.points, op.transaction_id, created, 0, now_us
            )
            if status != fastpath.OK:
                return self._applied(op, write, now_us, created, status, slot, amount, posted, available, kind)
            program.restore(
                member_id,
                (OWNER_TRANSACTION, op.transaction_id),
                portion.points,
                available - portion.points,
                now_us,
                version.restore_grace_us if version else 0,
            )
        repaid = min(program.credit.get(member_id, 0), portion.vouchers)
        back = portion.vouchers - repaid
        vouchers = rules.ASSET_VOUCHERS
        merchant = self.merchants.by_id[op.merchant_id]
        write.transactions.append(
            (
                created,
                rules.KIND_SPLIT_REFUND,
                op.merchant_id,
                member_id,
                op.points,
                None,
                None,
                op.transaction_id,
                op.idempotency_key,
                0,
                version.version if version is not None else None,
            )
        )
        write.refunds.append((op.transaction_id, op.points))
        _entries(
            write,
            created,
            [
                (ledger.member_account(slot), portion.points),
                (merchant.redeemed_account_id, -portion.points),
                (
                    self._voucher_account(write, rules.ACCOUNT_MEMBER_VOUCHER_CREDIT, member_id) if repaid else 0,
                    repaid,
                    vouchers,
                ),
                (self._voucher_account(write, domain.ACCOUNT_MEMBER, member_id) if back else 0, back, vouchers),
                (
                    self._voucher_account(write, domain.ACCOUNT_MERCHANT_REDEEMED, op.merchant_id)
                    if portion.vouchers
                    else 0,
                    -portion.vouchers,
                    vouchers,
                ),
            ],
        )
        program.move_credit(member_id, -repaid)
        program.move_vouchers((rules.HOLDER_MEMBER, member_id), back)
        program.split(op.transaction_id, dataclasses.replace(split, refunded=split.refunded + op.points))
        posted, held = ledger.balance(slot)
        return Outcome(
            Code.OK,
            {
                "transaction_id": created,
                "points": op.points,
                "kind": rules.KIND_SPLIT_REFUND,
                "balance": posted,
                "available": posted - held,
                "vouchers": portion.vouchers,
            },
        )

    def _move_member(self, member_id: str, delta: int) -> int:
        """Credits (or debits) a member's posted points in the fast path (recorded in its undo log)."""
        ledger = self.ledger
        slot: int = ledger.member_slot(member_id)
        require(slot >= 0, f"member {member_id!r} is not resident")
        posted, held = ledger.balance(slot)
        require(
            0 <= posted + delta <= fastpath.BALANCE_MAX and posted + delta - held >= 0,
            f"member {member_id!r}: {delta} would leave posted {posted + delta} with {held} held",
        )
        ledger.load_member(member_id, posted + delta)
        return slot

    def _credit(
        self,
        write: BatchWrite,
        kind: int,
        merchant_id: str,
        member_id: str,
        amount: int,
        funding_account: int,
        key: str,
        version: "rules.ProgramVersion | None",
        now_us: int,
        original: int | None = None,
    ) -> int:
        """Points the rules credit to a member from `funding_account`, as a lot of their own."""
        slot = self._move_member(member_id, amount)
        created = self._post(
            write,
            kind,
            merchant_id,
            member_id,
            amount,
            [(funding_account, -amount), (self.ledger.member_account(slot), amount)],
            key,
            version,
            original,
        )
        # the lot's breakage is attributed to the merchant whose earn set the credit off (the journal
        # names a merchant on every transaction; the operator funded the points either way)
        self.program.credit_lot(version, member_id, created, amount, merchant_id, now_us)
        return created

    def _spend_vouchers(
        self,
        op: Operation,
        write: BatchWrite,
        now_us: int,
        version: "rules.ProgramVersion | None",
        created: int,
    ) -> Outcome:
        """A merchant spends vouchers it holds (its dividends) at the operator's own store (kind 14), or at
        any merchant of the alliance the request names when the program allows it (issue 16): its
        merchant_vouchers account to that merchant's redeemed account in VOUCHERS."""
        store_id = version.operator_store_merchant_id if version is not None else None
        if op.at_merchant_id:
            _spend_anywhere_allowed(self.settings.program_id, version)
            store_id = op.at_merchant_id
        if store_id is None:
            raise Rejection(
                Code.FAILED_PRECONDITION,
                (
                    f"program {self.settings.program_id!r} names no operator store (operator_store_merchant_id); "
                    "merchants can spend their vouchers once the operator configures one"
                ),
            )
        if store_id == op.merchant_id:
            raise Rejection(
                Code.FAILED_PRECONDITION,
                (
                    f"merchant {op.merchant_id!r} is the operator's store: vouchers are spent there by other "
                    "merchants, not by the store itself"
                ),
            )
        store = self.merchants.by_id.get(store_id)
        if store is None or store.status != "active":
            where = f"merchant {store_id!r}" if op.at_merchant_id else f"the operator's store {store_id!r}"
            raise Rejection(
                Code.FAILED_PRECONDITION,
                (f"{where} is not an active merchant of the alliance; contact the operator"),
            )
        program, holder = self.program, (rules.HOLDER_MERCHANT, op.merchant_id)
        balance = program.vouchers.get(holder, 0)
        headroom = program.merchant_credit_headroom(version, op.merchant_id)  # issue 16; 0 without the option
        if op.vouchers > balance + headroom:
            credit = f" and may owe {headroom} more on credit" if headroom else ""
            raise Rejection(
                Code.FAILED_PRECONDITION,
                (
                    f"merchant {op.merchant_id!r} holds {balance} voucher-units{credit}, {op.vouchers} asked; "
                    "vouchers come from dividend rounds"
                ),
            )
        from_balance = min(balance, op.vouchers)
        from_credit = op.vouchers - from_balance
        write.transactions.append(
            (
                created,
                rules.KIND_MERCHANT_VOUCHER_SPEND,
                op.merchant_id,
                "",
                op.vouchers,
                None,
                None,
                None,
                op.idempotency_key,
                0,
                version.version if version is not None else None,  # a store is named only by a version
            )
        )
        vouchers = rules.ASSET_VOUCHERS
        _entries(
            write,
            created,
            [
                (
                    self._voucher_account(write, rules.ACCOUNT_MERCHANT_VOUCHERS, op.merchant_id)
                    if from_balance
                    else 0,
                    -from_balance,
                    vouchers,
                ),
                (
                    self._voucher_account(write, rules.ACCOUNT_MERCHANT_VOUCHER_CREDIT, op.merchant_id)
                    if from_credit
                    else 0,
                    -from_credit,
                    vouchers,
                ),
                (self._voucher_account(write, domain.ACCOUNT_MERCHANT_REDEEMED, store_id), op.vouchers, vouchers),
            ],
        )
        left = program.move_vouchers(holder, -from_balance)
        owed = program.move_merchant_credit(op.merchant_id, from_credit)
        fields = {
            "transaction_id": created,
            "vouchers": op.vouchers,
            "store_merchant_id": store_id,
            "voucher_balance": left,
            "created_at_us": now_us,
        }
        if owed:  # only then, so a stored outcome of a spend without credit replays as before
            fields["voucher_credit_used"] = owed
        return Outcome(Code.OK, fields)

    def _expire_lots(self, write: BatchWrite, now_us: int) -> None:
        """The expiry job: up to expiry_lots_per_batch_max expired lots, each posted as one expiry
        transaction in this batch (the lot leaves the member's lots in the same transaction, so a second
        run finds nothing). It runs in every batch and on its own when a lot falls due, never stopping
        traffic."""
        for member_id, lot in self.program.due(now_us, self.settings.expiry_lots_per_batch_max):
            self._post_expiry(write, member_id, lot)

    def _expire_member(self, write: BatchWrite, member_id: str, now_us: int) -> None:
        for lot in self.program.expire_member(member_id, now_us):
            self._post_expiry(write, member_id, lot)

    def _post_expiry(self, write: BatchWrite, member_id: str, lot: "rules.Lot") -> None:
        slot = self._move_member(member_id, -lot.amount)
        self._post(
            write,
            rules.KIND_EXPIRY,
            lot.issuer_id,
            member_id,
            lot.amount,
            [
                (self.ledger.member_account(slot), -lot.amount),
                (self.operator_accounts[domain.ACCOUNT_OPERATOR_BREAKAGE], lot.amount),
            ],
            f"expiry:{member_id}:{lot.lot_id}:{lot.expires_at_us}",
            None,
            original=lot.lot_id,
        )

    def _restore_hold(self, authorization_id: int, now_us: int) -> None:
        """An expired hold gives back the lots it consumed."""
        ledger = self.ledger
        if (OWNER_HOLD, authorization_id) not in self.program.pieces or not ledger.has_hold(authorization_id):
            return
        _, slot, _, amount, _ = ledger.hold(authorization_id)
        posted, held = ledger.balance(slot)
        version = self.program.version(now_us)
        self.program.restore(
            ledger.member_id(slot),
            (OWNER_HOLD, authorization_id),
            None,
            posted - held - amount,
            now_us,
            version.restore_grace_us if version is not None else 0,
        )

    def _link(self, op: Operation) -> Outcome:
        """Links a member to the merchant that signed it up (the caller) and to a referring member."""
        program = self.program
        member = program.member(op.member_id)
        if member.acquirer_id is not None:
            if member.acquirer_id == op.merchant_id and member.referrer_id == (op.referrer_id or None):
                return Outcome(Code.OK, {"acquirer_id": member.acquirer_id, "referrer_id": member.referrer_id or ""})
            return Outcome(
                Code.FAILED_PRECONDITION,
                reason="already_linked",
                message=(
                    f"member {op.member_id!r} was signed up by merchant {member.acquirer_id!r} already; a member is "
                    "linked once"
                ),
            )
        if op.referrer_id:
            if op.referrer_id == op.member_id:
                return Outcome(Code.INVALID_ARGUMENT, message="a member cannot refer itself")
            if self.ledger.member_slot(op.referrer_id) < 0:
                return Outcome(
                    Code.NOT_FOUND,
                    message=(
                        f"referrer {op.referrer_id!r} is not a member; a member exists once it has earned or been "
                        "linked"
                    ),
                )
        program.link(op.member_id, op.merchant_id, op.referrer_id or None)
        return Outcome(Code.OK, {"acquirer_id": op.merchant_id, "referrer_id": op.referrer_id})

    def _convert(
        self,
        op: Operation,
        write: BatchWrite,
        now_us: int,
        version: "rules.ProgramVersion | None",
        slot: int,
        created: int,
    ) -> Outcome:
        """A merchant's own points converted into alliance points at its agreed rate, in whole blocks."""
        if version is None:
            raise Rejection(
                Code.FAILED_PRECONDITION,
                f"program {self.settings.program_id!r} has no version in force; the operator must "
                "configure the program (with this merchant's conversion rate) before points convert",
            )
        conversion = rules.convert_merchant_points(op.merchant_points, version.conversion_rate_for(op.merchant_id))
        if conversion.point_units == 0:
            raise Rejection(
                Code.FAILED_PRECONDITION,
                (
                    f"{op.merchant_points} merchant points is less than one conversion block at the agreed rate; "
                    f"convert at least {conversion.merchant_points_remainder + 1 if op.merchant_points else 1} "
                    "merchant points"
                ),
            )
        merchant = self.merchants.by_id[op.merchant_id]
        amount = conversion.point_units
        self._move_member(op.member_id, amount)
        write.transactions.append(
            (
                created,
                rules.KIND_CONVERSION,
                op.merchant_id,
                op.member_id,
                amount,
                None,
                None,
                None,
                op.idempotency_key,
                0,
                version.version,
            )
        )
        write.entries.append((created, merchant.issued_account_id, -amount))
        write.entries.append((created, self.ledger.member_account(slot), amount))
        self.program.credit_lot(version, op.member_id, created, amount, op.merchant_id, now_us)
        posted, _ = self.ledger.balance(slot)
        return Outcome(
            Code.OK,
            {
                "transaction_id": created,
                "points": amount,
                "merchant_points_converted": conversion.merchant_points_converted,
                "merchant_points_remainder": conversion.merchant_points_remainder,
                "balance": posted,
                "created_at_us": now_us,
            },
        )


def _spend_anywhere_allowed(program_id: str, version: "rules.ProgramVersion | None") -> None:
    """Issue 16: a merchant names where it spends its vouchers only under a program that allows it."""
    if version is None or not version.merchant_vouchers_anywhere:
        raise Rejection(
            Code.FAILED_PRECONDITION,
            f"program {program_id!r} lets merchants spend vouchers only at the operator's store "
            "(merchant_vouchers_anywhere is off); leave at_merchant_id empty",
        )


# a resolved split-tender hold refused as the fast path refuses a resolved hold
_HOLD_REFUSAL = {
    fastpath.HOLD_STATUS_CAPTURED: fastpath.HOLD_CAPTURED,
    fastpath.HOLD_STATUS_VOIDED: fastpath.HOLD_VOIDED,
    fastpath.HOLD_STATUS_EXPIRED: fastpath.HOLD_EXPIRED,
}


def _entries(write: BatchWrite, transaction_id: int, entries: list[tuple[Any, ...]]) -> None:
    """Journal rows of a transaction: (account_id, amount) in points or (account_id, amount, asset);
    rows of amount 0 are left out (the journal holds none)."""
    for entry in entries:
        if entry[1]:
            write.entries.append(
                (transaction_id, entry[0], entry[1], entry[2])
                if len(entry) > 2
                else (transaction_id, entry[0], entry[1])
            )
