"""Member administration inside the ledger state machine (issue 15): operators' and support agents'
adjustments, reversals (of an earn with what it set off, a capture, a redeem, a conversion, a sign-up
bonus, an adjustment, a transfer), freezing, closing and merging members, aliases, households,
transfers. Each is an Operation of its own Method (domain.Method.ADJUST, ...) queued through the
committer like a till's, applied in the same batch and the same order as the tills' traffic, idempotent
per key (namespace domain.OPERATOR_ID), balanced, and checked by reconcile (kinds 16..22,
processor/kinds.py).

The members' administrative state (frozen, closed, which transactions were reversed) is held here in
memory, with an undo log per open batch like the fast path's, so a batch sees the freeze of an earlier
operation of the same batch, and a rolled-back batch leaves nothing behind. It is durable in Postgres
(member_status, member_adjustments, member_reversals, member_status_log; migration 0011), written in the
batch's transaction (processor/member_store.py).

MemberPostingsMixin is a base of LedgerStateMachine, as PostingsMixin is: it holds no state of its own
beyond `members` (a MemberRegistry) and works on the state machine's ledger, program state and ids.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import TYPE_CHECKING, Any

import fastpath
from processor import domain, kinds, metrics, rules
from processor.domain import Code, InvariantViolation, Method, Operation, Outcome, require
from processor.machine_parts import MachineParts
from processor.program import OWNER_TRANSACTION, EarnRecord

if TYPE_CHECKING:
    from processor.store import BatchWrite

STATE_ACTIVE, STATE_FROZEN, STATE_CLOSED = "active", "frozen", "closed"
# the operations this module applies (the state machine hands them over before its own dispatch)
METHODS = frozenset(
    {
        Method.ADJUST,
        Method.REVERSE,
        Method.FREEZE,
        Method.UNFREEZE,
        Method.CLOSE_MEMBER,
        Method.ADD_ALIAS,
        Method.REMOVE_ALIAS,
        Method.CREATE_HOUSEHOLD,
        Method.JOIN_HOUSEHOLD,
        Method.LEAVE_HOUSEHOLD,
        Method.TRANSFER,
        Method.MERGE,
    }
)
# a household's shared balance is the points account of this member id + the household's id
HOUSEHOLD_ACCOUNT_PREFIX = "household:"
# what a frozen member may not do: spend (a split tender is a Redeem or Authorize with vouchers)
_SPENDING = frozenset({Method.REDEEM, Method.AUTHORIZE})
# a till's operations that name a member (op.member_id): all refused for a closed member
_NAMING_MEMBER = frozenset({Method.EARN, Method.AUTHORIZE, Method.REDEEM, Method.LINK, Method.CONVERT})
# a till's operations that act on a household member's shared balance instead of its own (a link stays
# the member's own: its acquirer and referrer are about the person)
_SHARED = frozenset({Method.EARN, Method.AUTHORIZE, Method.REDEEM, Method.CONVERT})
# member events the change feed reads (member_status_log.event)
EVENT_FROZEN, EVENT_UNFROZEN, EVENT_CLOSED, EVENT_MERGED = "frozen", "unfrozen", "closed", "merged"
# AdjustmentReason (admin.proto) numbers and names, for the history and the messages
REASONS = {1: "goodwill", 2: "correction", 3: "sign_up", 4: "birthday", 5: "survey", 6: "activity", 7: "other"}
_MISSING = object()
# merges chain aliases (A merged into B, B into C: A -> B -> C); no cycle is possible (an alias is never a
# member with an account, and a merge binds a member that is no alias), this bounds the walk all the same
ALIAS_HOPS_MAX = 64


@dataclasses.dataclass(frozen=True, slots=True)
class MemberStatus:
    state: str
    reason: str
    # when the member was frozen or closed, microseconds since the epoch
    since_us: int


@dataclasses.dataclass(slots=True)
class MemberWrite:
    """A batch's member-administration rows, written in the batch's transaction (member_store.write)."""

    # (transaction_id, member_id, signed points, reason, note, key_id)
    adjustments: list[tuple[int, str, int, int, str, str]] = dataclasses.field(default_factory=list)
    # (original_transaction_id, reversal_transaction_id, reason, note, key_id)
    reversals: list[tuple[int, int, int, str, str]] = dataclasses.field(default_factory=list)
    # member_id -> its status after the batch (None: active again)
    statuses: dict[str, MemberStatus | None] = dataclasses.field(default_factory=dict)
    # (member_id, event, payload)
    events: list[tuple[str, str, dict[str, Any]]] = dataclasses.field(default_factory=list)
    # in order: (alias, member_id) binds, (alias, None) unbinds
    aliases: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)
    # (household_id, head_member_id) created
    households: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # in order: (member_id, household_id) joins, (member_id, None) leaves
    memberships: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)
    # (transaction_id, from account's member id, to account's member id, points, fee)
    transfers: list[tuple[int, str, str, int, int]] = dataclasses.field(default_factory=list)
    # (source_member_id, target_member_id, transaction_id | None, points)
    merges: list[tuple[str, str, int | None, int]] = dataclasses.field(default_factory=list)


def record_member_event(conn_or_write: Any, member_id: str, event: str, payload: dict[str, Any]) -> Any:
    """The one way a member event (frozen, unfrozen, closed, merged) is recorded for the change feed: into
    a batch's MemberWrite (written with the batch), or, given an asyncpg connection, at once (returns the
    coroutine to await). The rows go to member_status_log (migration 0011) and, through
    member_store.insert_events, to the change feed's member_events (processor/events.py)."""
    if isinstance(conn_or_write, MemberWrite):
        conn_or_write.events.append((member_id, event, payload))
        return None
    from processor import member_store

    return member_store.insert_events(conn_or_write, [(member_id, event, payload)], dt.datetime.now(dt.timezone.utc))


