"""The fast path: the in-memory ledger that decides balance checks, holds, captures and refunds.

The compiled `_core` is used unless POINTS_FASTPATH=python selects the pure-Python twin `_reference`.
A missing build is an error, not a silent fallback: the twin is far slower, and running it by accident
would only show up as latency.
"""

import os

if os.environ.get("POINTS_FASTPATH") == "python":
    from fastpath._reference import (
        BALANCE_MAX,
        CAPACITY,
        CAPTURE_EXCEEDS_HOLD,
        HOLD_CAPTURED,
        HOLD_EXPIRED,
        HOLD_OPEN,
        HOLD_STATUS_CAPTURED,
        HOLD_STATUS_EXPIRED,
        HOLD_STATUS_VOIDED,
        HOLD_VOIDED,
        INSUFFICIENT_POINTS,
        KIND_CAPTURE,
        KIND_EARN,
        KIND_REDEEM,
        KIND_REFUND_EARN,
        KIND_REFUND_REDEMPTION,
        NOT_REFUNDABLE,
        OK,
        OP_AUTHORIZE,
        OP_CAPTURE,
        OP_EARN,
        OP_REDEEM,
        OP_REFUND,
        OP_VOID,
        OVERFLOW,
        REFUND_EXCEEDS_REMAINING,
        RULES_EARN_POINTS_MAX,
        RULES_LEVELS_MAX,
        RULES_PURCHASE_MAX,
        UNKNOWN_HOLD,
        UNKNOWN_MEMBER,
        UNKNOWN_TRANSACTION,
        WRONG_MERCHANT,
        Ledger,
        LedgerInvariantError,
    )

    IMPLEMENTATION = "python"
else:
    try:
        from fastpath._core import (  # type: ignore[assignment]  # the twin and the compiled module: one API
            BALANCE_MAX,
            CAPACITY,
            CAPTURE_EXCEEDS_HOLD,
            HOLD_CAPTURED,
            HOLD_EXPIRED,
            HOLD_OPEN,
            HOLD_STATUS_CAPTURED,
            HOLD_STATUS_EXPIRED,
            HOLD_STATUS_VOIDED,
            HOLD_VOIDED,
            INSUFFICIENT_POINTS,
            KIND_CAPTURE,
            KIND_EARN,
            KIND_REDEEM,
            KIND_REFUND_EARN,
            KIND_REFUND_REDEMPTION,
            NOT_REFUNDABLE,
            OK,
            OP_AUTHORIZE,
            OP_CAPTURE,
            OP_EARN,
            OP_REDEEM,
            OP_REFUND,
            OP_VOID,
            OVERFLOW,
            REFUND_EXCEEDS_REMAINING,
            RULES_EARN_POINTS_MAX,
            RULES_LEVELS_MAX,
            RULES_PURCHASE_MAX,
            UNKNOWN_HOLD,
            UNKNOWN_MEMBER,
            UNKNOWN_TRANSACTION,
            WRONG_MERCHANT,
            Ledger,
            LedgerInvariantError,
        )
    except ImportError as error:
        raise ImportError(
            "the compiled fast path fastpath._core is not built: run `make build` (it runs "
            "`python setup.py build_ext --inplace`), or set POINTS_FASTPATH=python to run the "
            f"pure-Python twin deliberately ({error})"
        ) from error
    IMPLEMENTATION = "cython"

__all__ = [
    "BALANCE_MAX",
    "CAPACITY",
    "CAPTURE_EXCEEDS_HOLD",
    "HOLD_CAPTURED",
    "HOLD_EXPIRED",
    "HOLD_OPEN",
    "HOLD_STATUS_CAPTURED",
    "HOLD_STATUS_EXPIRED",
    "HOLD_STATUS_VOIDED",
    "HOLD_VOIDED",
    "IMPLEMENTATION",
    "INSUFFICIENT_POINTS",
    "KIND_CAPTURE",
    "KIND_EARN",
    "KIND_REDEEM",
    "KIND_REFUND_EARN",
    "KIND_REFUND_REDEMPTION",
    "Ledger",
    "LedgerInvariantError",
    "NOT_REFUNDABLE",
    "OK",
    "OP_AUTHORIZE",
    "OP_CAPTURE",
    "OP_EARN",
    "OP_REDEEM",
    "OP_REFUND",
    "OP_VOID",
    "OVERFLOW",
    "REFUND_EXCEEDS_REMAINING",
    "RULES_EARN_POINTS_MAX",
    "RULES_LEVELS_MAX",
    "RULES_PURCHASE_MAX",
    "UNKNOWN_HOLD",
    "UNKNOWN_MEMBER",
    "UNKNOWN_TRANSACTION",
    "WRONG_MERCHANT",
]
