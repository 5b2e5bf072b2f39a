"""The pure-Python twin of the compiled fast path (`_core.pyx`); the contract is `_core.pyi`.

Same names, constants, checks, order of checks and results as `_core`, written for clarity: parallel
lists indexed by slot, dicts from ids to slots, `heapq` for expiry and, per open batch, an undo log of
(list, slot, old value) (where `_core` keeps one log with a mark per batch). apply_batch() is a plain
loop over the per-operation methods. The differential tests hold the two to the same behaviour, so a
change to one is a change to both.
"""

import array
import heapq
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

# statuses
OK = 0
INSUFFICIENT_POINTS = 1
UNKNOWN_MEMBER = 2
UNKNOWN_HOLD = 3
HOLD_EXPIRED = 4
HOLD_CAPTURED = 5
HOLD_VOIDED = 6
WRONG_MERCHANT = 7
CAPTURE_EXCEEDS_HOLD = 8
UNKNOWN_TRANSACTION = 9
REFUND_EXCEEDS_REMAINING = 10
NOT_REFUNDABLE = 11
OVERFLOW = 12
CAPACITY = 13

# hold statuses (holds.status in Postgres)
HOLD_OPEN = 1
HOLD_STATUS_CAPTURED = 2
HOLD_STATUS_VOIDED = 3
HOLD_STATUS_EXPIRED = 4

# transaction kinds (transactions.kind in Postgres)
KIND_EARN = 1
KIND_CAPTURE = 2
KIND_REDEEM = 3
KIND_REFUND_REDEMPTION = 4
KIND_REFUND_EARN = 5

# operation codes of apply_batch()
OP_EARN = 1
OP_AUTHORIZE = 2
OP_CAPTURE = 3
OP_VOID = 4
OP_REDEEM = 5
OP_REFUND = 6

# 2**62: sums of two balances still fit in int64, so the overflow checks cannot overflow themselves.
BALANCE_MAX = 1 << 62

# apply_earn_redeem(): the bounds that keep its products in int64 (points * multiplier_bps <= 2**62,
# purchase * acquiring_bps <= 2**62); the caller sends larger amounts down its per-operation path.
_MULTIPLIER_BPS_MAX = 100_000
RULES_LEVELS_MAX = 63
RULES_EARN_POINTS_MAX = BALANCE_MAX // _MULTIPLIER_BPS_MAX
RULES_PURCHASE_MAX = BALANCE_MAX // 10_000

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_INT32_MAX = (1 << 31) - 1


class LedgerInvariantError(Exception):
    """An invariant of the ledger does not hold: a bug. The caller stops serving."""


def _int64(value):
    """Converts an argument the way the compiled module's `int64_t` parameters do."""
    value = operator.index(value)
    if value < _INT64_MIN or value > _INT64_MAX:
        raise OverflowError(f"{value} does not fit in int64")
    return value


def _text(value):
    """Accepts exactly what the compiled module's `str` parameters do: str, not a subclass."""
    if type(value) is not str:
        raise TypeError(f"member_id must be str, not {type(value).__name__}")
    return value


def _check_merchant(merchant):
    if merchant < 0 or merchant > _INT32_MAX:
        raise ValueError(f"merchant {merchant} is not a merchant slot (0..{_INT32_MAX})")


def _check_positive(points):
    if points <= 0:
        raise ValueError(f"points must be > 0, got {points}")


