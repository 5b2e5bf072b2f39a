"""What Python sees of the fast path (compiled `fastpath._core` and its pure-Python twin `fastpath._reference`).

The ledger keeps, in typed arrays, every member's posted balance and held amount, every hold that is
resident, and the refundable state of resident transactions. It decides balance checks, holds,
captures, voids, redemptions and refunds without touching Postgres. It knows nothing of gRPC,
asyncio or SQL: the caller (processor/pipeline.py) passes plain ints and strings, and one `now_us`
(microseconds since the Unix epoch) per batch.

Amounts are point-units (100 = 1 point) in int64. Ids of holds and transactions are int64 chosen by the
caller. Merchants are small ints (slots) chosen by the caller.

Every operation returns a tuple whose first item is a status (one of the constants below). On any
status other than OK the ledger is unchanged.

Undo log: `begin()` opens a batch and starts recording; `rollback()` restores exactly the state at
`begin()` (balances, holds and their statuses, transactions and refunded amounts, and removes members,
holds and transactions created since); `commit()` drops the record. Operations between begin and
commit/rollback are the batch being written to Postgres.
Batches nest for a pipelined committer: while batch N is being written, batch N+1 is applied on top of
it, after its own `begin()`. `commit()` makes the OLDEST open batch permanent (N's write succeeded);
`rollback()` undoes every open batch, newest first, back to the oldest `begin()` (N's write failed, and
N+1 was computed on top of it); `rollback_newest()` undoes only the newest (N+1 failed on its own,
N stays open). The undo log is one array with a mark per open batch, so `commit()` is O(1) amortized.
Member account ids are NOT in the undo log (see load_member).

Clarifications (both implementations behave so; tests/unit/test_fastpath*.py hold them to it):
- Caller bugs raise before anything changes (apply_batch(): anything of the operation at fault),
  and before any status is decided: TypeError/OverflowError for an argument that is not an int64
  (member ids: not a str); ValueError for points or amounts outside the range an operation allows,
  or a merchant outside 0..2**31-1; IndexError for a member slot that is not resident; KeyError when
  the id of the hold or transaction an operation would create is resident already. commit()/rollback()/rollback_newest() with no batch open and forget_resolved()
  while any batch is open raise RuntimeError.
- member_slot -1 (what member_slot() answers for an unknown member) is UNKNOWN_MEMBER in authorize()
  and redeem(); any other slot that is not resident is an IndexError everywhere.
- Statuses are decided in this order, the first that applies wins: capture/void: UNKNOWN_HOLD,
  WRONG_MERCHANT, HOLD_CAPTURED / HOLD_VOIDED / HOLD_EXPIRED (status), HOLD_EXPIRED (expires_at_us <=
  now_us: marked), CAPTURE_EXCEEDS_HOLD, CAPACITY. refund: UNKNOWN_TRANSACTION, WRONG_MERCHANT,
  NOT_REFUNDABLE, REFUND_EXCEEDS_REMAINING, INSUFFICIENT_POINTS (earn) / OVERFLOW (redemption),
  CAPACITY. earn: OVERFLOW, CAPACITY. authorize/redeem: UNKNOWN_MEMBER, INSUFFICIENT_POINTS, CAPACITY.
- An operation that would leave its member with posted outside 0..BALANCE_MAX, held < 0 or
  held > posted raises LedgerInvariantError before writing (only reachable from inconsistent loads).
"""

import array
from typing import Any

from collections.abc import Callable, Iterable, MutableSequence, Sequence

# statuses
OK: int  # 0
INSUFFICIENT_POINTS: int  # 1  available < points asked
UNKNOWN_MEMBER: int  # 2
UNKNOWN_HOLD: int  # 3
HOLD_EXPIRED: int  # 4  hold's expires_at_us <= now_us (or already marked expired)
HOLD_CAPTURED: int  # 5  hold already captured
HOLD_VOIDED: int  # 6  hold already voided
WRONG_MERCHANT: int  # 7  hold or transaction belongs to another merchant
CAPTURE_EXCEEDS_HOLD: int  # 8  capture points > held amount
UNKNOWN_TRANSACTION: int  # 9
REFUND_EXCEEDS_REMAINING: int  # 10 refund points > amount - refunded so far
NOT_REFUNDABLE: int  # 11 transaction kind cannot be refunded (e.g. a refund)
OVERFLOW: int  # 12 a balance would exceed BALANCE_MAX
CAPACITY: int  # 13 members_max / holds_max / transactions_max reached

