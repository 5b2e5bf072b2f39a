# cython: language_level=3
"""A member's lots (processor/program.py's ProgramState.lots), sorted soonest-expiring first: a tuple while
they are few, a LotChain once they grow past CHUNK_LOTS_MAX (a tuple again at CHAIN_LOTS_MIN or fewer), a
value the cyclic garbage collector does not track holding a tuple of chunks, tuples of at most
CHUNK_LOTS_MAX lots each.

Why: as one tuple, every change of a member's lots built a new tuple of all of them. A kernel run that
touched a member with 2,635 lots wrote 2,635 reference counts, the old tuple's release walked them again
and the collector's next young pass walked the new tuple: cheap in instructions (~15 a lot) and costly in
cache lines, and the lots a run copied grew with the members' history (0.7 an operation at batch 1 of the
bench, 15.4 at batch 40: docs/DESIGN.md, eleventh session). A change of a chain at the head (a spend
takes the soonest lots) or at the tail (an earn's new lot expires last) builds the chunks it changes (at
most CHUNK_LOTS_MAX lots, plus a small front a spend leaves) and a new tuple of the chunk references (the
member's lots / CHUNK_LOTS_MAX): the chunks it did not touch are shared with the chain before, which the
undo log keeps as it kept the old tuple (a chain is immutable, so a rollback restores it by reference).
Most members hold a few lots: their tuple is copied whole, as before, which costs less than a chain's
three objects (a chunk, the tuple of chunks, the chain) would.

The chain: `len`, iteration (and `reversed`), indexing (an int: O(1) at either end, else a walk of the
chunks; a slice: a tuple), `lots()` the flat tuple, `==` another chain or a tuple with the same lots
(whatever the chunks: two chains built by different paths compare equal when their lots are), `hash`,
pickling: a reader of a member's lots reads both forms alike. Chunks are never empty.

Building: `chained(lots)` (from a sorted sequence) and `spliced(lots, passed, head, tail)` (the first
`passed` lots replaced by `head`, then `tail` appended: every change the kernel's runs make, and the
per-operation path's spends, expiries and earns), each in the form its length calls for;
fastpath/kernel_rows.pyx calls `splice` in C. The twin of both is fastpath/lot_chain_reference.py, which
builds the same values (tests/unit/test_lot_chain.py compares them chunk for chunk and holds both to the
flat tuple they stand for). The class itself, like fastpath/records.pyx's, is a plain value and has no
twin: both implementations build it.

Why it is safe to leave untracked: it holds only a tuple of tuples of records.Lot (never a container of
its own), all built before it, so it can be part of no cycle. The tuples the builders make are untracked
when made (a tuple of records.Lot only, and the tuple of chunks once every chunk is): the collector would
untrack them at its next pass, after walking every lot of every new one; a tuple it could have to walk (a
chunk holding something else) stays tracked.
"""

cimport cython
from cpython.object cimport Py_EQ, Py_NE, Py_TYPE, PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM

from fastpath.records cimport Lot

from itertools import chain as _chain_iter


cdef extern from "Python.h":
    int PyObject_GC_IsTracked(object op)
    void PyObject_GC_UnTrack(void* op)

CHUNK_LOTS_MAX = 64  # lots a chunk holds at most: a change copies up to this many, plus lots / this many
cdef Py_ssize_t _CHUNK = 64
# A member's lots become a chain when they grow past CHUNK_LOTS_MAX, and a tuple again only at this many or
# fewer: a member holding about CHUNK_LOTS_MAX lots would otherwise change form at every earn and spend
CHAIN_LOTS_MIN = 32
cdef Py_ssize_t _CHAIN_MIN = 32