class Ledger:
    def __init__(self, members_max, holds_max, transactions_max):
        members_max, holds_max, transactions_max = (_int64(members_max), _int64(holds_max), _int64(transactions_max))
        if members_max < 1 or holds_max < 1 or transactions_max < 1:
            raise ValueError(
                "members_max, holds_max and transactions_max must each be >= 1, got "
                f"{members_max}, {holds_max}, {transactions_max}"
            )
        self._members_max = members_max
        self._holds_max = holds_max
        self._transactions_max = transactions_max

        self._member_slots = {}
        self._member_ids = []
        self._member_posted = []
        self._member_held = []
        self._member_account = []  # 0: not known

        self._hold_slots = {}
        self._hold_ids = []
        self._hold_member = []
        self._hold_merchant = []
        self._hold_amount = []
        self._hold_expires_at_us = []
        self._hold_status = []
        self._holds_open_count = 0

        self._transaction_slots = {}
        self._transaction_ids = []
        self._transaction_kind = []
        self._transaction_member = []
        self._transaction_merchant = []
        self._transaction_amount = []
        self._transaction_refunded = []

        # (expires_at_us, hold slot); entries of resolved holds are skipped when they reach the top
        self._heap = []

        # One entry per open batch, oldest first: (counts at its begin(), its undo records), each
        # record (list, slot, old value)
        self._batches = []

    # --- sizes ------------------------------------------------------------------------------------

    @property
    def members_count(self):
        return len(self._member_ids)

    @property
    def holds_resident_count(self):
        return len(self._hold_ids)

    @property
    def holds_open_count(self):
        return self._holds_open_count

    @property
    def transactions_resident_count(self):
        return len(self._transaction_ids)

    @property
    def batches_open(self):
        return len(self._batches)

    # --- recorded writes: the only way existing members, holds and transactions change ------------

    def _set(self, column, slot, value):
        if self._batches:
            self._batches[-1][1].append((column, slot, column[slot]))
        column[slot] = value

    def _set_hold_status(self, hold, status):
        if self._hold_status[hold] == HOLD_OPEN:
            self._holds_open_count -= 1
        if status == HOLD_OPEN:
            self._holds_open_count += 1
        self._set(self._hold_status, hold, status)

    # --- creation: appended at the end, so rollback() removes them by cutting back to the counts
    #     remembered at begin() ----------------------------------------------------------------------

    def _add_member(self, member_id, posted, account_id):
        member = len(self._member_ids)
        self._member_ids.append(member_id)
        self._member_slots[member_id] = member
        self._member_posted.append(posted)
        self._member_held.append(0)
        self._member_account.append(account_id)
        return member

    def _add_hold(self, hold_id, member, merchant, amount, expires_at_us, status):
        hold = len(self._hold_ids)
        self._hold_slots[hold_id] = hold
        self._hold_ids.append(hold_id)
        self._hold_member.append(member)
        self._hold_merchant.append(merchant)
        self._hold_amount.append(amount)
        self._hold_expires_at_us.append(expires_at_us)
        self._hold_status.append(status)
        if status == HOLD_OPEN:
            self._holds_open_count += 1
            heapq.heappush(self._heap, (expires_at_us, hold))
        return hold

    def _add_transaction(self, transaction_id, kind, member, merchant, amount, refunded):
        self._transaction_slots[transaction_id] = len(self._transaction_ids)
        self._transaction_ids.append(transaction_id)
        self._transaction_kind.append(kind)
        self._transaction_member.append(member)
        self._transaction_merchant.append(merchant)
        self._transaction_amount.append(amount)
        self._transaction_refunded.append(refunded)

    # --- checks ------------------------------------------------------------------------------------

    def _check_member_slot(self, member_slot):
        if member_slot < 0 or member_slot >= len(self._member_ids):
            raise IndexError(f"member slot {member_slot} is not in 0..{len(self._member_ids) - 1}")

    def _check_member_after(self, member, posted, held):
        # Checked on the values an operation is about to write, before it writes any of them.
        if posted < 0 or posted > BALANCE_MAX or held < 0 or held > posted:
            raise LedgerInvariantError(
                f"member {self._member_ids[member]!r} (slot {member}) would have posted {posted}, "
                f"held {held}; was posted {self._member_posted[member]}, "
                f"held {self._member_held[member]}"
            )

    # --- rules shared by several operations ---------------------------------------------------------

    def _release_hold(self, hold, status):
        member = self._hold_member[hold]
        held = self._member_held[member] - self._hold_amount[hold]
        self._check_member_after(member, self._member_posted[member], held)
        self._set_hold_status(hold, status)
        self._set(self._member_held, member, held)

    def _resolvable(self, hold, merchant, now_us):
        """OK if the hold is open, unexpired and this merchant's; else the status to answer (an open
        hold past its expiry is marked expired on the way)."""
        if self._hold_merchant[hold] != merchant:
            return WRONG_MERCHANT
        status = self._hold_status[hold]
        if status == HOLD_STATUS_CAPTURED:
            return HOLD_CAPTURED
        if status == HOLD_STATUS_VOIDED:
            return HOLD_VOIDED
        if status == HOLD_STATUS_EXPIRED:
            return HOLD_EXPIRED
        if self._hold_expires_at_us[hold] <= now_us:
            self._release_hold(hold, HOLD_STATUS_EXPIRED)
            return HOLD_EXPIRED
        return OK

    def _rebuild_heap(self):
        self._heap = [
            (self._hold_expires_at_us[hold], hold)
            for hold in range(len(self._hold_ids))
            if self._hold_status[hold] == HOLD_OPEN
        ]
        heapq.heapify(self._heap)

    # --- loading ----------------------------------------------------------------------------------

    def load_member(self, member_id, posted, account_id=0):
        member_id, posted, account_id = _text(member_id), _int64(posted), _int64(account_id)
        if posted < 0 or posted > BALANCE_MAX:
            raise OverflowError(f"posted {posted} of member {member_id!r} is outside 0..{BALANCE_MAX}")
        if account_id < 0:
            raise ValueError(f"account_id of member {member_id!r} must be >= 0 (0: not known), got {account_id}")
        found = self._member_slots.get(member_id)
        if found is not None:
            self._set(self._member_posted, found, posted)
            # Not recorded in the undo log: an account id is a fact from Postgres, true whatever the
            # batch; 0 means the caller did not say, so the id already known stays.
            if account_id != 0:
                self._member_account[found] = account_id
            return found
        if len(self._member_ids) >= self._members_max:
            raise OverflowError(f"members_max {self._members_max} reached; cannot load {member_id!r}")
        return self._add_member(member_id, posted, account_id)

    def ensure_member(self, member_id):
        member_id = _text(member_id)
        found = self._member_slots.get(member_id)
        if found is not None:
            return found
        if len(self._member_ids) >= self._members_max:
            return -1
        return self._add_member(member_id, 0, 0)

    def load_hold(self, hold_id, member_slot, merchant, amount, expires_at_us, status):
        hold_id, member_slot, merchant, amount, expires_at_us, status = map(
            _int64, (hold_id, member_slot, merchant, amount, expires_at_us, status)
        )
        self._check_member_slot(member_slot)
        _check_merchant(merchant)
        if amount <= 0 or amount > BALANCE_MAX:
            raise ValueError(f"hold {hold_id}: amount {amount} is outside 1..{BALANCE_MAX}")
        if status < HOLD_OPEN or status > HOLD_STATUS_EXPIRED:
            raise ValueError(f"hold {hold_id}: status {status} is not a hold status")
        if hold_id in self._hold_slots:
            raise KeyError(f"hold {hold_id} is resident already")
        if len(self._hold_ids) >= self._holds_max:
            raise OverflowError(f"holds_max {self._holds_max} reached; cannot load hold {hold_id}")
        held = self._member_held[member_slot]
        if status == HOLD_OPEN:
            if amount > BALANCE_MAX - held:
                raise OverflowError(f"hold {hold_id}: held of member slot {member_slot} would exceed {BALANCE_MAX}")
            held += amount
        self._add_hold(hold_id, member_slot, merchant, amount, expires_at_us, status)
        if status == HOLD_OPEN:
            self._set(self._member_held, member_slot, held)

    def load_transaction(self, transaction_id, kind, member_slot, merchant, amount, refunded):
        transaction_id, kind, member_slot, merchant, amount, refunded = map(
            _int64, (transaction_id, kind, member_slot, merchant, amount, refunded)
        )
        self._check_member_slot(member_slot)
        _check_merchant(merchant)
        if kind < KIND_EARN or kind > KIND_REFUND_EARN:
            raise ValueError(f"transaction {transaction_id}: kind {kind} is not a transaction kind")
        if amount < 0 or amount > BALANCE_MAX:
            raise ValueError(f"transaction {transaction_id}: amount {amount} is outside 0..{BALANCE_MAX}")
        if refunded < 0 or refunded > amount:
            raise ValueError(f"transaction {transaction_id}: refunded {refunded} is outside 0..{amount}")
        if transaction_id in self._transaction_slots:
            raise KeyError(f"transaction {transaction_id} is resident already")
        if len(self._transaction_ids) >= self._transactions_max:
            raise OverflowError(
                f"transactions_max {self._transactions_max} reached; cannot load transaction {transaction_id}"
            )
        self._add_transaction(transaction_id, kind, member_slot, merchant, amount, refunded)

    # --- look-ups ---------------------------------------------------------------------------------

    def member_slot(self, member_id):
        return self._member_slots.get(_text(member_id), -1)

    def member_id(self, member_slot):
        member_slot = _int64(member_slot)
        self._check_member_slot(member_slot)
        return self._member_ids[member_slot]

    def has_hold(self, hold_id):
        return _int64(hold_id) in self._hold_slots

    def has_transaction(self, transaction_id):
        return _int64(transaction_id) in self._transaction_slots

    def balance(self, member_slot):
        member_slot = _int64(member_slot)
        self._check_member_slot(member_slot)
        return (self._member_posted[member_slot], self._member_held[member_slot])

    def member_account(self, member_slot):
        member_slot = _int64(member_slot)
        self._check_member_slot(member_slot)
        return self._member_account[member_slot]

    def set_member_account(self, member_slot, account_id):
        member_slot, account_id = _int64(member_slot), _int64(account_id)
        if account_id < 1:
            raise ValueError(f"account_id must be >= 1, got {account_id}")
        self._check_member_slot(member_slot)
        # Not recorded in the undo log (see load_member).
        self._member_account[member_slot] = account_id

    def hold(self, hold_id):
        hold = self._hold_slots[_int64(hold_id)]
        return (
            self._hold_status[hold],
            self._hold_member[hold],
            self._hold_merchant[hold],
            self._hold_amount[hold],
            self._hold_expires_at_us[hold],
        )

    # --- undo log ---------------------------------------------------------------------------------

    def begin(self):
        self._batches.append(
            ((len(self._member_ids), len(self._hold_ids), self._holds_open_count, len(self._transaction_ids)), [])
        )

    def commit(self):
        if not self._batches:
            raise RuntimeError("commit() called without begin()")
        del self._batches[0]

    def rollback(self):
        if not self._batches:
            raise RuntimeError("rollback() called without begin()")
        self._rollback_to(0)

    def rollback_newest(self):
        if not self._batches:
            raise RuntimeError("rollback_newest() called without begin()")
        self._rollback_to(len(self._batches) - 1)

    def _rollback_to(self, batch):
        """Restores the state at the begin() of open batch `batch`; closes it and every newer one."""
        for _, records in reversed(self._batches[batch:]):
            for column, slot, old_value in reversed(records):
                column[slot] = old_value
        (members, holds, holds_open, transactions), _ = self._batches[batch]
        for member_id in self._member_ids[members:]:
            del self._member_slots[member_id]
        for hold_id in self._hold_ids[holds:]:
            del self._hold_slots[hold_id]
        for transaction_id in self._transaction_ids[transactions:]:
            del self._transaction_slots[transaction_id]
        for column in (self._member_ids, self._member_posted, self._member_held, self._member_account):
            del column[members:]
        for column in (
            self._hold_ids,
            self._hold_member,
            self._hold_merchant,
            self._hold_amount,
            self._hold_expires_at_us,
            self._hold_status,
        ):
            del column[holds:]
        for column in (
            self._transaction_ids,
            self._transaction_kind,
            self._transaction_member,
            self._transaction_merchant,
            self._transaction_amount,
            self._transaction_refunded,
        ):
            del column[transactions:]
        self._holds_open_count = holds_open
        # Statuses and slots changed wholesale; one heapify is simpler than replaying each change.
        self._rebuild_heap()
        del self._batches[batch:]

    # --- operations -------------------------------------------------------------------------------

    def earn(self, member_id, merchant, points, transaction_id):
        member_id = _text(member_id)
        merchant, points, transaction_id = map(_int64, (merchant, points, transaction_id))
        _check_merchant(merchant)
        if points < 0:
            raise ValueError(f"points must be >= 0, got {points}")
        if transaction_id in self._transaction_slots:
            raise KeyError(f"transaction {transaction_id} is resident already")
        member = self._member_slots.get(member_id, -1)
        posted = held = 0
        if member >= 0:
            posted, held = self._member_posted[member], self._member_held[member]
        if points > BALANCE_MAX - posted:
            return (OVERFLOW, 0, 0)
        if member < 0 and len(self._member_ids) >= self._members_max:
            return (CAPACITY, 0, 0)
        if len(self._transaction_ids) >= self._transactions_max:
            return (CAPACITY, 0, 0)
        if member < 0:
            member = self._add_member(member_id, 0, 0)
        posted += points
        self._check_member_after(member, posted, held)
        self._set(self._member_posted, member, posted)
        self._add_transaction(transaction_id, KIND_EARN, member, merchant, points, 0)
        return (OK, member, posted)

    def authorize(self, member_slot, merchant, points, hold_id, expires_at_us):
        member_slot, merchant, points, hold_id, expires_at_us = map(
            _int64, (member_slot, merchant, points, hold_id, expires_at_us)
        )
        _check_positive(points)
        _check_merchant(merchant)
        if member_slot != -1:
            self._check_member_slot(member_slot)
        if hold_id in self._hold_slots:
            raise KeyError(f"hold {hold_id} is resident already")
        if member_slot == -1:
            return (UNKNOWN_MEMBER, 0)
        posted, held = self._member_posted[member_slot], self._member_held[member_slot]
        if points > posted - held:
            return (INSUFFICIENT_POINTS, 0)
        if len(self._hold_ids) >= self._holds_max:
            return (CAPACITY, 0)
        held += points
        self._check_member_after(member_slot, posted, held)
        self._add_hold(hold_id, member_slot, merchant, points, expires_at_us, HOLD_OPEN)
        self._set(self._member_held, member_slot, held)
        return (OK, posted - held)

    def capture(self, hold_id, merchant, points, transaction_id, now_us):
        hold_id, merchant, points, transaction_id, now_us = map(
            _int64, (hold_id, merchant, points, transaction_id, now_us)
        )
        _check_merchant(merchant)
        if points < 0:
            raise ValueError(f"points must be >= 0 (0 captures the whole hold), got {points}")
        if transaction_id in self._transaction_slots:
            raise KeyError(f"transaction {transaction_id} is resident already")
        hold = self._hold_slots.get(hold_id)
        if hold is None:
            return (UNKNOWN_HOLD, 0, 0, 0, 0)
        status = self._resolvable(hold, merchant, now_us)
        if status != OK:
            return (status, 0, 0, 0, 0)
        amount = self._hold_amount[hold]
        captured = amount if points == 0 else points
        if captured > amount:
            return (CAPTURE_EXCEEDS_HOLD, 0, 0, 0, 0)
        if len(self._transaction_ids) >= self._transactions_max:
            return (CAPACITY, 0, 0, 0, 0)
        member = self._hold_member[hold]
        posted = self._member_posted[member] - captured
        held = self._member_held[member] - amount
        self._check_member_after(member, posted, held)
        self._release_hold(hold, HOLD_STATUS_CAPTURED)
        self._set(self._member_posted, member, posted)
        self._add_transaction(transaction_id, KIND_CAPTURE, member, merchant, captured, 0)
        return (OK, captured, member, posted, posted - held)

    def void(self, hold_id, merchant, now_us):
        hold_id, merchant, now_us = map(_int64, (hold_id, merchant, now_us))
        _check_merchant(merchant)
        hold = self._hold_slots.get(hold_id)
        if hold is None:
            return (UNKNOWN_HOLD, 0, 0, 0)
        status = self._resolvable(hold, merchant, now_us)
        if status != OK:
            return (status, 0, 0, 0)
        member = self._hold_member[hold]
        self._release_hold(hold, HOLD_STATUS_VOIDED)
        return (OK, self._hold_amount[hold], member, self._member_posted[member] - self._member_held[member])

    def redeem(self, member_slot, merchant, points, transaction_id):
        member_slot, merchant, points, transaction_id = map(_int64, (member_slot, merchant, points, transaction_id))
        _check_positive(points)
        _check_merchant(merchant)
        if member_slot != -1:
            self._check_member_slot(member_slot)
        if transaction_id in self._transaction_slots:
            raise KeyError(f"transaction {transaction_id} is resident already")
        if member_slot == -1:
            return (UNKNOWN_MEMBER, 0, 0)
        posted, held = self._member_posted[member_slot], self._member_held[member_slot]
        if points > posted - held:
            return (INSUFFICIENT_POINTS, 0, 0)
        if len(self._transaction_ids) >= self._transactions_max:
            return (CAPACITY, 0, 0)
        posted -= points
        self._check_member_after(member_slot, posted, held)
        self._set(self._member_posted, member_slot, posted)
        self._add_transaction(transaction_id, KIND_REDEEM, member_slot, merchant, points, 0)
        return (OK, posted, posted - held)

    def refund(self, transaction_id, merchant, points, refund_transaction_id):
        transaction_id, merchant, points, refund_transaction_id = map(
            _int64, (transaction_id, merchant, points, refund_transaction_id)
        )
        _check_positive(points)
        _check_merchant(merchant)
        if refund_transaction_id in self._transaction_slots:
            raise KeyError(f"transaction {refund_transaction_id} is resident already")
        transaction = self._transaction_slots.get(transaction_id)
        if transaction is None:
            return (UNKNOWN_TRANSACTION, 0, 0, 0, 0)
        if self._transaction_merchant[transaction] != merchant:
            return (WRONG_MERCHANT, 0, 0, 0, 0)
        kind = self._transaction_kind[transaction]
        if kind not in (KIND_EARN, KIND_CAPTURE, KIND_REDEEM):
            return (NOT_REFUNDABLE, 0, 0, 0, 0)
        refunded = self._transaction_refunded[transaction]
        if points > self._transaction_amount[transaction] - refunded:
            return (REFUND_EXCEEDS_REMAINING, 0, 0, 0, 0)
        member = self._transaction_member[transaction]
        posted, held = self._member_posted[member], self._member_held[member]
        if kind == KIND_EARN:
            if points > posted - held:
                return (INSUFFICIENT_POINTS, 0, 0, 0, 0)
            refund_kind = KIND_REFUND_EARN
            posted -= points
        else:
            if points > BALANCE_MAX - posted:
                return (OVERFLOW, 0, 0, 0, 0)
            refund_kind = KIND_REFUND_REDEMPTION
            posted += points
        if len(self._transaction_ids) >= self._transactions_max:
            return (CAPACITY, 0, 0, 0, 0)
        self._check_member_after(member, posted, held)
        self._set(self._transaction_refunded, transaction, refunded + points)
        self._set(self._member_posted, member, posted)
        self._add_transaction(refund_transaction_id, refund_kind, member, merchant, points, 0)
        return (OK, refund_kind, member, posted, posted - held)

    def expire_holds(self, now_us, limit):
        now_us, limit = _int64(now_us), _int64(limit)
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        expired = []
        while len(expired) < limit and self._heap and self._heap[0][0] <= now_us:
            _, hold = heapq.heappop(self._heap)
            if self._hold_status[hold] != HOLD_OPEN:
                continue
            self._release_hold(hold, HOLD_STATUS_EXPIRED)
            expired.append(self._hold_ids[hold])
        return expired

    def apply_batch(
        self,
        method,
        member,
        merchant,
        points,
        ref_id,
        new_id,
        expires_at_us,
        now_us,
        out_status,
        out_member,
        out_amount,
        out_posted,
        out_available,
        out_kind,
    ):
        now_us = _int64(now_us)
        count = len(method)
        for name, column in (
            ("member", member),
            ("merchant", merchant),
            ("points", points),
            ("ref_id", ref_id),
            ("new_id", new_id),
            ("expires_at_us", expires_at_us),
        ):
            if len(column) != count:
                raise ValueError(f"{name} has {len(column)} items; method has {count}")
        for name, column in (
            ("out_status", out_status),
            ("out_member", out_member),
            ("out_amount", out_amount),
            ("out_posted", out_posted),
            ("out_available", out_available),
            ("out_kind", out_kind),
        ):
            if len(column) < count:
                raise ValueError(f"{name} has {len(column)} items, fewer than the {count} operations")
        # Checked before the first operation, so a batch with an unknown code changes nothing.
        for operation in range(count):
            if not OP_EARN <= _int64(method[operation]) <= OP_REFUND:
                raise ValueError(f"operation {operation}: method {method[operation]} is not an OP_* code")
        for operation in range(count):
            row = self._apply_one(
                method[operation],
                member[operation],
                merchant[operation],
                points[operation],
                ref_id[operation],
                new_id[operation],
                expires_at_us[operation],
                now_us,
            )
            if row[0] == INSUFFICIENT_POINTS and row[1] >= 0:
                # the balances the refusal saw: the caller's message states them
                posted, held = self.balance(row[1])
                row = (row[0], row[1], row[2], posted, posted - held, row[5])
            (
                out_status[operation],
                out_member[operation],
                out_amount[operation],
                out_posted[operation],
                out_available[operation],
                out_kind[operation],
            ) = row
        return count

    def apply_earn_redeem(
        self,
        method,
        member,
        merchant,
        points,
        purchase,
        fee_bps,
        tier,
        tier_qualifying,
        tier_reached,
        tier_acquirer,
        tier_acquiring_bps,
        tier_lot_head,
        tier_lot_tail,
        tier_lot_total,
        lot_amount,
        lot_expires_at_us,
        lot_next,
        lots_used,
        level_threshold,
        level_multiplier_bps,
        new_lot_expires_at_us,
        next_transaction_id,
        out_status,
        out_created,
        out_posted,
        out_available,
        out_total,
        out_fee,
        out_level_before,
        out_level_after,
        out_reward,
        out_reward_id,
        out_lot,
        out_piece_start,
        out_piece_end,
        out_due_at_us,
        piece_lot,
        piece_amount,
    ):
        next_id = _int64(next_transaction_id)
        lots = _int64(lots_used)
        new_lot_expires = _int64(new_lot_expires_at_us)
        count = len(method)
        tiers = len(tier_qualifying)
        levels = len(level_threshold)
        pool = len(lot_amount)
        for name, column in (
            ("member", member),
            ("merchant", merchant),
            ("points", points),
            ("purchase", purchase),
            ("fee_bps", fee_bps),
            ("tier", tier),
        ):
            if len(column) != count:
                raise ValueError(f"{name} has {len(column)} items; method has {count}")
        for name, column in (
            ("out_status", out_status),
            ("out_created", out_created),
            ("out_posted", out_posted),
            ("out_available", out_available),
            ("out_total", out_total),
            ("out_fee", out_fee),
            ("out_level_before", out_level_before),
            ("out_level_after", out_level_after),
            ("out_reward", out_reward),
            ("out_reward_id", out_reward_id),
            ("out_lot", out_lot),
            ("out_piece_start", out_piece_start),
            ("out_piece_end", out_piece_end),
            ("out_due_at_us", out_due_at_us),
        ):
            if len(column) < count:
                raise ValueError(f"{name} has {len(column)} items, fewer than the {count} operations")
        for column in (tier_reached, tier_acquirer, tier_acquiring_bps, tier_lot_head, tier_lot_tail, tier_lot_total):
            if len(column) != tiers:
                raise ValueError("the tier_* columns must have one item per tier row")
        if len(lot_expires_at_us) != pool or len(lot_next) != pool:
            raise ValueError("lot_amount, lot_expires_at_us and lot_next must have one item per lot")
        if len(piece_amount) != len(piece_lot):
            raise ValueError("piece_lot and piece_amount must have the same length")
        if not 0 <= lots <= pool or new_lot_expires < 0:
            raise ValueError(f"lots_used must be 0..{pool} and new_lot_expires_at_us >= 0")
        for row in range(tiers):
            head, tail = tier_lot_head[row], tier_lot_tail[row]
            if not -1 <= head < lots or not -1 <= tail < lots or (head < 0) != (tail < 0):
                raise ValueError(f"tier row {row}: lot head and tail must both be -1 or lots in use")
        for lot in range(lots):
            if lot_amount[lot] <= 0 or not -1 <= lot_next[lot] < lots or lot_next[lot] == lot:
                raise ValueError(f"lot {lot}: amount must be > 0 and next -1 or another lot in use")
        if not 1 <= levels <= RULES_LEVELS_MAX or len(level_multiplier_bps) != levels:
            raise ValueError(f"level_threshold and level_multiplier_bps must have the same 1..{RULES_LEVELS_MAX} items")
        for level in range(levels):
            if level_threshold[level] < 0 or not 10_000 <= level_multiplier_bps[level] <= _MULTIPLIER_BPS_MAX:
                raise ValueError(
                    f"level {level}: threshold must be >= 0 and multiplier_bps 10000..{_MULTIPLIER_BPS_MAX}"
                )
        # Checked before the first operation, so a call with a bad row changes nothing.
        for operation in range(count):
            if method[operation] not in (OP_EARN, OP_REDEEM):
                raise ValueError(f"operation {operation}: method {method[operation]} is not OP_EARN or OP_REDEEM")
            if not 0 <= tier[operation] < tiers:
                raise IndexError(f"operation {operation}: tier row {tier[operation]} of {tiers}")
            if not 0 <= points[operation] <= RULES_EARN_POINTS_MAX:
                raise ValueError(f"operation {operation}: points must be 0..{RULES_EARN_POINTS_MAX}")
            if not 0 <= purchase[operation] <= RULES_PURCHASE_MAX:
                raise ValueError(f"operation {operation}: purchase must be 0..{RULES_PURCHASE_MAX}")
            if not 0 <= fee_bps[operation] <= 10_000:
                raise ValueError(f"operation {operation}: fee_bps must be 0..10000")
            if not 0 <= tier_acquiring_bps[tier[operation]] <= 10_000:
                raise ValueError(f"tier row {tier[operation]}: acquiring_bps must be 0..10000")
        # The program's earn and redeem rules around the per-operation methods, in order (see _core).
        pieces = 0
        for operation in range(count):
            created = next_id
            next_id += 1
            out_created[operation] = created
            total = fee = level_before = level_after = reward = reward_id = due = 0
            new_lot = -1
            piece_start = pieces
            slot = member[operation]
            row = tier[operation]
            if method[operation] == OP_EARN:
                qualifying = tier_qualifying[row]
                level_before = level_after = _level_for(qualifying, level_threshold)
                base = points[operation]
                # floor(base * multiplier / 10000): base + the uplift, in the operator's favour
                planned = base * level_multiplier_bps[level_before] // 10_000
                self._check_member_slot(slot)
                status, _, posted = self.earn(self.member_id(slot), merchant[operation], planned, created)
                available = 0
                if status == OK:
                    available = posted - self._member_held[slot]
                    total = planned
                    fee = base * fee_bps[operation] // 10_000
                    qualifying += base
                    tier_qualifying[row] = qualifying
                    level_after = _level_for(qualifying, level_threshold)
                    reached = tier_reached[row]
                    for level in range(1, levels):  # every level reached counts once (its bonus)
                        if qualifying >= level_threshold[level]:
                            reached |= 1 << level
                    tier_reached[row] = reached
                    acquirer = tier_acquirer[row]
                    if acquirer >= 0 and acquirer != merchant[operation] and base > 0:
                        reward = purchase[operation] * tier_acquiring_bps[row] // 10_000
                        if reward > 0:
                            reward_id = next_id
                            next_id += 1
                    if total > 0 and new_lot_expires > 0:  # the earn's lot, last in the member's chain
                        if lots >= pool:
                            raise LedgerInvariantError(f"operation {operation}: no room for its lot")
                        new_lot = lots
                        lots += 1
                        lot_amount[new_lot] = total
                        lot_expires_at_us[new_lot] = new_lot_expires
                        lot_next[new_lot] = -1
                        if tier_lot_tail[row] >= 0:
                            lot_next[tier_lot_tail[row]] = new_lot
                        else:
                            tier_lot_head[row] = new_lot
                        tier_lot_tail[row] = new_lot
                        if tier_lot_total[row] >= 0:
                            tier_lot_total[row] += total
                else:
                    posted = 0
            else:
                spendable = -1
                if slot >= 0:
                    self._check_member_slot(slot)
                    spendable = self._member_posted[slot] - self._member_held[slot]
                status, posted, available = self.redeem(slot, merchant[operation], points[operation], created)
                if status == OK:
                    fee = points[operation] * fee_bps[operation] // 10_000
                    # the soonest-expiring points first, ties by lot id: the chain's order
                    left = points[operation]
                    lots_before = tier_lot_total[row]
                    lot = tier_lot_head[row]
                    soonest_before = lot_expires_at_us[lot] if lot >= 0 else 0
                    while left > 0 and lot >= 0:
                        taken = min(lot_amount[lot], left)
                        if pieces >= len(piece_lot):
                            raise LedgerInvariantError(f"operation {operation}: no room for its pieces")
                        piece_lot[pieces], piece_amount[pieces] = lot, taken
                        pieces += 1
                        lot_amount[lot] -= taken
                        left -= taken
                        if lots_before >= 0:
                            tier_lot_total[row] -= taken
                        if lot_amount[lot] == 0:
                            lot = lot_next[lot]
                    tier_lot_head[row] = lot
                    if lot < 0:
                        tier_lot_tail[row] = -1
                    if left > 0:  # every lot taken: the rest is the member's never-expiring points
                        if lots_before < 0 or left > spendable - lots_before:
                            raise LedgerInvariantError(
                                f"operation {operation}: the member's lots do not cover what its never-expiring "
                                "points cannot"
                            )
                        if pieces >= len(piece_lot):
                            raise LedgerInvariantError(f"operation {operation}: no room for its pieces")
                        piece_lot[pieces], piece_amount[pieces] = -1, left
                        pieces += 1
                    if (
                        piece_start < pieces
                        and piece_lot[piece_start] >= 0
                        and lot >= 0
                        and lot_expires_at_us[lot] != soonest_before
                    ):
                        due = lot_expires_at_us[lot]  # the member's soonest expiry moved
                elif status == INSUFFICIENT_POINTS and slot >= 0:
                    posted, held = self.balance(slot)
                    available = posted - held
                else:
                    posted = available = 0
            out_status[operation] = status
            out_posted[operation] = posted
            out_available[operation] = available
            out_total[operation] = total
            out_fee[operation] = fee
            out_level_before[operation] = level_before
            out_level_after[operation] = level_after
            out_reward[operation] = reward
            out_reward_id[operation] = reward_id
            out_lot[operation] = new_lot
            out_piece_start[operation] = piece_start
            out_piece_end[operation] = pieces
            out_due_at_us[operation] = due
        return (next_id, lots, pieces)

    @staticmethod
    def unbalanced_entries(entries: Sequence[tuple[Any, ...]], points_asset: str) -> str | None:
        """The first problem of a batch's journal entries as a message, or None (contract: _core.pyi)."""
        points: dict[Any, Any] = {}
        other: dict[tuple[Any, Any], Any] = {}  # (transaction id, asset) of entries that name their asset
        for entry in entries:
            if not entry[1] > 0:
                return f"transaction {entry[0]} posts to an account without an id"
            if len(entry) == 3:
                points[entry[0]] = points.get(entry[0], 0) + entry[2]
            else:
                key = (entry[0], entry[3])
                other[key] = other.get(key, 0) + entry[2]
        for (transaction_id, asset), total in other.items():  # named points count with the others
            if asset == points_asset:
                points[transaction_id] = points.get(transaction_id, 0) + total
        for transaction_id, total in points.items():
            if total:
                return f"transaction {transaction_id} entries of {points_asset} sum to {total}"
        for (transaction_id, asset), total in other.items():
            if asset != points_asset and total:
                return f"transaction {transaction_id} entries of {asset} sum to {total}"
        return None

    @staticmethod
    def int64_column(values: Iterable[int]) -> "array.array[int]":
        """An int64 array of `values` (contract: _core.pyi)."""
        return array.array("q", [operator.index(value) for value in values])

    @staticmethod
    def idempotency_records(
        batch: list[Any],
        outcomes: list[Any],
        stored: dict[tuple[str, str], Any],
        not_recorded: frozenset[Any],
        ok: Any,
        dumps: Callable[..., Any] | None,
        records: list[tuple[Any, ...]],
        dumps_option: Any = None,
        dumps_option_fallback: Any = None,
    ) -> None:
        """Appends each recorded operation's idempotency record to `records` (contract: _core.pyi; the
        compiled one's untracking has no Python call: here the collector keeps tracking them)."""
        if dumps is None:

            def dumps(value: Any) -> Any:
                return value

        elif dumps_option is not None:
            plain_dumps = dumps

            def dumps(value: Any) -> str:
                try:
                    made = plain_dumps(value, option=dumps_option)
                except TypeError:
                    if dumps_option_fallback is None:
                        raise
                    made = plain_dumps(value, option=dumps_option_fallback)
                return made.decode() if type(made) is bytes else made

        if len(outcomes) != len(batch):
            raise ValueError(f"{len(outcomes)} outcomes for {len(batch)} operations")
        for op, outcome in zip(batch, outcomes):
            code = outcome.code
            if (code is not ok and code in not_recorded) or not outcome.recorded:
                continue
            if stored and (op.merchant_id, op.idempotency_key) in stored:
                continue
            records.append(
                (
                    op.merchant_id,
                    op.idempotency_key,
                    op.method._value_,
                    dumps(op.request),
                    code._value_,
                    dumps(outcome.fields) if code is ok else None,
                    outcome.message,
                )
            )

    def plain_rows(
        self,
        batch,
        applied,
        index,
        created,
        status,
        member,
        posted,
        available,
        merchants,
        numbers,
        classes,
        transactions,
        entries,
        outcomes,
    ):
        """The rows and outcomes of plain earns and redeems decided OK (contract: _core.pyi)."""
        now_us, fee_revenue, earn, redeem = numbers
        outcome_type, ok_code = classes
        count = len(applied)
        if min(len(created), len(status), len(member), len(posted), len(available)) < count:
            raise ValueError("created, status, member, posted and available need an item per applied operation")
        while index < count:
            if status[index] != OK:
                break
            op = batch[applied[index]]
            method = op.method
            if method is not earn and method is not redeem:
                break
            is_earn = method is earn
            merchant = merchants.get(op.merchant_id)
            if merchant is None:
                break
            points = op.points
            bps = merchant.fee_issued_bps if is_earn else merchant.fee_redeemed_bps
            if type(points) is not int or type(bps) is not int:
                break
            if not (0 <= points <= _FEE_POINTS_MAX and 0 <= bps <= 10_000):
                break
            slot = member[index]
            self._check_member_slot(slot)
            fee = points * bps // 10_000
            transaction_id = created[index]
            if fee:
                _fee_rows(entries, transaction_id, merchant, fee_revenue, fee)
            if is_earn:
                transactions.append(
                    (
                        transaction_id,
                        KIND_EARN,
                        op.merchant_id,
                        op.member_id,
                        points,
                        op.purchase_amount,
                        None,
                        None,
                        op.idempotency_key,
                        fee,
                    )
                )
                if points:
                    entries.append((transaction_id, self._member_account[slot], points))
                    entries.append((transaction_id, merchant.issued_account_id, -points))
                fields = {
                    "transaction_id": transaction_id,
                    "points": points,
                    "balance": posted[index],
                    "give_back_bps": merchant.give_back_bps,
                    "created_at_us": now_us,
                }
                outcomes[applied[index]] = outcome_type(ok_code, fields)
            else:
                outcomes[applied[index]] = _redeem_rows(
                    transactions,
                    entries,
                    transaction_id,
                    op,
                    points,
                    fee,
                    self._member_account[slot],
                    merchant,
                    outcome_type,
                    ok_code,
                    posted[index],
                    available[index],
                )
            index += 1
        return index

    def first_pass_plain(self, context, batch, position, next_transaction_id):
        """The batch loop's first pass with no program (contract: _core.pyi)."""
        merchants, routed, stored, earn, redeem, applied, codes, members, merchant_slots, points = context[:10]
        references, createds, expirations = context[10:]
        count = len(batch)
        while position < count:
            op = batch[position]
            merchant = _first_pass_merchant(op, merchants, routed, stored, earn, redeem)
            if merchant is None:
                break
            slot = self._member_slots.get(op.member_id, -1)
            if slot < 0:
                break
            is_earn = op.method is earn
            if is_earn and self._member_account[slot] == 0:
                break
            applied.append(position)
            codes.append(OP_EARN if is_earn else OP_REDEEM)
            members.append(slot)
            merchant_slots.append(op.merchant_slot)
            points.append(op.points)
            references.append(0)
            createds.append(next_transaction_id)
            expirations.append(0)
            next_transaction_id += 1
            position += 1
        return position, next_transaction_id

    def first_pass_run(self, context, batch, position):
        """The batch loop's first pass into a rules kernel's run (contract: _core.pyi)."""
        merchants, routed, stored, earn, redeem, give_back_min, give_back_max, points_max, purchase_max = context[:9]
        positions, ops, slots, rows, fee_bps, tier_rows, tier_demand = context[9:16]
        kernel_member, run, tables, now_us = context[16:]
        count = len(batch)
        while position < count:
            op = batch[position]
            merchant = _first_pass_merchant(op, merchants, routed, stored, earn, redeem)
            if merchant is None:
                break
            is_earn = op.method is earn
            if is_earn:
                give_back = merchant.give_back_bps
                if type(give_back) is not int or not give_back_min <= give_back <= give_back_max:
                    break
            points, purchase = op.points, op.purchase_amount
            if type(points) is not int or type(purchase) is not int:
                break
            if not (0 <= points <= points_max and 0 <= purchase <= purchase_max):
                break
            row = tier_rows.get(op.member_id, -1)
            if row < 0:
                row = kernel_member(run, tables, op, now_us)
                if row < 0:
                    break
            slot = self._member_slots.get(op.member_id, -1)
            if slot < 0:
                break
            if is_earn and self._member_account[slot] == 0:
                break
            positions.append(position)
            ops.append(op)
            slots.append(slot)
            rows.append(row)
            if is_earn:
                fee_bps.append(merchant.fee_issued_bps)
            else:
                fee_bps.append(merchant.fee_redeemed_bps)
                tier_demand[row] += points
            position += 1
        return position

    def earn_redeem_rows(
        self,
        ops,
        positions,
        method,
        member,
        tier,
        out,
        piece_lot,
        piece_amount,
        pool_lots,
        merchants,
        tier_acquirer_ids,
        level_names,
        numbers,
        classes,
        transactions,
        entries,
        outcomes,
        earned_level,
        taken_rows,
        new_lots_by_row,
        earn_records,
        tier_events,
        consumed,
        spent,
    ):
        """The rows of a run apply_earn_redeem() decided, in the run's order (the contract: _core.pyi)."""
        (
            version_number,
            now_us,
            new_lot_expires_at_us,
            fee_revenue,
            tier_rewards,
            acquiring,
            kind_acquiring_reward,
            owner_transaction,
            permanent_lot_id,
        ) = numbers
        outcome_type, ok_code, lot_type, earn_type, record_type = classes
        failed = []
        for index, (op, code, slot, row) in enumerate(zip(ops, method, member, tier)):
            status, created, posted, available, total, fee = (column[index] for column in out[:6])
            level_before, level_after, reward, reward_id, new_lot, start, end = (column[index] for column in out[6:13])
            if status != OK:
                failed.append(index)
                continue
            merchant_id, member_id = op.merchant_id, op.member_id
            merchant = merchants[merchant_id]
            if fee:
                _fee_rows(entries, created, merchant, fee_revenue, fee)
            if code == OP_EARN:
                base = op.points
                uplift = total - base
                transactions.append(
                    (
                        created,
                        KIND_EARN,
                        merchant_id,
                        member_id,
                        total,
                        op.purchase_amount,
                        None,
                        None,
                        op.idempotency_key,
                        fee,
                        version_number,
                    )
                )
                if total:
                    entries.append((created, self._member_account[slot], total))
                if base:
                    entries.append((created, merchant.issued_account_id, -base))
                if uplift:
                    entries.append((created, tier_rewards, -uplift))
                earned_level[row] = level_after
                if new_lot >= 0:  # the earn's lot (the kernel made one only for total > 0)
                    pool_lots[new_lot] = lot_type(created, total, new_lot_expires_at_us, merchant_id)
                    new_lots_by_row.setdefault(row, []).append(new_lot)
                acquirer_id = tier_acquirer_ids[row] if reward else None
                earn_records.append(
                    (
                        created,
                        record_type(
                            member_id,
                            merchant_id,
                            version_number,
                            earn_type(base, uplift, ()),
                            acquirer_id,
                            reward,
                            0,
                            now_us,
                        ),
                    )
                )
                if level_before != level_after:
                    tier_events.append((created, member_id, level_names[level_before], level_names[level_after]))
                if acquirer_id is not None:
                    transactions.append(
                        (
                            reward_id,
                            kind_acquiring_reward,
                            acquirer_id,
                            member_id,
                            reward,
                            None,
                            None,
                            created,
                            f"acquiring:{created}",
                            0,
                            version_number,
                        )
                    )
                    entries.append((reward_id, acquiring, -reward))
                    entries.append((reward_id, merchants[acquirer_id].acquiring_account_id, reward))
                outcomes[positions[index]] = outcome_type(
                    ok_code,
                    {
                        "transaction_id": created,
                        "points": base,
                        "balance": posted,
                        "give_back_bps": merchant.give_back_bps,
                        "created_at_us": now_us,
                        "bonus_points": uplift,
                        "level": level_names[level_after],
                    },
                )
                continue
            points = op.points
            outcomes[positions[index]] = _redeem_rows(
                transactions,
                entries,
                created,
                op,
                points,
                fee,
                self._member_account[slot],
                merchant,
                outcome_type,
                ok_code,
                posted,
                available,
            )
            pieces = []
            if end > start:
                taken_rows.add(row)
                for k in range(start, end):
                    taken, source = piece_amount[k], piece_lot[k]
                    if source < 0:  # never-expiring points
                        pieces.append(lot_type(permanent_lot_id, taken, None, ""))
                        continue
                    source_lot = pool_lots[source]
                    if source_lot is None:
                        raise LedgerInvariantError(
                            f"operation {index} of the run took from lot {source}, which no earn made"
                        )
                    pieces.append(
                        source_lot
                        if taken == source_lot.amount
                        else lot_type(source_lot.lot_id, taken, source_lot.expires_at_us, source_lot.issuer_id)
                    )
            consumed.append(((owner_transaction, created), tuple(pieces)))
            if points > 0:
                spent[member_id] = spent.get(member_id, 0) + points
        return failed

    def _apply_one(self, method, member, merchant, points, ref_id, new_id, expires_at_us, now_us):
        """One operation of apply_batch() through its per-operation method: (status, member slot,
        amount, posted, available, kind). On a non-OK status only the member slot may be set: the
        member concerned, when known and not another merchant's."""
        if method == OP_EARN:
            status, slot, posted = self.earn(self.member_id(member), merchant, points, new_id)
            if status != OK:
                return (status, member, 0, 0, 0, 0)
            return (OK, slot, points, posted, posted - self._member_held[slot], KIND_EARN)
        if method == OP_AUTHORIZE:
            status, available = self.authorize(member, merchant, points, new_id, expires_at_us)
            if status != OK:
                return (status, member, 0, 0, 0, 0)
            return (OK, member, points, self._member_posted[member], available, 0)
        if method == OP_CAPTURE:
            status, captured, slot, posted, available = self.capture(ref_id, merchant, points, new_id, now_us)
            if status != OK:
                return (status, self._hold_member_involved(ref_id, status), 0, 0, 0, 0)
            return (OK, slot, captured, posted, available, KIND_CAPTURE)
        if method == OP_VOID:
            status, released, slot, available = self.void(ref_id, merchant, now_us)
            if status != OK:
                return (status, self._hold_member_involved(ref_id, status), 0, 0, 0, 0)
            return (OK, slot, released, self._member_posted[slot], available, 0)
        if method == OP_REDEEM:
            status, posted, available = self.redeem(member, merchant, points, new_id)
            if status != OK:
                return (status, member, 0, 0, 0, 0)
            return (OK, member, points, posted, available, KIND_REDEEM)
        status, kind, slot, posted, available = self.refund(ref_id, merchant, points, new_id)
        if status != OK:
            involved = -1
            if status not in (UNKNOWN_TRANSACTION, WRONG_MERCHANT):
                involved = self._transaction_member[self._transaction_slots[ref_id]]
            return (status, involved, 0, 0, 0, 0)
        return (OK, slot, points, posted, available, kind)

    def _hold_member_involved(self, hold_id, status):
        # Another merchant learns nothing about the hold, not even whose it is.
        if status in (UNKNOWN_HOLD, WRONG_MERCHANT):
            return -1
        return self._hold_member[self._hold_slots[hold_id]]

    def forget_resolved(self):
        if self._batches:
            raise RuntimeError("forget_resolved() called between begin() and commit()")
        kept = [hold for hold in range(len(self._hold_ids)) if self._hold_status[hold] == HOLD_OPEN]
        for column in (
            self._hold_ids,
            self._hold_member,
            self._hold_merchant,
            self._hold_amount,
            self._hold_expires_at_us,
            self._hold_status,
        ):
            column[:] = [column[hold] for hold in kept]
        self._hold_slots = {hold_id: hold for hold, hold_id in enumerate(self._hold_ids)}
        self._rebuild_heap()
        self._transaction_slots = {}
        for column in (
            self._transaction_ids,
            self._transaction_kind,
            self._transaction_member,
            self._transaction_merchant,
            self._transaction_amount,
            self._transaction_refunded,
        ):
            column.clear()

    def check_invariants(self):
        members = len(self._member_ids)
        holds = len(self._hold_ids)
        transactions = len(self._transaction_ids)
        if (
            len(self._member_slots) != members
            or len(self._hold_slots) != holds
            or len(self._transaction_slots) != transactions
        ):
            raise LedgerInvariantError(
                f"indexes disagree with counts: {len(self._member_slots)} member ids, {members} "
                f"members; {len(self._hold_slots)} hold ids, {holds} holds; "
                f"{len(self._transaction_slots)} transaction ids, {transactions} transactions"
            )
        for member in range(members):
            posted, held = self._member_posted[member], self._member_held[member]
            if posted < 0 or posted > BALANCE_MAX or held < 0 or held > posted or self._member_account[member] < 0:
                raise LedgerInvariantError(
                    f"member {self._member_ids[member]!r} (slot {member}): posted {posted}, held "
                    f"{held}, account {self._member_account[member]}"
                )
        held_sums = [0] * members
        open_count = 0
        for hold in range(holds):
            member, amount, status = (self._hold_member[hold], self._hold_amount[hold], self._hold_status[hold])
            if (
                member < 0
                or member >= members
                or amount <= 0
                or amount > BALANCE_MAX
                or status < HOLD_OPEN
                or status > HOLD_STATUS_EXPIRED
                or self._hold_slots.get(self._hold_ids[hold]) != hold
            ):
                raise LedgerInvariantError(
                    f"hold {self._hold_ids[hold]} (slot {hold}): member slot {member}, amount {amount}, status {status}"
                )
            if status == HOLD_OPEN:
                open_count += 1
                held_sums[member] += amount
                if held_sums[member] > BALANCE_MAX:
                    raise LedgerInvariantError(f"open holds of member slot {member} sum beyond {BALANCE_MAX}")
        if open_count != self._holds_open_count:
            raise LedgerInvariantError(f"{open_count} open holds, but holds_open_count is {self._holds_open_count}")
        for member in range(members):
            if held_sums[member] != self._member_held[member]:
                raise LedgerInvariantError(
                    f"member {self._member_ids[member]!r} (slot {member}): held "
                    f"{self._member_held[member]} but its open holds sum to {held_sums[member]}"
                )
        in_heap = set()
        for position, (expires_at_us, hold) in enumerate(self._heap):
            if (
                hold < 0
                or hold >= holds
                or hold in in_heap
                or expires_at_us != self._hold_expires_at_us[hold]
                or (position > 0 and self._heap[position] < self._heap[(position - 1) // 2])
            ):
                raise LedgerInvariantError(
                    f"expiry heap entry {position} (hold slot {hold}) is out of order, stale or repeated"
                )
            in_heap.add(hold)
        for hold in range(holds):
            if self._hold_status[hold] == HOLD_OPEN and hold not in in_heap:
                raise LedgerInvariantError(f"open hold {self._hold_ids[hold]} is missing from the expiry heap")
        for transaction in range(transactions):
            kind, member = self._transaction_kind[transaction], self._transaction_member[transaction]
            amount, refunded = (self._transaction_amount[transaction], self._transaction_refunded[transaction])
            if (
                kind < KIND_EARN
                or kind > KIND_REFUND_EARN
                or refunded < 0
                or refunded > amount
                or member < 0
                or member >= members
                or self._transaction_slots.get(self._transaction_ids[transaction]) != transaction
            ):
                raise LedgerInvariantError(
                    f"transaction {self._transaction_ids[transaction]} (slot {transaction}): kind "
                    f"{kind}, amount {amount}, refunded {refunded}"
                )


def _level_for(qualifying, threshold):
    """rules.level_for over thresholds: the last level whose threshold the qualifying points reach."""
    reached = 0
    for level, value in enumerate(threshold):
        if qualifying >= value:
            reached = level
    return reached


# points whose fee at any rate up to 10,000 bps is an int64 product (plain_rows; larger: the caller's path)
_FEE_POINTS_MAX = 922337203685477


def _fee_rows(entries, created, merchant, fee_revenue, fee):
    """A transaction's fee legs (plain_rows, earn_redeem_rows): the merchant's fees account pays, the
    operator's fee revenue account receives."""
    entries.append((created, merchant.fees_account_id, -fee))
    entries.append((created, fee_revenue, fee))


def _redeem_rows(
    transactions, entries, created, op, points, fee, member_account, merchant, outcome_type, ok_code, posted, available
):
    """A redemption decided OK (plain_rows, earn_redeem_rows): its transaction row and two legs appended;
    its outcome returned."""
    transactions.append(
        (created, KIND_REDEEM, op.merchant_id, op.member_id, points, None, None, None, op.idempotency_key, fee)
    )
    entries.append((created, member_account, -points))
    entries.append((created, merchant.redeemed_account_id, points))
    return outcome_type(
        ok_code, {"transaction_id": created, "points": points, "balance": posted, "available": available}
    )


def _first_pass_merchant(op, merchants, routed, stored, earn, redeem):
    """The merchant row of `op` when the first pass may take it (an earn or redeem of an active merchant,
    no replay, refusal, route, vouchers or hold), else None: the batch loop decides it."""
    if stored and stored.get((op.merchant_id, op.idempotency_key)) is not None:
        return None
    method = op.method
    if op.refusal is not None or (method is not earn and method is not redeem):
        return None
    member_id = op.member_id
    if type(member_id) is not str or member_id in routed or op.transaction_id or op.referrer_id:
        return None
    if op.vouchers or op.authorization_id:
        return None
    merchant = merchants.get(op.merchant_id)
    if merchant is None or type(merchant.status) is not str or merchant.status != "active":
        return None
    return merchant