class MemberRegistry:
    """Members' administrative state in memory (no row = active) and the transactions reversed, with an
    undo log per open batch (begin / commit / rollback_newest / rollback, as ProgramState)."""

    def __init__(
        self,
        statuses: dict[str, MemberStatus] | None = None,
        reversed_by: dict[int, int] | None = None,
        aliases: dict[str, str] | None = None,
        households: dict[str, str] | None = None,
        household_of: dict[str, str] | None = None,
        transferred: dict[str, tuple[int, int]] | None = None,
    ):
        self.statuses: dict[str, MemberStatus] = dict(statuses or {})
        # original transaction id -> the reversal's transaction id
        self.reversed_by: dict[int, int] = dict(reversed_by or {})
        self.aliases: dict[str, str] = dict(aliases or {})  # alias -> member_id
        self.households: dict[str, str] = dict(households or {})  # household_id -> head member_id
        self.household_of: dict[str, str] = dict(household_of or {})  # member_id -> household_id
        # member_id -> (UTC day number, point-units it sent by transfer that day)
        self.transferred: dict[str, tuple[int, int]] = dict(transferred or {})
        # The ids route() acts on (an alias, a member with a status or a household): the keys of aliases,
        # statuses and household_of, kept current by _set and rollback_newest. The state machine's batch
        # loop calls route() only for an operation naming one, a refund or a link (see route()): one set
        # probe an operation instead of a call (measured: see LedgerStateMachine._apply_batch).
        self.routed: set[str] = {*self.aliases, *self.statuses, *self.household_of}
        self._undo: list[list[tuple[dict[Any, Any], Any, Any]]] = []
        # Reversals asked and not yet answered (original id -> how many), and those of them a merchant's
        # Refund named meanwhile. The servicer reads the original from committed state; a refund routed
        # after it registered the reversal (so not in what it read) makes the reversal refuse rather than
        # mirror a transaction already refunded in part. Not undone by a rollback (a refusal is safe, a
        # retry passes); both hold at most the reversals in flight.
        self.pending_reversals: dict[int, int] = {}
        self.refunded_pending: set[int] = set()

    def begin(self) -> None:
        self._undo.append([])

    def commit(self) -> None:
        require(bool(self._undo), "member registry: commit with no batch open")
        self._undo.pop(0)

    def rollback_newest(self) -> None:
        require(bool(self._undo), "member registry: rollback with no batch open")
        for table, key, old in reversed(self._undo.pop()):
            if old is _MISSING:
                table.pop(key, None)
            else:
                table[key] = old
            self._routed_changed(key)

    def rollback(self) -> None:
        while self._undo:
            self.rollback_newest()

    def _set(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        require(bool(self._undo), "member registry: change outside a batch")
        self._undo[-1].append((table, key, table.get(key, _MISSING)))
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
        self._routed_changed(key)

    def _routed_changed(self, key: Any) -> None:
        """Keeps `routed` the keys of aliases, statuses and household_of after `key` changed in a table
        (any table: a key of another one, a transaction id, is simply not routed)."""
        if key in self.aliases or key in self.statuses or key in self.household_of:
            self.routed.add(key)
        else:
            self.routed.discard(key)

    def set_status(self, member_id: str, status: MemberStatus | None) -> None:
        self._set(self.statuses, member_id, status)

    def mark_reversed(self, original_id: int, reversal_id: int) -> None:
        self._set(self.reversed_by, original_id, reversal_id)

    def bind(self, alias: str, member_id: str | None) -> None:
        self._set(self.aliases, alias, member_id)

    def add_household(self, household_id: str, head_member_id: str) -> None:
        self._set(self.households, household_id, head_member_id)

    def set_household(self, member_id: str, household_id: str | None) -> None:
        self._set(self.household_of, member_id, household_id)

    def transferred_on(self, member_id: str, day: int) -> int:
        sent = self.transferred.get(member_id)
        return sent[1] if sent is not None and sent[0] == day else 0

    def add_transferred(self, member_id: str, day: int, points: int) -> None:
        self._set(self.transferred, member_id, (day, self.transferred_on(member_id, day) + points))

    def status(self, member_id: str) -> MemberStatus | None:
        return self.statuses.get(member_id)

    def expect_reversal(self, original_id: int) -> None:
        self.pending_reversals[original_id] = self.pending_reversals.get(original_id, 0) + 1

    def reversal_answered(self, original_id: int) -> None:
        left = self.pending_reversals.get(original_id, 0) - 1
        if left > 0:
            self.pending_reversals[original_id] = left
        else:  # (a registry rebuilt by a resync meanwhile knows nothing of it)
            self.pending_reversals.pop(original_id, None)
            self.refunded_pending.discard(original_id)

    def _refund_route(self, op: Operation) -> Outcome | None:
        """A merchant's Refund of a transaction reversed (ReverseTransaction) is refused: nothing is left
        to refund. One naming a transaction whose reversal is in flight marks it (see pending_reversals)."""
        reversal = self.reversed_by.get(op.transaction_id)
        if reversal is not None:
            metrics.rejections.labels("not_refundable").inc()
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=f"transaction {domain.format_transaction_id(op.transaction_id)} was reversed by the operator "
                f"({domain.format_transaction_id(reversal)}); nothing of it is left to refund",
                recorded=False,
                reason="not_refundable",
            )
        if op.transaction_id in self.pending_reversals:
            self.refunded_pending.add(op.transaction_id)
        return None

    def resolve(self, member_id: str) -> str:
        """The member an id names: the member an alias is bound to (through merges: a merged member's id
        is an alias of its target, and its own aliases still name it), else the id itself."""
        for _ in range(ALIAS_HOPS_MAX):
            bound = self.aliases.get(member_id)
            if bound is None:
                return member_id
            member_id = bound
        raise InvariantViolation(f"aliases of {member_id!r} chain further than {ALIAS_HOPS_MAX} merges")

    def account_of(self, member_id: str) -> str:
        """The member id whose points account the member earns on and spends: its household's, if any."""
        household = self.household_of.get(member_id)
        return member_id if household is None else HOUSEHOLD_ACCOUNT_PREFIX + household

    def route(self, op: Operation) -> Outcome | None:
        """A till's operation: its member_id resolved (an alias to its member, a household member's earn or
        spend to the household's account), or its refusal because of the member's state. A refusal is not
        recorded under the idempotency key: the state may change (an unfreeze), and a retry may pass."""
        # On every till operation: the common case (a member with no alias, status or household) costs three
        # dict probes and no Enum hashing (measured: 1.2-1.7 µs an operation before, against ~14 µs for
        # the whole of apply()'s work on an earn).
        # (a refund's and a link's checks below: measured +20 ns on an earn's route(), 100 -> 120 ns with the
        # call; a refund once any transaction was reversed 255 ns; timeit of 1e6 calls, best of 5)
        # The state machine's batch loop skips the call when none of the three tests below can act: no
        # transaction_id, no referrer_id, a member_id not in `routed` (needs_route() says the same, for
        # the tests: a change here changes both).
        if op.transaction_id and op.method is Method.REFUND and (self.reversed_by or self.pending_reversals):
            return self._refund_route(op)
        if op.referrer_id and op.referrer_id in self.aliases:  # a LinkMember's referrer named by a card or merge
            op.referrer_id = self.resolve(op.referrer_id)
        member_id = op.member_id
        if member_id not in self.routed:  # no alias, status or household: nothing to do
            return None
        if member_id in self.aliases:
            member_id = self.resolve(member_id)
        if op.method not in _NAMING_MEMBER or not op.member_id:
            return None
        op.member_id = member_id
        refusal = self._refusal(op)
        if refusal is None and op.method in _SHARED:
            op.member_id = self.account_of(member_id)
        return refusal

    def needs_route(self, op: Operation) -> bool:
        """False when route(op) would do nothing and return None: the state machine's batch loop makes
        this test inline (a call an operation is what it saves) and calls route() only when it is True."""
        return bool(op.transaction_id or op.referrer_id or op.member_id in self.routed)

    def _refusal(self, op: Operation) -> Outcome | None:
        status = self.statuses.get(op.member_id)
        if status is None:
            return None
        if status.state == STATE_CLOSED:
            metrics.rejections.labels("member_closed").inc()
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=closed_message(op.member_id, status),
                recorded=False,
                reason="member_closed",
            )
        if status.state == STATE_FROZEN and op.method in _SPENDING:
            metrics.rejections.labels("member_frozen").inc()
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=frozen_message(op.member_id, status),
                recorded=False,
                reason="member_frozen",
            )
        return None


