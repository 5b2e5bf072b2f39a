"""Credentials: merchant, gateway and operator API keys.

A key is `pk_<key_id>_<secret>`: key_id (16 hex characters) finds the row, the secret (256 random bits,
base64url) is checked against its stored SHA-256. Keys are shown once, at creation, and never logged.
Verified keys are cached for `auth_cache_seconds`, so a revocation from another process (the CLI) takes
effect within that time; a revocation through the admin API takes effect at once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
import time

from processor.domain import Code, Rejection

KEY_PATTERN = re.compile(r"pk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
KINDS = ("merchant", "gateway", "operator")


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
    raise Rejection(Code.UNAUTHENTICATED,
                    "missing credential: send metadata `authorization: Bearer <key>` with your API key")


class Authenticator:
    """Looks keys up in Postgres (through `store.api_key`) and caches verified ones."""

    def __init__(self, store, cache_seconds: float, cache_entries_max: int = 100_000):
        self.store = store
        self.cache_seconds = cache_seconds
        self.cache_entries_max = cache_entries_max
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def principal(self, metadata) -> Principal:
        key = bearer_key(metadata)
        match = KEY_PATTERN.fullmatch(key)
        if match is None:
            raise Rejection(Code.UNAUTHENTICATED, "the API key is malformed; keys look like pk_<id>_<secret>")
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[1] < self.cache_seconds:
            return cached[0]
        key_id, secret = match.groups()
        if self.store is None:
            raise Rejection(Code.UNAVAILABLE, "the service is starting; retry shortly")
        try:
            row = await self.store.api_key(key_id)
        except Exception:  # Postgres unreachable: retryable, not a bad key
            raise Rejection(Code.UNAVAILABLE, "cannot check the API key now; retry shortly") from None
        if row is None or not hmac.compare_digest(row["secret_sha256"], hashlib.sha256(secret.encode()).digest()):
            raise Rejection(Code.UNAUTHENTICATED, "the API key is not valid; ask the operator for a key")
        if row["revoked_at"] is not None:
            self._cache.pop(key, None)
            raise Rejection(Code.UNAUTHENTICATED, f"the API key {key_id} was revoked; ask the operator for a new one")
        principal = Principal(key_id, row["kind"], frozenset(row["merchant_ids"]))
        if len(self._cache) >= self.cache_entries_max:
            self._cache.clear()  # bounded; refilled from Postgres on demand
        self._cache[key] = (principal, now)
        return principal

    def forget(self, key_id: str) -> None:
        for key in [k for k, (p, _) in self._cache.items() if p.key_id == key_id]:
            del self._cache[key]
