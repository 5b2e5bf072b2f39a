"""Idempotency decided in memory: which (merchant, idempotency key) pairs may have a stored record, and
in which batch's row of `idempotency_batches` (migration 0023) it is.

The committer asks this table before a batch is applied: a key it has no entry of has certainly no
record in Postgres (the batch reads nothing for it); a key it has entries of is read from the rows of
the batches those entries name (Store.stored_outcomes: a retry, or, rarely, another key with the same
fingerprint: the read finds no record of this key there and the operation is decided as new, exactly
as without the table). So the table may err towards "maybe stored" (a read too many) but never towards
"new" while a record exists: that would post a retry twice. Postgres no longer refuses a key stored
twice (one row per batch, no per-key primary key): the table is the guard.

What keeps it so:
- rebuilt from `idempotency_batches` (each row's keys and batch id) by every recovery (start-up,
  before SERVING; and every resync), so it starts equal to Postgres;
- a batch's records are written in its log append's statement (processor/batch_log.py), and its keys
  are added here after that append succeeded and before its calls are answered (a batch rolled back
  never added them: nothing to undo), so a later batch's look-up sees them, and their row is durable;
- the retention purge removes the entries of the batch rows it deleted, and only if no rebuild
  happened meanwhile (`epoch`): a rebuild may already have left them out.

It is a multiset: one entry per record, so two records with one fingerprint (a key purged and used
again before the purge's removal runs, or two keys colliding) are two entries, and removing one leaves
the other. Records deleted around the service leave entries behind: extra reads, never a wrong answer.
Records inserted around the service while it runs are not seen until the next recovery.

Layout: one `array('Q')` of 2**k slots, a quotienting Robin Hood table (linear probing, 0 = empty,
deletion by backward shift, no tombstones), 8 bytes a slot: bits 0-31 the batch id mod 2**32, bits 32-39
the entry's distance from its home slot plus one (1..255, so an occupied slot is never 0, even for a
fingerprint of 0 in batch 0), bits 40-63 `rem`. A key's home slot is its fingerprint's low k bits and its
rem the `rem_bits` bits just above them (24 after a reset): a slot and its position keep k + 24 bits of
the fingerprint, and a new key is a candidate only if a stored key has its home and its rem, ~ load *
2**-24 per new key (at 30M keys in 2**26 slots, 0.45 full, issue 14 target 5: 0.00003 a batch of 1,000
new keys; the 32-bit tags before, which also picked the home, gave stored / 2**32: about 7 a batch). A
look-up walks from the home and stops at an empty slot or an entry nearer its own home than the walk is
(Robin Hood keeps a run ordered by home). A doubling moves the lowest rem bit of each entry into its home
(rem_bits drops by one, k + rem_bits stays; growth is rare, logged, and warned of below REM_BITS_FLOOR);
an entry that would sit farther than DIST_MAX from home also doubles the table (never seen at LOAD_MAX
with a 64-bit hash: the longest distance at 0.75 on 2**20 slots is 20-30). The full batch id is rebuilt
as the newest batch id at or below the newest one added whose low 32 bits are the slot's: batch ids
within retention span far less than 2**32 (asserted as they are added: at ~1,600 appends/s, the most one
writer commits here, 2**32 batches are 31 days of non-stop single-operation batches; batches grow with
load), and ids below zero (the records migration 0023 moved, numbered -1, -2, ...) come back as
themselves. Fingerprint: Python's 64-bit hash of (merchant_id, key), salted per process, which is enough
because the table is only ever rebuilt from the keys themselves.

The slots and every walk over them (fingerprints, look-up, insert, backward-shift delete, doubling) are
compiled: fastpath/idempotency_table.pyx, one crossing per batch (in Python they cost 3-6 µs per
operation in the service: the look-up's walk, the add's, and for a third the doublings);
fastpath/idempotency_reference.py is its pure-Python twin, kept for the differential test. This class
keeps what is policy: the batch ids' span, the purge's epoch, the log lines of a doubling, the table's
errors as InvariantViolation. Measured (python -m
processor.idempotency; loadtest/idempotency_table.py against a base tree): see `measure()` and
docs/DESIGN.md section 4.
"""

