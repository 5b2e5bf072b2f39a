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

Layout: one `array('Q')` of 2**k slots, open addressing with linear probing, 0 = empty, deletion by
backward shift (no tombstones). A slot is (tag << 32) | (batch id mod 2**32), 8 bytes: tag = the upper 32
bits of the key's 64-bit fingerprint (never 0), which also picks the home slot (tag & mask; 2**26 slots
hold 30 million keys at 0.45 full, issue 14 target 5). The full batch id is rebuilt as the newest batch id
at or below the newest one added whose low 32 bits are the slot's: batch ids within retention span far
less than 2**32 (asserted as they are added: at ~1,600 appends/s, the most one writer commits here, 2**32
batches are 31 days of non-stop single-operation batches; batches grow with load), and ids below zero
(the records migration 0023 moved, numbered -1, -2, ...) come back as themselves. Fingerprint: Python's
64-bit hash of (merchant_id, key), salted per process, which is enough because the table is only ever
rebuilt from the keys themselves. Measured (python -m processor.idempotency, this machine): see
`measure()` and docs/DESIGN.md section 4.
"""

from __future__ import annotations

import array
import logging
import time
from collections.abc import Callable, Iterable, Iterator

from processor.domain import require

log = logging.getLogger("points.idempotency")
# A key's 64-bit fingerprint; its upper 32 bits are the slot's tag (a tag of 0 takes 1: 0 marks an empty slot).
Fingerprint = Callable[[str, str], int]
Key = tuple[str, str]

SLOTS_MIN = 1 << 16  # 512 KiB: the table of a service with few keys
# Grown (doubled and rehashed) beyond this share of slots used: linear probing's misses stay short
# (about 2.2 probes at 0.5, 8.5 at 0.75; the largest load before growing is this, the least after is
# half of it) and 30 million keys fit in 2**26 slots = 512 MiB (0.45 full).
LOAD_MAX = 0.75
_LOW = 0xFFFFFFFF  # a slot's batch id bits, and a tag's
# batch ids in the table (and in Postgres within retention) span less than this: a slot's 32 bits name one
BATCH_ID_SPAN_MAX = 1 << 32


def fingerprint(merchant_id: str, key: str) -> int:
    """The 64-bit fingerprint of a merchant's key."""
    return hash((merchant_id, key))


class IdempotencyTable:
    """Where every idempotency record within retention is (see the module's docstring)."""

    def __init__(self, fingerprint: Fingerprint = fingerprint, slots: int = SLOTS_MIN):
        self.fingerprint = fingerprint  # replaceable by tests (forced collisions)
        self._allocate(slots)
        # bumped by every rebuild: a purge's removals computed against an older table are dropped
        self.epoch = 0
        # the newest batch id added: a slot's low 32 bits are rebuilt into the batch id at or below it
        self.newest_batch_id = 0

    def _allocate(self, slots: int) -> None:
        size = SLOTS_MIN
        while size < slots:
            size <<= 1
        self._slots = array.array("Q", bytes(8 * size))
        self._mask = size - 1
        self.count = 0
        self._grow_at = int(size * LOAD_MAX)

    @property
    def slots(self) -> int:
        return self._mask + 1

    @property
    def memory_bytes(self) -> int:
        return self._slots.itemsize * len(self._slots)

    # --- questions ---

    def may_contain(self, merchant_id: str, key: str) -> bool:
        return bool(self.maybe_stored([(merchant_id, key)]))

    def maybe_stored(self, keys: Iterable[Key]) -> dict[Key, list[int]]:
        """The keys that may have a stored record, each with the batch ids whose rows may hold it (read
        them from Postgres: Store.stored_outcomes); every other key is new."""
        slots, mask, newest = self._slots, self._mask, self.newest_batch_id
        hits: dict[Key, list[int]] = {}
        for pair, print_ in zip(keys, self._fingerprints(keys)):
            tag = (print_ >> 32) & _LOW or 1
            i = tag & mask
            while True:
                value = slots[i]
                if value == 0:
                    break
                if value >> 32 == tag:  # another key may share the tag: every entry of it is a candidate
                    batch_id = newest - ((newest - value) & _LOW)
                    found = hits.get(pair)
                    if found is None:
                        hits[pair] = [batch_id]
                    elif batch_id not in found:
                        found.append(batch_id)
                i = (i + 1) & mask
        return hits

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
        low = batch_id & _LOW
        for print_ in self._fingerprints(keys):
            if self.count >= self._grow_at:
                self._grow()
            self._insert(((print_ >> 32) & _LOW or 1) << 32 | low)

    def _fingerprints(self, keys: Iterable[Key]) -> Iterator[int]:
        """The keys' 64-bit fingerprints (a slot's tag is the upper 32 bits, 0 taken as 1); with the default
        fingerprint, hash() mapped in C over the (merchant, key) tuples: a Python call per key was ~30% of
        a look-up's time (measured: 215 -> 153 µs a batch of 1,000, best of 15)."""
        if self.fingerprint is fingerprint:
            return map(hash, keys)
        return (self.fingerprint(merchant_id, key) for merchant_id, key in keys)

    def remove(self, batches: Iterable[tuple[int, Iterable[Key]]], epoch: int) -> int:
        """Drops the entries of the batch rows deleted (the purge's: (batch id, its keys)), unless the
        table was rebuilt since `epoch` (the rebuild read Postgres after or during the delete). Returns
        the entries dropped."""
        if epoch != self.epoch:
            return 0
        dropped = 0
        for batch_id, keys in batches:
            low = batch_id & _LOW
            for print_ in self._fingerprints(keys):
                i = self._find(((print_ >> 32) & _LOW or 1) << 32 | low)
                if i >= 0:
                    self._delete(i)
                    dropped += 1
        return dropped

    def reset(self, expected: int = 0) -> None:
        """Empties the table before a rebuild, sized so that `expected` records fill at most half of it
        (it grows only past LOAD_MAX: growing rehashes every entry with the committer stopped, about
        a second per million keys measured, so the service should be sized not to)."""
        self._allocate(2 * expected)
        self.epoch += 1
        self.newest_batch_id = 0

    # --- the open-addressing table ---

    def _find(self, value: int) -> int:
        slots, mask = self._slots, self._mask
        i = (value >> 32) & mask
        while True:
            found = slots[i]
            if found == value:
                return i
            if found == 0:
                return -1
            i = (i + 1) & mask

    def _insert(self, value: int) -> None:
        slots, mask = self._slots, self._mask
        i = (value >> 32) & mask
        while slots[i] != 0:
            i = (i + 1) & mask
        slots[i] = value
        self.count += 1

    def _delete(self, i: int) -> None:
        """Empties slot i and shifts back the entries after it that probing would no longer reach."""
        slots, mask = self._slots, self._mask
        j = i
        while True:
            j = (j + 1) & mask
            value = slots[j]
            if value == 0:
                break
            home = (value >> 32) & mask
            # the entry at j stays if its home lies cyclically in (i, j]: probing from home reaches j
            # without passing i
            if (i < home <= j) if i <= j else (i < home or home <= j):
                continue
            slots[i] = value
            i = j
        slots[i] = 0
        self.count -= 1

    def _grow(self) -> None:
        old = self._slots
        started = time.perf_counter()
        self._allocate(2 * len(old))
        insert = self._insert
        for value in old:
            if value:
                insert(value)
        log.warning(
            "idempotency table grown; size it at start (--idempotency-keys-expected) to avoid the stall",
            extra={"keys": self.count, "slots": self.slots, "seconds": round(time.perf_counter() - started, 3)},
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