@cython.no_gc
@cython.final
cdef class LotChain:
    """A member's lots, sorted soonest-expiring first, in chunks of at most CHUNK_LOTS_MAX (the module's
    docstring says why and what the value supports)."""

    def __init__(self, chunks=()):
        cdef Py_ssize_t length = 0, size
        cdef tuple made = tuple(chunks)
        for chunk in made:
            if type(chunk) is not tuple:
                raise TypeError(f"a chunk of lots is a tuple, not {type(chunk).__name__}")
            size = len(<tuple>chunk)
            if size == 0 or size > _CHUNK:
                raise ValueError(f"a chunk holds 1 to {_CHUNK} lots, not {size}")
            length += size
        _untrack(made)
        self.chunks = made
        self.length = length

    def __len__(self):
        return self.length

    def __bool__(self):
        return self.length > 0

    def __iter__(self):
        return _chain_iter.from_iterable(self.chunks)

    def __reversed__(self):
        for chunk in reversed(self.chunks):
            yield from reversed(chunk)

    def __getitem__(self, index):
        cdef Py_ssize_t at, size
        cdef tuple chunk
        if isinstance(index, slice):
            return self.lots()[index]
        at = index
        if at < 0:
            at += self.length
        if at < 0 or at >= self.length:
            raise IndexError("LotChain index out of range")
        if at == self.length - 1:
            chunk = self.chunks[len(self.chunks) - 1]
            return chunk[len(chunk) - 1]
        for chunk in self.chunks:
            size = len(chunk)
            if at < size:
                return chunk[at]
            at -= size
        raise IndexError("LotChain index out of range")  # (its chunks disagree with its length)

    def lots(self):
        """The lots as one tuple."""
        if len(self.chunks) == 1:
            return self.chunks[0]
        return tuple(_chain_iter.from_iterable(self.chunks))

    def __richcmp__(self, other, int op):
        if op != Py_EQ and op != Py_NE:
            return NotImplemented
        if isinstance(other, LotChain):
            same = other is self or (
                (<LotChain>other).length == self.length and (<LotChain>other).lots() == self.lots())
        elif type(other) is tuple:
            same = len(<tuple>other) == self.length and other == self.lots()
        else:
            return NotImplemented
        return same if op == Py_EQ else not same

    def __hash__(self):
        return hash(self.lots())

    def __repr__(self):
        return f"LotChain({self.length} lots: {self.lots()!r})"

    def __reduce__(self):
        return (LotChain, (self.chunks,))


cdef bint _untracked(tuple chunk):
    # a chunk still tracked is untracked when it holds only records.Lot (which the collector does not
    # track): True when the chunk is untracked now
    if not PyObject_GC_IsTracked(chunk):
        return True
    for lot in chunk:
        if type(lot) is not Lot:
            return False
    PyObject_GC_UnTrack(<void*>chunk)
    return True


cdef void _untrack(tuple chunks):
    # the chunks, then the tuple of them once every one is untracked (O(new chunks' lots + chunks))
    cdef bint every = True
    for chunk in chunks:
        if not _untracked(<tuple>chunk):
            every = False
    if every and PyObject_GC_IsTracked(chunks):
        PyObject_GC_UnTrack(<void*>chunks)


cdef inline LotChain _made(tuple chunks, Py_ssize_t length):
    cdef LotChain made = LotChain.__new__(LotChain)
    _untrack(chunks)
    made.chunks = chunks
    made.length = length
    return made


cdef inline LotChain _made_of(tuple outer, Py_ssize_t length, bint every_untracked):
    # a chain of the new tuple `outer`, which the collector tracks; untracked when every chunk of it is
    # (known to the builder: new chunks untracked as made, shared ones from a chain whose tuple of chunks
    # is untracked), without reading each chunk's header again
    cdef LotChain made = LotChain.__new__(LotChain)
    if every_untracked:
        PyObject_GC_UnTrack(<void*>outer)
    else:
        _untrack(outer)
    made.chunks = outer
    made.length = length
    return made


cdef inline void _put(tuple into, Py_ssize_t at, object lot):
    Py_INCREF(lot)
    PyTuple_SET_ITEM(into, at, lot)


# --- copying lots by pointer (a borrowed item into a new tuple: one reference count written) ---

cdef extern from "Python.h":
    PyObject* _tuple_item "PyTuple_GET_ITEM"(PyObject* tuple, Py_ssize_t index)
    PyObject* _list_item "PyList_GET_ITEM"(PyObject* list, Py_ssize_t index)
    void _tuple_set "PyTuple_SET_ITEM"(PyObject* tuple, Py_ssize_t index, PyObject* item)
    void _incref "Py_INCREF"(PyObject* item)
    bint _is_list "PyList_CheckExact"(PyObject* item)


cdef enum:
    _SEGMENTS_MAX = 4


cdef struct _Cursor:
    # the items of up to _SEGMENTS_MAX slices of tuples or lists, read in order (the sequences borrowed:
    # the caller holds them)
    PyObject* sequences[_SEGMENTS_MAX]
    Py_ssize_t starts[_SEGMENTS_MAX]
    Py_ssize_t ends[_SEGMENTS_MAX]
    int count
    int segment
    Py_ssize_t position


