# cython: auto_pickle=False, autotestdict=False
"""The idempotency table's slots and probes in C: a quotienting Robin Hood hash table of 64-bit slots,
walked per key without a Python operation on the way (processor/idempotency.py says what the table is
for, why it may err only towards "maybe stored", and the slot layout this module keeps bit for bit).

Why: in Python the table cost 3-6 µs per operation in the service (py-spy, loadtest.budget: the walks
of maybe_stored and add, and a third of it the doublings, ~1 s of rehash per million keys with the
committer stopped); here a batch's look-up and add are one crossing each, and a doubling ~30 ms per
million keys (loadtest/idempotency_table.py).

`Table` holds the slots (an `array('Q')`, `slots_array`), their count and the geometry (home bits,
rem bits); the caller (processor/idempotency.py) holds the rest: the newest batch id (given to
maybe_stored to rebuild ids from their low 32 bits), the epoch of the purge, the batch id checks and
the log lines of a doubling (add returns the doublings it made). `fingerprint` None is the default
fingerprint, Python's hash of the (merchant_id, key) tuple taken in C; any other callable is called
per key with (merchant_id, key) and its result's low 64 bits are used. A table that cannot keep its
invariants raises TableError (the caller raises it as an InvariantViolation).

fastpath/idempotency_reference.py is the pure-Python twin, slot for slot the same: the differential
test (tests/unit/test_idempotency_table.py) runs both and compares their arrays.
"""

import time

from cpython cimport array
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.list cimport PyList_Append
from cpython.long cimport PyLong_AsUnsignedLongLongMask
from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint64_t

import array as _array

SLOTS_MIN = 1 << 16  # 512 KiB: the table of a service with few keys
# Grown (doubled and rehashed) beyond this share of slots used: Robin Hood probing stays short (a miss
# stops at the first entry nearer its home than the walk is; the longest distance at 0.75 on 2**20 slots
# is about 20, see the tests) and 30 million keys fit in 2**26 slots = 512 MiB (0.45 full).
LOAD_MAX = 0.75
DIST_MAX = 254  # the farthest an entry may sit from its home; one farther grows the table
REM_BITS = 24  # the fingerprint bits a slot keeps above the home bits, after a reset
GROW_LOAD = "load"
GROW_DISTANCE = "an entry would sit farther than DIST_MAX from its home"

# a slot: bits 0-31 the batch id mod 2**32, bits 32-39 the distance from home plus one (0 = empty),
# bits 40-63 the rem
cdef uint64_t LOW = 0xFFFFFFFF
cdef int DIST_SHIFT = 32
cdef uint64_t DIST_BYTE = 0xFF
cdef uint64_t ONE_FARTHER = 1ULL << 32  # one more step from home in a slot's distance byte
cdef int REM_SHIFT = 40
cdef uint64_t NEAR_LIMIT = 254 + 1  # DIST_MAX + 1: the largest distance byte an entry may have
cdef array.array TEMPLATE = _array.array("Q")
cdef double LOAD = LOAD_MAX
cdef enum:
    CHUNK = 64  # keys fingerprinted (and their homes prefetched) before they are walked


cdef extern from *:
    void __builtin_prefetch(const void* address) noexcept nogil


class TableError(Exception):
    """The table cannot keep its invariants (a fingerprint crowding one home slot, growth past its last
    rem bit): a bug or a misconfiguration, never a wrong answer."""


