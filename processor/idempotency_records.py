"""A batch's idempotency records as the two values of its `idempotency_batches` row (migration 0023).

BatchWrite.idempotency holds one tuple a record: (merchant_id, idempotency_key, method, request JSON
text, outcome, response JSON text or None, message). Its row holds them as columns of UTF-8 JSON:
  keys     [[merchant_id, ...], [idempotency_key, ...]]               (a recovery rebuild reads these)
  records  [[method, ...], [request, ...], [outcome, ...], [response or null, ...], [message, ...]]
The request and response JSON texts the records already hold are embedded as they are (one
orjson.Fragment a column, the texts joined in C: nothing re-parsed and no Python call per record on the
answer path). Written only by this service and read only by it (and the `idempotency_keys` view).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

Key = tuple[str, str]


class Row(NamedTuple):
    """A batch's records encoded: its `idempotency_batches` row's values."""

    operations: int
    keys: bytes
    records: bytes


def encode(idempotency: Sequence[tuple]) -> Row | None:
    """The row of a batch's records, or None when it has none (no row)."""
    if not idempotency:
        return None
    merchants, keys, methods, requests, outcomes, responses, messages = zip(*idempotency)
    if None in responses:  # a refusal's record has no response
        responses = tuple(["null" if r is None else r for r in responses])
    return Row(
        len(idempotency),
        orjson.dumps((merchants, keys)),
        orjson.dumps(
            (
                methods,
                orjson.Fragment("[" + ",".join(requests) + "]"),
                outcomes,
                orjson.Fragment("[" + ",".join(responses) + "]"),
                messages,
            )
        ),
    )


def decode_keys(keys: bytes) -> list[Key]:
    """A row's (merchant_id, idempotency_key) pairs, in order."""
    merchants, idempotency_keys = orjson.loads(keys)
    return list(zip(merchants, idempotency_keys))


def decode_records(records: bytes) -> list[list[Any]]:
    """A row's records as columns: methods, requests (parsed), outcomes, responses (parsed or None),
    messages (None for a legacy record stored without one)."""
    columns: list[list[Any]] = orjson.loads(records)
    return columns