cdef inline void _segment(_Cursor* cursor, object sequence, Py_ssize_t start, Py_ssize_t end):
    # (the callers add at most _SEGMENTS_MAX)
    if end > start:
        cursor.sequences[cursor.count] = <PyObject*>sequence
        cursor.starts[cursor.count] = start
        cursor.ends[cursor.count] = end
        if cursor.count == 0:
            cursor.position = start
        cursor.count += 1


cdef int _fill(tuple into, Py_ssize_t at, Py_ssize_t count, _Cursor* cursor, bint* lots_only) except -1:
    # into[at:at + count] = the cursor's next count items (references taken); lots_only[0] cleared when
    # one is not a records.Lot
    cdef PyObject* sequence
    cdef PyObject* item
    cdef PyTypeObject* lot_type = <PyTypeObject*>Lot
    while count:
        if cursor.segment >= cursor.count:
            raise ValueError("lots to copy run out: a chain's chunks disagree with its length")
        sequence = cursor.sequences[cursor.segment]
        if _is_list(sequence):
            item = _list_item(sequence, cursor.position)
        else:
            item = _tuple_item(sequence, cursor.position)
        if <PyTypeObject*>Py_TYPE(<object>item) != lot_type:
            lots_only[0] = False
        _incref(item)
        _tuple_set(<PyObject*>into, at, item)
        at += 1
        count -= 1
        cursor.position += 1
        if cursor.position == cursor.ends[cursor.segment]:
            cursor.segment += 1
            if cursor.segment < cursor.count:
                cursor.position = cursor.starts[cursor.segment]
    return 0


cdef tuple _copied(Py_ssize_t size, _Cursor* cursor, bint* untracked):
    # a new tuple of the cursor's next size items, untracked when they are all records.Lot (else
    # untracked[0] cleared)
    cdef tuple made = PyTuple_New(size)
    cdef bint lots_only = True
    _fill(made, 0, size, cursor, &lots_only)
    if lots_only:
        PyObject_GC_UnTrack(<void*>made)
    else:
        untracked[0] = False
    return made


cdef inline void _share(tuple into, Py_ssize_t at, tuple chunks, Py_ssize_t index):
    # into[at] = chunks[index] (one reference count written)
    cdef PyObject* chunk = _tuple_item(<PyObject*>chunks, index)
    _incref(chunk)
    _tuple_set(<PyObject*>into, at, chunk)


cdef void _put_rest(tuple outer, Py_ssize_t at, list tail, Py_ssize_t filled, bint* every_untracked):
    # the lots of `tail` after its first `filled` (which went into the last chunk) in new chunks of up to
    # _CHUNK lots, put into `outer` from chunk `at` on
    cdef _Cursor cursor
    cdef Py_ssize_t rest = len(tail) - filled, chunk_size
    cursor.count = cursor.segment = 0
    _segment(&cursor, tail, filled, len(tail))
    while rest:
        chunk_size = _CHUNK if rest >= _CHUNK else rest
        _put(outer, at, _copied(chunk_size, &cursor, every_untracked))
        at += 1
        rest -= chunk_size


cdef inline bint _copy_into(PyObject* into, Py_ssize_t at, PyObject* sequence, bint is_list, Py_ssize_t start,
                           Py_ssize_t end, PyTypeObject* lot_type):
    # into[at:] = sequence[start:end] (references taken); False when one of them is not a records.Lot
    cdef PyObject* item
    cdef bint lots_only = True
    cdef Py_ssize_t index
    for index in range(start, end):
        item = _list_item(sequence, index) if is_list else _tuple_item(sequence, index)
        if <PyTypeObject*>Py_TYPE(<object>item) != lot_type:
            lots_only = False
        _incref(item)
        _tuple_set(into, at, item)
        at += 1
    return lots_only


