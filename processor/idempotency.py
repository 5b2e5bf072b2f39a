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
because the table is only ever rebuilt from the keys themselves. Measured (python -m
processor.idempotency, this machine): see `measure()` and docs/DESIGN.md section 4.
"""

from __future__ import annotations

import array
import logging
import time
from collections.abc import Callable, Iterable, Iterator

from processor.domain import require

log = logging.getLogger("points.idempotency")
# A key's 64-bit fingerprint: its low k bits are its home slot, the rem_bits above them the slot's rem.
Fingerprint = Callable[[str, str], int]
Key = tuple[str, str]

SLOTS_MIN = 1 << 16  # 512 KiB: the table of a service with few keys
# Grown (doubled and rehashed) beyond this share of slots used: Robin Hood probing stays short (a miss
# stops at the first entry nearer its home than the walk is; the longest distance at 0.75 on 2**20 slots
# is about 20, see the tests) and 30 million keys fit in 2**26 slots = 512 MiB (0.45 full).
LOAD_MAX = 0.75
_LOW = 0xFFFFFFFF  # a slot's batch id bits
_DIST_SHIFT = 32  # a slot's byte of distance from home plus one: 1..255, never 0 in an occupied slot
_DIST_BYTE = 0xFF
DIST_MAX = _DIST_BYTE - 1  # the farthest an entry may sit from its home; one farther grows the table
_REM_SHIFT = 40
REM_BITS = 24  # the fingerprint bits a slot keeps above the home bits, after a reset
# a doubling moves one rem bit into the home: below this, new keys meet false candidates noticeably
# more often (~ load * 2**-rem_bits each); the cure is sizing the table at start
REM_BITS_FLOOR = 12
# batch ids in the table (and in Postgres within retention) span less than this: a slot's 32 bits name one
BATCH_ID_SPAN_MAX = 1 << 32


def fingerprint(merchant_id: str, key: str) -> int:
    """The 64-bit fingerprint of a merchant's key."""
    return hash((merchant_id, key))


