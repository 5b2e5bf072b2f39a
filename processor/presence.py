"""Member presence for spending (docs/RULES.md section 10).

When the program version in force says member_verification = "spending", a Redeem or Authorize (split
tender included, and their SubmitBatch/Stream forms) must carry a MemberProof: a time-based one-time
code (RFC 6238 via pyotp: SHA-1, 6 digits, 30-second steps; the current step and the one before are
accepted, for a code read just before it changed) or the member's PIN. Earns, captures, voids and
refunds need none.

The check runs in the servicer before the operation is queued, never in the committer's batch loop:
a PIN costs a deliberately slow scrypt (about 50 ms of one core at the parameters below), run in a
thread pool of `pin_hash_threads_max` threads, and every check costs one or two short Postgres
statements (presence_store.py). At most `member_verifications_in_flight_max` checks run at once (the
others wait their turn), and their statements hold at most half of `pool_connections_max` connections,
so the committer always finds one.

A refusal is handed to the pipeline as Operation.refusal rather than raised, so that a retry of an
operation that was carried out before still replays its outcome (the idempotency look-up comes first);
it is never recorded under the key, so the same key can be tried again with a proof.

Failure counting: wrong codes and PINs in a row are counted per member in Postgres (so a restart does not
reset a lock); at the program's verification_failures_max the member's spending is locked for
verification_lockout_seconds (RESOURCE_EXHAUSTED naming the time), and the count starts again. A missing
proof, or a proof of a kind the member has not enrolled, is refused without counting (it is the till's
mistake, not a guess). A code already accepted once is refused and counted, unless it comes again with
the same merchant and idempotency key (a retry of the same operation). A wrong proof on a retry of an
operation already carried out (its key has an outcome) is not counted: the pipeline replays the outcome.

Secrets: a TOTP secret is returned once at enrollment and kept in member_credentials (AES-GCM encrypted
under --member-secret-key when the service has one, see seal_secret); a PIN is kept
only as scrypt(pin, 16 random bytes of salt, n=2**14, r=8, p=1, 32 bytes), compared in constant time.
Neither is logged.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime as dt
import hashlib
import hmac
import logging
import secrets

import asyncpg
import pyotp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from processor import config, metrics, rules
from processor.domain import Code, Operation, Outcome, Rejection
from processor.presence_store import PresenceStore

TOTP_DIGITS = 6
TOTP_PERIOD_SECONDS = 30
TOTP_STEPS_BEHIND = 1  # also accept the code of the step before the current one
TOTP_ISSUER = "Points alliance"
PIN_DIGITS_MIN, PIN_DIGITS_MAX = 4, 12
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_BYTES = 2**14, 8, 1, 32  # ~16 MiB and ~50 ms per hash
SCRYPT_PARAMS = f"scrypt:n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}"
PIN_SALT_BYTES = 16
PROOF_TOTP, PROOF_PIN = "totp_code", "pin"
log = logging.getLogger("points.presence")


# --- TOTP ---------------------------------------------------------------------------------------------


def new_totp_secret() -> str:
    """160 random bits, base32 (RFC 4226's recommended secret length)."""
    return pyotp.random_base32(32)


def provisioning_uri(secret: str, member_id: str) -> str:
    return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD_SECONDS).provisioning_uri(
        name=member_id, issuer_name=TOTP_ISSUER
    )