def _iso(micros: int) -> str:
    moment = dt.datetime.fromtimestamp(micros / 1_000_000, dt.timezone.utc).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def frozen_message(member_id: str, status: MemberStatus) -> str:
    why = f" ({status.reason})" if status.reason else ""
    return (
        f"member {member_id!r} is frozen since {_iso(status.since_us)}{why}: it may earn, but not redeem, "
        "authorize or be debited; the operator unfreezes it (UnfreezeMember)"
    )


def closed_message(member_id: str, status: MemberStatus) -> str:
    why = f" ({status.reason})" if status.reason else ""
    return f"member {member_id!r} is closed since {_iso(status.since_us)}{why}; a closed member cannot be used again"


class MemberPostingsMixin(MachineParts):
    """The member-administration paths of LedgerStateMachine; see the module's docstring."""

    members: MemberRegistry  # set by LedgerStateMachine

    def _member_admin(self, op: Operation, write: BatchWrite, now_us: int) -> Outcome:
        """Applies one member-administration operation (op.method in METHODS) to the batch."""
        if write.members is None:
            write.members = MemberWrite()
        if op.method is Method.REMOVE_ALIAS:
            return self._unbind(op, write)
        if op.method is Method.REVERSE:  # the mirror posts on the original's own accounts
            merged_into = self.members.aliases.get(op.member_id)
            if merged_into is not None:
                return Outcome(
                    Code.FAILED_PRECONDITION,
                    message=f"member {op.member_id!r} of that transaction was merged into {merged_into!r}; adjust "
                    f"{merged_into!r} instead (AdjustPoints)",
                    recorded=False,
                )
        else:
            op.member_id = self.members.resolve(op.member_id)  # an alias names its member here too
        status = self.members.status(op.member_id)
        if status is not None and status.state == STATE_CLOSED:
            metrics.rejections.labels("member_closed").inc()
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=closed_message(op.member_id, status),
                recorded=False,
                reason="member_closed",
            )
        method = op.method
        if method is Method.ADJUST:
            return self._adjust(op, write, now_us, status)
        if method is Method.REVERSE:
            return self._reverse(op, write, now_us, status)
        if method is Method.CLOSE_MEMBER:
            return self._close(op, write, now_us)
        if method is Method.TRANSFER:
            return self._transfer(op, write, now_us, status)
        if method is Method.MERGE:
            return self._merge(op, write, now_us, status)
        slot = self.ledger.member_slot(op.member_id)
        if slot < 0:
            return _unknown_member(op.member_id)
        if method is Method.ADD_ALIAS:
            return self._bind(op, write)
        if method in (Method.CREATE_HOUSEHOLD, Method.JOIN_HOUSEHOLD, Method.LEAVE_HOUSEHOLD):
            return self._household(op, write)
        reason = str(op.request.get("reason", ""))
        if method is Method.FREEZE:
            if status is None:  # freezing a frozen member keeps its first time and reason
                status = MemberStatus(STATE_FROZEN, reason, now_us)
                self._change_status(write, op.member_id, status, EVENT_FROZEN, {"reason": reason})
            return Outcome(Code.OK, status_fields(op.member_id, status), recorded=False)
        if status is not None:  # UNFREEZE
            self._change_status(write, op.member_id, None, EVENT_UNFROZEN, {})
        return Outcome(Code.OK, status_fields(op.member_id, None), recorded=False)

    def _change_status(
        self, write: BatchWrite, member_id: str, status: MemberStatus | None, event: str, payload: dict[str, Any]
    ) -> None:
        require(write.members is not None, "member rows of the batch")
        self.members.set_status(member_id, status)
        write.members.statuses[member_id] = status
        record_member_event(write.members, member_id, event, payload)

    def _adjust(self, op: Operation, write: BatchWrite, now_us: int, status: MemberStatus | None) -> Outcome:
        # a household member's adjustment goes to the balance it earns on and spends: the household's
        ledger, member_id, points = self.ledger, self.members.account_of(op.member_id), op.points
        require(points != 0, "an adjustment of 0 point-units")
        slot = ledger.member_slot(member_id)
        if points < 0:
            if slot < 0:
                return _unknown_member(member_id)
            if status is not None and status.state == STATE_FROZEN:
                metrics.rejections.labels("member_frozen").inc()
                return Outcome(
                    Code.FAILED_PRECONDITION,
                    message=frozen_message(member_id, status),
                    recorded=False,
                    reason="member_frozen",
                )
            self._expire_member(write, member_id, now_us)  # expired points are not there to debit
            posted, held = ledger.balance(slot)
            if posted - held < -points:
                metrics.rejections.labels("insufficient_points").inc()
                return Outcome(
                    Code.FAILED_PRECONDITION,
                    message=f"member {member_id!r} has {posted - held} point-units available ({held} held); "
                    f"a debit of {-points} would take it below zero. Debit at most {posted - held}",
                    reason="insufficient_points",
                    recorded=False,
                )
        else:
            slot = self._ensure_member(write, member_id)
            if slot < 0:
                return Outcome(Code.RESOURCE_EXHAUSTED, message="the ledger is full of members; contact the operator")
            posted, held = ledger.balance(slot)
            if posted + points > fastpath.BALANCE_MAX:
                return Outcome(
                    Code.FAILED_PRECONDITION,
                    message=f"member {member_id!r} would hold more than {fastpath.BALANCE_MAX} point-units",
                )
        kind = kinds.KIND_ADJUSTMENT_CREDIT if points > 0 else kinds.KIND_ADJUSTMENT_DEBIT
        created = self._member_posting(write, kind, member_id, points, op.idempotency_key, None)
        if points < 0:  # the soonest-expiring points go first, as a redemption's
            self.program.consume(member_id, (OWNER_TRANSACTION, created), -points, posted - held, now_us)
        else:  # a lot of its own, expiring as an earn's would (the operator funded it: the issuer of its breakage)
            self.program.credit_lot(
                self.program.version(now_us), member_id, created, points, domain.OPERATOR_ID, now_us
            )
        reason, note, key_id = int(op.request["reason"]), str(op.request["note"]), str(op.request["key_id"])
        require(write.members is not None, "member rows of the batch")
        write.members.adjustments.append((created, member_id, points, reason, note, key_id))
        posted, held = ledger.balance(slot)
        return Outcome(
            Code.OK,
            {"transaction_id": created, "points": points, "balance": posted, "available": posted - held},
        )

    def _reverse(self, op: Operation, write: BatchWrite, now_us: int, status: MemberStatus | None) -> Outcome:
        """The exact mirror of every entry of one transaction and of the transactions it set off (an
        earn's tier and referral bonuses, acquiring reward and merchant match), once, as one reversal
        transaction per original. The servicer read them from committed state (op.request["originals"]:
        each with its entries as [account_id, account kind, owner, asset, amount], POINTS only, and
        op.request["earn_record"], an earn's record under a program). Every check comes before any
        change: never a partial reversal."""
        ledger, program, members, original = self.ledger, self.program, self.members, op.transaction_id
        name = domain.format_transaction_id(original)

        def refuse(message: str, reason: str = "not_reversible") -> Outcome:
            return Outcome(Code.FAILED_PRECONDITION, message=message, recorded=False, reason=reason)

        originals = [
            (int(o["transaction_id"]), int(o["kind"]), str(o["member_id"]), str(o["merchant_id"]), o["legs"])
            for o in op.request["originals"]
        ]
        require(bool(originals) and originals[0][0] == original, f"the reversal of {name} names its original first")
        for transaction_id, *_ in originals:
            done = members.reversed_by.get(transaction_id)
            if done is not None:
                return refuse(
                    f"transaction {domain.format_transaction_id(transaction_id)} was reversed already, by "
                    f"{domain.format_transaction_id(done)}; a transaction is reversed once"
                )
        if original in members.refunded_pending:
            return refuse(
                f"a refund of transaction {name} was made while its reversal was being asked; a reversal mirrors a "
                "whole transaction, never a refunded one. Read the transaction again (ListTransactions)"
            )
        record = program.earns.get(original)
        if record is None and op.request.get("earn_record"):
            record = _earn_record(op.request["earn_record"])
            program.load_earn(original, record)  # committed state: no batch in flight touched it (not resident)
        if record is not None and record.refunded_base:
            return refuse(
                f"transaction {name} was refunded in part ({record.refunded_base} of {record.earn.base} base "
                "point-units): a reversal mirrors a whole transaction; refund the rest through its merchant's Refund"
            )
        # per original: its mirror, and what it does to each member's points
        mirrors: list[tuple[int, int, str, list[tuple[int, str, str, int]], dict[str, int]]] = []
        deltas: dict[str, int] = {}
        matched: dict[str, int] = {}  # merchant -> merchant-match points the reversal takes back
        for transaction_id, kind, member_id, merchant_id, legs in originals:
            mirror = []
            own: dict[str, int] = {}
            for account_id, account_kind, owner, asset, amount in legs:
                require(asset == domain.ASSET_POINTS, f"the reversal of {name} mirrors POINTS only")
                mirror.append((int(account_id), str(account_kind), str(owner), -int(amount)))
                if account_kind == domain.ACCOUNT_MEMBER:
                    own[owner] = own.get(owner, 0) - int(amount)
                    deltas[owner] = deltas.get(owner, 0) - int(amount)
                elif account_kind == rules.ACCOUNT_MERCHANT_POINTS:
                    matched[owner] = matched.get(owner, 0) + int(amount)
            mirrors.append((transaction_id, kind, member_id, mirror, own))
        for merchant_id, points in matched.items():
            held = program.merchant_points.get(merchant_id, 0)
            if held < points:
                return refuse(
                    f"merchant {merchant_id!r} holds {held} point-units of the merchant match; the reversal of {name} "
                    f"would take back {points}. The matched points were spent"
                )
        for member_id, delta in deltas.items():
            if member_id in members.aliases:
                return refuse(
                    f"member {member_id!r} of transaction {name} was merged into {members.resolve(member_id)!r}; "
                    "adjust that member instead (AdjustPoints)"
                )
            member_status = members.status(member_id)
            if member_status is not None and member_status.state == STATE_CLOSED:
                return refuse(closed_message(member_id, member_status), "member_closed")
            slot = ledger.member_slot(member_id)
            require(slot >= 0, f"member {member_id!r} of transaction {name} is not resident")
            if delta < 0:
                if member_status is not None and member_status.state == STATE_FROZEN:
                    return refuse(frozen_message(member_id, member_status), "member_frozen")
                self._expire_member(write, member_id, now_us)
                posted, held = ledger.balance(slot)
                if posted - held < -delta:
                    metrics.rejections.labels("insufficient_points").inc()
                    return refuse(
                        f"transaction {name} credited {-delta} point-units that member {member_id!r} no longer has: "
                        f"{posted - held} available ({held} held). The points were spent (or expired); adjust the "
                        "member instead (AdjustPoints) if a correction is still due",
                        "insufficient_points",
                    )
            elif ledger.balance(slot)[0] + delta > fastpath.BALANCE_MAX:
                return refuse(f"member {member_id!r} would hold more than {fastpath.BALANCE_MAX} point-units")
        version = program.version(now_us)
        grace = version.restore_grace_us if version is not None else 0
        require(write.members is not None, "member rows of the batch")
        reason, note, key_id = int(op.request["reason"]), str(op.request["note"]), str(op.request["key_id"])
        answer = 0
        for transaction_id, kind, member_id, mirror, own in mirrors:
            points = own.get(member_id, 0)  # what the reversal does to the original's member
            reversal_kind = kinds.KIND_REVERSAL_CREDIT if points > 0 else kinds.KIND_REVERSAL_DEBIT
            # the transaction itself under the call's key, what it set off under keys derived from it
            key = op.idempotency_key if transaction_id == original else f"reversal:{transaction_id}"
            created = self._operator_transaction(write, reversal_kind, member_id, abs(points), key, transaction_id)
            for owner, delta in own.items():
                slot = ledger.member_slot(owner)
                posted, held = ledger.balance(slot)
                ledger.load_member(owner, posted + delta)
                if delta > 0:  # the lots the original consumed come back, as a refund's
                    program.restore(owner, (OWNER_TRANSACTION, transaction_id), None, posted - held, now_us, grace)
                elif record is not None and transaction_id == original:
                    # the earn's own lot first, its qualifying points and its record, as a whole refund's
                    program.refunded_earn(
                        program.version_numbered(record.version),
                        original,
                        record,
                        owner,
                        record.earn.base,
                        -delta,
                        posted - held,
                        now_us,
                    )
                else:  # a credit's own lot first (lot id = its transaction id), then the soonest-expiring
                    program.refunded_earn(None, transaction_id, None, owner, 0, -delta, posted - held, now_us)
            for account_id, account_kind, owner, amount in mirror:
                if account_kind == domain.ACCOUNT_MEMBER:
                    require(
                        ledger.member_account(ledger.member_slot(owner)) == account_id,
                        f"member {owner!r}'s account is not {account_id}",
                    )
                elif account_kind == rules.ACCOUNT_MERCHANT_POINTS:
                    program.move_merchant_points(owner, amount)
                write.entries.append((created, account_id, amount))
            members.mark_reversed(transaction_id, created)
            write.members.reversals.append((transaction_id, created, reason, note, key_id))
            if transaction_id == original:
                answer = created
        points = deltas.get(op.member_id, 0)
        posted, held = ledger.balance(ledger.member_slot(op.member_id))
        return Outcome(
            Code.OK,
            {
                "transaction_id": answer,
                "original_transaction_id": original,
                "member_id": op.member_id,
                "points": points,
                "balance": posted,
                "available": posted - held,
            },
        )

    def _close(self, op: Operation, write: BatchWrite, now_us: int) -> Outcome:
        ledger, program, member_id = self.ledger, self.program, op.member_id
        slot = ledger.member_slot(member_id)
        if slot < 0:
            return _unknown_member(member_id)
        household = self.members.household_of.get(member_id)
        if household is not None:
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=f"member {member_id!r} is in household {household!r}; it leaves it first (LeaveHousehold)",
                recorded=False,
            )
        if member_id.startswith(HOUSEHOLD_ACCOUNT_PREFIX):
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=f"{member_id!r} is a household's shared account: its members' earns land there, so it is "
                "not closed (nor merged)",
                recorded=False,
            )
        posted, held = ledger.balance(slot)
        vouchers_held = program.vouchers_held.get(member_id, (0, 0))
        if held or any(vouchers_held):
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=f"member {member_id!r} has open holds ({held} point-units, {sum(vouchers_held)} "
                "voucher-units); capture or void them, or wait for them to expire, then close it",
                recorded=False,
            )
        vouchers = program.vouchers.get((rules.HOLDER_MEMBER, member_id), 0)
        credit = program.credit.get(member_id, 0)
        if vouchers or credit:
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=f"member {member_id!r} holds {vouchers} voucher-units and owes {credit} of voucher credit; "
                "a closure moves points only: settle the vouchers first",
                recorded=False,
            )
        self._expire_member(write, member_id, now_us)  # expired lots go to breakage as expiries first
        posted, held = ledger.balance(slot)
        created = 0
        if posted:
            created = self._member_posting(
                write, kinds.KIND_MEMBER_CLOSURE, member_id, -posted, op.idempotency_key, None, closure=True
            )
            program.consume(member_id, (OWNER_TRANSACTION, created), posted, posted, now_us)
        reason = str(op.request.get("reason", ""))
        status = MemberStatus(STATE_CLOSED, reason, now_us)
        self._change_status(write, member_id, status, EVENT_CLOSED, {"reason": reason, "points_to_breakage": posted})
        return Outcome(
            Code.OK,
            {"member_id": member_id, "transaction_id": created, "points_to_breakage": posted, "closed_at_us": now_us},
        )

    def _transfer(self, op: Operation, write: BatchWrite, now_us: int, status: MemberStatus | None) -> Outcome:
        """Points from one member's account to another's (each its household's, if any), less the program's
        fee to operator_transfer_fees, within the sender's daily cap."""
        ledger, members, sender, points = self.ledger, self.members, op.member_id, op.points
        version = self.program.version(now_us)
        if version is None or version.member_transfers != rules.TRANSFERS_ON:
            return Outcome(
                Code.FAILED_PRECONDITION,
                message="the program in force does not allow member-to-member transfers (ProgramRules.member_transfers)",
                recorded=False,
            )
        if status is not None and status.state == STATE_FROZEN:
            metrics.rejections.labels("member_frozen").inc()
            return Outcome(
                Code.FAILED_PRECONDITION, message=frozen_message(sender, status), recorded=False, reason="member_frozen"
            )
        receiver = members.resolve(str(op.request["to_member_id"]))
        receiver_status = members.status(receiver)
        if receiver_status is not None and receiver_status.state == STATE_CLOSED:
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=closed_message(receiver, receiver_status),
                recorded=False,
                reason="member_closed",
            )
        source, target = members.account_of(sender), members.account_of(receiver)
        if source == target:
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=f"members {sender!r} and {receiver!r} share one balance ({source!r}); nothing to transfer "
                "while both are in the household (LeaveHousehold)",
                recorded=False,  # about the members' state: the key stays free for when one has left
            )
        source_slot, target_slot = ledger.member_slot(source), ledger.member_slot(target)
        if source_slot < 0 or target_slot < 0:
            return _unknown_member(sender if source_slot < 0 else receiver)
        day = now_us // rules.DAY_US
        # the cap is on the account the points leave (a household's members share theirs)
        sent, cap = members.transferred_on(source, day), version.member_points_transferred_per_day_max
        if cap and sent + points > cap:
            retry = ((day + 1) * rules.DAY_US - now_us) / 1_000_000
            return Outcome(
                Code.RESOURCE_EXHAUSTED,
                message=f"member {sender!r} sent {sent} of its {cap} point-units of transfers today (UTC); {points} "
                f"more would pass the cap. Retry after midnight UTC (in {retry:.0f} s)",
                recorded=False,
                retry_after_seconds=retry,
                quota=(f"member:{sender}", f"{cap} point-units of transfers per UTC day"),
            )
        self._expire_member(write, source, now_us)
        posted, held = ledger.balance(source_slot)
        if posted - held < points:
            metrics.rejections.labels("insufficient_points").inc()
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=f"member {sender!r} has {posted - held} point-units available ({held} held); it cannot "
                f"send {points}",
                reason="insufficient_points",
                recorded=False,
            )
        fee = domain.fee_point_units(points, version.member_transfer_fee_bps)
        received = points - fee
        target_posted, _ = ledger.balance(target_slot)
        if target_posted + received > fastpath.BALANCE_MAX:
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=f"member {receiver!r} would hold more than {fastpath.BALANCE_MAX} point-units",
                recorded=False,
            )
        ledger.load_member(source, posted - points)
        ledger.load_member(target, target_posted + received)
        created = self._operator_transaction(
            write, kinds.KIND_TRANSFER, source, points, op.idempotency_key, fee=fee, version=version.version
        )
        write.entries.append((created, ledger.member_account(source_slot), -points))
        if received:
            write.entries.append((created, ledger.member_account(target_slot), received))
        if fee:
            write.entries.append((created, self.operator_accounts[ACCOUNT_OPERATOR_TRANSFER_FEES], fee))
        self.program.consume(source, (OWNER_TRANSACTION, created), points, posted - held, now_us)
        self.program.credit_lots(
            target, _received_lots(self.program.pieces.get((OWNER_TRANSACTION, created), ()), received, created)
        )
        members.add_transferred(source, day, points)
        require(write.members is not None, "member rows of the batch")
        write.members.transfers.append((created, source, target, points, fee))
        posted, held = ledger.balance(source_slot)
        return Outcome(
            Code.OK,
            {
                "transaction_id": created,
                "points": points,
                "fee": fee,
                "received": received,
                "balance": posted,
                "available": posted - held,
            },
        )

    def _merge(self, op: Operation, write: BatchWrite, now_us: int, status: MemberStatus | None) -> Outcome:
        """The source's points (with their lots) and qualifying points to the target, in one posting; the
        source id becomes an alias of the target. Never partial: every refusal comes before any change."""
        ledger, program, members, source = self.ledger, self.program, self.members, op.member_id
        target = members.resolve(str(op.request["target_member_id"]))

        def refuse(message: str, reason: str = "") -> Outcome:
            return Outcome(Code.FAILED_PRECONDITION, message=message, recorded=False, reason=reason)

        if source == target:
            return refuse(f"{op.request['source_member_id']!r} and {op.request['target_member_id']!r} name one member")
        source_slot, target_slot = ledger.member_slot(source), ledger.member_slot(target)
        if source_slot < 0 or target_slot < 0:
            return _unknown_member(source if source_slot < 0 else target)
        target_status = members.status(target)
        if target_status is not None and target_status.state == STATE_CLOSED:
            return refuse(closed_message(target, target_status), "member_closed")
        if status is not None and status.state == STATE_FROZEN:
            return refuse(frozen_message(source, status), "member_frozen")
        for member_id in (source, target):
            household = members.household_of.get(member_id)
            if household is not None:
                return refuse(f"member {member_id!r} is in household {household!r}; it leaves it first")
            if member_id.startswith(HOUSEHOLD_ACCOUNT_PREFIX):
                return refuse(f"{member_id!r} is a household's shared account; it is not merged")
        posted, held = ledger.balance(source_slot)
        if held or any(program.vouchers_held.get(source, (0, 0))):
            return refuse(f"member {source!r} has open holds; capture or void them, or wait for them to expire")
        if program.lots_collide(source, target):
            return refuse(f"members {source!r} and {target!r} hold lots of one id; contact the operator")
        target_posted, _ = ledger.balance(target_slot)
        if target_posted + posted > fastpath.BALANCE_MAX:
            return refuse(f"member {target!r} would hold more than {fastpath.BALANCE_MAX} point-units")
        self._expire_member(write, source, now_us)  # expired lots go to breakage, not to the target
        posted, _ = ledger.balance(source_slot)
        # the source's vouchers, and the voucher credit it owes, go with it (VOUCHERS entries of the posting)
        vouchers, credit = program.vouchers.get((rules.HOLDER_MEMBER, source), 0), program.credit.get(source, 0)
        created = 0
        if posted or vouchers or credit:
            created = self._operator_transaction(write, kinds.KIND_MERGE, source, posted, op.idempotency_key)
        if posted:
            ledger.load_member(source, 0)
            ledger.load_member(target, target_posted + posted)
            write.entries.append((created, ledger.member_account(source_slot), -posted))
            write.entries.append((created, ledger.member_account(target_slot), posted))
        # a member's vouchers are + on its member account; the credit it owes is - on its credit account
        for kind, amount in ((domain.ACCOUNT_MEMBER, vouchers), (rules.ACCOUNT_MEMBER_VOUCHER_CREDIT, -credit)):
            if amount:
                write.entries.append(
                    (created, self._voucher_account(write, kind, source), -amount, rules.ASSET_VOUCHERS)
                )
                write.entries.append(
                    (created, self._voucher_account(write, kind, target), amount, rules.ASSET_VOUCHERS)
                )
        if vouchers:
            program.move_vouchers((rules.HOLDER_MEMBER, source), -vouchers)
            program.move_vouchers((rules.HOLDER_MEMBER, target), vouchers)
        if credit:
            program.move_credit(source, -credit)
            program.move_credit(target, credit)
        program.merge_members(source, target)
        members.bind(source, target)
        require(write.members is not None, "member rows of the batch")
        write.members.aliases.append((source, target))
        write.members.merges.append((source, target, created or None, posted))
        record_member_event(write.members, source, EVENT_MERGED, {"into": target, "points": posted})
        record_member_event(write.members, target, EVENT_MERGED, {"from": source, "points": posted})
        target_posted, target_held = ledger.balance(target_slot)
        return Outcome(
            Code.OK,
            {
                "transaction_id": created,
                "source_member_id": source,
                "target_member_id": target,
                "points": posted,
                "balance": target_posted,
                "available": target_posted - target_held,
            },
        )

    def _bind(self, op: Operation, write: BatchWrite) -> Outcome:
        alias, member_id = str(op.request["alias"]), op.member_id
        bound = self.members.aliases.get(alias)
        fields = {"member_id": member_id, "alias": alias}
        if bound == member_id:
            return Outcome(Code.OK, fields, recorded=False)
        if bound is not None:
            return Outcome(
                Code.ALREADY_EXISTS,
                message=f"alias {alias!r} names member {bound!r}; remove it there first (RemoveMemberAlias)",
                recorded=False,
            )
        if alias == member_id or self.ledger.member_slot(alias) >= 0 or alias.startswith(HOUSEHOLD_ACCOUNT_PREFIX):
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=f"{alias!r} is a member with a points account of its own; it cannot be an alias",
                recorded=False,
            )
        self.members.bind(alias, member_id)
        require(write.members is not None, "member rows of the batch")
        write.members.aliases.append((alias, member_id))
        return Outcome(Code.OK, fields, recorded=False)

    def _unbind(self, op: Operation, write: BatchWrite) -> Outcome:
        alias = str(op.request["alias"])
        member_id = self.members.aliases.get(alias)
        if member_id is None:
            return Outcome(Code.NOT_FOUND, message=f"alias {alias!r} names no member", recorded=False)
        if self.ledger.member_slot(alias) >= 0:
            # only a merge binds an id with a points account (_bind refuses one): unbinding it would bring
            # the merged member back, empty, and its cards with it, while its points and lots stay moved
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=f"{alias!r} is a member merged into {member_id!r} (MergeMembers), not a card or phone "
                "number; a merge is not undone, so its id stays an alias of the member it was merged into",
                recorded=False,
            )
        self.members.bind(alias, None)
        require(write.members is not None, "member rows of the batch")
        write.members.aliases.append((alias, None))
        return Outcome(Code.OK, {"member_id": member_id, "alias": alias}, recorded=False)

    def _household(self, op: Operation, write: BatchWrite) -> Outcome:
        members, member_id, method = self.members, op.member_id, op.method
        require(write.members is not None, "member rows of the batch")
        current = members.household_of.get(member_id)
        if method is Method.LEAVE_HOUSEHOLD:
            if current is None:
                return Outcome(
                    Code.FAILED_PRECONDITION, message=f"member {member_id!r} is in no household", recorded=False
                )
            members.set_household(member_id, None)
            write.members.memberships.append((member_id, None))
            return Outcome(Code.OK, {"household_id": current, "member_id": member_id}, recorded=False)
        household = str(op.request["household_id"])
        if method is Method.JOIN_HOUSEHOLD and household not in members.households:
            return Outcome(Code.NOT_FOUND, message=f"household {household!r} does not exist", recorded=False)
        if current is not None:
            return Outcome(
                Code.FAILED_PRECONDITION,
                message=f"member {member_id!r} is in household {current!r} already; it leaves it first",
                recorded=False,
            )
        if method is Method.CREATE_HOUSEHOLD:
            require(household not in members.households, f"household id {household!r} handed out twice")
            if self._ensure_member(write, HOUSEHOLD_ACCOUNT_PREFIX + household) < 0:
                return Outcome(Code.RESOURCE_EXHAUSTED, message="the ledger is full of members; contact the operator")
            members.add_household(household, member_id)
            write.members.households.append((household, member_id))
        members.set_household(member_id, household)
        write.members.memberships.append((member_id, household))
        return Outcome(Code.OK, {"household_id": household, "member_id": member_id}, recorded=False)

    def _ensure_member(self, write: BatchWrite, member_id: str) -> int:
        """The member's slot, opening its account in this batch if it is new (-1: the ledger is full)."""
        ledger = self.ledger
        slot: int = ledger.ensure_member(member_id)
        if slot >= 0 and ledger.member_account(slot) == 0:
            account_id = self.account_ids.pop()
            ledger.set_member_account(slot, account_id)
            write.new_members.append((member_id, account_id))
        return slot

    def _operator_transaction(
        self,
        write: BatchWrite,
        kind: int,
        member_id: str,
        amount: int,
        key: str,
        original: int | None = None,
        fee: int = 0,
        version: int | None = None,
    ) -> int:
        """A new transaction of the operator's (no merchant, no purchase, no authorization) in the batch;
        its id. The caller adds its entries."""
        created: int = self.ids.transaction()
        write.transactions.append(
            (created, kind, domain.OPERATOR_ID, member_id, amount, None, None, original, key, fee, version)
        )
        return created

    def _member_posting(
        self,
        write: BatchWrite,
        kind: int,
        member_id: str,
        points: int,
        key: str,
        original: int | None,
        closure: bool = False,
    ) -> int:
        """One transaction moving `points` (signed) on the member against operator_adjustments, or, for a
        closure, to operator_breakage; the fast path's balance moves with it (in its undo log)."""
        ledger = self.ledger
        slot = ledger.member_slot(member_id)
        posted, held = ledger.balance(slot)
        require(posted + points - held >= 0, f"member {member_id!r}: {points} would leave less than held {held}")
        ledger.load_member(member_id, posted + points)
        counter = domain.ACCOUNT_OPERATOR_BREAKAGE if closure else ACCOUNT_OPERATOR_ADJUSTMENTS
        created = self._operator_transaction(write, kind, member_id, abs(points), key, original)
        write.entries.append((created, ledger.member_account(slot), points))
        write.entries.append((created, self.operator_accounts[counter], -points))
        return created