from __future__ import annotations

import array
import logging
import time
from collections.abc import Callable, Iterable

from fastpath.idempotency_table import DIST_MAX, LOAD_MAX, REM_BITS, SLOTS_MIN, Table, TableError
from processor.domain import InvariantViolation, require

__all__ = [
    "BATCH_ID_SPAN_MAX",
    "DIST_MAX",
    "LOAD_MAX",
    "REM_BITS",
    "REM_BITS_FLOOR",
    "SLOTS_MIN",
    "IdempotencyTable",
    "fingerprint",
]

log = logging.getLogger("points.idempotency")
# A key's 64-bit fingerprint: its low k bits are its home slot, the rem_bits above them the slot's rem.
Fingerprint = Callable[[str, str], int]
Key = tuple[str, str]

# a doubling moves one rem bit into the home: below this, new keys meet false candidates noticeably
# more often (~ load * 2**-rem_bits each); the cure is sizing the table at start
REM_BITS_FLOOR = 12
# batch ids in the table (and in Postgres within retention) span less than this: a slot's 32 bits name one
BATCH_ID_SPAN_MAX = 1 << 32


def fingerprint(merchant_id: str, key: str) -> int:
    """The 64-bit fingerprint of a merchant's key (the table computes the same in C, without this call)."""
    return hash((merchant_id, key))


class IdempotencyTable:
    """Where every idempotency record within retention is (see the module's docstring). The slots and
    their walks are fastpath/idempotency_table.pyx's `Table` (`kernel`: its pure-Python twin in tests);
    this class keeps the batch ids' span, the purge's epoch and the log lines of a doubling."""

    def __init__(
        self, fingerprint: Fingerprint = fingerprint, slots: int = SLOTS_MIN, kernel: Callable[[int], Table] = Table
    ):
        """`slots` below SLOTS_MIN only in tests (growth exercised often); reset() never sizes below it."""
        self._table = kernel(slots)
        self.fingerprint = fingerprint  # replaceable by tests (forced collisions)
        # bumped by every rebuild: a purge's removals computed against an older table are dropped
        self.epoch = 0
        # the newest batch id added: a slot's low 32 bits are rebuilt into the batch id at or below it
        self.newest_batch_id = 0

    @property
    def fingerprint(self) -> Fingerprint:
        return self._fingerprint

    @fingerprint.setter
    def fingerprint(self, value: Fingerprint) -> None:
        self._fingerprint = value
        # None: the kernel hashes the (merchant_id, key) pair itself, in C, with no call per key
        self._custom = None if value is fingerprint else value

    @property
    def count(self) -> int:
        return self._table.count

    @property
    def rem_bits(self) -> int:
        return self._table.rem_bits

    @property
    def slots(self) -> int:
        return self._table.slots

    @property
    def memory_bytes(self) -> int:
        return self._table.memory_bytes

    @property
    def _slots(self) -> array.array[int]:
        """The slots themselves (tests and measures read them)."""
        return self._table.slots_array

    def dist_max(self) -> int:
        """The farthest any entry sits from its home slot (a scan of every slot: for tests and measures)."""
        return self._table.dist_max()

    # --- questions ---

    def may_contain(self, merchant_id: str, key: str) -> bool:
        return bool(self.maybe_stored([(merchant_id, key)]))

    def maybe_stored(self, keys: Iterable[Key]) -> dict[Key, list[int]]:
        """The keys that may have a stored record, each with the batch ids whose rows may hold it (read
        them from Postgres: Store.stored_outcomes); every other key is new."""
        return self._table.maybe_stored(keys, self.newest_batch_id, self._custom)

    # --- changes ---

    def add(self, batch_id: int, keys: Iterable[Key]) -> None:
        """One entry per record a batch's row holds (a committed batch's, or a rebuild's rows, added in
        batch id order)."""
        newest = self.newest_batch_id
        if batch_id > newest:
            require(
                self.count == 0 or batch_id - newest < BATCH_ID_SPAN_MAX,
                f"batch {batch_id} is 2**32 batches or more after {newest}, the newest in the idempotency table",
            )
            self.newest_batch_id = newest = batch_id
        require(
            newest - batch_id < BATCH_ID_SPAN_MAX,
            f"batch {batch_id}'s idempotency records are 2**32 batches or more before batch {newest}: a slot "
            "cannot name both; purge the records older than the retention (idempotency_retention_days)",
        )
        try:
            doublings = self._table.add(batch_id, keys, self._custom)
        except TableError as error:
            raise InvariantViolation(str(error)) from error
        if doublings:
            self._log_doublings(doublings)

    def remove(self, batches: Iterable[tuple[int, Iterable[Key]]], epoch: int) -> int:
        """Drops the entries of the batch rows deleted (the purge's: (batch id, its keys)), unless the
        table was rebuilt since `epoch` (the rebuild read Postgres after or during the delete). Returns
        the entries dropped."""
        if epoch != self.epoch:
            return 0
        return self._table.remove(batches, self._custom)

    def reset(self, expected: int = 0) -> None:
        """Empties the table before a rebuild, sized so that `expected` records fill at most half of it
        (it grows only past LOAD_MAX: growing rehashes every entry with the committer stopped, about
        30 ms per million keys in C, measured, so the service should be sized not to)."""
        self._table.reset(expected)
        self.epoch += 1
        self.newest_batch_id = 0

    def _log_doublings(self, doublings: list[tuple[str, int, int, int, float]]) -> None:
        """A doubling's log lines, written once the add that made it returned."""
        for reason, keys, slots, rem_bits, seconds in doublings:
            log.warning(
                "idempotency table grown; size it at start (--idempotency-keys-expected) to avoid the stall",
                extra={"reason": reason, "keys": keys, "slots": slots, "rem_bits": rem_bits, "seconds": seconds},
            )
            if rem_bits < REM_BITS_FLOOR:
                log.warning(
                    "idempotency table slots keep few fingerprint bits: new keys meet false candidates (a "
                    "Postgres read each) more often; size it at start (--idempotency-keys-expected)",
                    extra={"rem_bits": rem_bits, "slots": slots},
                )


