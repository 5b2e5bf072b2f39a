"""batch_log.encode pickles without the pickler's memo (processor/batch_log.py): the payload holds no
memo opcode, and it decodes to what a format-2 payload pickled with the memo (as the versions before
wrote it, still in an unprojected log after an upgrade) decodes to, field for field. No database."""

from __future__ import annotations

import pickle
import pickletools
import random

from processor import batch_log
from tests.unit.test_batch_log import (
    SAMPLE_WRITE,
    encode_format_2,
    program_batches,
    random_write,
    same,
    without_records,
)

_MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET"}


def _with_memo(write) -> bytes:
    """A format-3 payload pickled as encode did before: the same values, pickle.dumps (memo on)."""
    values = list(batch_log._BATCH_GETTER(write))
    values[batch_log._RULES] = batch_log._pack_rules(values[batch_log._RULES])
    values[batch_log._MEMBERS] = batch_log._pack_members(values[batch_log._MEMBERS])
    values[batch_log._IDEMPOTENCY] = None
    return pickle.dumps(values, protocol=5)


def test_the_payload_holds_no_memo_and_decodes_as_the_memoized_one_did():
    rng = random.Random(7)
    writes = program_batches(30) + [SAMPLE_WRITE] + [random_write(rng) for _ in range(100)]
    for write in writes:
        payload = batch_log.encode(write)
        assert not {opcode.name for opcode, _, _ in pickletools.genops(payload)} & _MEMO_OPCODES
        assert pickle.loads(payload) == pickle.loads(_with_memo(write))
        same(batch_log.decode(9, 3, payload), without_records(write))
        same(batch_log.decode(9, 3, _with_memo(write)), without_records(write))
        # format 2 as the versions before wrote it (memo on, records in), still in an unprojected log
        same(batch_log.decode(9, 2, encode_format_2(write, memo=True)), write)