class IdempotencyTable:
    """Where every idempotency record within retention is (see the module's docstring)."""

    def __init__(self, fingerprint: Fingerprint = fingerprint, slots: int = SLOTS_MIN):
        """`slots` below SLOTS_MIN only in tests (growth exercised often); reset() never sizes below it."""
        self.fingerprint = fingerprint  # replaceable by tests (forced collisions)
        self._rehashing = False  # in _grow: an insert must not grow again
        self._allocate(slots)
        self.rem_bits = REM_BITS
        # bumped by every rebuild: a purge's removals computed against an older table are dropped
        self.epoch = 0
        # the newest batch id added: a slot's low 32 bits are rebuilt into the batch id at or below it
        self.newest_batch_id = 0

    def _allocate(self, slots: int) -> None:
        size = 2
        while size < slots:
            size <<= 1
        self._slots = array.array("Q", bytes(8 * size))
        self._mask = size - 1
        self._home_bits = size.bit_length() - 1
        self.count = 0
        self._grow_at = int(size * LOAD_MAX)

    @property
    def slots(self) -> int:
        return self._mask + 1

    @property
    def memory_bytes(self) -> int:
        return self._slots.itemsize * len(self._slots)

    def dist_max(self) -> int:
        """The farthest any entry sits from its home slot (a scan of every slot: for tests and measures)."""
        return max(((value >> _DIST_SHIFT) & _DIST_BYTE for value in self._slots), default=0) - 1

    # --- questions ---

    def may_contain(self, merchant_id: str, key: str) -> bool:
        return bool(self.maybe_stored([(merchant_id, key)]))

    def maybe_stored(self, keys: Iterable[Key]) -> dict[Key, list[int]]:
        """The keys that may have a stored record, each with the batch ids whose rows may hold it (read
        them from Postgres: Store.stored_outcomes); every other key is new."""
        slots, mask, newest = self._slots, self._mask, self.newest_batch_id
        home_bits, rem_mask = self._home_bits, (1 << self.rem_bits) - 1
        hits: dict[Key, list[int]] = {}
        for pair, print_ in zip(keys, self._fingerprints(keys)):
            i = print_ & mask
            value = slots[i]
            if value == 0:  # an empty home: most misses end here (half the keys at 0.5 full)
                continue
            # a slot's upper 32 bits as they would be for this key at distance + 1 = `near`: equal means
            # an entry with this home and this rem; `near` and `wanted` step together along the run
            near = 1
            wanted = ((print_ >> home_bits) & rem_mask) << 8 | 1
            while True:
                upper = value >> _DIST_SHIFT
                if upper & _DIST_BYTE < near:  # empty (0), or an entry nearer its home: the key is not further
                    break
                if upper == wanted:  # same home and rem: another key may share them, every entry is a candidate
                    batch_id = newest - ((newest - value) & _LOW)
                    found = hits.get(pair)
                    if found is None:
                        hits[pair] = [batch_id]
                    elif batch_id not in found:
                        found.append(batch_id)
                near += 1
                wanted += 1
                i = (i + 1) & mask
                value = slots[i]
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
        at_home = 1 << _DIST_SHIFT | low  # an entry's distance byte and batch bits in its home slot
        insert = self._insert
        slots, mask, home_bits, rem_mask = self._slots, self._mask, self._home_bits, (1 << self.rem_bits) - 1
        for print_ in self._fingerprints(keys):
            if self.count >= self._grow_at:
                self._grow("load")
            if self._slots is not slots:  # grown, for load or by the previous insert
                slots, mask, home_bits, rem_mask = self._slots, self._mask, self._home_bits, (1 << self.rem_bits) - 1
            home = print_ & mask
            if slots[home] == 0:  # an empty home (most keys below 0.5 full): no call
                slots[home] = ((print_ >> home_bits) & rem_mask) << _REM_SHIFT | at_home
            else:
                insert(home, (print_ >> home_bits) & rem_mask, low)
            self.count += 1

    def _fingerprints(self, keys: Iterable[Key]) -> Iterator[int]:
        """The keys' 64-bit fingerprints; with the default fingerprint, hash() mapped in C over the
        (merchant, key) tuples: a Python call per key was ~30% of a look-up's time (measured: 215 -> 153
        µs a batch of 1,000, best of 15)."""
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
        mask, home_bits, rem_mask = self._mask, self._home_bits, (1 << self.rem_bits) - 1
        for batch_id, keys in batches:
            low = batch_id & _LOW
            for print_ in self._fingerprints(keys):
                i = self._find(print_ & mask, (print_ >> home_bits) & rem_mask, low)
                if i >= 0:
                    self._delete(i)
                    dropped += 1
        return dropped

    def reset(self, expected: int = 0) -> None:
        """Empties the table before a rebuild, sized so that `expected` records fill at most half of it
        (it grows only past LOAD_MAX: growing rehashes every entry with the committer stopped, about
        a second per million keys measured, so the service should be sized not to)."""
        self._allocate(max(2 * expected, SLOTS_MIN))
        self.rem_bits = REM_BITS
        self.epoch += 1
        self.newest_batch_id = 0

    # --- the Robin Hood table ---

    def _find(self, home: int, rem: int, low: int) -> int:
        """The slot of the entry (home, rem, batch id's low bits), or -1."""
        slots, mask = self._slots, self._mask
        i, near = home, 1
        value = rem << _REM_SHIFT | 1 << _DIST_SHIFT | low
        while True:
            found = slots[i]
            if (found >> _DIST_SHIFT) & _DIST_BYTE < near:
                return -1
            if found == value:
                return i
            near += 1
            value += 1 << _DIST_SHIFT
            i = (i + 1) & mask

    def _insert(self, home: int, rem: int, low: int) -> None:
        """Places an entry (the caller counts it): each slot on the way goes to whichever of the carried
        entry and its occupant is farther from home (Robin Hood), the other is carried on; a carried entry
        about to sit farther than DIST_MAX grows the table and goes on from its home there."""
        slots, mask = self._slots, self._mask
        i, near = home, 1  # the carried entry's distance from its home plus one, at slot i
        value = rem << _REM_SHIFT | low  # the carried entry without its distance
        while True:
            found = slots[i]
            if found == 0:
                slots[i] = value | near << _DIST_SHIFT
                return
            found_near = (found >> _DIST_SHIFT) & _DIST_BYTE
            if found_near < near:  # the occupant is nearer its home: it gives up the slot
                slots[i] = value | near << _DIST_SHIFT
                value, near = found ^ found_near << _DIST_SHIFT, found_near
            i = (i + 1) & mask
            near += 1
            if near > DIST_MAX + 1:
                # the carried entry (not in the table) would sit DIST_MAX + 1 from home
                require(
                    not self._rehashing,
                    "an idempotency entry would sit farther from home after a doubling than before it",
                )
                require(
                    self.count >= (self.slots >> 3),
                    f"{DIST_MAX + 1} idempotency entries crowd one run in a table {self.count} / {self.slots} "
                    "full: the fingerprint function gives many keys one home; use a 64-bit hash",
                )
                home = (i - DIST_MAX - 1) & mask
                rem, low = value >> _REM_SHIFT, value & _LOW
                self._grow("an entry would sit farther than DIST_MAX from its home")
                home_bit = self._home_bits - 1  # the bit the doubling moved from rem into the home
                self._insert(home | (rem & 1) << home_bit, rem >> 1, low)
                return

    def _delete(self, i: int) -> None:
        """Empties slot i and shifts back, one slot nearer their home, the entries after it that are not
        at their home (backward shift: the run stays ordered by home, with no gap)."""
        slots, mask = self._slots, self._mask
        while True:
            j = (i + 1) & mask
            value = slots[j]
            if (value >> _DIST_SHIFT) & _DIST_BYTE <= 1:  # empty, or at its home: the run ends here
                break
            slots[i] = value - (1 << _DIST_SHIFT)
            i = j
        slots[i] = 0
        self.count -= 1

    def _grow(self, reason: str) -> None:
        """Doubles the table: an entry's home is its slot minus its distance; its new home takes the
        lowest rem bit as the new top home bit, and rem keeps the bits above (rem_bits drops by one)."""
        require(
            self.rem_bits > 0,
            "the idempotency table has grown until its slots keep no fingerprint bits above the home; "
            "size it at start (--idempotency-keys-expected)",
        )
        old, old_mask, count = self._slots, self._mask, self.count
        started = time.perf_counter()
        self._allocate(2 * len(old))
        self.rem_bits -= 1
        home_bit = self._home_bits - 1
        insert, slots = self._insert, self._slots
        # a doubling never moves an entry farther from its home (the entries homed in a window of the new
        # table are a subset of those homed in a window as long of the old one): asserted in _insert
        self._rehashing = True
        try:
            for i, value in enumerate(old):
                if value:
                    home = (i - ((value >> _DIST_SHIFT) & _DIST_BYTE) + 1) & old_mask
                    rem = value >> _REM_SHIFT
                    home |= (rem & 1) << home_bit
                    if slots[home] == 0:  # most entries: no call
                        slots[home] = (rem >> 1) << _REM_SHIFT | 1 << _DIST_SHIFT | value & _LOW
                    else:
                        insert(home, rem >> 1, value & _LOW)
        finally:
            self._rehashing = False
        self.count = count
        log.warning(
            "idempotency table grown; size it at start (--idempotency-keys-expected) to avoid the stall",
            extra={
                "reason": reason,
                "keys": count,
                "slots": self.slots,
                "rem_bits": self.rem_bits,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
        if self.rem_bits < REM_BITS_FLOOR:
            log.warning(
                "idempotency table slots keep few fingerprint bits: new keys meet false candidates (a "
                "Postgres read each) more often; size it at start (--idempotency-keys-expected)",
                extra={"rem_bits": self.rem_bits, "slots": self.slots},
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
