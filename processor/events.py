"""The change feed: every committed transaction and member event as one totally ordered, gap-free log
(points.v1.EventsService.WatchEvents serves it, processor/events_nats.py publishes it to NATS).

Positions. A transaction's position is (transaction_id, 0); a member event's is (after_transaction_id,
member_event_id), compared as pairs. The log is gap-free — once a reader has seen a position, nothing
at an earlier one commits later — because:
  * the single writer hands transaction ids out in increasing order, appends batches to the batch log
    in that order, and its projector (processor/projector.py) writes their rows one projection after
    the other, in log order, so transactions commit in id order (the feed reads only projected rows;
    the projector wakes it after each projection);
  * every writer of member_events first locks the ledger_writer row, which every batch append updates
    (the fence): a member event commits between two appends, after_transaction_id is the writer's
    high-water mark then (every later transaction gets a larger id; a reader shows the event only once
    the transactions up to it are projected), and its
    member_event_id is drawn under that lock, so it grows in commit order. Level changes are written
    by the batch itself (tier_events, copied to member_events by a trigger, migration 0012).
A reader reads both tables in one repeatable-read snapshot, so the two agree.

The member's balance after a transaction is recorded by the committer (balances_after, in the same
Postgres transaction as the batch) rather than derived on read: the fast path holds every member's
exact posted balance right after the batch is applied, so the per-transaction balances are the final
balance walked back through the batch's own entries (one pass, no I/O); deriving it on read would need
the sum of the member's whole journal up to each event (entries have no per-account index, on purpose:
migration 0003), a scan per event. reconcile checks every recorded balance against the journal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import re
from typing import Any, Callable, Mapping, NamedTuple

import asyncpg

import fastpath
from processor.domain import Code, Rejection, require

# the compiled walk of balances_after (fastpath/balances.pyx); POINTS_FASTPATH=python runs its twin
_balances_after_ordered: Callable[[list[Any], list[Any], Any, Any], dict[int, int] | None] | None = None
_TRANSACTION_ORDER_ERROR: type[Exception] = ValueError  # the compiled walk's, raised by it only
if fastpath.IMPLEMENTATION == "cython":
    from fastpath import balances as _compiled_balances

    _balances_after_ordered = _compiled_balances.balances_after_ordered
    _TRANSACTION_ORDER_ERROR = _compiled_balances.TransactionOrderError

log = logging.getLogger("points.events")

# member_events.event_type (the CHECK in migration 0012 lists the same)
LEVEL_CHANGED = "level_changed"
POINTS_EXPIRING = "points_expiring"
FROZEN = "frozen"
UNFROZEN = "unfrozen"
MERGED = "merged"
CLOSED = "closed"
MEMBER_EVENT_TYPES = (LEVEL_CHANGED, POINTS_EXPIRING, FROZEN, UNFROZEN, MERGED, CLOSED)
TRANSACTION = "transaction"  # the type of a transaction event (not a member_events row)
EVENT_TYPES = (TRANSACTION, *MEMBER_EVENT_TYPES)

_CURSOR = re.compile(r"c1\.([0-9]{1,19})\.([0-9]{1,19})")
_INT64_MAX = 2**63 - 1


class Position(NamedTuple):
    """Where an event is in the feed: (transaction_id, 0) for a transaction, (after_transaction_id,
    member_event_id) for a member event. Compared as a pair."""

    transaction_id: int
    member_event_id: int


START = Position(0, 0)


def encode_cursor(position: Position) -> str:
    return f"c1.{position.transaction_id}.{position.member_event_id}"


def decode_cursor(cursor: str) -> Position:
    """The position of a cursor this service issued (empty: the start); INVALID_ARGUMENT otherwise."""
    if cursor == "":
        return START
    match = _CURSOR.fullmatch(cursor)
    if match is None or int(match[1]) > _INT64_MAX or int(match[2]) > _INT64_MAX:
        raise Rejection(
            Code.INVALID_ARGUMENT,
            f"cursor {cursor[:80]!r} is not a cursor of this feed: send the `cursor` of an event as "
            "WatchEvents gave it, or empty to start at the beginning",
            reason="INVALID_CURSOR",
            field="cursor",
        )
    return Position(int(match[1]), int(match[2]))


def event_id(position: Position) -> str:
    """The event's stable id (the NATS publisher's Nats-Msg-Id)."""
    if position.member_event_id == 0:
        return f"tx-{position.transaction_id}"
    return f"me-{position.member_event_id}"


@dataclasses.dataclass(frozen=True, slots=True)
class FeedFilter:
    """What a stream sees. None = no restriction on that dimension."""

    merchant_ids: frozenset[str] | None = None
    member_ids: frozenset[str] | None = None
    types: frozenset[str] | None = None

    @property
    def transactions(self) -> bool:
        return self.types is None or TRANSACTION in self.types

    @property
    def member_events(self) -> bool:
        # member events have no merchant: a merchant-restricted feed shows none
        return self.merchant_ids is None and (self.types is None or bool(self.types & set(MEMBER_EVENT_TYPES)))


@dataclasses.dataclass(frozen=True, slots=True)
class TransactionRow:
    transaction_id: int
    kind: int
    merchant_id: str
    member_id: str
    amount: int
    purchase_amount: int
    fee: int
    authorization_id: int | None
    original_transaction_id: int | None
    member_points_delta: int
    member_vouchers_delta: int
    member_balance_after: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class FeedEvent:
    position: Position
    type: str  # TRANSACTION or one of MEMBER_EVENT_TYPES
    member_id: str
    committed_at: dt.datetime
    transaction: TransactionRow | None = None
    detail: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # a member event's fields

    @property
    def cursor(self) -> str:
        return encode_cursor(self.position)

    @property
    def event_id(self) -> str:
        return event_id(self.position)

    @property
    def merchant_id(self) -> str:
        return self.transaction.merchant_id if self.transaction is not None else ""


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    events: list[FeedEvent]
    # where the next read starts: past every event of this read's snapshot up to its bound (filtered out
    # or returned), so a filtered reader does not rescan what it skipped
    position: Position
    # the read reached the head of the feed as of its snapshot (nothing more to read now)
    at_head: bool


_TRANSACTIONS = """
SELECT t.transaction_id, t.kind, t.merchant_id, t.member_id, t.amount, coalesce(t.purchase_amount, 0) AS purchase_amount,
       t.fee, t.authorization_id, t.original_transaction_id, t.member_balance_after, t.created_at,
       coalesce(d.points, 0)::bigint AS points_delta, coalesce(d.vouchers, 0)::bigint AS vouchers_delta