# hold statuses (as stored in Postgres: holds.status)
HOLD_OPEN: int  # 1
HOLD_STATUS_CAPTURED: int  # 2
HOLD_STATUS_VOIDED: int  # 3
HOLD_STATUS_EXPIRED: int  # 4

# transaction kinds (as stored in Postgres: transactions.kind)
KIND_EARN: int  # 1
KIND_CAPTURE: int  # 2
KIND_REDEEM: int  # 3
KIND_REFUND_REDEMPTION: int  # 4  refund of a capture or redeem: points back to the member
KIND_REFUND_EARN: int  # 5  refund of an earn: points taken back from the member

BALANCE_MAX: int  # 2**62: no balance or held sum may exceed it (leaves headroom for int64 sums)

# operation codes of apply_batch() (its `method` array)
OP_EARN: int  # 1
OP_AUTHORIZE: int  # 2
OP_CAPTURE: int  # 3
OP_VOID: int  # 4
OP_REDEEM: int  # 5
OP_REFUND: int  # 6

# apply_earn_redeem()'s bounds (its products stay in int64); larger amounts take the caller's other path
RULES_EARN_POINTS_MAX: int  # 2**62 // 100000
RULES_PURCHASE_MAX: int  # 2**62 // 10000
RULES_LEVELS_MAX: int  # 63

class LedgerInvariantError(Exception):
    """An invariant of the ledger does not hold: a bug. The caller stops serving."""

