"""Credentials: merchant, gateway and operator API keys.

A key is `pk_<key_id>_<secret>`: key_id (16 hex characters) finds the row, the secret (256 random bits,
base64url) is checked against its stored SHA-256. Keys are shown once, at creation, and never logged.
Verified keys are cached for `auth_cache_seconds`, so a revocation from another process (the CLI) takes
effect within that time; a revocation through the admin API takes effect at once. A key may have an
expiry (`expires_at`): past it the key is refused, cached or not. Unknown key ids are remembered as
unknown for `auth_unknown_cache_seconds`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import re
import secrets
import time

from processor.domain import Code, Rejection

KEY_PATTERN = re.compile(r"pk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
# support: customer service (MemberAdminService reads and AdjustPoints within limits; migration 0011)
KINDS = ("merchant", "gateway", "operator", "support")


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    kind: str
    merchant_ids: frozenset[str]

    def may_act_for(self, merchant_id: str) -> bool:
        return self.kind in ("merchant", "gateway") and merchant_id in self.merchant_ids


@dataclasses.dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    key: str
    secret_sha256: bytes


def new_key() -> NewKey:
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return NewKey(key_id, f"pk_{key_id}_{secret}", hashlib.sha256(secret.encode()).digest())


def bearer_key(metadata) -> str:
    """The key of an `authorization: Bearer <key>` header, or UNAUTHENTICATED."""
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            scheme, _, key = value.partition(" ")
            if scheme.lower() == "bearer" and key.strip():
                return key.strip()
            break
    raise Rejection(
        Code.UNAUTHENTICATED, "missing credential: send metadata `authorization: Bearer <key>` with your API key"
    )


class Authenticator:
    """Looks keys up in Postgres (through `store.api_key`, on its own small pool when `pool` is set) and
    caches verified ones for `cache_seconds`; remembers unknown key ids as unknown for
    `unknown_cache_seconds` (at most `unknown_cache_entries_max` of them), so a flood of made-up keys
    costs one look-up per id, not per call; at most `lookups_in_flight_max` look-ups run or wait for the
    pool at once (beyond: RESOURCE_EXHAUSTED). Records when each key was last used, written at most every
    `last_used_seconds` for all keys used meanwhile (`flush_last_used`)."""

    def __init__(
        self,
        store,
        cache_seconds: float,
        cache_entries_max: int = 100_000,
        unknown_cache_seconds: float = 0.0,
        unknown_cache_entries_max: int = 10_000,
        last_used_seconds: float = 60.0,
        lookups_in_flight_max: int = 256,
    ):
        self.store = store
        self.pool = None  # the look-ups' own pool (server.py); None: the store's
        self.cache_seconds = cache_seconds
        self.cache_entries_max = cache_entries_max
        self.unknown_cache_seconds = unknown_cache_seconds
        self.unknown_cache_entries_max = unknown_cache_entries_max
        self.last_used_seconds = last_used_seconds
        self._cache: dict[str, tuple[Principal, float, float | None]] = {}  # key -> (principal, at, expires)
        self._unknown: dict[str, float] = {}  # key_id -> monotonic time it was found unknown
        self._used: dict[str, dt.datetime] = {}  # key_id -> last use not yet written
        self._written: dict[str, float] = {}  # key_id -> monotonic time its last use was last queued
        self.lookups_in_flight_max = lookups_in_flight_max
        self._lookups_in_flight = 0  # look-ups running or waiting for a connection of the pool

    async def principal(self, metadata) -> Principal:
        key = bearer_key(metadata)
        match = KEY_PATTERN.fullmatch(key)
        if match is None:
            raise Rejection(Code.UNAUTHENTICATED, "the API key is malformed; keys look like pk_<id>_<secret>")
        now = time.monotonic()
        wall = time.time()
        cached = self._cache.get(key)
        if cached is not None and now - cached[1] < self.cache_seconds:
            if cached[2] is not None and wall >= cached[2]:
                self._cache.pop(key, None)
                raise _expired(cached[0].key_id, cached[2])
            self._note_use(cached[0].key_id, now)
            return cached[0]
        key_id, secret = match.groups()
        unknown_at = self._unknown.get(key_id)
        if unknown_at is not None:
            if now - unknown_at < self.unknown_cache_seconds:
                raise Rejection(Code.UNAUTHENTICATED, "the API key is not valid; ask the operator for a key")
            del self._unknown[key_id]
        if self.store is None:
            raise Rejection(Code.UNAVAILABLE, "the service is starting; retry shortly")
        if self._lookups_in_flight >= self.lookups_in_flight_max:  # the pool's wait queue is bounded too
            raise Rejection(
                Code.RESOURCE_EXHAUSTED,
                f"{self._lookups_in_flight} API keys are being checked at once; retry with exponential backoff",
            )
        self._lookups_in_flight += 1
        try:
            row = await self.store.api_key(key_id, self.pool)
        except Exception:  # Postgres unreachable: retryable, not a bad key
            raise Rejection(Code.UNAVAILABLE, "cannot check the API key now; retry shortly") from None
        finally:
            self._lookups_in_flight -= 1
        if row is None:
            if self.unknown_cache_seconds > 0:
                if len(self._unknown) >= self.unknown_cache_entries_max:
                    self._unknown.clear()  # bounded; a flood of new ids only costs look-ups again
                self._unknown[key_id] = now
            raise Rejection(Code.UNAUTHENTICATED, "the API key is not valid; ask the operator for a key")
        if not hmac.compare_digest(row["secret_sha256"], hashlib.sha256(secret.encode()).digest()):
            raise Rejection(Code.UNAUTHENTICATED, "the API key is not valid; ask the operator for a key")
        if row["revoked_at"] is not None:
            self._cache.pop(key, None)
            raise Rejection(Code.UNAUTHENTICATED, f"the API key {key_id} was revoked; ask the operator for a new one")
        expires = row["expires_at"].timestamp() if row["expires_at"] is not None else None
        if expires is not None and wall >= expires:
            self._cache.pop(key, None)
            raise _expired(key_id, expires)
        principal = Principal(key_id, row["kind"], frozenset(row["merchant_ids"]))
        if len(self._cache) >= self.cache_entries_max:
            self._cache.clear()  # bounded; refilled from Postgres on demand
        self._cache[key] = (principal, now, expires)
        self._note_use(key_id, now)
        return principal

    def _note_use(self, key_id: str, now: float) -> None:
        """Queues the key's last use for the next flush, at most once per last_used_seconds."""
        written = self._written.get(key_id)
        if written is not None and now - written < self.last_used_seconds:
            return
        if len(self._written) >= self.cache_entries_max:
            self._written.clear()
        self._written[key_id] = now
        self._used[key_id] = dt.datetime.now(dt.timezone.utc)

    async def flush_last_used(self) -> int:
        """Writes the queued last uses (one statement); returns how many keys. On a failure they are
        queued again for the next flush."""
        if not self._used or self.store is None:
            return 0
        used, self._used = self._used, {}
        try:
            await self.store.touch_api_keys(used, self.pool)
        except Exception:
            for key_id, at in used.items():
                self._used.setdefault(key_id, at)
            raise
        return len(used)

    def forget(self, key_id: str) -> None:
        for key in [k for k, (p, _, _) in self._cache.items() if p.key_id == key_id]:
            del self._cache[key]
        self._unknown.pop(key_id, None)


def _expired(key_id: str, expires: float) -> Rejection:
    moment = dt.datetime.fromtimestamp(expires, dt.timezone.utc).isoformat().replace("+00:00", "Z")
    return Rejection(Code.UNAUTHENTICATED, f"the API key {key_id} expired at {moment}; ask the operator for a new one")