FROM transactions t
LEFT JOIN LATERAL (
    SELECT sum(e.amount) FILTER (WHERE a.asset_code = 'POINTS') AS points,
           sum(e.amount) FILTER (WHERE a.asset_code = 'VOUCHERS') AS vouchers
    FROM unnest(t.leg_accounts, t.leg_amounts) AS e(account_id, amount)  -- the row's legs (migration 0022)
    JOIN accounts a ON a.account_id = e.account_id
    WHERE a.kind = 'member' AND a.owner_id = t.member_id
) d ON true
WHERE t.transaction_id > $1 AND t.transaction_id <= $2
  AND ($3::text[] IS NULL OR t.merchant_id = ANY($3))
  AND ($4::text[] IS NULL OR t.member_id = ANY($4))
ORDER BY t.transaction_id
LIMIT $5
"""

_MEMBER_EVENTS = """
SELECT member_event_id, after_transaction_id, event_type, member_id, detail, committed_at
FROM member_events
WHERE (after_transaction_id, member_event_id) > ($1, $2) AND after_transaction_id <= $3
  AND ($4::text[] IS NULL OR member_id = ANY($4))
  AND event_type = ANY($5)
ORDER BY after_transaction_id, member_event_id
LIMIT $6
"""


async def head(connection: asyncpg.Connection) -> Position:
    """The newest position committed (as of the connection's snapshot)."""
    row = await connection.fetchrow(
        """SELECT (SELECT coalesce(max(transaction_id), 0) FROM transactions) AS t,
                  (SELECT coalesce(max(member_event_id), 0) FROM member_events) AS m"""
    )
    return Position(row["t"], row["m"])


async def check_cursor(pool: asyncpg.Pool, position: Position) -> None:
    """INVALID_ARGUMENT for a cursor past anything this ledger has committed (another ledger's, or made up)."""
    async with pool.acquire() as connection:
        newest = await head(connection)
        written = await connection.fetchval("SELECT last_transaction_id FROM ledger_writer")
    if position.transaction_id > max(newest.transaction_id, written or 0) or (
        position.member_event_id > newest.member_event_id
    ):
        raise Rejection(
            Code.INVALID_ARGUMENT,
            f"cursor {encode_cursor(position)!r} is ahead of this ledger (newest event "
            f"{encode_cursor(newest)!r}): it was not issued by this feed",
            reason="INVALID_CURSOR",
            field="cursor",
        )


async def read_page(
    pool: asyncpg.Pool, after: Position, feed_filter: FeedFilter, events_max: int, scan_transactions_max: int
) -> Page:
    """The events after `after` that pass the filter, in feed order: at most `events_max`, from at most
    `scan_transactions_max` transaction ids (both bounds keep one read short), in one snapshot."""
    merchants = sorted(feed_filter.merchant_ids) if feed_filter.merchant_ids is not None else None
    members = sorted(feed_filter.member_ids) if feed_filter.member_ids is not None else None
    async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
        newest = await head(connection)
        # transactions with ids in (after.t, bound]: a window of at most scan_transactions_max ids
        bound = min(newest.transaction_id, after.transaction_id + scan_transactions_max)
        bound = max(bound, after.transaction_id)
        transactions: list[asyncpg.Record] = []
        if feed_filter.transactions and bound > after.transaction_id:
            transactions = await connection.fetch(
                _TRANSACTIONS, after.transaction_id, bound, merchants, members, events_max
            )
            if len(transactions) == events_max:
                bound = transactions[-1]["transaction_id"]  # the rest of the window is the next read's
        member_rows: list[asyncpg.Record] = []
        if feed_filter.member_events:
            types = sorted((feed_filter.types or set(MEMBER_EVENT_TYPES)) & set(MEMBER_EVENT_TYPES))
            member_rows = await connection.fetch(
                _MEMBER_EVENTS, after.transaction_id, after.member_event_id, bound, members, types, events_max
            )
    events = [_transaction_event(r) for r in transactions]
    events.extend(_member_event(r) for r in member_rows)
    events.sort(key=lambda e: e.position)
    # Where the next read starts. Every member event committed after this snapshot has a larger id than
    # any in it and an after_transaction_id >= the head's, so (bound, newest member event id) is past
    # everything this snapshot showed up to bound and before everything it did not.
    position = max(after, Position(bound, newest.member_event_id))
    if len(events) > events_max:
        events = events[:events_max]
    if member_rows and len(member_rows) == events_max or len(events) == events_max:
        position = events[-1].position  # a full read: continue right after its last event
    at_head = position.transaction_id >= newest.transaction_id and position.member_event_id >= newest.member_event_id
    return Page(events, position, at_head)


def _transaction_event(r: asyncpg.Record) -> FeedEvent:
    row = TransactionRow(
        transaction_id=r["transaction_id"],
        kind=r["kind"],
        merchant_id=r["merchant_id"],
        member_id=r["member_id"],
        amount=r["amount"],
        purchase_amount=r["purchase_amount"],
        fee=r["fee"],
        authorization_id=r["authorization_id"],
        original_transaction_id=r["original_transaction_id"],
        member_points_delta=r["points_delta"],
        member_vouchers_delta=r["vouchers_delta"],
        member_balance_after=r["member_balance_after"],
    )
    return FeedEvent(Position(row.transaction_id, 0), TRANSACTION, row.member_id, r["created_at"], transaction=row)


def _member_event(r: asyncpg.Record) -> FeedEvent:
    detail = r["detail"]
    if isinstance(detail, str):
        detail = json.loads(detail)
    return FeedEvent(
        Position(r["after_transaction_id"], r["member_event_id"]),
        r["event_type"],
        r["member_id"],
        r["committed_at"],
        detail=detail,
    )


# --- recording member events ---


async def record_member_event(
    connection: asyncpg.Connection,
    member_id: str,
    event_type: str,
    detail: Mapping[str, Any] | None = None,
    signal: "FeedSignal | None" = None,
) -> Position:
    """Records a member event (frozen, unfrozen, merged, ...) in the feed, in the caller's Postgres
    transaction if one is open (so it commits with the change it reports), else in its own. Takes the
    ledger_writer row lock first (see the module's docstring): it waits for the batch being written, if
    any, and holds off the next until the caller commits; keep that transaction short. `signal` (the
    service's FeedSignal) wakes the streams at once; without it they see the event within
    --events-poll-seconds. Returns the event's position."""
    if event_type not in MEMBER_EVENT_TYPES:
        raise ValueError(f"member event type {event_type!r} is not one of {MEMBER_EVENT_TYPES}")
    if not member_id:
        raise ValueError("a member event needs its member_id")
    payload = json.dumps(dict(detail or {}), sort_keys=True, separators=(",", ":"))

    async def write() -> Position:
        batch_through = await connection.fetchval("SELECT current_setting('" + PROJECTED_BATCH_SETTING + "', true)")
        if batch_through:
            # inside a projection (processor/projector.py): right after the transactions of the batch
            # being written, as when the batch's own transaction wrote it
            after = int(batch_through)
        else:
            after = await connection.fetchval("SELECT last_transaction_id FROM ledger_writer FOR NO KEY UPDATE")
            if after is None:
                raise RuntimeError("ledger_writer has no row: the ledger database is not migrated")
            # appends wait for this lock from here; what was appended before is projected first, so no
            # event of an earlier transaction (a level change) commits after this one
            await _wait_for_projection(connection)
            committed = await connection.fetchval("SELECT coalesce(max(transaction_id), 0) FROM transactions")
            after = max(after, committed)  # a seeded ledger may have rows past the mark (never fewer)
        member_event_id = await connection.fetchval(
            """INSERT INTO member_events (after_transaction_id, event_type, member_id, detail)
               VALUES ($1, $2, $3, $4::jsonb) RETURNING member_event_id""",
            after,
            event_type,
            member_id,
            payload,
        )
        return Position(after, member_event_id)

    if connection.is_in_transaction():
        position = await write()
    else:
        async with connection.transaction():
            position = await write()
    if signal is not None:
        # the caller's transaction may not have committed yet: a stream woken early reads again later
        asyncio.get_running_loop().call_soon(signal.notify)
    return position


# The transaction-local setting a projection sets to the last transaction id of the batch whose member
# administration rows it writes (Store._write_updates): a member event recorded there is positioned
# after that batch's transactions and takes no ledger_writer lock (the projection must not wait for an
# append, nor for a caller of record_member_event waiting for the projection).
PROJECTED_BATCH_SETTING = "points.batch_transactions_through"
# how long record_member_event waits for the projector to write what was appended before it
PROJECTION_WAIT_SECONDS = 10.0


async def _wait_for_projection(connection: asyncpg.Connection) -> None:
    """Waits until every batch appended to the batch log is projected (bounded)."""
    deadline = asyncio.get_running_loop().time() + PROJECTION_WAIT_SECONDS
    while not await connection.fetchval(
        """SELECT (SELECT through_batch_id FROM projection_state)
                  >= (SELECT coalesce(max(batch_id), 0) FROM batch_log)"""
    ):
        if asyncio.get_running_loop().time() >= deadline:
            raise Rejection(Code.UNAVAILABLE, "the ledger's read tables are behind its log; retry shortly")
        await asyncio.sleep(0.005)


# --- the committer's part ---


def balances_after(write: Any, ledger: Any) -> dict[int, int]:
    """transaction_id -> the member's posted points balance right after it, for a batch just applied to
    the fast path: the compiled walk (fastpath/balances.pyx) with the compiled fast path, else its twin
    _balances_after_python; either hands a batch whose moves are not in order to the general walk."""
    if _balances_after_ordered is None:
        return _balances_after_python(write, ledger)
    try:
        found = _balances_after_ordered(write.transactions, write.entries, write.new_members, ledger)
    except _TRANSACTION_ORDER_ERROR as error:
        require(False, str(error))
    return _balances_after_any_order(write, ledger) if found is None else found


def _balances_after_python(write: Any, ledger: Any) -> dict[int, int]:
    """transaction_id -> the member's posted points balance right after it, for a batch just applied to
    the fast path (`ledger` shows exactly the state after the batch; BatchWrite `write`). The final
    balance of each member is the fast path's; walking the batch's journal back from it gives each
    transaction's. Transactions without a member (member_id '') are left out.

    One pass over the transactions (each member's account and final balance looked up once a batch,
    not once a transaction), one comprehension picking the entries that move those members' points,
    then one walk back over the transactions and those moves together: a batch's entries come grouped
    by transaction in id order, as they were posted, so no per-entry tuple or list is built. Moves in
    another order (none of today's postings make them) take the general walk,
    _balances_after_any_order: the same answer (tests/unit/test_balances_after.py)."""
    member_slot, member_account, balance = ledger.member_slot, ledger.member_account, ledger.balance
    new_members: dict[str, int] = dict(write.new_members)  # member_id -> account id, new in the batch
    transactions = write.transactions
    current: dict[int, int] = {}  # account id -> its balance, from the batch's end walking back
    account_of: dict[str, int] = {}  # member_id -> its account id (0: none)
    owners: list[int] = []  # per transaction, its member's account id (0: none)
    for transaction in transactions:
        member_id = transaction[3]
        account_id = account_of.get(member_id)
        if account_id is None:
            account_id = 0
            if member_id:
                slot = member_slot(member_id)
                if slot >= 0:
                    account_id = new_members.get(member_id) or member_account(slot) or 0
                    if account_id and account_id not in current:
                        current[account_id] = balance(slot)[0]
            account_of[member_id] = account_id
        owners.append(account_id)
    # the points moves on those accounts (a transaction may move another member's points too: a
    # transfer), gathered in C by the comprehension; only their order matters below
    moves = [e for e in write.entries if e[1] in current and (len(e) < 4 or e[3] == "POINTS")]
    at = len(moves) - 1
    ids: list[int] = []
    balances: list[int] = []
    later = 1 << 63  # the id of the transaction after this one (walking back: the one before in the loop)
    move_id = moves[at][0] if moves else -1  # the transaction of the last move not undone yet
    for transaction, account_id in zip(reversed(transactions), reversed(owners)):
        transaction_id = transaction[0]
        if transaction_id >= later:
            require(False, "a batch's transactions are in id order")
        later = transaction_id
        if account_id:
            ids.append(transaction_id)
            balances.append(current[account_id])
        while move_id == transaction_id:  # undo this transaction's moves: the balances before it
            move = moves[at]
            current[move[1]] -= move[2]
            at -= 1
            move_id = moves[at][0] if at >= 0 else -1
    if at >= 0:  # moves not grouped by transaction in id order (or of a transaction not in the batch)
        return _balances_after_any_order(write, ledger)
    ids.reverse()
    balances.reverse()
    return dict(zip(ids, balances))  # in transaction order, as the walk forward built it


def _balances_after_any_order(write: Any, ledger: Any) -> dict[int, int]:
    """balances_after for entries in any order: their moves gathered per transaction, then the walk
    forward from each member's balance before the batch."""
    member_slot, member_account, balance = ledger.member_slot, ledger.member_account, ledger.balance
    new_members: dict[str, int] = dict(write.new_members)  # member_id -> account id, new in the batch
    # account id -> [member slot, balance before the batch (final minus the batch's moves, below)]
    accounts: dict[int, list[int]] = {}
    owner: list[tuple[int, int]] = []  # (transaction_id, account id) in batch order
    for transaction in write.transactions:
        member_id = transaction[3]
        if not member_id:
            continue
        slot = member_slot(member_id)
        if slot < 0:
            continue
        account_id = new_members.get(member_id) or member_account(slot)
        if not account_id:
            continue
        if account_id not in accounts:
            accounts[account_id] = [slot, balance(slot)[0]]
        owner.append((transaction[0], account_id))
    # the batch's points moves on those accounts, per transaction (a transaction may move another
    # member's points too: a transfer, a merge)
    moves: dict[int, list[tuple[int, int]]] = {}
    for entry in write.entries:
        account_id = entry[1]
        if account_id in accounts and (len(entry) < 4 or entry[3] == "POINTS"):
            moves.setdefault(entry[0], []).append((account_id, entry[2]))
            accounts[account_id][1] -= entry[2]
    result: dict[int, int] = {}
    owners = dict(owner)
    previous = -1
    for transaction in write.transactions:
        # ids are handed out in batch order, so this walks the batch's journal forward
        transaction_id = transaction[0]
        require(transaction_id > previous, "a batch's transactions are in id order")
        previous = transaction_id
        for account_id, amount in moves.get(transaction_id, ()):
            accounts[account_id][1] += amount
        account_id = owners.get(transaction_id, 0)
        if account_id:
            result[transaction_id] = accounts[account_id][1]
    return result


class FeedSignal:
    """Wakes every stream waiting for new commits: the committer calls notify() after each batch."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, timeout_seconds: float) -> None:
        """Returns at the next notify(), or after timeout_seconds (a read then finds what other
        processes committed)."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout_seconds)
        except asyncio.TimeoutError:
            pass


# --- points expiring soon ---


async def scan_expiring_points(
    pool: asyncpg.Pool, notice_days: int, lots_max: int, now_us: int, signal: FeedSignal | None = None
) -> int:
    """Records a points_expiring member event for each (member, expiry instant) whose lots expire within
    `notice_days` and was not noticed before (member_expiry_notices), reading at most `lots_max` lots.
    Returns how many events it recorded. A bounded scan: run it periodically."""
    until_us = now_us + notice_days * 86_400_000_000
    async with pool.acquire() as connection:
        rows = await connection.fetch(
            """SELECT member_id, expires_at_us, sum(amount)::bigint AS amount
               FROM (SELECT l.member_id, l.expires_at_us, l.amount FROM lots l
                     WHERE l.expires_at_us > $1 AND l.expires_at_us <= $2
                       AND NOT EXISTS (SELECT 1 FROM member_expiry_notices n
                                       WHERE n.member_id = l.member_id AND n.expires_at_us = l.expires_at_us)
                     ORDER BY l.expires_at_us LIMIT $3) due
               GROUP BY member_id, expires_at_us
               ORDER BY expires_at_us, member_id""",
            now_us,
            until_us,
            lots_max,
        )
        recorded = 0
        for row in rows:
            async with connection.transaction():
                inserted = await connection.fetchval(
                    """INSERT INTO member_expiry_notices (member_id, expires_at_us) VALUES ($1, $2)
                       ON CONFLICT DO NOTHING RETURNING 1""",
                    row["member_id"],
                    row["expires_at_us"],
                )
                if inserted:
                    await record_member_event(
                        connection,
                        row["member_id"],
                        POINTS_EXPIRING,
                        {
                            "amount_point_units": row["amount"],
                            "expires_at_us": row["expires_at_us"],
                            "notice_days": notice_days,
                        },
                    )
                    recorded += 1
    if recorded and signal is not None:
        signal.notify()
    return recorded
