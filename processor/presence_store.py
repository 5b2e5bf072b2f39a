"""Postgres for member presence and spending caps: the member_credentials table (migration 0009) and
the journal read that rebuilds the spending caps' state at start-up. Every write is a short transaction
of its own, made before an operation is queued (never in a batch's transaction); the conditional
UPDATEs make each decision atomic, so two calls racing with the same code cannot both be accepted."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt

import fastpath
from processor import domain, rules
from processor.store import Store, from_micros, micros

# what counts as a member's spend for the caps (processor/velocity.py): its points debited by these kinds
SPEND_KINDS = (fastpath.KIND_CAPTURE, fastpath.KIND_REDEEM, rules.KIND_SPLIT_REDEEM)


@dataclasses.dataclass(frozen=True, slots=True)
class Credentials:
    member_id: str
    totp_secret: str | None
    totp_enrolled_at: dt.datetime | None
    pin_hash: bytes | None
    pin_salt: bytes | None
    pin_params: str | None
    pin_set_at: dt.datetime | None
    failures: int
    locked_until: dt.datetime | None

    def locked_until_us(self) -> int:
        return micros(self.locked_until) if self.locked_until is not None else 0


_COLUMNS = (
    "member_id, totp_secret, totp_enrolled_at, pin_hash, pin_salt, pin_params, pin_set_at, failures, locked_until"
)


def _credentials(row) -> Credentials | None:
    return Credentials(**dict(row)) if row is not None else None


class _Gated:
    """The pool, with every statement waiting for the gate first (see PresenceStore)."""

    def __init__(self, pool, gate):
        self._pool, self._gate = pool, gate

    async def fetchrow(self, *args, **kwargs):
        async with self._gate:
            return await self._pool.fetchrow(*args, **kwargs)

    async def fetch(self, *args, **kwargs):
        async with self._gate:
            return await self._pool.fetch(*args, **kwargs)

    async def execute(self, *args, **kwargs):
        async with self._gate:
            return await self._pool.execute(*args, **kwargs)


class PresenceStore:
    """gate: an asyncio.Semaphore bounding the pool connections these statements hold at once, so that
    member presence checks under load never take every connection from the committer."""

    def __init__(self, store: Store, gate=None):
        self.store = store
        self._pool = _Gated(store.pool, gate if gate is not None else contextlib.nullcontext())

    async def credentials(self, member_id: str) -> Credentials | None:
        return _credentials(
            await self._pool.fetchrow(
                f"SELECT {_COLUMNS} FROM member_credentials WHERE member_id = $1",
                member_id,
                timeout=self.store.read_timeout,
            )
        )

    async def enroll_totp(self, member_id: str, secret: str, replace: bool, now_us: int) -> bool:
        """Stores a new secret; False (nothing changed) if one is enrolled and replace is false."""
        row = await self._pool.fetchrow(
            """INSERT INTO member_credentials (member_id, totp_secret, totp_enrolled_at, updated_at)
               VALUES ($1, $2, $3, $3)
               ON CONFLICT (member_id) DO UPDATE
                  SET totp_secret = excluded.totp_secret, totp_enrolled_at = excluded.totp_enrolled_at,
                      totp_last_step = 0, totp_last_merchant_id = NULL, totp_last_idempotency_key = NULL,
                      updated_at = excluded.updated_at
                WHERE $4 OR member_credentials.totp_secret IS NULL
               RETURNING member_id""",
            member_id,
            secret,
            from_micros(now_us),
            replace,
        )
        return row is not None

    async def set_pin(self, member_id: str, pin_hash: bytes, salt: bytes, params: str, now_us: int) -> Credentials:
        return _credentials(
            await self._pool.fetchrow(
                f"""INSERT INTO member_credentials (member_id, pin_hash, pin_salt, pin_params, pin_set_at, updated_at)
               VALUES ($1, $2, $3, $4, $5, $5)
               ON CONFLICT (member_id) DO UPDATE
                  SET pin_hash = excluded.pin_hash, pin_salt = excluded.pin_salt, pin_params = excluded.pin_params,
                      pin_set_at = excluded.pin_set_at, updated_at = excluded.updated_at
               RETURNING {_COLUMNS}""",
                member_id,
                pin_hash,
                salt,
                params,
                from_micros(now_us),
            )
        )

    async def reset(self, member_id: str, remove_totp: bool, remove_pin: bool) -> Credentials | None:
        return _credentials(
            await self._pool.fetchrow(
                f"""UPDATE member_credentials
                   SET failures = 0, locked_until = NULL, updated_at = now(),
                       totp_secret = CASE WHEN $2 THEN NULL ELSE totp_secret END,
                       totp_enrolled_at = CASE WHEN $2 THEN NULL ELSE totp_enrolled_at END,
                       pin_hash = CASE WHEN $3 THEN NULL ELSE pin_hash END,
                       pin_salt = CASE WHEN $3 THEN NULL ELSE pin_salt END,
                       pin_params = CASE WHEN $3 THEN NULL ELSE pin_params END,
                       pin_set_at = CASE WHEN $3 THEN NULL ELSE pin_set_at END
                 WHERE member_id = $1
             RETURNING {_COLUMNS}""",
                member_id,
                remove_totp,
                remove_pin,
            )
        )

    async def accept_totp(self, member_id: str, secret: str, step: int, merchant_id: str, idempotency_key: str) -> bool:
        """Records `step` as the member's newest accepted code and clears its failures, if no code of this
        step or a later one was accepted before (or it was, for this same operation). False: a replay."""
        row = await self._pool.fetchrow(
            """UPDATE member_credentials
                  SET totp_last_step = $3, totp_last_merchant_id = $4, totp_last_idempotency_key = $5,
                      failures = 0, updated_at = now()
                WHERE member_id = $1 AND totp_secret = $2
                  AND (totp_last_step < $3 OR (totp_last_step = $3 AND totp_last_merchant_id = $4
                                               AND totp_last_idempotency_key = $5))
            RETURNING member_id""",
            member_id,
            secret,
            step,
            merchant_id,
            idempotency_key,
        )
        return row is not None

    async def accepted(self, member_id: str) -> None:
        """A right PIN: the failures in a row start again."""
        await self._pool.execute(
            "UPDATE member_credentials SET failures = 0, updated_at = now() WHERE member_id = $1 AND failures > 0",
            member_id,
        )

    async def failed(
        self,
        member_id: str,
        failures_max: int,
        lockout_seconds: int,
        now_us: int,
        key_has_outcome: bool,
    ) -> tuple[int, int]:
        """Counts a wrong proof: (failures in a row now, locked until µs or 0). At failures_max the member
        is locked for lockout_seconds and the count starts again. Not counted when the operation's key has
        an outcome already (`key_has_outcome`, the caller's: Pipeline.has_stored_outcome; a retry of an
        operation carried out: the pipeline replays it, whatever proof). The idempotency records are one
        row per batch (migration 0023): a look-up by key here would parse them all."""
        row = None
        if not key_has_outcome:
            row = await self._pool.fetchrow(
                """UPDATE member_credentials
                      SET failures = CASE WHEN failures + 1 >= $2 THEN 0 ELSE failures + 1 END,
                          locked_until = CASE WHEN failures + 1 >= $2 THEN $3 ELSE locked_until END,
                          updated_at = now()
                    WHERE member_id = $1
                RETURNING failures, locked_until""",
                member_id,
                failures_max,
                from_micros(now_us + lockout_seconds * 1_000_000),
            )
        if row is None:  # not counted: show the count as it is
            current = await self.credentials(member_id)
            return (current.failures if current is not None else 0), 0
        locked = micros(row["locked_until"]) if row["locked_until"] is not None else 0
        return row["failures"], locked if locked > now_us else 0

    async def spends_since(self, since_us: int) -> list[tuple[str, int, int]]:
        """(member_id, at µs, point-units) of every spend since since_us: the points a capture, redeem or
        split redeem debited from the member (start-up, for the spending caps)."""
        rows = await self._pool.fetch(
            """SELECT t.member_id, t.created_at, -e.amount AS points
                 FROM transactions t
                 CROSS JOIN LATERAL unnest(t.leg_accounts, t.leg_amounts) AS e(account_id, amount)
                 JOIN accounts a ON a.account_id = e.account_id
                WHERE t.created_at >= $1 AND t.kind = ANY($2::smallint[])
                  AND a.kind = $3 AND a.asset_code = $4 AND e.amount < 0""",
            from_micros(since_us),
            list(SPEND_KINDS),
            domain.ACCOUNT_MEMBER,
            domain.ASSET_POINTS,
            timeout=self.store.recovery_timeout,
        )
        return [(r["member_id"], micros(r["created_at"]), r["points"]) for r in rows]