cdef tuple _flat(list head, object lots, Py_ssize_t passed, Py_ssize_t length, list tail):
    # head + lots[passed:] + tail as one tuple, untracked when of Lots
    cdef Py_ssize_t size = len(head) + length - passed + len(tail), at = 0, skip = passed, chunk_size
    cdef tuple made = PyTuple_New(size)
    cdef PyTypeObject* lot_type = <PyTypeObject*>Lot
    cdef bint lots_only = True
    cdef _Cursor cursor
    if type(lots) is tuple:  # (a member's few lots: no cursor)
        lots_only = _copy_into(<PyObject*>made, 0, <PyObject*>head, True, 0, len(head), lot_type)
        lots_only &= _copy_into(<PyObject*>made, len(head), <PyObject*>lots, False, passed, length, lot_type)
        lots_only &= _copy_into(<PyObject*>made, size - len(tail), <PyObject*>tail, True, 0, len(tail), lot_type)
        if lots_only:
            PyObject_GC_UnTrack(<void*>made)
        return made
    cursor.count = cursor.segment = 0
    _segment(&cursor, head, 0, len(head))
    _fill(made, at, len(head), &cursor, &lots_only)
    at += len(head)
    for chunk in (<LotChain>lots).chunks:
        chunk_size = len(<tuple>chunk)
        if skip >= chunk_size:
            skip -= chunk_size
            continue
        cursor.count = cursor.segment = 0
        _segment(&cursor, chunk, skip, chunk_size)
        _fill(made, at, chunk_size - skip, &cursor, &lots_only)
        at += chunk_size - skip
        skip = 0
    cursor.count = cursor.segment = 0
    _segment(&cursor, tail, 0, len(tail))
    _fill(made, at, len(tail), &cursor, &lots_only)
    at += len(tail)
    if at != size:
        raise ValueError(f"{at} lots written of {size}: a chain's chunks disagree with its length")
    if lots_only:
        PyObject_GC_UnTrack(<void*>made)
    return made


cdef inline void _append_chunks(list chunks, list lots, Py_ssize_t start):
    # lots[start:] as chunks of _CHUNK, in order
    cdef Py_ssize_t count = len(lots), end
    while start < count:
        end = start + _CHUNK if start + _CHUNK < count else count
        chunks.append(tuple(lots[start:end]))
        start = end


def chained(lots):
    """A member's lots (sorted soonest-expiring first) as ProgramState holds them: a tuple of at most
    CHUNK_LOTS_MAX lots, else a LotChain in full chunks from the head."""
    cdef list items = list(lots)
    cdef list chunks = []
    if len(items) <= _CHUNK:
        return _flat(items, (), 0, 0, [])
    _append_chunks(chunks, items, 0)
    return _made(tuple(chunks), len(items))


