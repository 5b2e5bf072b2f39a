"""MemberAdminService (admin.proto): the operator enrolls a member's means of proving presence at a till
(processor/presence.py); a TOTP secret leaves the service once, in EnrollMemberTotp's response; a PIN is
stored only as its scrypt hash. Neither is logged. And member administration (issue 15): adjustments,
reversals (REVERSIBLE below; the originals read from committed state), freezing, closing and merging
members, aliases, households and transfers, posted through the committer (processor/member_postings.py),
and reads of any member. Operator keys may call everything; support keys only SUPPORT_METHODS, and
AdjustPoints within their limits (processor/support_limits.py)."""

from __future__ import annotations

import datetime as dt
import json
import uuid

from google.protobuf import timestamp_pb2

import fastpath
from points.v1 import admin_pb2 as pb
from points.v1 import admin_pb2_grpc
from points.v1 import points_pb2
from processor import auth, domain, kinds, member_postings, member_store, metrics, presence, rpc, rules
from processor.config import Settings
from processor.domain import Code, Method, Operation, Outcome, Rejection
from processor.errors import outcome_status
from processor.pipeline import Pipeline, now_micros
from processor.presence import Presence
from processor.presence_store import Credentials
from processor.servicer import Validator, encode_page_token, guard, history_page, projected_store, timestamp
from processor.store import micros
from processor.support_limits import SupportLimits

# what a support key may call; every other method of the service is for operator keys
SUPPORT_METHODS = frozenset({"AdjustPoints", "GetBalance", "ListTransactions"})
NOTE_CHARACTERS_MAX = 200
# what ReverseTransaction reverses (docs/RULES.md section 13, "Reversals"): an earn with what it set off
# (member_store.TIED_KINDS), a capture, a redeem, a conversion, a sign-up bonus, an adjustment, a transfer
REVERSIBLE = frozenset(
    {
        fastpath.KIND_EARN,
        fastpath.KIND_CAPTURE,
        fastpath.KIND_REDEEM,
        rules.KIND_CONVERSION,
        rules.KIND_SIGNUP_BONUS,
        kinds.KIND_ADJUSTMENT_CREDIT,
        kinds.KIND_ADJUSTMENT_DEBIT,
        kinds.KIND_TRANSFER,
    }
)
# why the others are not, said to the caller
_NOT_REVERSIBLE = {
    fastpath.KIND_REFUND_REDEMPTION: "a refund is not reversed; the merchant makes the sale again. ",
    fastpath.KIND_REFUND_EARN: "a refund is not reversed; the merchant makes the sale again. ",
    rules.KIND_EXPIRY: "expired points are not reversed; credit the member instead (AdjustPoints). ",
    rules.KIND_TIER_BONUS: "it was set off by an earn: reverse that earn (original_transaction_id). ",
    rules.KIND_REFERRAL_BONUS: "it was set off by an earn: reverse that earn (original_transaction_id). ",
    rules.KIND_ACQUIRING_REWARD: "it was set off by an earn: reverse that earn (original_transaction_id). ",
    rules.KIND_MERCHANT_MATCH: "it was set off by an earn: reverse that earn (original_transaction_id). ",
    rules.KIND_FAN_REWARD: "it was set off by an earn and moved vouchers; its earn's merchant refunds the earn. ",
    rules.KIND_ACQUIRING_REVERSAL: "it is part of a refund; a refund is not reversed. ",
    rules.KIND_MERCHANT_MATCH_REVERSAL: "it is part of a refund; a refund is not reversed. ",
    rules.KIND_FAN_REWARD_REVERSAL: "it is part of a refund; a refund is not reversed. ",
    rules.KIND_SPLIT_REDEEM: "it moved vouchers; a reversal mirrors points only: its merchant refunds it. ",
    rules.KIND_SPLIT_REFUND: "a refund is not reversed; the merchant makes the sale again. ",
    kinds.KIND_REVERSAL_CREDIT: "a reversal is not reversed; adjust the member instead (AdjustPoints). ",
    kinds.KIND_REVERSAL_DEBIT: "a reversal is not reversed; adjust the member instead (AdjustPoints). ",
    kinds.KIND_MEMBER_CLOSURE: "a closed member stays closed. ",
    kinds.KIND_MERGE: "a merge is not undone. ",
}
_STATES = {
    member_postings.STATE_ACTIVE: pb.MEMBER_STATE_ACTIVE,
    member_postings.STATE_FROZEN: pb.MEMBER_STATE_FROZEN,
    member_postings.STATE_CLOSED: pb.MEMBER_STATE_CLOSED,
}


