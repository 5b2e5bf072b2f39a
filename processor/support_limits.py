"""Support keys' limits on AdjustPoints (issue 15): point-units (absolute value) per call and per UTC day,
set by the operator at `key create --support`. The day's use is read from member_adjustments at a key's
first adjustment of the day (so a restart forgets nothing committed) and counted in memory after that;
an adjustment reserves its points before it is queued and gives them back unless it was carried out."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable

import asyncpg

from processor import member_store
from processor.domain import Code, Outcome, Rejection

DAY = dt.timedelta(days=1)
# keys whose day's use is kept; beyond, the entries with no adjustment in flight are dropped (reloaded
# from member_adjustments on demand, which then holds all they counted); those with one in flight stay,
# as many as the calls in flight
KEYS_MAX = 10_000


def _day_start(now: dt.datetime) -> dt.datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


class SupportLimits:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool
        # key_id -> (UTC day start, per-call max, per-day max, point-units used that day)
        self._used: dict[str, tuple[dt.datetime, int, int, int]] = {}
        # key_id -> reservations not yet committed or given back (reserve .. release or the commit)
        self._in_flight: dict[str, int] = {}
        self._lock = asyncio.Lock()  # one load per key and day, not one per concurrent call

    async def reserve(self, key_id: str, points: int, now: dt.datetime | None = None) -> None:
        """Counts |points| against the key's limits, or raises RESOURCE_EXHAUSTED (PERMISSION_DENIED if the
        key has no limits, which a support key always has)."""
        now = now or dt.datetime.now(dt.timezone.utc)
        day = _day_start(now)
        amount = abs(points)
        async with self._lock:
            entry = self._used.get(key_id)
            if entry is None or entry[0] != day:
                limits = await member_store.support_limits(self.pool, key_id)
                if limits is None:
                    raise Rejection(Code.PERMISSION_DENIED, f"key {key_id} has no support limits; ask the operator")
                if len(self._used) >= KEYS_MAX:
                    # Not clear(): a reload reads committed adjustments only, so a key dropped with a
                    # reservation in flight would forget it and let the day's limit be passed by it.
                    for stale in [k for k in self._used if not self._in_flight.get(k)]:
                        del self._used[stale]
                used = await member_store.adjusted_since(self.pool, key_id, day)
                entry = (day, limits[0], limits[1], used)
            _, per_call, per_day, used = entry
            if amount > per_call:
                raise Rejection(
                    Code.RESOURCE_EXHAUSTED,
                    f"this support key may adjust at most {per_call} point-units per call, asked {amount}; "
                    "ask an operator for a larger adjustment",
                    reason="SUPPORT_LIMIT",
                    field="points",
                    quota=(f"key:{key_id}", f"{per_call} point-units per AdjustPoints call"),
                )
            if used + amount > per_day:
                retry = (day + DAY - now).total_seconds()
                raise Rejection(
                    Code.RESOURCE_EXHAUSTED,
                    f"this support key adjusted {used} of its {per_day} point-units today (UTC); {amount} more "
                    f"would pass the limit. Retry after midnight UTC (in {retry:.0f} s) or ask an operator",
                    reason="SUPPORT_LIMIT",
                    field="points",
                    retry_after_seconds=retry,
                    quota=(f"key:{key_id}", f"{per_day} point-units of AdjustPoints per UTC day"),
                )
            self._used[key_id] = (day, per_call, per_day, used + amount)
            self._in_flight[key_id] = self._in_flight.get(key_id, 0) + 1

    async def adjust(self, key_id: str, points: int, submit: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """Reserves |points|, then submits the adjustment (`submit`: the pipeline's), and keeps them counted
        if it may have been carried out: given back if it was refused, replayed, or refused before it was
        queued; kept if the caller went away meanwhile (the pipeline still commits a queued operation
        whose caller cancelled: given back, a key cancelling its calls would pass its limits)."""
        await self.reserve(key_id, points)
        try:
            outcome = await submit()
        except asyncio.CancelledError:
            self.settled(key_id)
            raise
        except BaseException:
            self.release(key_id, points)
            raise
        if outcome.code is not Code.OK or outcome.replayed:
            self.release(key_id, points)  # nothing was adjusted by this call
        else:
            self.settled(key_id)  # committed: member_adjustments counts it from now on
        return outcome

    def settled(self, key_id: str) -> None:
        """A reservation's adjustment was committed (its points stay counted) or given back (release)."""
        left = self._in_flight.get(key_id, 0) - 1
        if left > 0:
            self._in_flight[key_id] = left
        else:
            self._in_flight.pop(key_id, None)

    def release(self, key_id: str, points: int, now: dt.datetime | None = None) -> None:
        """Gives back a reservation whose adjustment was not carried out (refused, or a replay)."""
        self.settled(key_id)
        day = _day_start(now or dt.datetime.now(dt.timezone.utc))
        entry = self._used.get(key_id)
        if entry is not None and entry[0] == day:
            self._used[key_id] = (entry[0], entry[1], entry[2], max(0, entry[3] - abs(points)))