cdef object splice(object lots, Py_ssize_t passed, list head, list tail):
    """`lots` (a member's: a tuple of at most CHUNK_LOTS_MAX, or a LotChain) with its first `passed` lots
    replaced by `head` and `tail` appended (in the form `spliced` says); of a chain, the chunks the change
    does not reach are shared. The same value as the twin's spliced (a chain: the same chunks)."""
    cdef tuple chunks, outer
    cdef Py_ssize_t length, count, index, offset, size, room, front, front_chunks, middle, filled, rest, at
    cdef Py_ssize_t chunk_size
    cdef bint every_untracked
    cdef list grown
    if type(lots) is LotChain:
        chunks = (<LotChain>lots).chunks
        length = (<LotChain>lots).length
    elif type(lots) is tuple and len(<tuple>lots) <= _CHUNK:
        chunks = ()
        length = len(<tuple>lots)
    else:
        raise TypeError(f"a member's lots are a tuple of at most {_CHUNK} or a LotChain, not "
                        f"{type(lots).__name__} of {len(lots)}")
    if passed < 0 or passed > length:
        raise ValueError(f"{passed} lots passed of {length}")
    if not passed and not head and not tail:
        return lots
    size = length - passed + len(head) + len(tail)
    if size <= _CHAIN_MIN or (size <= _CHUNK and type(lots) is tuple):  # one tuple, as most members' lots are
        return _flat(head, lots, passed, length, tail)
    if type(lots) is tuple:  # grown past a chunk: chained
        grown = list(head)
        grown.extend((<tuple>lots)[passed:])
        grown.extend(tail)
        return chained(grown)
    count = len(chunks)
    if not passed and not head and count:  # only appended to (an earn's new lots): the last chunk is new
        return _appended(chunks, count, size, tail)
    # the chunks the passed lots cover whole, then how many of the next one they cover
    index = 0
    offset = passed
    while index < count and offset >= len(<tuple>chunks[index]):
        offset -= len(<tuple>chunks[index])
        index += 1
    # the front: head, the rest of a chunk the passed lots end inside, and the next chunk when all of it
    # fits in one chunk with them; in chunks of _CHUNK
    cdef _Cursor cursor
    cursor.count = cursor.segment = 0
    _segment(&cursor, head, 0, len(head))
    front = len(head)
    if offset:
        _segment(&cursor, chunks[index], offset, len(<tuple>chunks[index]))
        front += len(<tuple>chunks[index]) - offset
        index += 1
    if front and index < count and front + len(<tuple>chunks[index]) <= _CHUNK:
        _segment(&cursor, chunks[index], 0, len(<tuple>chunks[index]))  # a small front joins the next chunk
        front += len(<tuple>chunks[index])
        index += 1
    front_chunks = (front + _CHUNK - 1) // _CHUNK
    middle = count - index  # shared
    # the tail: into the last chunk up to _CHUNK lots, the rest in new chunks
    filled = 0
    if tail:
        if middle:
            room = _CHUNK - len(<tuple>chunks[count - 1])
        elif front_chunks:
            room = _CHUNK - (front - (front_chunks - 1) * _CHUNK)
        else:
            room = 0
        filled = room if room < len(tail) else len(tail)
    rest = len(tail) - filled
    outer = PyTuple_New(front_chunks + middle + (rest + _CHUNK - 1) // _CHUNK)
    every_untracked = not PyObject_GC_IsTracked(chunks)  # (then so is every chunk shared from it)
    at = 0
    if filled and not middle:  # the last front chunk takes them
        _segment(&cursor, tail, 0, filled)
    for at in range(front_chunks):
        chunk_size = _CHUNK if at < front_chunks - 1 else front - at * _CHUNK + (filled if not middle else 0)
        _put(outer, at, _copied(chunk_size, &cursor, &every_untracked))
    at = front_chunks
    for index in range(index, count):
        if filled and middle and index == count - 1:
            cursor.count = cursor.segment = 0
            _segment(&cursor, chunks[index], 0, len(<tuple>chunks[index]))
            _segment(&cursor, tail, 0, filled)
            _put(outer, at, _copied(len(<tuple>chunks[index]) + filled, &cursor, &every_untracked))
        else:
            _share(outer, at, chunks, index)
        at += 1
    _put_rest(outer, at, tail, filled, &every_untracked)
    return _made_of(outer, size, every_untracked)


cdef LotChain _appended(tuple chunks, Py_ssize_t count, Py_ssize_t size, list tail):
    # the chain of `chunks` (count of them, size lots in all after) with `tail` appended: its last chunk
    # filled up to a chunk's lots, the rest in new chunks; the other chunks shared (as splice's general
    # path leaves them, without its walk to the passed lots)
    cdef tuple last = chunks[count - 1]
    cdef Py_ssize_t last_count = len(last), added = len(tail), room = _CHUNK - last_count, index
    cdef Py_ssize_t rest, filled
    cdef tuple outer
    cdef bint every_untracked = not PyObject_GC_IsTracked(chunks)  # (then so is every chunk shared from it)
    cdef _Cursor cursor
    filled = room if room < added else added  # of tail, into the last chunk
    rest = added - filled
    outer = PyTuple_New(count + (rest + _CHUNK - 1) // _CHUNK)
    for index in range(count - 1):
        _share(outer, index, chunks, index)
    if filled:
        cursor.count = cursor.segment = 0
        _segment(&cursor, last, 0, last_count)
        _segment(&cursor, tail, 0, filled)
        _put(outer, count - 1, _copied(last_count + filled, &cursor, &every_untracked))
    else:
        _share(outer, count - 1, chunks, count - 1)
    _put_rest(outer, count, tail, filled, &every_untracked)
    return _made_of(outer, size, every_untracked)


def spliced(lots, Py_ssize_t passed, head, tail):
    """A member's `lots` (a tuple of at most CHUNK_LOTS_MAX, or a LotChain) with its first `passed` lots
    replaced by `head` (sorted, all before the lots that follow) and `tail` appended (sorted, all after
    them): a tuple of CHAIN_LOTS_MIN lots or fewer, or of up to CHUNK_LOTS_MAX when `lots` is a tuple; else a
    chain, which shares the chunks of `lots` the change does not reach."""
    return splice(lots, passed, list(head), list(tail))
