"""The pure-Python twin of fastpath/idempotency_table.pyx: the same `Table`, slot for slot, written for
reading and for the differential test (tests/unit/test_idempotency_table.py runs every table test on
both and compares their slot arrays after random operations). The service never runs it: the table
has no environment switch, because its Python walk was the cost the compiled one removed (3-6 µs per
operation in the service, docs/DESIGN.md section 4). It shares the compiled module's constants and
TableError, so both answer and fail alike."""

from __future__ import annotations

import array
import time
from collections.abc import Callable, Iterable, Iterator

from fastpath.idempotency_table import (
    DIST_MAX,
    GROW_DISTANCE,
    GROW_LOAD,
    LOAD_MAX,
    REM_BITS,
    SLOTS_MIN,
    TableError,
)

Key = tuple[str, str]
Fingerprint = Callable[[str, str], int]
Doubling = tuple[str, int, int, int, float]

_LOW = 0xFFFFFFFF  # a slot's batch id bits
_DIST_SHIFT = 32  # a slot's byte of distance from home plus one: 1..255, never 0 in an occupied slot
_DIST_BYTE = 0xFF
_REM_SHIFT = 40
_MASK_64 = (1 << 64) - 1


class Table:
    """The slots of the idempotency table (fastpath/idempotency_table.pyx's docstring)."""

    def __init__(self, slots: int = SLOTS_MIN):
        self._allocate(slots)
        self.rem_bits = REM_BITS
        self._rehashing = False  # in _grow: an insert must not grow again
        self._doublings: list[Doubling] = []

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
    def slots_array(self) -> array.array[int]:
        return self._slots

    @property
    def memory_bytes(self) -> int:
        return self._slots.itemsize * len(self._slots)

    def dist_max(self) -> int:
        return max(((value >> _DIST_SHIFT) & _DIST_BYTE for value in self._slots), default=0) - 1

    def reset(self, expected: int = 0) -> None:
        self._allocate(max(2 * expected, SLOTS_MIN))
        self.rem_bits = REM_BITS

    def _fingerprints(self, keys: Iterable[Key], fingerprint: Fingerprint | None) -> Iterator[int]:
        """The keys' fingerprints' low 64 bits (None: Python's hash of the pair, mapped in C)."""
        if fingerprint is None:
            return (print_ & _MASK_64 for print_ in map(hash, keys))
        return (fingerprint(merchant_id, key) & _MASK_64 for merchant_id, key in keys)

    # --- questions ---

    def maybe_stored(
        self, keys: Iterable[Key], newest: int, fingerprint: Fingerprint | None = None
    ) -> dict[Key, list[int]]:
        keys = list(keys)  # walked twice: with their fingerprints, and for the pairs
        slots, mask = self._slots, self._mask
        home_bits, rem_mask = self._home_bits, (1 << self.rem_bits) - 1
        hits: dict[Key, list[int]] = {}
        for pair, print_ in zip(keys, self._fingerprints(keys, fingerprint)):
            i = print_ & mask
            value = slots[i]
            if value == 0:
                continue
            near = 1
            wanted = ((print_ >> home_bits) & rem_mask) << 8 | 1
            while True:
                upper = value >> _DIST_SHIFT
                if upper & _DIST_BYTE < near:
                    break
                if upper == wanted:
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

    def add(self, batch_id: int, keys: Iterable[Key], fingerprint: Fingerprint | None = None) -> list[Doubling] | None:
        low = batch_id & _LOW
        for print_ in self._fingerprints(keys, fingerprint):
            if self.count >= self._grow_at:
                self._grow(GROW_LOAD)
            slots, mask, rem_mask = self._slots, self._mask, (1 << self.rem_bits) - 1
            home = print_ & mask
            rem = (print_ >> self._home_bits) & rem_mask
            if slots[home] == 0:
                slots[home] = rem << _REM_SHIFT | 1 << _DIST_SHIFT | low
            else:
                self._insert(home, rem, low)
            self.count += 1
        if not self._doublings:
            return None
        done, self._doublings = self._doublings, []
        return done

    def remove(self, batches: Iterable[tuple[int, Iterable[Key]]], fingerprint: Fingerprint | None = None) -> int:
        dropped = 0
        for batch_id, keys in batches:
            low = batch_id & _LOW
            for print_ in self._fingerprints(keys, fingerprint):
                i = self._find(print_ & self._mask, (print_ >> self._home_bits) & ((1 << self.rem_bits) - 1), low)
                if i >= 0:
                    self._delete(i)
                    dropped += 1
        return dropped

    # --- the Robin Hood table ---

    def _find(self, home: int, rem: int, low: int) -> int:
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
                if self._rehashing:
                    raise TableError("an idempotency entry would sit farther from home after a doubling than before it")
                if self.count < (self.slots >> 3):
                    raise TableError(
                        f"{DIST_MAX + 1} idempotency entries crowd one run in a table {self.count} / {self.slots} "
                        "full: the fingerprint function gives many keys one home; use a 64-bit hash"
                    )
                home = (i - DIST_MAX - 1) & mask
                rem, low = value >> _REM_SHIFT, value & _LOW
                self._grow(GROW_DISTANCE)
                home_bit = self._home_bits - 1  # the bit the doubling moved from rem into the home
                self._insert(home | (rem & 1) << home_bit, rem >> 1, low)
                return

    def _delete(self, i: int) -> None:
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
        if self.rem_bits <= 0:
            raise TableError(
                "the idempotency table has grown until its slots keep no fingerprint bits above the home; "
                "size it at start (--idempotency-keys-expected)"
            )
        old, old_mask, count = self._slots, self._mask, self.count
        started = time.perf_counter()
        self._allocate(2 * len(old))
        self.rem_bits -= 1
        home_bit = self._home_bits - 1
        insert, slots = self._insert, self._slots
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
        self._doublings.append((reason, count, self.slots, self.rem_bits, round(time.perf_counter() - started, 3)))