def _timestamp(moment: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    return None if moment is None else timestamp(micros(moment))


def verification_message(member_id: str, credentials: Credentials | None, now_us: int) -> pb.MemberVerification:
    if credentials is None:
        return pb.MemberVerification(member_id=member_id)
    locked = credentials.locked_until_us() > now_us
    return pb.MemberVerification(
        member_id=member_id,
        totp_enrolled=credentials.totp_secret is not None,
        totp_enrolled_at=_timestamp(credentials.totp_enrolled_at),
        pin_set=credentials.pin_hash is not None,
        pin_set_at=_timestamp(credentials.pin_set_at),
        failures=credentials.failures,
        locked_until=_timestamp(credentials.locked_until) if locked else None,
    )


class MemberAdminServicer(admin_pb2_grpc.MemberAdminServiceServicer):
    def __init__(self, settings: Settings, pipeline: Pipeline, member_presence: Presence):
        self.settings = settings
        self.pipeline = pipeline
        self.presence = member_presence
        self.validate = Validator(settings)
        self._limits: SupportLimits | None = None

    # --- who may call what ---

    @staticmethod
    def _allow(method: str) -> auth.Principal:
        """The caller, if it may call `method`: a support key only SUPPORT_METHODS (PERMISSION_DENIED)."""
        caller = rpc.principal.get()
        if caller is None:
            raise Rejection(Code.UNAUTHENTICATED, "send an operator or support key")
        if caller.kind == "support" and method not in SUPPORT_METHODS:
            raise Rejection(
                Code.PERMISSION_DENIED,
                f"a support key cannot call {method}; it may call {', '.join(sorted(SUPPORT_METHODS))}. "
                "Ask an operator",
                reason="KEY_NOT_PERMITTED",
            )
        return caller

    async def EnrollMemberTotp(self, request: pb.EnrollMemberTotpRequest, context) -> pb.EnrollMemberTotpResponse:
        async def call():
            self._allow("EnrollMemberTotp")
            member_id = self.validate.identifier(request.member_id, "member_id")
            secret, now_us = presence.new_totp_secret(), now_micros()
            stored = presence.seal_secret(secret, member_id, self.presence.secret_key)
            if not await self.presence.store.enroll_totp(member_id, stored, request.replace, now_us):
                raise Rejection(
                    Code.FAILED_PRECONDITION,
                    f"member {member_id!r} has a one-time code app enrolled already; send replace=true "
                    "to enroll a new secret (the old one stops working at once)",
                )
            return pb.EnrollMemberTotpResponse(
                member_id=member_id,
                secret_base32=secret,
                provisioning_uri=presence.provisioning_uri(secret, member_id),
                digits=presence.TOTP_DIGITS,
                period_seconds=presence.TOTP_PERIOD_SECONDS,
                enrolled_at=timestamp(now_us),
            )

        return await guard(context, call)

    async def SetMemberPin(self, request: pb.SetMemberPinRequest, context) -> pb.SetMemberPinResponse:
        async def call():
            self._allow("SetMemberPin")
            member_id = self.validate.identifier(request.member_id, "member_id")
            pin_hash, salt, params = await self.presence.hash_pin(request.pin)
            now_us = now_micros()
            credentials = await self.presence.store.set_pin(member_id, pin_hash, salt, params, now_us)
            return pb.SetMemberPinResponse(verification=verification_message(member_id, credentials, now_us))

        return await guard(context, call)

    async def ResetMemberVerification(
        self, request: pb.ResetMemberVerificationRequest, context
    ) -> pb.ResetMemberVerificationResponse:
        async def call():
            self._allow("ResetMemberVerification")
            member_id = self.validate.identifier(request.member_id, "member_id")
            credentials = await self.presence.store.reset(member_id, request.remove_totp, request.remove_pin)
            if credentials is None:
                raise Rejection(Code.NOT_FOUND, f"member {member_id!r} has nothing enrolled and no failures")
            return pb.ResetMemberVerificationResponse(
                verification=verification_message(member_id, credentials, now_micros())
            )

        return await guard(context, call)

    async def GetMemberVerification(
        self, request: pb.GetMemberVerificationRequest, context
    ) -> pb.GetMemberVerificationResponse:
        async def call():
            self._allow("GetMemberVerification")
            member_id = self.validate.identifier(request.member_id, "member_id")
            credentials = await self.presence.store.credentials(member_id)
            if credentials is None:
                raise Rejection(
                    Code.NOT_FOUND,
                    f"member {member_id!r} has nothing enrolled and no failures; "
                    "enroll with EnrollMemberTotp or SetMemberPin",
                )
            return pb.GetMemberVerificationResponse(
                verification=verification_message(member_id, credentials, now_micros())
            )

        return await guard(context, call)

    # --- member administration (issue 15) ---

    def _note(self, value: str, field: str = "note") -> str:
        if len(value) > NOTE_CHARACTERS_MAX or not value.isprintable():
            raise domain.invalid_field(field, f"{field} must be at most {NOTE_CHARACTERS_MAX} printable characters")
        return value

    @staticmethod
    def _reason(value: int) -> int:
        if value not in member_postings.REASONS:
            names = ", ".join(name.upper() for name in member_postings.REASONS.values())
            raise domain.invalid_field("reason", f"reason must be one of {names}, got {value}")
        return value

    async def _submit(self, op: Operation, context) -> Outcome:
        """Queues the operation through the committer; a refusal becomes its status (as PointsService's)."""
        return await self._answer(await self.pipeline.submit(op), context)

    def _operation(self, method: Method, key: str, fields: dict, **values) -> Operation:
        # the operator's namespace of idempotency keys (domain.OPERATOR_ID); no merchant slot applies
        return Operation(
            method=method,
            merchant_id=domain.OPERATOR_ID,
            merchant_slot=0,
            idempotency_key=key,
            request=fields,
            **values,
        )

    def limits(self) -> SupportLimits:
        if self._limits is None:
            self._limits = SupportLimits(self.pipeline.ready_store().pool)
        return self._limits

    async def AdjustPoints(self, request: pb.AdjustPointsRequest, context) -> pb.AdjustPointsResponse:
        async def call():
            caller = self._allow("AdjustPoints")
            member_id = self.validate.identifier(request.member_id, "member_id")
            key = self.validate.idempotency_key(request.idempotency_key)
            points = request.points
            if points == 0 or abs(points) > fastpath.BALANCE_MAX:
                raise domain.invalid_field(
                    "points",
                    f"points must be a signed, non-zero count of point-units (|points| <= "
                    f"{fastpath.BALANCE_MAX}), got {points}",
                )
            reason, note = self._reason(request.reason), self._note(request.note)
            fields = {"member_id": member_id, "points": points, "reason": reason, "note": note, "key_id": caller.key_id}
            op = self._operation(Method.ADJUST, key, fields, member_id=member_id, points=points)
            # a support key's retry of a key just answered must be seen as one, or it would use the limits
            # twice: the idempotency records read below include every operation answered before this call
            if caller.kind == "support" and not await self.pipeline.has_stored_outcome(domain.OPERATOR_ID, key):
                outcome = await self.limits().adjust(caller.key_id, points, lambda: self.pipeline.submit(op))
            else:  # an operator's, or a retry (it replays its outcome and uses no more of the limits)
                outcome = await self.pipeline.submit(op)
            f = (await self._answer(outcome, context)).fields
            return pb.AdjustPointsResponse(
                transaction_id=domain.format_transaction_id(f["transaction_id"]),
                points=f["points"],
                balance=f["balance"],
                available=f["available"],
            )

        return await guard(context, call)

    async def _answer(self, outcome: Outcome, context) -> Outcome:
        trailer = (("points-idempotent-replay", "true"),) if outcome.replayed else ()
        if outcome.replayed:
            metrics.idempotent_replays.inc()
        if outcome.code is not Code.OK:
            await context.abort_with_status(outcome_status(outcome, trailing_metadata=trailer))
        if trailer:
            context.set_trailing_metadata(trailer)
        return outcome

    async def ReverseTransaction(self, request: pb.ReverseTransactionRequest, context) -> pb.ReverseTransactionResponse:
        async def call():
            caller = self._allow("ReverseTransaction")
            original = domain.parse_transaction_id(request.transaction_id)
            key = self.validate.idempotency_key(request.idempotency_key)
            reason, note = self._reason(request.reason), self._note(request.note)
            name = domain.format_transaction_id(original)
            registry = self.pipeline.machine.members
            # registered before the read: a merchant's Refund of it routed from now on makes the reversal
            # refuse (member_postings.MemberRegistry.pending_reversals); one routed before is committed
            # by the time committed_view() returns, so the read below sees it
            registry.expect_reversal(original)
            try:
                await self.pipeline.committed_view()  # an original just made is committed...
                store = await projected_store(self.pipeline)  # ...and its rows projected, so it is read
                group = await member_store.reversal_group(store.pool, original)
                op = self._reversal(original, name, group, key, reason, note, caller.key_id)
                f = (await self._submit(op, context)).fields
            finally:
                registry.reversal_answered(original)
            return pb.ReverseTransactionResponse(
                transaction_id=domain.format_transaction_id(f["transaction_id"]),
                original_transaction_id=domain.format_transaction_id(f["original_transaction_id"]),
                member_id=f["member_id"],
                points=f["points"],
                balance=f["balance"],
                available=f["available"],
            )

        return await guard(context, call)

    def _reversal(
        self, original: int, name: str, group: dict, key: str, reason: int, note: str, key_id: str
    ) -> Operation:
        """The REVERSE operation of `original` from what member_store.reversal_group read, or the refusal of
        what cannot be reversed (docs/RULES.md section 13, "Reversals")."""
        originals = group["originals"]
        if not originals or originals[0]["transaction_id"] != original:
            raise Rejection(Code.NOT_FOUND, f"transaction {name} does not exist", reason="TRANSACTION_NOT_FOUND")
        first = originals[0]
        kind = first["kind"]
        if kind not in REVERSIBLE:
            raise Rejection(
                Code.FAILED_PRECONDITION,
                f"transaction {name} is of kind {kinds.kind(kind).name} ({kind}): {_NOT_REVERSIBLE.get(kind, '')}"
                f"ReverseTransaction reverses earns (with what they set off), captures, redeems, conversions, "
                "sign-up bonuses, adjustments and transfers",
                reason="TRANSACTION_NOT_REVERSIBLE",
            )
        if first["refunded"] or group["refunds"]:
            raise Rejection(
                Code.FAILED_PRECONDITION,
                f"transaction {name} was refunded in part ({first['refunded']} of {first['amount']} point-units): "
                "a reversal mirrors a whole transaction, never what a refund left. Refund the rest through its "
                "merchant's Refund, or adjust the member (AdjustPoints)",
                reason="TRANSACTION_NOT_REVERSIBLE",
            )
        for o in originals:
            if any(leg[3] != "POINTS" for leg in o["legs"]):
                raise Rejection(
                    Code.FAILED_PRECONDITION,
                    f"transaction {name} (or transaction {domain.format_transaction_id(o['transaction_id'])} it set "
                    f"off, of kind {kinds.kind(o['kind']).name}) moved vouchers: a reversal mirrors points only. "
                    "Undo it through its merchant's Refund",
                    reason="TRANSACTION_NOT_REVERSIBLE",
                )
        record = group["earn_record"]  # its refunds were refused above: nothing of it is refunded
        fields = {
            "transaction_id": original,
            "reason": reason,
            "note": note,
            "key_id": key_id,
            # read from the journal: the same for every retry of the key
            "originals": [
                {k: o[k] for k in ("transaction_id", "kind", "member_id", "merchant_id", "legs")} for o in originals
            ],
            "earn_record": None
            if record is None
            else {
                "member_id": record["member_id"],
                "merchant_id": record["merchant_id"],
                "program_version": record["program_version"],
                "base_point_units": record["base_point_units"],
                "uplift_point_units": record["uplift_point_units"],
                "grants": json.loads(record["grants"]),
                "acquirer_id": record["acquirer_id"],
                "acquiring_point_units": record["acquiring_point_units"],
                "made_at_us": micros(record["created_at"]),
            },
        }
        member_points = sum(
            leg[4] for leg in first["legs"] if leg[1] == domain.ACCOUNT_MEMBER and leg[2] == first["member_id"]
        )
        return self._operation(
            Method.REVERSE,
            key,
            fields,
            member_id=first["member_id"],
            points=member_points,
            transaction_id=original,
        )

    async def FreezeMember(self, request: pb.FreezeMemberRequest, context) -> pb.FreezeMemberResponse:
        async def call():
            self._allow("FreezeMember")
            member_id = self.validate.identifier(request.member_id, "member_id")
            fields = {"member_id": member_id, "reason": self._note(request.reason, "reason")}
            return pb.FreezeMemberResponse(
                status=status_message(await self._change(Method.FREEZE, fields, member_id, context))
            )

        return await guard(context, call)

    async def UnfreezeMember(self, request: pb.UnfreezeMemberRequest, context) -> pb.UnfreezeMemberResponse:
        async def call():
            self._allow("UnfreezeMember")
            member_id = self.validate.identifier(request.member_id, "member_id")
            op = self._operation(
                Method.UNFREEZE, f"unfreeze:{uuid.uuid4().hex}", {"member_id": member_id}, member_id=member_id
            )
            outcome = await self._submit(op, context)
            return pb.UnfreezeMemberResponse(status=status_message(outcome.fields))

        return await guard(context, call)

    async def CloseMember(self, request: pb.CloseMemberRequest, context) -> pb.CloseMemberResponse:
        async def call():
            self._allow("CloseMember")
            member_id = self.validate.identifier(request.member_id, "member_id")
            key = self.validate.idempotency_key(request.idempotency_key)
            fields = {"member_id": member_id, "reason": self._note(request.reason, "reason")}
            f = (
                await self._submit(self._operation(Method.CLOSE_MEMBER, key, fields, member_id=member_id), context)
            ).fields
            return pb.CloseMemberResponse(
                member_id=member_id,
                transaction_id=domain.format_transaction_id(f["transaction_id"]) if f["transaction_id"] else "",
                points_to_breakage=f["points_to_breakage"],
                closed_at=timestamp(f["closed_at_us"]),
            )

        return await guard(context, call)

    async def GetBalance(
        self, request: pb.MemberAdminServiceGetBalanceRequest, context
    ) -> pb.MemberAdminServiceGetBalanceResponse:
        async def call():
            self._allow("GetBalance")
            member_id = self.pipeline.machine.members.resolve(self.validate.identifier(request.member_id, "member_id"))
            ledger = await self.pipeline.committed_view()
            slot = ledger.member_slot(member_id)
            if slot < 0:
                raise Rejection(
                    Code.NOT_FOUND, f"member {member_id!r} has no points account", reason="MEMBER_NOT_FOUND"
                )
            posted, held = ledger.balance(slot)
            status = self.pipeline.machine.members.status(member_id)
            return pb.MemberAdminServiceGetBalanceResponse(
                member_id=member_id,
                posted=posted,
                held=held,
                available=posted - held,
                status=status_message(member_postings.status_fields(member_id, status)),
                household_id=self.pipeline.machine.members.household_of.get(member_id, ""),
            )

        return await guard(context, call)

    async def ListTransactions(
        self, request: pb.MemberAdminServiceListTransactionsRequest, context
    ) -> pb.MemberAdminServiceListTransactionsResponse:
        async def call():
            self._allow("ListTransactions")
            member_id = self.validate.identifier(request.member_id, "member_id")
            store = self.pipeline.ready_store()
            size, before = history_page(self.settings, request.page_size, request.page_token)
            await self.pipeline.projected()  # read-your-writes: the rows below hold every answered operation
            registry = self.pipeline.machine.members
            if member_id in registry.aliases and not await store.member_exists(member_id):
                # a card or phone number: its member's history (a merged member's id keeps its own, which
                # ends with the merge, as it has a history of its own)
                member_id = registry.resolve(member_id)
            rows = await member_store.member_history(store.pool, member_id, before, size + 1)
            if not rows and before is None and not await store.member_exists(member_id):
                raise Rejection(
                    Code.NOT_FOUND, f"member {member_id!r} has no points account", reason="MEMBER_NOT_FOUND"
                )
            more = len(rows) > size
            rows = rows[:size]
            response = pb.MemberAdminServiceListTransactionsResponse(
                next_page_token=encode_page_token(rows[-1]["transaction_id"]) if more else ""
            )
            for r in rows:
                response.transactions.append(transaction_message(r))
            return response

        return await guard(context, call)

    async def _change(self, method: Method, fields: dict, member_id: str, context) -> dict:
        """A change with no idempotency key in its request (adding an alias twice, or leaving twice, has
        one effect or one refusal): queued under a key of its own, not recorded."""
        op = self._operation(method, f"{method.value}:{uuid.uuid4().hex}", fields, member_id=member_id)
        return (await self._submit(op, context)).fields

    async def AddMemberAlias(self, request: pb.AddMemberAliasRequest, context) -> pb.AddMemberAliasResponse:
        async def call():
            self._allow("AddMemberAlias")
            member_id = self.validate.identifier(request.member_id, "member_id")
            alias = self.validate.identifier(request.alias, "alias")
            f = await self._change(Method.ADD_ALIAS, {"member_id": member_id, "alias": alias}, member_id, context)
            return pb.AddMemberAliasResponse(member_id=f["member_id"], alias=f["alias"])

        return await guard(context, call)

    async def RemoveMemberAlias(self, request: pb.RemoveMemberAliasRequest, context) -> pb.RemoveMemberAliasResponse:
        async def call():
            self._allow("RemoveMemberAlias")
            alias = self.validate.identifier(request.alias, "alias")
            f = await self._change(Method.REMOVE_ALIAS, {"alias": alias}, "", context)
            return pb.RemoveMemberAliasResponse(member_id=f["member_id"], alias=f["alias"])

        return await guard(context, call)

    async def CreateHousehold(self, request: pb.CreateHouseholdRequest, context) -> pb.CreateHouseholdResponse:
        async def call():
            self._allow("CreateHousehold")
            head = self.validate.identifier(request.head_member_id, "head_member_id")
            household = f"hh-{uuid.uuid4().hex[:16]}"
            f = await self._change(
                Method.CREATE_HOUSEHOLD, {"member_id": head, "household_id": household}, head, context
            )
            return pb.CreateHouseholdResponse(household_id=f["household_id"], head_member_id=f["member_id"])

        return await guard(context, call)

    async def JoinHousehold(self, request: pb.JoinHouseholdRequest, context) -> pb.JoinHouseholdResponse:
        async def call():
            self._allow("JoinHousehold")
            household = self.validate.identifier(request.household_id, "household_id")
            member_id = self.validate.identifier(request.member_id, "member_id")
            fields = {"member_id": member_id, "household_id": household}
            f = await self._change(Method.JOIN_HOUSEHOLD, fields, member_id, context)
            return pb.JoinHouseholdResponse(household_id=f["household_id"], member_id=f["member_id"])

        return await guard(context, call)

    async def LeaveHousehold(self, request: pb.LeaveHouseholdRequest, context) -> pb.LeaveHouseholdResponse:
        async def call():
            self._allow("LeaveHousehold")
            member_id = self.validate.identifier(request.member_id, "member_id")
            f = await self._change(Method.LEAVE_HOUSEHOLD, {"member_id": member_id}, member_id, context)
            return pb.LeaveHouseholdResponse(household_id=f["household_id"], member_id=f["member_id"])

        return await guard(context, call)

    async def TransferPoints(self, request: pb.TransferPointsRequest, context) -> pb.TransferPointsResponse:
        async def call():
            self._allow("TransferPoints")
            sender = self.validate.identifier(request.from_member_id, "from_member_id")
            receiver = self.validate.identifier(request.to_member_id, "to_member_id")
            if sender == receiver:
                raise domain.invalid_field("to_member_id", "to_member_id must name another member than from_member_id")
            points = self.validate.amount(request.points, "points", fastpath.BALANCE_MAX, "point-units")
            key = self.validate.idempotency_key(request.idempotency_key)
            fields = {"from_member_id": sender, "to_member_id": receiver, "points": points}
            op = self._operation(Method.TRANSFER, key, fields, member_id=sender, points=points)
            # a transfer spends the sender's points: the member's proof when the program asks for one
            # (PointsService's check, against the member an alias names)
            now_us = now_micros()
            version = self.pipeline.program.version(now_us)
            proof = request.member_proof.WhichOneof("proof")
            op.member_id = self.pipeline.machine.members.resolve(sender)
            await self.presence.check(op, version, proof, getattr(request.member_proof, proof) if proof else "", now_us)
            op.member_id = sender
            f = (await self._submit(op, context)).fields
            return pb.TransferPointsResponse(
                transaction_id=domain.format_transaction_id(f["transaction_id"]),
                points=f["points"],
                fee=f["fee"],
                received=f["received"],
                balance=f["balance"],
                available=f["available"],
            )

        return await guard(context, call)

    async def MergeMembers(self, request: pb.MergeMembersRequest, context) -> pb.MergeMembersResponse:
        async def call():
            self._allow("MergeMembers")
            source = self.validate.identifier(request.source_member_id, "source_member_id")
            target = self.validate.identifier(request.target_member_id, "target_member_id")
            if source == target:
                raise domain.invalid_field("target_member_id", "target_member_id must name another member")
            key = self.validate.idempotency_key(request.idempotency_key)
            fields = {"source_member_id": source, "target_member_id": target}
            f = (await self._submit(self._operation(Method.MERGE, key, fields, member_id=source), context)).fields
            return pb.MergeMembersResponse(
                transaction_id=domain.format_transaction_id(f["transaction_id"]) if f["transaction_id"] else "",
                source_member_id=f["source_member_id"],
                target_member_id=f["target_member_id"],
                points=f["points"],
                balance=f["balance"],
                available=f["available"],
            )

        return await guard(context, call)


def transaction_message(r) -> points_pb2.Transaction:
    """A row of member_store.member_history as the public Transaction."""

    def transaction_id(value: int | None) -> str:
        return domain.format_transaction_id(value) if value else ""

    return points_pb2.Transaction(
        transaction_id=transaction_id(r["transaction_id"]),
        kind=kinds.kind(r["kind"]).proto,
        merchant_id=r["merchant_id"],
        points=r["member_points"],
        vouchers=r["member_vouchers"],
        original_transaction_id=transaction_id(r["original_transaction_id"]),
        authorization_id=domain.format_authorization_id(r["authorization_id"]) if r["authorization_id"] else "",
        created_at=timestamp(micros(r["created_at"])),
        purchase_amount=r["purchase_amount"] or 0,
    )


def status_message(f: dict) -> pb.MemberStatus:
    state = f["state"]
    message = pb.MemberStatus(member_id=f["member_id"], state=_STATES[state], reason=f["reason"])
    if state == member_postings.STATE_FROZEN:
        message.frozen_at.CopyFrom(timestamp(f["since_us"]))
    elif state == member_postings.STATE_CLOSED:
        message.closed_at.CopyFrom(timestamp(f["since_us"]))
    return message
