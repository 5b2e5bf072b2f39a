"""Idempotency decided in memory: which (merchant, idempotency key) pairs may have a stored record.

The committer asks this table before a batch is applied: a key it has no fingerprint of has certainly
no record in Postgres (the batch needs no `stored_outcomes` read for it); a key it has a fingerprint
of is read from Postgres as before (a retry, or, rarely, another key with the same fingerprint: the
read finds no record of this key and the operation is decided as new, exactly as without the table).
So the table may err towards "maybe stored" (a read too many) but never towards "new" while a record
exists: that would post a retry twice (the record's primary key would refuse the batch, and the
service would resynchronise; see the pipeline).

What keeps it so:
- rebuilt from `idempotency_keys` by every recovery (start-up, before SERVING; and every resync), so
  it starts equal to Postgres;
- a committed batch adds its records' keys after its COMMIT and before its calls are answered (a batch
  rolled back never added them: nothing to undo), so a later batch's look-up sees them;
- the retention purge removes one fingerprint per record it deleted (the rows its DELETE returned),
  and only if no rebuild happened meanwhile (`epoch`): a rebuild may already have left them out.

It is a multiset: one entry per record, so two records with one fingerprint (a key purged and used
again before the purge's removal runs, or two keys colliding) are two entries, and removing one leaves
the other. Records deleted around the service leave entries behind: extra reads, never a wrong answer.
Records inserted around the service while it runs are not seen until the next recovery (their key is
taken as new, the batch's INSERT is refused by the primary key, and the service resynchronises).

Layout: one `array('q')` of 2**k slots, open addressing with linear probing, 0 = empty, deletion by
backward shift (no tombstones). Fingerprint: Python's 64-bit hash of (merchant_id, key), salted per
process, which is enough because the table is only ever rebuilt from the keys themselves. Measured
(python -m processor.idempotency, this machine): see `measure()` and docs/DESIGN.md section 4.
"""

from __future__ import annotations

import array
import logging
import time
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger("points.idempotency")
# A key that fingerprints to 0 takes 1 instead: 0 marks an empty slot.
Fingerprint = Callable[[str, str], int]

SLOTS_MIN = 1 << 16  # 512 KiB: the table of a service with few keys
# Grown (doubled and rehashed) beyond this share of slots used: linear probing's misses stay short
# (about 2.2 probes at 0.5, 8.5 at 0.75; the largest load before growing is this, the least after is
# half of it) and 30 million keys fit in 2**26 slots = 512 MiB (0.45 full).
LOAD_MAX = 0.75


def fingerprint(merchant_id: str, key: str) -> int:
    """The 64-bit fingerprint of a merchant's key (never 0)."""
    return hash((merchant_id, key)) or 1


class IdempotencyTable:
    """The fingerprints of every idempotency record within retention (see the module's docstring)."""

    def __init__(self, fingerprint: Fingerprint = fingerprint, slots: int = SLOTS_MIN):
        self.fingerprint = fingerprint  # replaceable by tests (forced collisions)
        self._allocate(slots)
        # bumped by every rebuild: a purge's removals computed against an older table are dropped
        self.epoch = 0

    def _allocate(self, slots: int) -> None:
        size = SLOTS_MIN
        while size < slots:
            size <<= 1
        self._slots = array.array("q", bytes(8 * size))
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
        return self._find(self.fingerprint(merchant_id, key)) >= 0

    def maybe_stored(self, keys: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """The keys that may have a stored record (read them from Postgres); every other is new."""
        slots, mask = self._slots, self._mask
        hits = []
        for pair, print_ in zip(keys, self._fingerprints(keys)):
            print_ = print_ or 1
            i = print_ & mask
            while True:
                value = slots[i]
                if value == print_:
                    hits.append(pair)
                    break
                if value == 0:
                    break
                i = (i + 1) & mask
        return hits

    # --- changes ---

    def add(self, keys: Iterable[tuple[str, str]]) -> None:
        """One entry per record written (a committed batch's records, or a rebuild's rows)."""
        for print_ in self._fingerprints(keys):
            if self.count >= self._grow_at:
                self._grow()
            self._insert(print_ or 1)

    def _fingerprints(self, keys: Iterable[tuple[str, str]]) -> Iterator[int]:
        """The keys' fingerprints, maybe 0 (the caller takes 1 for it); with the default fingerprint,
        hash() mapped in C over the (merchant, key) tuples: a Python call per key was ~30% of a
        look-up's time (measured: 215 -> 153 µs a batch of 1,000, best of 15)."""
        if self.fingerprint is fingerprint:
            return map(hash, keys)
        return (self.fingerprint(merchant_id, key) for merchant_id, key in keys)

    def remove(self, keys: Iterable[tuple[str, str]], epoch: int) -> int:
        """Drops one entry per record deleted (the purge's), unless the table was rebuilt since `epoch`
        (the rebuild read Postgres after or during the delete). Returns the entries dropped."""
        if epoch != self.epoch:
            return 0
        fingerprint, dropped = self.fingerprint, 0
        for merchant_id, key in keys:
            i = self._find(fingerprint(merchant_id, key))
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

    # --- the open-addressing table ---

    def _find(self, print_: int) -> int:
        slots, mask = self._slots, self._mask
        i = print_ & mask
        while True:
            value = slots[i]
            if value == print_:
                return i
            if value == 0:
                return -1
            i = (i + 1) & mask

    def _insert(self, print_: int) -> None:
        slots, mask = self._slots, self._mask
        i = print_ & mask
        while slots[i] != 0:
            i = (i + 1) & mask
        slots[i] = print_
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
            home = value & mask
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
    table.add((f"merchant-{i % 200}", f"order-{i:012d}") for i in range(keys_count))
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
