"""A batch's idempotency records as the two values of its `idempotency_batches` row (migration 0023).

BatchWrite.idempotency holds one tuple a record: (merchant_id, idempotency_key, method, request,
outcome, response or None, message), the request and response either as values (the operation's
request dict and its outcome's fields, as the state machine records them) or as JSON texts (the
records of a format-1 or format-2 batch log payload, written by the versions that made the text an
operation). Its row holds them as columns of UTF-8 JSON:
  keys     [[merchant_id, ...], [idempotency_key, ...]]               (a recovery rebuild reads these)
  records  [[method, ...], [request, ...], [outcome, ...], [response or null, ...], [message, ...]]
Values are written by ONE orjson call for the whole row, with store.to_json's options (sorted keys):
the same bytes as the texts an operation the records held before, joined (tests/unit/
test_idempotency_records.py holds the two to the byte), so a retry compares against and answers from
the same record whichever version wrote it. Two orjson calls, two bytes and two str an operation on
the service's apply were ~7.9k of its ~36.5k instructions an operation (callgrind, program in force);
one call a batch here costs ~1/3 of their time (the dicts' serialisation itself is the same work).
Texts are embedded as they are (one orjson.Fragment a column, the texts joined in C: nothing re-parsed).
Written only by this service and read only by it (and the `idempotency_keys` view).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from processor.domain import InvariantViolation

Key = tuple[str, str]

# store.to_json's options (store.JSON_OPTIONS is this value: store imports this module, not the other
# way round). A row is dumped first without
# OPT_NON_STR_KEYS: dicts of str keys only (every request and outcome the servicer makes) are written to
# the same text by both, and orjson's path without it is faster; any other key is a TypeError, and the
# row is dumped again with it (~85 ns of ~360 a record's two texts were that slower path, measured).
JSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
JSON_OPTIONS_STR_KEYS = JSON_OPTIONS & ~orjson.OPT_NON_STR_KEYS


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
    if type(requests[0]) is str:  # JSON texts (a format-1 or -2 payload's records): embedded as they are
        if None in responses:  # a refusal's record has no response
            responses = tuple(["null" if r is None else r for r in responses])
        records = orjson.dumps(
            (
                methods,
                orjson.Fragment("[" + ",".join(requests) + "]"),
                outcomes,
                orjson.Fragment("[" + ",".join(responses) + "]"),
                messages,
            )
        )
    else:
        records = _dumps((methods, requests, outcomes, responses, messages))
    return Row(len(idempotency), orjson.dumps((merchants, keys)), records)


def _dumps(columns: tuple) -> bytes:
    """The records' columns of values as JSON, as store.to_json writes each value."""
    try:
        return orjson.dumps(columns, option=JSON_OPTIONS_STR_KEYS)
    except TypeError:
        pass  # a key that is not a str (or a value orjson refuses: refused again below)
    try:
        return orjson.dumps(columns, option=JSON_OPTIONS)
    except TypeError as error:  # the servicer's requests and the outcomes' fields are JSON values: a bug
        raise InvariantViolation(f"a batch's idempotency records are not JSON values: {error}") from error


def as_texts(idempotency: Sequence[tuple]) -> list[tuple]:
    """The records with their request and response as JSON texts, store.to_json's (what the versions
    before the values held, and the writers before migration 0023 took: tests and loadtests compare
    with them)."""
    return [
        (m, k, method, _text(request), code, None if response is None else _text(response), message)
        for m, k, method, request, code, response, message in idempotency
    ]


def _text(value: Any) -> str:
    return value if type(value) is str else orjson.dumps(value, option=JSON_OPTIONS).decode()


def decode_keys(keys: bytes) -> list[Key]:
    """A row's (merchant_id, idempotency_key) pairs, in order."""
    merchants, idempotency_keys = orjson.loads(keys)
    return list(zip(merchants, idempotency_keys))


def decode_records(records: bytes) -> list[list[Any]]:
    """A row's records as columns: methods, requests (parsed), outcomes, responses (parsed or None),
    messages (None for a legacy record stored without one)."""
    columns: list[list[Any]] = orjson.loads(records)
    return columns