def measure(keys_count: int = 1_000_000, batch: int = 1_000) -> dict[str, float]:
    """Bytes per key, the cost of a batch's look-up and of adding keys (growing as it goes), and the
    process's peak memory (the table while growing holds its old and new arrays). No database."""
    import resource

    table = IdempotencyTable()
    started = time.perf_counter()
    for first in range(0, keys_count, batch):
        table.add(
            first // batch + 1,
            ((f"merchant-{i % 200}", f"order-{i:012d}") for i in range(first, min(first + batch, keys_count))),
        )
    added = time.perf_counter() - started
    stored = [(f"merchant-{i % 200}", f"order-{i:012d}") for i in range(batch)]
    new = [(f"merchant-{i % 200}", f"new-{i:012d}") for i in range(batch)]
    rounds = 50
    started = time.perf_counter()
    for _ in range(rounds):
        table.maybe_stored(new)
    miss_us = (time.perf_counter() - started) / rounds * 1e6
    started = time.perf_counter()
    for _ in range(rounds):
        table.maybe_stored(stored)
    hit_us = (time.perf_counter() - started) / rounds * 1e6
    return {
        "keys": keys_count,
        "slots": table.slots,
        "memory_bytes": table.memory_bytes,
        "bytes_per_key": table.memory_bytes / keys_count,
        "add_seconds": added,
        "lookup_batch_all_new_us": miss_us,
        "lookup_batch_all_stored_us": hit_us,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


if __name__ == "__main__":
    import sys

    for name, value in measure(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000).items():
        print(f"{name:28} {value:,.2f}")