def totp_step(secret: str, code: str, now_s: float) -> int | None:
    """The time step (now_s // 30, or the one before) whose code `code` is; None if neither."""
    if len(code) != TOTP_DIGITS or not code.isascii() or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD_SECONDS)
    current = int(now_s) // TOTP_PERIOD_SECONDS
    for step in range(current, current - TOTP_STEPS_BEHIND - 1, -1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


# TOTP secrets at rest: with --member-secret-key, AES-256-GCM under it with a random 96-bit nonce and
# the member id as associated data (a sealed secret copied to another member's row does not open), kept
# as "aesgcm:" + base64(nonce || ciphertext || tag); without a key, the base32 secret itself.
SEALED_PREFIX = "aesgcm:"


def seal_secret(secret: str, member_id: str, key: bytes | None) -> str:
    if key is None:
        return secret
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(key).encrypt(nonce, secret.encode("ascii"), member_id.encode())
    return SEALED_PREFIX + base64.b64encode(nonce + sealed).decode("ascii")


def open_secret(stored: str, member_id: str, key: bytes | None) -> str:
    if not stored.startswith(SEALED_PREFIX):
        return stored  # stored in clear (no key when it was enrolled)
    if key is None:
        raise Rejection(
            Code.INTERNAL,
            "members' one-time code secrets are stored encrypted and the service has "
            "no --member-secret-key (POINTS_MEMBER_SECRET_KEY); the operator must set it",
        )
    raw = base64.b64decode(stored[len(SEALED_PREFIX) :])
    try:
        return AESGCM(key).decrypt(raw[:12], raw[12:], member_id.encode()).decode("ascii")
    except InvalidTag:
        raise Rejection(
            Code.INTERNAL,
            f"member {member_id!r}'s one-time code secret does not open with this "
            "service's --member-secret-key (was the key changed?); re-enroll the "
            "member or restore the key",
        ) from None


# --- PIN ----------------------------------------------------------------------------------------------


def check_pin_format(pin: str) -> str:
    if not (PIN_DIGITS_MIN <= len(pin) <= PIN_DIGITS_MAX and pin.isascii() and pin.isdigit()):
        raise Rejection(Code.INVALID_ARGUMENT, f"pin must be {PIN_DIGITS_MIN}..{PIN_DIGITS_MAX} digits")
    return pin


def _scrypt(pin: str, salt: bytes, params: str) -> bytes:
    fields = dict(part.split("=") for part in params.removeprefix("scrypt:").split(","))
    n, r, p = int(fields["n"]), int(fields["r"]), int(fields["p"])
    return hashlib.scrypt(pin.encode(), salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * r * n + 2**20, dklen=SCRYPT_BYTES)


def hash_pin(pin: str) -> tuple[bytes, bytes, str]:
    """(hash, salt, params) of a PIN, for member_credentials."""
    salt = secrets.token_bytes(PIN_SALT_BYTES)
    return _scrypt(check_pin_format(pin), salt, SCRYPT_PARAMS), salt, SCRYPT_PARAMS


def pin_matches(pin: str, pin_hash: bytes, salt: bytes, params: str) -> bool:
    if not (PIN_DIGITS_MIN <= len(pin) <= PIN_DIGITS_MAX and pin.isascii() and pin.isdigit()):
        return False
    return hmac.compare_digest(_scrypt(pin, salt, params), pin_hash)


def _iso(at_us: int) -> str:
    return dt.datetime.fromtimestamp(at_us // 1_000_000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def lock_message(member_id: str, locked_until_us: int) -> str:
    return (
        f"member {member_id!r} may not spend until {_iso(locked_until_us + 999_999)}: too many wrong codes "
        "or PINs in a row; retry then with a right one (the operator can unlock it: "
        "MemberAdminService.ResetMemberVerification)"
    )


# --- the check before queueing ------------------------------------------------------------------------


class Presence:
    """Decides member presence for spending operations, reading and writing member_credentials through
    the pipeline's store (UNAVAILABLE while the service has none)."""

    def __init__(self, settings, pipeline):
        self.pipeline = pipeline
        self.secret_key = config.member_secret_key(settings)
        self._store: PresenceStore | None = None
        self._slots = asyncio.Semaphore(settings.member_verifications_in_flight_max)
        # at most half the pool's connections for presence statements: the committer keeps the rest
        self._database = asyncio.Semaphore(max(1, settings.pool_connections_max // 2))
        self._hashing = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.pin_hash_threads_max, thread_name_prefix="pin-hash"
        )

    @property
    def store(self) -> PresenceStore:
        store = self.pipeline.ready_store()
        if self._store is None or self._store.store is not store:
            self._store = PresenceStore(store, self._database)
        return self._store

    async def hash_pin(self, pin: str) -> tuple[bytes, bytes, str]:
        check_pin_format(pin)
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(self._hashing, hash_pin, pin)

    def close(self) -> None:
        self._hashing.shutdown(wait=False, cancel_futures=True)

    async def check(
        self, op: Operation, version: rules.ProgramVersion | None, proof_kind: str | None, proof: str, now_us: int
    ) -> None:
        """Sets op.refusal if the program requires the member's presence and the proof does not show it."""
        if version is None or version.member_verification != rules.VERIFICATION_SPENDING:
            return
        machine = getattr(self.pipeline, "machine", None)
        if machine is not None:  # a card's alias proves its member's presence (processor/member_postings.py)
            op.member_id = machine.members.resolve(op.member_id)
        async with self._slots:
            try:
                op.refusal = await self._decide(op, version, proof_kind, proof, now_us)
            except (asyncpg.PostgresError, OSError, asyncio.TimeoutError):
                log.warning("member presence check could not reach Postgres", exc_info=True)
                raise Rejection(
                    Code.UNAVAILABLE,
                    "the member's proof could not be checked (the database did not "
                    "answer); retry with the same idempotency key and proof",
                    reason="SERVICE_UNAVAILABLE",
                ) from None

    async def _decide(
        self, op: Operation, version: rules.ProgramVersion, proof_kind: str | None, proof: str, now_us: int
    ) -> Outcome | None:
        member_id = op.member_id
        credentials = await self.store.credentials(member_id)
        if credentials is not None and credentials.locked_until_us() > now_us:
            metrics.member_verifications.labels("locked").inc()
            return Outcome(
                Code.RESOURCE_EXHAUSTED,
                recorded=False,
                reason="member_locked",
                message=lock_message(member_id, credentials.locked_until_us()),
                retry_after_seconds=(credentials.locked_until_us() - now_us) / 1_000_000,
            )
        has_totp = credentials is not None and credentials.totp_secret is not None
        has_pin = credentials is not None and credentials.pin_hash is not None
        enrolled = " or ".join(
            name
            for name, present in (
                ("member_proof.totp_code (the 6-digit code of the member's app)", has_totp),
                ("member_proof.pin", has_pin),
            )
            if present
        )
        if not has_totp and not has_pin:
            metrics.member_verifications.labels("not_enrolled").inc()
            return _denied(
                f"program {version.version_id} requires the member's presence to spend, and member "
                f"{member_id!r} has no one-time code app or PIN enrolled; the operator enrolls one "
                "(MemberAdminService.EnrollMemberTotp or SetMemberPin)"
            )
        if proof_kind is None:
            metrics.member_verifications.labels("missing").inc()
            return _denied(
                f"member_proof is missing: program {version.version_id} requires the member's presence "
                f"to spend; send {enrolled}"
            )
        if proof_kind == PROOF_TOTP:
            if not has_totp:
                metrics.member_verifications.labels("not_enrolled").inc()
                return _denied(f"member {member_id!r} has no one-time code app enrolled; send {enrolled}")
            step = totp_step(
                open_secret(credentials.totp_secret, member_id, self.secret_key), proof, now_us / 1_000_000
            )
            if step is not None:
                if await self.store.accept_totp(
                    member_id, credentials.totp_secret, step, op.merchant_id, op.idempotency_key
                ):
                    metrics.member_verifications.labels("accepted").inc()
                    return None
                metrics.member_verifications.labels("replayed").inc()
                return await self._failed(
                    op, version, now_us, "member_proof.totp_code was used already; ask the member for the next code"
                )
            metrics.member_verifications.labels("wrong").inc()
            return await self._failed(
                op,
                version,
                now_us,
                f"member_proof.totp_code is wrong (or more than {TOTP_PERIOD_SECONDS * (TOTP_STEPS_BEHIND + 1)} s old)",
            )
        if not has_pin:
            metrics.member_verifications.labels("not_enrolled").inc()
            return _denied(f"member {member_id!r} has no PIN set; send {enrolled}")
        matches = await asyncio.get_running_loop().run_in_executor(
            self._hashing, pin_matches, proof, credentials.pin_hash, credentials.pin_salt, credentials.pin_params
        )
        if matches:
            metrics.member_verifications.labels("accepted").inc()
            if credentials.failures:
                await self.store.accepted(member_id)
            return None
        metrics.member_verifications.labels("wrong").inc()
        return await self._failed(op, version, now_us, "member_proof.pin is wrong")

    async def _failed(self, op: Operation, version: rules.ProgramVersion, now_us: int, what: str) -> Outcome:
        failures, locked_until_us = await self.store.failed(
            op.member_id,
            version.verification_failures_max,
            version.verification_lockout_seconds,
            now_us,
            await self.pipeline.has_stored_outcome(op.merchant_id, op.idempotency_key),
        )
        if locked_until_us:
            return Outcome(
                Code.RESOURCE_EXHAUSTED,
                recorded=False,
                reason="member_locked",
                message=f"{what}; " + lock_message(op.member_id, locked_until_us),
                retry_after_seconds=(locked_until_us - now_us) / 1_000_000,
            )
        left = version.verification_failures_max - failures
        return _denied(
            f"{what}; {left} more wrong proof{'s' if left != 1 else ''} in a row lock member "
            f"{op.member_id!r}'s spending for {version.verification_lockout_seconds} s"
        )


def _denied(message: str) -> Outcome:
    return Outcome(Code.PERMISSION_DENIED, recorded=False, reason="member_presence", message=message)