cdef inline bint _place(uint64_t* slots, uint64_t mask, uint64_t* home, uint64_t* rem, uint64_t* low) noexcept nogil:
    """Places an entry: each slot on the way goes to whichever of the carried entry and its occupant is
    farther from home (Robin Hood), the other is carried on. Returns True, with the carried entry's home,
    rem and low bits written back (it is not in the table), when it would sit farther than DIST_MAX."""
    cdef uint64_t i = home[0], near = 1, value = rem[0] << REM_SHIFT | low[0], found, found_near
    while True:
        found = slots[i]
        if found == 0:
            slots[i] = value | near << DIST_SHIFT
            return False
        found_near = (found >> DIST_SHIFT) & DIST_BYTE
        if found_near < near:  # the occupant is nearer its home: it gives up the slot
            slots[i] = value | near << DIST_SHIFT
            value = found ^ found_near << DIST_SHIFT
            near = found_near
        i = (i + 1) & mask
        near += 1
        if near > NEAR_LIMIT:
            home[0] = (i - NEAR_LIMIT) & mask
            rem[0] = value >> REM_SHIFT
            low[0] = value & LOW
            return True


cdef class Table:
    """The slots of the idempotency table (the module's docstring)."""

    cdef array.array _array
    cdef uint64_t* _data
    cdef uint64_t _mask
    cdef int _home_bits
    cdef Py_ssize_t _grow_at
    cdef readonly Py_ssize_t count
    cdef readonly int rem_bits
    cdef list _doublings  # (reason, keys, slots, rem_bits, seconds) of each doubling not yet returned

    def __init__(self, Py_ssize_t slots=SLOTS_MIN):
        """`slots` rounded up to a power of two (at least 2); below SLOTS_MIN only in tests."""
        self._allocate(slots)
        self.rem_bits = REM_BITS
        self._doublings = []

    cdef int _allocate(self, Py_ssize_t slots) except -1:
        cdef Py_ssize_t size = 2
        cdef int bits = 1
        while size < slots:
            size <<= 1
            bits += 1
        self._array = array.clone(TEMPLATE, size, True)
        self._data = <uint64_t*>self._array.data.as_ulonglongs
        self._mask = <uint64_t>size - 1
        self._home_bits = bits
        self.count = 0
        self._grow_at = <Py_ssize_t>(size * LOAD)
        return 0

    @property
    def slots(self):
        return <Py_ssize_t>self._mask + 1

    @property
    def slots_array(self):
        """The slots themselves (read them, never write: tests and measures)."""
        return self._array

    @property
    def memory_bytes(self):
        return 8 * (<Py_ssize_t>self._mask + 1)

    def dist_max(self):
        """The farthest any entry sits from its home slot (a scan of every slot: for tests and measures)."""
        cdef uint64_t i, near, farthest = 0
        for i in range(self._mask + 1):
            near = (self._data[i] >> DIST_SHIFT) & DIST_BYTE
            if near > farthest:
                farthest = near
        return <int>farthest - 1

    def reset(self, Py_ssize_t expected=0):
        """Empties the table, sized so that `expected` entries fill at most half of it."""
        self._allocate(max(2 * expected, SLOTS_MIN))
        self.rem_bits = REM_BITS

    cdef inline int _fingerprint(self, object pair, object fingerprint, uint64_t* out) except -1:
        if fingerprint is None:
            out[0] = <uint64_t>hash(pair)  # tuplehash in C: the element hashes (cached by str) combined
        else:
            merchant_id, key = pair
            out[0] = PyLong_AsUnsignedLongLongMask(fingerprint(merchant_id, key))
        return 0

    # --- questions ---

    cdef int _fingerprints(self, list pairs, Py_ssize_t start, Py_ssize_t end, object fingerprint, uint64_t* prints) except -1:
        """The fingerprints of pairs[start:end] into prints[0:end - start], each key's home slot
        prefetched: the walks that follow find most homes in cache (a home is a random slot of a table
        of up to 512 MiB; one miss at a time cost ~100 ns a key at 1M keys, measured)."""
        cdef Py_ssize_t j
        for j in range(start, end):
            self._fingerprint(pairs[j], fingerprint, &prints[j - start])
            __builtin_prefetch(&self._data[prints[j - start] & self._mask])
        return 0

    def maybe_stored(self, keys, int64_t newest, fingerprint=None):
        """The keys that may have a stored record, each with the batch ids whose rows may hold it (ids
        rebuilt as the newest at or below `newest` with the slot's low 32 bits); every other key is new."""
        cdef list pairs = list(keys)  # a copy: a fingerprint function (Python) cannot resize it under the walk
        cdef dict hits = {}
        cdef uint64_t prints[CHUNK]
        cdef uint64_t print_, i, value, upper, near, wanted, mask
        cdef uint64_t* slots
        cdef int64_t batch_id
        cdef Py_ssize_t start, end, j, count = len(pairs)
        cdef PyObject* found
        end = 0
        while end < count:  # chunk by chunk
            start, end = end, min(end + CHUNK, count)
            self._fingerprints(pairs, start, end, fingerprint, prints)
            slots, mask = self._data, self._mask  # after the fingerprints: Python code may run in them
            for j in range(start, end):
                print_ = prints[j - start]
                i = print_ & mask
                value = slots[i]
                if value == 0:  # an empty home: most misses end here (half the keys at 0.5 full)
                    continue
                # a slot's upper 32 bits as they would be for this key at distance + 1 = `near`: equal
                # means an entry with this home and this rem; `near` and `wanted` step together
                near = 1
                wanted = ((print_ >> self._home_bits) & ((1ULL << self.rem_bits) - 1)) << 8 | 1
                while True:
                    upper = value >> DIST_SHIFT
                    if upper & DIST_BYTE < near:  # empty, or an entry nearer its home: the key is not further
                        break
                    if upper == wanted:  # same home and rem: every entry is a candidate
                        batch_id = newest - <int64_t>((<uint64_t>newest - value) & LOW)
                        pair = pairs[j]
                        found = PyDict_GetItem(hits, pair)
                        if found == NULL:
                            PyDict_SetItem(hits, pair, [batch_id])
                        elif batch_id not in <list>found:
                            PyList_Append(<list>found, batch_id)
                    near += 1
                    wanted += 1
                    i = (i + 1) & mask
                    value = slots[i]
        return hits

    # --- changes ---

    def add(self, int64_t batch_id, keys, fingerprint=None):
        """One entry per key, in batch `batch_id` (its low 32 bits kept). Returns the doublings it made,
        (reason, keys, slots, rem_bits, seconds) each, or None (the caller logs them)."""
        cdef list pairs = list(keys)  # a copy: a fingerprint function (Python) cannot resize it under the walk
        cdef uint64_t prints[CHUNK]
        cdef uint64_t low = <uint64_t>batch_id & LOW, print_, home, rem
        cdef Py_ssize_t start, end, j, count = len(pairs)
        end = 0
        while end < count:  # chunk by chunk
            start, end = end, min(end + CHUNK, count)
            self._fingerprints(pairs, start, end, fingerprint, prints)
            for j in range(end - start):
                if self.count >= self._grow_at:
                    self._grow(GROW_LOAD)
                print_ = prints[j]
                home = print_ & self._mask
                rem = (print_ >> self._home_bits) & ((1ULL << self.rem_bits) - 1)
                if self._data[home] == 0:  # an empty home (most keys below 0.5 full)
                    self._data[home] = rem << REM_SHIFT | ONE_FARTHER | low
                else:
                    self._insert(home, rem, low)
                self.count += 1
        return self._take_doublings()

    def remove(self, batches, fingerprint=None):
        """Drops one entry of each (batch id, its keys) pair's keys in that batch, if there is one.
        Returns the entries dropped."""
        cdef Py_ssize_t dropped = 0, i
        cdef uint64_t low, print_
        for batch_id, keys in batches:
            low = <uint64_t>(<int64_t>batch_id) & LOW
            for pair in keys:
                self._fingerprint(pair, fingerprint, &print_)
                i = self._find(
                    print_ & self._mask, (print_ >> self._home_bits) & ((1ULL << self.rem_bits) - 1), low
                )
                if i >= 0:
                    self._delete(<uint64_t>i)
                    dropped += 1
        return dropped

    def _take_doublings(self):
        if not self._doublings:
            return None
        done, self._doublings = self._doublings, []
        return done

    # --- the Robin Hood table ---

    cdef Py_ssize_t _find(self, uint64_t home, uint64_t rem, uint64_t low) noexcept:
        """The slot of the entry (home, rem, batch id's low bits), or -1."""
        cdef uint64_t i = home, near = 1, found, mask = self._mask
        cdef uint64_t value = rem << REM_SHIFT | ONE_FARTHER | low
        while True:
            found = self._data[i]
            if (found >> DIST_SHIFT) & DIST_BYTE < near:
                return -1
            if found == value:
                return <Py_ssize_t>i
            near += 1
            value += ONE_FARTHER
            i = (i + 1) & mask

    cdef int _insert(self, uint64_t home, uint64_t rem, uint64_t low) except -1:
        """Places an entry (the caller counts it); a carried entry about to sit farther than DIST_MAX
        grows the table and goes on from its home there."""
        while _place(self._data, self._mask, &home, &rem, &low):
            if self.count < <Py_ssize_t>((self._mask + 1) >> 3):
                raise TableError(
                    f"{DIST_MAX + 1} idempotency entries crowd one run in a table {self.count} / "
                    f"{self._mask + 1} full: the fingerprint function gives many keys one home; use a 64-bit hash"
                )
            self._grow(GROW_DISTANCE)
            home |= (rem & 1) << (self._home_bits - 1)  # the bit the doubling moved from rem into the home
            rem >>= 1
        return 0

    cdef void _delete(self, uint64_t i) noexcept:
        """Empties slot i and shifts back, one slot nearer their home, the entries after it that are not
        at their home (backward shift: the run stays ordered by home, with no gap)."""
        cdef uint64_t j, value, mask = self._mask
        cdef uint64_t* slots = self._data
        while True:
            j = (i + 1) & mask
            value = slots[j]
            if (value >> DIST_SHIFT) & DIST_BYTE <= 1:  # empty, or at its home: the run ends here
                break
            slots[i] = value - ONE_FARTHER
            i = j
        slots[i] = 0
        self.count -= 1

    cdef int _grow(self, str reason) except -1:
        """Doubles the table: an entry's home is its slot minus its distance; its new home takes the
        lowest rem bit as the new top home bit, and rem keeps the bits above (rem_bits drops by one)."""
        if self.rem_bits <= 0:
            raise TableError(
                "the idempotency table has grown until its slots keep no fingerprint bits above the home; "
                "size it at start (--idempotency-keys-expected)"
            )
        cdef array.array old = self._array  # kept alive until every entry is moved
        cdef uint64_t* old_data = self._data
        cdef uint64_t old_mask = self._mask, i, value, home, rem, low, home_bit
        cdef Py_ssize_t count = self.count
        started = time.perf_counter()
        self._allocate(2 * (<Py_ssize_t>old_mask + 1))
        self.rem_bits -= 1
        home_bit = self._home_bits - 1
        cdef uint64_t* slots = self._data
        cdef uint64_t mask = self._mask
        for i in range(old_mask + 1):
            value = old_data[i]
            if value:
                home = (i - ((value >> DIST_SHIFT) & DIST_BYTE) + 1) & old_mask
                rem = value >> REM_SHIFT
                home |= (rem & 1) << home_bit
                rem >>= 1
                low = value & LOW
                if slots[home] == 0:  # most entries
                    slots[home] = rem << REM_SHIFT | ONE_FARTHER | low
                elif _place(slots, mask, &home, &rem, &low):
                    # never: the entries homed in a window of the new table are a subset of those homed
                    # in a window as long of the old one
                    raise TableError("an idempotency entry would sit farther from home after a doubling than before it")
        self.count = count
        self._doublings.append(
            (reason, count, <Py_ssize_t>mask + 1, self.rem_bits, round(time.perf_counter() - started, 3))
        )
        return 0
