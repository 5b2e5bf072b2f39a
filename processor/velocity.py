"""Per-member spending caps (program settings member_points_spent_per_hour_max and
member_points_spent_per_day_max; docs/RULES.md section 10). Pure functions over a member's spends.

What counts as spent: the point-units a member's Redeem or Capture took (kinds REDEEM, CAPTURE and the
points part of a SPLIT_REDEEM). Vouchers are a separate asset and do not count; a refund does not give
allowance back (a cap limits what a stolen member id can take in an hour, and a refund is the merchant's
act, not the member's). A Redeem or Authorize is refused when

    spent in the window + the points of the member's open holds + the points asked  >  cap

for either window, so a hold reserves its points against the caps when it is placed and its Capture
is never refused (the member was present and within the caps at Authorize).

Windows are rolling (the last hour, the last 24 hours), counted in whole minutes: a spend is kept in
the bucket of its minute and counts until a whole window has passed since the end of that minute. So a
spend counts for at most a minute longer than its window, never shorter, and a member's state is at
most 1,440 buckets whatever the number of its spends.

State: ProgramState.spends (member_id -> its buckets, oldest first), changed through ProgramState's undo
log in the committer's apply step, where balances are decided, so concurrent spends are decided in
order and exactly. Start-up rebuilds it from the journal (the spends of the last 24 hours).
"""

from __future__ import annotations

import datetime as dt

from processor.domain import Code, Outcome

BUCKET_US = 60_000_000  # one minute
HOUR_US = 3_600_000_000
DAY_US = 86_400_000_000
WINDOW_US_MAX = DAY_US  # the longest window: buckets older than it are dropped

Spends = tuple[tuple[int, int], ...]  # (minute since the epoch, point-units spent in it), oldest first


def _first_bucket(now_us: int, window_us: int) -> int:
    """The oldest bucket that still counts in the window ending at now_us."""
    return (now_us - window_us) // BUCKET_US


def add(spends: Spends, points: int, at_us: int) -> Spends:
    """spends with `points` spent at at_us added, and buckets older than a day dropped."""
    bucket = at_us // BUCKET_US
    first = _first_bucket(at_us, WINDOW_US_MAX)
    # the buckets are oldest first: when the oldest is still within the day and the newest is not after
    # this spend's, nothing is dropped nor re-sorted, and the walk of every bucket (up to 1,440) is skipped
    if spends and spends[0][0] >= first and spends[-1][0] <= bucket:
        if spends[-1][0] == bucket:
            return (*spends[:-1], (bucket, spends[-1][1] + points))
        return (*spends, (bucket, points))
    kept = [(b, p) for b, p in spends if b >= first]
    if kept and kept[-1][0] == bucket:
        kept[-1] = (bucket, kept[-1][1] + points)
    elif kept and kept[-1][0] > bucket:  # dated before the newest (loading out of order): keep them sorted
        merged = dict(kept)
        merged[bucket] = merged.get(bucket, 0) + points
        kept = sorted(merged.items())
    else:
        kept.append((bucket, points))
    return tuple(kept)


def pruned(spends: Spends, now_us: int) -> Spends:
    first = _first_bucket(now_us, WINDOW_US_MAX)
    return tuple((b, p) for b, p in spends if b >= first)


def spent(spends: Spends, now_us: int, window_us: int) -> int:
    first = _first_bucket(now_us, window_us)
    return sum(p for b, p in spends if b >= first)


def retry_at_us(spends: Spends, now_us: int, window_us: int, cap: int, reserved: int) -> int | None:
    """The first time at which spent-in-window + reserved <= cap, as the oldest buckets leave the window;
    None if waiting cannot do it (reserved alone exceeds the cap)."""
    if reserved > cap:
        return None
    first = _first_bucket(now_us, window_us)
    total = spent(spends, now_us, window_us)
    for bucket, points in spends:
        if bucket < first:
            continue
        total -= points
        if total + reserved <= cap:
            return (bucket + 1) * BUCKET_US + window_us  # when this bucket stops counting
    return now_us  # unreachable when called for a refusal: then total + reserved > cap


def _iso(at_us: int) -> str:
    moment = dt.datetime.fromtimestamp(at_us // 1_000_000, dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def refusal(
    spends: Spends, now_us: int, member_id: str, held: int, points: int, hour_max: int, day_max: int
) -> Outcome | None:
    """The refusal of a spend of `points` by a member with `held` point-units in open holds, or None if
    both caps (0 = none) allow it. Not recorded under the idempotency key: the same call may succeed later."""
    problems, retries = [], []
    for cap, window_us, name, setting in (
        (hour_max, HOUR_US, "hour", "member_points_spent_per_hour_max"),
        (day_max, DAY_US, "24 hours", "member_points_spent_per_day_max"),
    ):
        if not cap:
            continue
        if points > cap:
            return Outcome(
                Code.FAILED_PRECONDITION,
                recorded=False,
                reason="spending_cap",
                message=(
                    f"a spend of {points} point-units is more than the program allows member {member_id!r} in "
                    f"{'an hour' if window_us == HOUR_US else name} ({setting} = {cap}); spend at most {cap} "
                    "point-units at once"
                ),
            )
        used = spent(spends, now_us, window_us)
        if used + held + points <= cap:
            continue
        problems.append(
            f"{used} point-units spent in the last {name} and {held} in open holds, plus {points} now, "
            f"would pass the cap of {cap} ({setting})"
        )
        retries.append(retry_at_us(spends, now_us, window_us, cap, held + points))
    if not problems:
        return None
    retry_after_seconds = None
    if any(retry is None for retry in retries):
        advice = "waiting alone will not let it through: capture or void the member's open holds, or spend less"
    else:
        advice = f"retry after {_iso(max(retries) + 999_999)}, or spend less"
        retry_after_seconds = (max(retries) - now_us) / 1_000_000
    return Outcome(
        Code.RESOURCE_EXHAUSTED,
        recorded=False,
        reason="spending_cap",
        message=(f"member {member_id!r}: " + "; ".join(problems) + f"; {advice}"),
        retry_after_seconds=retry_after_seconds,
    )
