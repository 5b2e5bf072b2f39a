"""Per-merchant quotas of the service's global bounds, so one merchant cannot exhaust them for all:

- queue share: operations of one merchant queued or being committed, at most `merchant_queue_operations_max`
  (of `queue_operations_max`);
- open holds: at most `merchant_holds_open_max` (of `holds_max`);
- new members: its earns (conversions, links) create at most `merchant_new_members_per_hour_max` members per
  clock hour (UTC); and an earn of 0 points creates none.

Refusals are RESOURCE_EXHAUSTED (FAILED_PRECONDITION for the 0-point earn) saying which quota and when to
retry, and are not recorded under the idempotency key: the retry is decided afresh.

A share at or above its global bound is no share (the global bound applies, with its own message).

The counters live beside the pipeline (pure Python, no I/O) and err high: a batch rolled back after a
failed commit does not give back the members it counted; a hold that is captured, voided or expires is
subtracted only at the next recount of open holds from Postgres (every `merchant_holds_recount_seconds`,
`recount_open_holds`). They never err low: a recount reads Postgres only once every batch applied before
it started is answered and projected (the holds table is written by the projector, off the answer path,
so without the wait a lagging projection hid every hold of the batches it had not reached yet, and a
merchant could open more than its quota); holds applied after it started are added to what it reads. A
recount that cannot wait (the projection lags past the wait, or fails) is skipped: the counts keep erring
high until the next.
"""

from __future__ import annotations

import asyncio
import logging

from processor import metrics
from processor.config import Settings
from processor.domain import Code, Outcome, Rejection

log = logging.getLogger("points.quotas")
HOUR_US = 3_600_000_000