def _received_lots(pieces: tuple[rules.Lot, ...], received: int, transfer_id: int) -> list[rules.Lot]:
    """What a transfer's receiver holds of the sender's points: their expiries, so a transfer never
    lengthens the life of points (nor a transfer back and forth). The fee is the soonest-expiring part of
    what the sender paid; the receiver's lots are the rest, one per expiry, keyed by the transfer's id
    (new to the receiver), with the issuer of that expiry's first piece; never-expiring pieces stay
    never-expiring (no lot)."""
    lots: dict[int, rules.Lot] = {}
    left = received
    for piece in reversed(pieces):  # the latest-expiring first: the fee was paid from the soonest
        if not left:
            break
        amount = min(piece.amount, left)
        left -= amount
        if piece.expires_at_us is None:
            continue
        lot = lots.get(piece.expires_at_us)
        if lot is None:
            lots[piece.expires_at_us] = rules.Lot(transfer_id, amount, piece.expires_at_us, piece.issuer_id)
        else:
            lots[piece.expires_at_us] = lot.replace(amount=lot.amount + amount)
    return list(lots.values())


def _earn_record(fields: dict[str, Any]) -> EarnRecord:
    """An earn's record as ReverseTransaction's servicer read it (member_store.reversal_group)."""
    grants = tuple(rules.Grant(p, sponsor, amount) for p, sponsor, amount in fields["grants"])
    return EarnRecord(
        fields["member_id"],
        fields["merchant_id"],
        fields["program_version"],
        rules.Earn(fields["base_point_units"], fields["uplift_point_units"], grants),
        fields["acquirer_id"],
        fields["acquiring_point_units"],
        0,
        fields["made_at_us"],
    )


ACCOUNT_OPERATOR_ADJUSTMENTS = "operator_adjustments"
ACCOUNT_OPERATOR_TRANSFER_FEES = "operator_transfer_fees"


def _unknown_member(member_id: str) -> Outcome:
    metrics.rejections.labels("unknown_member").inc()
    return Outcome(
        Code.NOT_FOUND,
        message=f"member {member_id!r} has no points account; a member is created by its first Earn or credit",
        recorded=False,
    )


def status_fields(member_id: str, status: MemberStatus | None) -> dict[str, Any]:
    if status is None:
        return {"member_id": member_id, "state": STATE_ACTIVE, "reason": "", "since_us": 0}
    return {"member_id": member_id, "state": status.state, "reason": status.reason, "since_us": status.since_us}