class Ledger:
    def __init__(self, members_max: int, holds_max: int, transactions_max: int) -> None: ...

    # --- sizes (for metrics and bounds) ---
    @property
    def members_count(self) -> int: ...
    @property
    def holds_resident_count(self) -> int: ...  # holds in memory, any status
    @property
    def holds_open_count(self) -> int: ...  # holds with status HOLD_OPEN
    @property
    def transactions_resident_count(self) -> int: ...
    @property
    def batches_open(self) -> int: ...  # begin() calls not yet committed or rolled back

    # --- loading from Postgres (start-up, and prefetch before a batch); not recorded in the undo log
    #     unless called between begin() and commit()/rollback() (then rollback removes them too) ---
    def load_member(self, member_id: str, posted: int, account_id: int = 0) -> int:
        """Adds (or overwrites the posted balance of) a member; returns its slot. held starts at 0 and
        grows only by load_hold/authorize. Raises OverflowError on CAPACITY or posted outside 0..BALANCE_MAX.
        Overwriting does not compare posted with held (members are loaded before their holds);
        check_invariants() reports a member left with held > posted.
        account_id is the Postgres accounts.account_id of the member's points account (0: not known;
        ValueError if < 0). Overwriting with account_id 0 keeps the id already known. The account id
        is not recorded in the undo log: a rollback restores posted but leaves the id (a member
        created inside the rolled-back batch disappears with it, id and all)."""
    def ensure_member(self, member_id: str) -> int:
        """The member's slot, creating it (posted 0, account id 0) if unknown; -1 (not an exception)
        when it is unknown and members_max is reached. A member created between begin() and
        commit() is removed by rollback(), like one created by earn()."""
    def load_hold(
        self, hold_id: int, member_slot: int, merchant: int, amount: int, expires_at_us: int, status: int
    ) -> None:
        """Adds a hold. If status is HOLD_OPEN the member's held grows by amount. Raises KeyError if the
        hold id is resident already, OverflowError on capacity or if held would exceed BALANCE_MAX,
        ValueError unless 1 <= amount <= BALANCE_MAX and status is a hold status."""
    def load_transaction(
        self, transaction_id: int, kind: int, member_slot: int, merchant: int, amount: int, refunded: int
    ) -> None:
        """Adds a transaction that refunds may refer to. Raises KeyError if already resident,
        OverflowError on capacity, ValueError unless kind is a kind, 0 <= amount <= BALANCE_MAX and
        0 <= refunded <= amount."""

    # --- look-ups ---
    def member_slot(self, member_id: str) -> int: ...  # -1 if unknown
    def member_id(self, member_slot: int) -> str: ...
    def has_hold(self, hold_id: int) -> bool: ...
    def has_transaction(self, transaction_id: int) -> bool: ...
    def balance(self, member_slot: int) -> tuple[int, int]:
        """(posted, held). held counts open holds not yet expired by expire_holds()."""
    def member_account(self, member_slot: int) -> int:
        """The member's account id; 0 if never set (members created by earn() or ensure_member()
        start at 0). IndexError for a slot that is not resident."""
    def set_member_account(self, member_slot: int, account_id: int) -> None:
        """Sets the member's account id (ValueError unless account_id >= 1, then IndexError for a slot
        that is not resident). Not recorded in the undo log (see load_member)."""
    def hold(self, hold_id: int) -> tuple[int, int, int, int, int]:
        """(status, member_slot, merchant, amount, expires_at_us); KeyError if not resident."""

    # --- undo log (batches nest; see the module docstring) ---
    def begin(self) -> None:
        """Opens a batch on top of those already open (any number)."""
    def commit(self) -> None:
        """Makes the OLDEST open batch permanent: drops its undo records; newer open batches keep
        theirs and stay open. RuntimeError if no batch is open."""
    def rollback(self) -> None:
        """Restores exactly the state at the OLDEST open begin(), undoing every open batch newest
        first; leaves no batch open. RuntimeError if no batch is open."""
    def rollback_newest(self) -> None:
        """Restores exactly the state at the NEWEST open begin(), undoing that batch only; older open
        batches stay open and intact. RuntimeError if no batch is open."""

    # --- operations: (status, ...) ; on status != OK the rest of the tuple is zeros ---
    def earn(self, member_id: str, merchant: int, points: int, transaction_id: int) -> tuple[int, int, int]:
        """Credits points (>= 0) to the member, creating it if unknown. Registers the transaction
        (KIND_EARN, amount=points) as resident. Returns (status, member_slot, posted_after)."""
    def authorize(
        self, member_slot: int, merchant: int, points: int, hold_id: int, expires_at_us: int
    ) -> tuple[int, int]:
        """Places a hold of points (> 0) if posted - held >= points. Returns (status, available_after)."""
    def capture(
        self, hold_id: int, merchant: int, points: int, transaction_id: int, now_us: int
    ) -> tuple[int, int, int, int, int]:
        """Captures points (0 = the whole hold) of an open hold of this merchant; the rest is released;
        the hold becomes HOLD_STATUS_CAPTURED. An open hold with expires_at_us <= now_us is marked
        HOLD_STATUS_EXPIRED (its points released) and HOLD_EXPIRED is returned -- that marking is the
        one change made on a non-OK status, and it is recorded in the undo log.
        Registers the transaction (KIND_CAPTURE, amount=captured) when captured > 0.
        Returns (status, captured, member_slot, posted_after, available_after)."""
    def void(self, hold_id: int, merchant: int, now_us: int) -> tuple[int, int, int, int]:
        """Releases an open hold of this merchant (expiry handled as in capture).
        Returns (status, released, member_slot, available_after)."""
    def redeem(self, member_slot: int, merchant: int, points: int, transaction_id: int) -> tuple[int, int, int]:
        """Debits points (> 0) if available. Registers (KIND_REDEEM, amount=points).
        Returns (status, posted_after, available_after)."""
    def refund(
        self, transaction_id: int, merchant: int, points: int, refund_transaction_id: int
    ) -> tuple[int, int, int, int, int]:
        """Refunds points (> 0) of a resident transaction of this merchant.
        KIND_CAPTURE / KIND_REDEEM: credits the member back (KIND_REFUND_REDEMPTION).
        KIND_EARN: debits the member (KIND_REFUND_EARN), INSUFFICIENT_POINTS if available < points.
        points must be <= amount - refunded (REFUND_EXCEEDS_REMAINING).
        Returns (status, refund_kind, member_slot, posted_after, available_after)."""
    def expire_holds(self, now_us: int, limit: int) -> list[int]:
        """Marks up to `limit` open holds with expires_at_us <= now_us as HOLD_STATUS_EXPIRED, soonest
        first, releasing their points; returns their ids. O(k log n) (a heap on expiry). Holds expiring
        at the same microsecond go in the order they became resident. limit >= 0."""
    def apply_batch(
        self,
        method: Sequence[int],
        member: Sequence[int],
        merchant: Sequence[int],
        points: Sequence[int],
        ref_id: Sequence[int],
        new_id: Sequence[int],
        expires_at_us: Sequence[int],
        now_us: int,
        out_status: MutableSequence[int],
        out_member: MutableSequence[int],
        out_amount: MutableSequence[int],
        out_posted: MutableSequence[int],
        out_available: MutableSequence[int],
        out_kind: MutableSequence[int],
    ) -> int:
        """Applies operations 0..n-1 in order, in one call: exactly as calling, for each i,
          OP_EARN       earn(member_id(member[i]), merchant[i], points[i], new_id[i])
          OP_AUTHORIZE  authorize(member[i], merchant[i], points[i], new_id[i], expires_at_us[i])
          OP_CAPTURE    capture(ref_id[i], merchant[i], points[i], new_id[i], now_us)
          OP_VOID       void(ref_id[i], merchant[i], now_us)
          OP_REDEEM     redeem(member[i], merchant[i], points[i], new_id[i])
          OP_REFUND     refund(ref_id[i], merchant[i], points[i], new_id[i])
        (ref_id: the hold captured or voided, the transaction refunded; new_id: the transaction or hold
        created; columns an operation does not use are ignored). Returns n = len(method).
        Earn needs a resident member slot: create new members with ensure_member() first.

        Row i of the outputs: out_status (the operation's status), out_member (the member slot),
        out_amount (earn, authorize, redeem, refund: points; capture: captured; void: released),
        out_posted and out_available (the member's, after the operation), out_kind (earn, capture,
        redeem: the KIND_* registered; refund: KIND_REFUND_REDEMPTION or KIND_REFUND_EARN;
        authorize, void: 0). On a status other than OK every output is 0 except out_member: the
        member the operation concerns when the ledger knows it (the slot given to earn, authorize and
        redeem -- -1 for UNKNOWN_MEMBER; the hold's or transaction's member), so the caller can say
        what is available; -1 on UNKNOWN_HOLD, UNKNOWN_TRANSACTION and WRONG_MERCHANT (another
        merchant learns nothing about the hold or transaction); and, on INSUFFICIENT_POINTS,
        out_posted and out_available: that member's posted and available balances when the operation
        was refused (what a later operation of the batch may have changed by the time it returns).

        Raises ValueError, before anything changes, if the inputs do not all have n items, an output
        has fewer than n, or a method is not an OP_* code. A caller bug in operation i (as listed in
        the clarifications above; for earn, IndexError for a non-resident slot comes first) raises
        what the per-operation method raises; operations 0..i-1 stay applied and their output rows
        written (roll back with the undo log), operation i changed nothing, rows i.. are not written.
        The compiled module takes int64 buffers (array.array('q'); memoryviews of them), the twin
        any sequences of ints; outputs are written in place, the caller allocates them."""
    def apply_earn_redeem(
        self,
        method: Sequence[int],
        member: Sequence[int],
        merchant: Sequence[int],
        points: Sequence[int],
        purchase: Sequence[int],
        fee_bps: Sequence[int],
        tier: Sequence[int],
        tier_qualifying: MutableSequence[int],
        tier_reached: MutableSequence[int],
        tier_acquirer: Sequence[int],
        tier_acquiring_bps: Sequence[int],
        tier_lot_head: MutableSequence[int],
        tier_lot_tail: MutableSequence[int],
        tier_lot_total: MutableSequence[int],
        lot_amount: MutableSequence[int],
        lot_expires_at_us: MutableSequence[int],
        lot_next: MutableSequence[int],
        lots_used: int,
        level_threshold: Sequence[int],
        level_multiplier_bps: Sequence[int],
        new_lot_expires_at_us: int,
        next_transaction_id: int,
        out_status: MutableSequence[int],
        out_created: MutableSequence[int],
        out_posted: MutableSequence[int],
        out_available: MutableSequence[int],
        out_total: MutableSequence[int],
        out_fee: MutableSequence[int],
        out_level_before: MutableSequence[int],
        out_level_after: MutableSequence[int],
        out_reward: MutableSequence[int],
        out_reward_id: MutableSequence[int],
        out_lot: MutableSequence[int],
        out_piece_start: MutableSequence[int],
        out_piece_end: MutableSequence[int],
        out_due_at_us: MutableSequence[int],
        piece_lot: MutableSequence[int],
        piece_amount: MutableSequence[int],
    ) -> tuple[int, int, int]:
        """A run of earns and redeems under a program's rules, in one call (processor/rules_kernel.py
        prepares it; docs/RULES.md states the rules). Each member of the run has a tier row: its
        qualifying points, levels reached (bit j: level j), acquirer (a merchant slot, -1: none) and
        that acquirer's share, and its expiring lots as a chain in the lot pool (lot_amount,
        lot_expires_at_us, lot_next; -1 ends a chain), soonest first, from tier_lot_head to
        tier_lot_tail (both -1: none), with tier_lot_total their sum over ALL the member's lots or -1
        when the caller passed only the first of them (enough for its redeems). Lots 0..lots_used-1
        are in use; the pool's room after them takes the run's new lots.

        For each i in order (method[i] OP_EARN or OP_REDEEM), transaction id next_transaction_id is
        taken for the operation (out_created[i]), then
          OP_EARN   the member's level is the last level whose level_threshold its qualifying points
                    reach (out_level_before[i]); total = floor(points[i] * level_multiplier_bps[level]
                    / 10000) (base points[i] + uplift); earn(member_id(member[i]), merchant[i], total,
                    out_created[i]). On OK: out_total[i] = total; out_fee[i] = floor(points[i] *
                    fee_bps[i] / 10000) (on the base); the qualifying points grow by points[i];
                    out_level_after[i] is the level they reach; tier_reached gets the bit of every
                    level >= 1 they reach; if the member's acquirer is not merchant[i] and points[i] >
                    0: out_reward[i] = floor(purchase[i] * acquiring bps / 10000) and, if > 0,
                    out_reward_id[i] takes the next transaction id; if total > 0 and
                    new_lot_expires_at_us > 0, a new lot of `total` expiring then goes last in the
                    member's chain (out_lot[i]: its index; -1: none).
          OP_REDEEM redeem(member[i], merchant[i], points[i], out_created[i]); on OK out_fee[i] as
                    above, and the points are taken from the member's chain, soonest first, the rest
                    from its never-expiring points (posted - held - tier_lot_total before it): pieces
                    out_piece_start[i]..out_piece_end[i]-1 of piece_lot (the lot, -1: never-expiring)
                    and piece_amount; out_due_at_us[i] = the member's new soonest expiry when the
                    redeem took lots and moved it, else 0.
        out_status, out_posted, out_available as apply_batch() (the member's balances after the
        operation; on INSUFFICIENT_POINTS those that refused it; else 0); other outputs 0 where not
        set. The tier and lot columns are updated in place. Returns (the next transaction id not
        taken, lots in use, pieces written).

        Raises ValueError (IndexError for a tier row out of range), before anything changes, when the
        columns' lengths differ, a method is not OP_EARN/OP_REDEEM, points are outside
        0..RULES_EARN_POINTS_MAX, purchase outside 0..RULES_PURCHASE_MAX, a bps outside 0..10000,
        the levels are not 1..RULES_LEVELS_MAX thresholds >= 0 with multipliers 10000..100000, or a
        chain is malformed (a lot in use of amount <= 0, links out of range). LedgerInvariantError
        when the pool or the pieces run out of room or a redeem would need more never-expiring points
        than the member has (inconsistent lots). A caller bug in operation i raises as apply_batch()
        does (rows before i applied)."""
    @staticmethod
    def unbalanced_entries(entries: Sequence[tuple[Any, ...]], points_asset: str) -> str | None:
        """None when every transaction's journal entries sum to zero per asset and every entry names an
        account (id > 0); else a message naming the first problem: an entry without an account (the
        first in order), else a transaction whose `points_asset` entries do not sum to zero, else one of
        another asset. An entry is (transaction id, account id, amount) in `points_asset`, or (..,
        asset) naming its asset; ids and amounts are int64. A transaction's entries may be apart."""
    @staticmethod
    def int64_column(values: Iterable[int]) -> array.array[int]:
        """A new int64 array ("q") of `values`, in order: what array.array("q", values) makes. An item
        that is not an integer (by operator.index) raises TypeError; one outside int64, OverflowError."""
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
        """Appends to `records` the idempotency record of each operation of `batch` whose outcome (aligned
        by index) is recorded: (merchant id, key, method value, dumps(request), code value,
        dumps(fields) when the code is `ok` else None, message). Left out: an outcome whose code is in
        `not_recorded` or whose `recorded` is false, and an operation whose (merchant id, key) is in
        `stored` (a replay keeps its record). With `dumps_option` not None, dumps(value,
        option=dumps_option) is called instead (orjson.dumps: UTF-8 bytes, decoded to str here; a str
        answer is kept), and when it raises TypeError (orjson's JSONEncodeError) and
        dumps_option_fallback is not None, dumps(value, option=dumps_option_fallback) is the answer.
        With `dumps` None the request and the fields themselves are recorded (not copied: the caller
        must not change them before the records are encoded), and the cyclic collector stops tracking
        what cannot be in a cycle: each record whose request and fields it does not track, and each
        outcome (of processor.domain.Outcome, the class Ledger's outcomes are built as) whose fields it
        does not track and whose quota is None (the twin leaves them tracked: Python has no call for
        it). ValueError when the lengths differ."""
    def plain_rows(
        self,
        batch: list[Any],
        applied: list[int],
        index: int,
        created: Sequence[int],
        status: Sequence[int],
        member: Sequence[int],
        posted: Sequence[int],
        available: Sequence[int],
        merchants: dict[str, Any],
        numbers: tuple[int, int, Any, Any],
        classes: tuple[Any, Any],
        transactions: list[Any],
        entries: list[Any],
        outcomes: list[Any],
    ) -> int:
        """The rows of the plain operations apply_batch() decided, from `index` on (processor/
        state_machine.py's _applied, for an earn or redeem decided OK): for i = index, index + 1, ..
        while status[i] is OK, batch[applied[i]] is an earn or redeem (numbers' `earn` and `redeem`
        methods, by identity) of a merchant in `merchants` whose fee rate (fee_issued_bps for an earn,
        fee_redeemed_bps for a redeem) is an int in 0..10,000 and whose points are an int in
        0..922,337,203,685,477: its fee floor(points * rate / 10,000) and, when non-zero, its two
        entries (the merchant's fees account, the operator's fee revenue account); its transaction
        row; an earn's member and issued entries (when points > 0), a redeem's member and redeemed
        entries; and outcomes[applied[i]] = Outcome(OK, fields) (an earn: transaction_id, points,
        balance, give_back_bps, created_at_us; a redeem: transaction_id, points, balance, available).
        created/status/member/posted/available: apply_batch()'s new id column and its outputs.
        `numbers`: (now_us, the fee revenue account id, earn, redeem); `classes`: (Outcome, its OK
        code). Returns the index it stopped at (the caller builds that one). ValueError when a column
        is shorter than `applied`."""
    def first_pass_plain(
        self, context: tuple[Any, ...], batch: list[Any], position: int, next_transaction_id: int
    ) -> tuple[int, int]:
        """The batch loop's first pass with no program (processor/state_machine.py's _apply_batch): from
        batch[position] on, each operation that is an earn or redeem (context's `earn` and `redeem`
        methods, by identity) with no refusal, vouchers, authorization_id, transaction_id or
        referrer_id, a str member_id not in `routed`, not a replay (stored, when not None, has no
        record under (merchant_id, idempotency_key)), of a merchant in `merchants` whose status is
        "active", of a member in the ledger whose account is known (an earn's; any redeem's member) is
        appended to the plain columns: its position to `applied`, OP_EARN or OP_REDEEM, its member
        slot, merchant_slot, points, reference 0, the next transaction id (taken) and expiry 0.
        Stops at the first operation it does not take (the caller decides it). `context`: (merchants,
        routed, stored, earn, redeem, applied, codes, members, merchant_slots, points, references,
        createds, expirations). Returns (the position it stopped at, the next transaction id)."""
    def first_pass_run(self, context: tuple[Any, ...], batch: list[Any], position: int) -> int:
        """The batch loop's first pass into a rules kernel's run (processor/rules_kernel.py): from
        batch[position] on, each operation first_pass_plain would take whose points and purchase_amount
        are ints within 0..points_max and 0..purchase_max and, an earn, whose merchant's give_back_bps
        is an int within give_back_min..give_back_max, whose member has a tier row (tier_rows, else
        kernel_member(run, tables, op, now_us) >= 0) is appended to the run: position, op, member
        slot, tier row, and the merchant's fee_issued_bps (an earn) or fee_redeemed_bps (a redeem,
        whose points are added to tier_demand[row]). Stops at the first operation it does not take,
        which may have been given its tier row (as the loop would first). `context`: (merchants,
        routed, stored, earn, redeem, give_back_min, give_back_max, points_max, purchase_max,
        positions, ops, slots, rows, fee_bps, tier_rows, tier_demand, kernel_member, run, tables,
        now_us). Returns the position it stopped at."""
    def earn_redeem_rows(
        self,
        ops: list[Any],
        positions: list[int],
        method: Sequence[int],
        member: Sequence[int],
        tier: Sequence[int],
        out: Sequence[Sequence[int]],
        piece_lot: Sequence[int],
        piece_amount: Sequence[int],
        pool_lots: list[Any],
        merchants: dict[str, Any],
        tier_acquirer_ids: list[str | None],
        level_names: tuple[str, ...],
        numbers: tuple[int, int, int, int, int, int, int, int, int],
        classes: tuple[Any, ...],
        transactions: list[Any],
        entries: list[Any],
        outcomes: list[Any],
        earned_level: MutableSequence[int],
        taken_rows: set[int],
        new_lots_by_row: dict[int, list[int]],
        earn_records: list[Any],
        tier_events: list[Any],
        consumed: list[Any],
        spent: dict[str, int],
    ) -> list[int]:
        """The Python rows of a run apply_earn_redeem() just decided (processor/rules_kernel.py), in the
        run's order: what the caller's loop would build per operation, built in one call. `ops[i]`
        (an object with merchant_id, member_id, idempotency_key, points, purchase_amount) with
        method[i], member[i] (slot) and tier[i] as given to apply_earn_redeem(); `out`: its out_status
        .. out_piece_end columns (its 13 first outputs, in its order) and piece_lot/piece_amount.
        `pool_lots[j]`: the pool's lot j (a Lot; the run's new lots are set here at out_lot[i]).
        `merchants`: merchant id -> row (fees_account_id, issued_account_id, redeemed_account_id,
        acquiring_account_id, give_back_bps); `tier_acquirer_ids[row]`: the row's acquirer id or None.
        `numbers`: (version number, now_us, new_lot_expires_at_us, fee revenue, tier rewards and
        acquiring account ids, the acquiring reward's kind, the owner kind of a transaction, the lot id
        of never-expiring points); `classes`: (Outcome, its OK code, Lot, Earn, EarnRecord): the
        compiled module builds fastpath.records' Lot, Earn and EarnRecord with their fields set in C
        (no __init__ run; TypeError for any other classes); its twin calls the classes.

        For each i with out_status[i] OK: the transaction row(s) and entry rows are appended to
        `transactions` and `entries` (an earn: its fee's two entries, the member's total, the
        merchant's base and the tier rewards' uplift, each when non-zero, and when out_reward[i] > 0
        the acquirer's reward transaction and its two entries; a redeem: its fee's entries, the
        member's and the merchant's), outcomes[positions[i]] gets the Outcome, an earn sets
        earned_level[tier[i]] = out_level_after[i], its lot in pool_lots (appended to
        new_lots_by_row[tier[i]]), (transaction id, EarnRecord) in earn_records and (transaction id,
        member, level before, level after) in tier_events when its level changed; a redeem appends
        ((owner kind, transaction id), its pieces) to `consumed` (a piece is the pool's Lot itself
        when taken whole), adds its points to spent[member] and tier[i] to taken_rows when it took
        pieces. Returns the indexes i not OK (no rows: the caller answers them). Raises ValueError on
        columns of the wrong length, LedgerInvariantError when a piece names a lot no earn made."""
    def forget_resolved(self) -> None:
        """Drops resolved holds and all transactions from memory (Postgres keeps them; they are
        prefetched again when a batch refers to them). Not allowed while any batch is open."""
    def check_invariants(self) -> None:
        """Raises LedgerInvariantError unless: every posted in 0..BALANCE_MAX, held >= 0,
        held <= posted, and each member's held equals the sum of its open holds. Also checks the
        ledger's own bookkeeping: indexes agree with counts, holds and transactions are well formed
        (0 <= refunded <= amount), holds_open_count is right and every open hold is in the expiry
        heap."""