class MerchantQuotas:
    def __init__(self, settings: Settings):
        # a share at or above the global bound is no share: the global bound (and its message) applies
        self.queue_operations_max = (
            settings.merchant_queue_operations_max
            if settings.merchant_queue_operations_max < settings.queue_operations_max
            else None
        )
        self.holds_open_max = (
            settings.merchant_holds_open_max if settings.merchant_holds_open_max < settings.holds_max else None
        )
        self.new_members_per_hour_max = settings.merchant_new_members_per_hour_max
        self.queued: dict[str, int] = {}  # merchant -> operations queued or being committed
        self.holds_open: dict[str, int] = {}  # merchant -> open holds (last recount + opened since)
        self._opened_since: dict[str, int] | None = None  # holds opened while a recount runs
        self._hour = -1
        self.new_members: dict[str, int] = {}  # merchant -> members created in the current hour

    # --- queue share ---

    def enqueue(self, merchant_id: str) -> None:
        """Counts one more operation of the merchant in the pipeline, or refuses it."""
        queued = self.queued.get(merchant_id, 0)
        if self.queue_operations_max is not None and queued >= self.queue_operations_max:
            metrics.quota_refusals.labels("queue").inc()
            raise Rejection(
                Code.RESOURCE_EXHAUSTED,
                f"merchant {merchant_id!r} has {queued} operations waiting to commit, its share of the "
                f"queue (merchant_queue_operations_max {self.queue_operations_max}); retry in about "
                "0.1 s, with exponential backoff",
                reason="MERCHANT_QUOTA",
                retry_after_seconds=0.1,
                quota=(
                    f"merchant:{merchant_id}",
                    f"operations waiting to commit, at most "
                    f"{self.queue_operations_max} (merchant_queue_operations_max)",
                ),
            )
        self.queued[merchant_id] = queued + 1

    def dequeued(self, merchant_id: str) -> None:
        """The operation is decided (its future resolved)."""
        left = self.queued.get(merchant_id, 0) - 1
        if left > 0:
            self.queued[merchant_id] = left
        else:
            self.queued.pop(merchant_id, None)

    # --- new members ---

    def new_member(self, merchant_id: str, earn_points: int | None, now_us: int) -> Outcome | None:
        """Before an operation of the merchant creates a member: None if it may (and it is counted), else
        the refusal. `earn_points`: the base points of an earn (None for other operations)."""
        if earn_points == 0:
            metrics.quota_refusals.labels("zero_point_member").inc()
            return Outcome(
                Code.FAILED_PRECONDITION,
                recorded=False,
                message=(
                    "this earn gives 0 points and the member has no account yet: an earn of 0 points creates no "
                    "member; a larger purchase_amount earns points and opens the account"
                ),
            )
        hour = now_us // HOUR_US
        if hour != self._hour:
            self._hour = hour
            self.new_members.clear()
        created = self.new_members.get(merchant_id, 0)
        if created >= self.new_members_per_hour_max:
            metrics.quota_refusals.labels("new_members").inc()
            retry_seconds = ((hour + 1) * HOUR_US - now_us) // 1_000_000 + 1
            return Outcome(
                Code.RESOURCE_EXHAUSTED,
                recorded=False,
                message=(
                    f"merchant {merchant_id!r} has created {created} new members this hour, its quota "
                    f"(merchant_new_members_per_hour_max {self.new_members_per_hour_max}); existing members may still "
                    f"earn; retry for a new member in {retry_seconds} s, at the next hour"
                ),
                reason="merchant_quota",
                retry_after_seconds=retry_seconds,
                quota=(
                    f"merchant:{merchant_id}",
                    f"new members per hour, at most {self.new_members_per_hour_max} "
                    "(merchant_new_members_per_hour_max)",
                ),
            )
        self.new_members[merchant_id] = created + 1
        return None

    # --- open holds ---

    def take_hold(self, merchant_id: str) -> Outcome | None:
        """Before an authorize of the merchant: None if it may open a hold (counted), else the refusal."""
        count = self.holds_open.get(merchant_id, 0)
        if self.holds_open_max is not None and count >= self.holds_open_max:
            metrics.quota_refusals.labels("holds_open").inc()
            return Outcome(
                Code.RESOURCE_EXHAUSTED,
                recorded=False,
                message=(
                    f"merchant {merchant_id!r} has {count} open holds, its quota (merchant_holds_open_max "
                    f"{self.holds_open_max}); capture or void some, or let them expire, and retry (the count is "
                    f"refreshed within a minute)"
                ),
                reason="merchant_quota",
                quota=(
                    f"merchant:{merchant_id}",
                    f"open holds, at most {self.holds_open_max} (merchant_holds_open_max)",
                ),
            )
        self._add_hold(merchant_id, 1)
        return None

    def hold_not_opened(self, merchant_id: str) -> None:
        """A take_hold whose authorize was refused after all."""
        self._add_hold(merchant_id, -1)

    def _add_hold(self, merchant_id: str, delta: int) -> None:
        self.holds_open[merchant_id] = max(0, self.holds_open.get(merchant_id, 0) + delta)
        if self._opened_since is not None:
            self._opened_since[merchant_id] = self._opened_since.get(merchant_id, 0) + delta

    def recount_started(self) -> None:
        self._opened_since = {}

    def recounted(self, counts: dict[str, int]) -> None:
        """The open holds per merchant as Postgres counted them; holds opened meanwhile are added."""
        opened, self._opened_since = self._opened_since or {}, None
        holds = dict(counts)
        for merchant_id, delta in opened.items():
            holds[merchant_id] = max(0, holds.get(merchant_id, 0) + delta)
        self.holds_open = {m: n for m, n in holds.items() if n > 0}


async def recount_open_holds(pipeline, interval_seconds: float) -> None:
    """Replaces the open-hold counts with Postgres's every interval (the first at once)."""
    while True:
        if pipeline.ready and pipeline.store is not None:
            quotas = pipeline.quotas
            quotas.recount_started()
            try:
                # every hold applied before the recount started must be in what it reads (module docstring)
                if not await pipeline.applied_projected(pipeline.settings.projection_wait_seconds):
                    raise TimeoutError("the projection did not reach the batches applied before the recount")
                counts = await pipeline.store.open_holds_per_merchant()
            except Exception as error:  # Postgres away: the counts keep erring high until the next recount
                quotas._opened_since = None
                log.warning("open holds not recounted; will retry", extra={"error": repr(error)})
            else:
                quotas.recounted(counts)
        await asyncio.sleep(interval_seconds)
