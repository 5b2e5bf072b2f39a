# Objects of a slots class built and read from C through their member descriptors' offsets: the one
# place fastpath/intake.pyx (Operation), fastpath/_core.pyx (Outcome; reads of Operation, Outcome and
# MerchantRow) and fastpath/records.pyx (the member descriptors it makes) take these C declarations from.
#
# Why: a slot of a @dataclass(slots=True) is a PyObject* at a fixed offset in its objects. Calling the
# dataclass's __init__ from C costs a Python call (~0.2 µs for Outcome, ~0.5 µs for Operation's twenty
# fields); reading a slot by generic getattr from Cython costs ~60 instructions (a type look-up, the
# descriptor's call), where the interpreter's specialised LOAD_ATTR_SLOT costs ~10. At the offset, a store
# or a read is a few instructions.
#
# Why it is safe: an offset is used only for the class it was read from, and only after checking that
# the name is a member descriptor of that class's own (T_OBJECT_EX: an object slot, unset = NULL), so
# the object at that offset is what getattr would answer. A builder (slot_offsets) also checks that its
# names are exactly the dataclass's fields in order and that there is no __post_init__ (it runs no
# __init__): a field added or renamed fails where the layout is read, with a message naming it. A reader
# (SlotReader) compares the object's exact type with the laid-out class at every read; any other type,
# an unset slot, or a class whose slots do not fit, is read by getattr, with getattr's answer or error.
#
# Only inline functions here (no slots.pyx): every user compiles its own copy, no import between modules.

from cpython.object cimport Py_TYPE, PyObject, PyTypeObject
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF


cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        const char* name
        int type
        Py_ssize_t offset
        int flags
        const char* doc
    ctypedef struct PyDescrObject:
        PyTypeObject* d_type
    ctypedef struct PyMemberDescrObject:
        PyDescrObject d_common
        PyMemberDef* d_member
    ctypedef PyObject* (*allocfunc)(PyTypeObject*, Py_ssize_t)
    ctypedef PyObject* (*getattrofunc)(PyObject*, PyObject*)
    # the two slots of PyTypeObject used here (Cython's cpython.object declares neither)
    ctypedef struct SlotsType "PyTypeObject":
        allocfunc tp_alloc
        getattrofunc tp_getattro
    PyTypeObject PyMemberDescr_Type
    PyObject* _generic_getattr "PyObject_GenericGetAttr"(PyObject*, PyObject*)
    PyObject* _tuple_item "PyTuple_GET_ITEM"(object, Py_ssize_t)

cdef extern from "structmember.h":
    int T_OBJECT_EX
    int READONLY


# --- the layout ---

cdef inline str slot_problem(type cls, tuple names, Py_ssize_t* offsets):
    """None when every one of `names` is an object slot of `cls`'s own (its offsets written to
    offsets[0..len(names))); else what is wrong, naming the first field that does not fit."""
    cdef PyTypeObject* kind = <PyTypeObject*>cls
    cdef PyMemberDescrObject* member
    cdef Py_ssize_t index, offset
    for index in range(len(names)):
        name = names[index]
        descriptor = cls.__dict__.get(name)
        if descriptor is None or Py_TYPE(descriptor) != &PyMemberDescr_Type:
            return f"{cls.__qualname__}.{name} is not a slot of its own (a @dataclass(slots=True) field)"
        member = <PyMemberDescrObject*>descriptor
        offset = member.d_member.offset
        if (member.d_common.d_type != kind or member.d_member.type != T_OBJECT_EX
                or offset < <Py_ssize_t>sizeof(PyObject)
                or offset > kind.tp_basicsize - <Py_ssize_t>sizeof(PyObject*)):
            return f"{cls.__qualname__}.{name} is not an object slot (T_OBJECT_EX) inside its objects"
        offsets[index] = offset
    return None


cdef inline int slot_offsets(type cls, tuple names, Py_ssize_t* offsets, str user) except -1:
    """For building `cls`'s objects in C (new_with_slots, then put every slot): reads the offsets of
    `names`, which must be exactly cls's dataclass fields in order, every one an object slot, and no
    __post_init__ (nothing of __init__ runs). TypeError naming the field otherwise; `user` says where
    the names are kept (what to update)."""
    import dataclasses  # at layout time only

    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a slots dataclass; {user} expects one with the fields {names}")
    fields = tuple([field.name for field in dataclasses.fields(cls)])  # no generator: not in a .pxd
    if fields != names:
        for index in range(max(len(fields), len(names))):
            found = repr(fields[index]) if index < len(fields) else "missing"
            wanted = repr(names[index]) if index < len(names) else "nothing"
            if found != wanted:
                raise TypeError(
                    f"{cls.__qualname__}'s fields (its slots, in order) are {fields}, not {user}'s: "
                    f"field {index} is {found} where {user} has {wanted}; update {user} and the code that stores them")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__qualname__} has a __post_init__, which objects built by {user} would skip")
    problem = slot_problem(cls, names, offsets)
    if problem is not None:
        raise TypeError(f"{problem}; {user} stores its slots by offset")
    return 0


# --- building ---

cdef inline object new_with_slots(type cls):
    """An object of `cls` as object.__new__ makes it (tp_alloc: zeroed, tracked by the cyclic collector
    when cls is), every slot NULL (unset): the caller puts every one before anyone else sees it."""
    cdef PyObject* made = (<SlotsType*>cls).tp_alloc(<PyTypeObject*>cls, 0)
    if made == NULL:
        raise MemoryError(f"cannot allocate a {cls.__qualname__}")
    instance = <object>made  # a reference of its own: the allocation's is given up here
    Py_DECREF(instance)
    return instance


cdef inline void put(object instance, Py_ssize_t offset, object value) noexcept:
    """instance's slot at `offset` (from slot_offsets of its exact class) = value: a reference taken,
    the previous value's (NULL in a new object) released after the store, as a slot's setter does."""
    cdef PyObject** slot = <PyObject**>((<char*><PyObject*>instance) + offset)
    cdef PyObject* old = slot[0]
    Py_INCREF(value)
    slot[0] = <PyObject*>value
    Py_XDECREF(old)


# --- reading ---

cdef enum:
    SLOT_READER_NAMES_MAX = 8


cdef struct SlotReader:
    # One per (module, names): the class last seen, laid out for `names`; a static, zero before use.
    PyObject* kind  # the class last laid out (a reference held, so its address is never reused), or NULL
    PyTypeObject* fast  # == kind when its objects are read by offset; NULL when by getattr
    Py_ssize_t offsets[SLOT_READER_NAMES_MAX]


cdef inline int slot_reader_layout(SlotReader* reader, type cls, tuple names) except -1:
    """Lays `reader` out for cls: by offset when every name is an object slot of its own and cls reads
    attributes the generic way (no __getattribute__ or __getattr__), else by getattr."""
    cdef Py_ssize_t offsets[SLOT_READER_NAMES_MAX]
    cdef Py_ssize_t index
    cdef PyObject* old = reader.kind
    if len(names) > SLOT_READER_NAMES_MAX:
        raise ValueError(f"a SlotReader reads at most {SLOT_READER_NAMES_MAX} names, not {len(names)}")
    fast = ((<SlotsType*>cls).tp_getattro == <getattrofunc>_generic_getattr
            and slot_problem(cls, names, offsets) is None)
    Py_INCREF(cls)
    reader.kind = <PyObject*>cls
    reader.fast = NULL
    Py_XDECREF(old)
    if fast:
        for index in range(len(names)):
            reader.offsets[index] = offsets[index]
        reader.fast = <PyTypeObject*>cls
    return 0


cdef extern from *:
    """
    /* fastpath/slots.pxd. The read at every call site: the slot (borrowed) when the object's exact type is
       `fast` and the slot is set, else NULL. The rest is behind a call gcc does not inline (the cold path
       inlined into one function made that function too big to inline at ~20 call sites: callgrind showed
       slot_read as its own function, ~24 instructions a read with the call). */
    static CYTHON_INLINE PyObject* fastpath_slot_at(PyObject* instance, PyTypeObject* fast, Py_ssize_t offset) {
        if (Py_TYPE(instance) != fast) return NULL;
        return *(PyObject**)((char*)instance + offset);
    }
    typedef PyObject* (*fastpath_slot_slow_t)(void*, PyObject*, Py_ssize_t, PyObject*);
    #if defined(__GNUC__)
    __attribute__((noinline, cold))
    #endif
    static PyObject* fastpath_slot_cold(fastpath_slot_slow_t slow, void* reader, PyObject* instance,
                                        Py_ssize_t index, PyObject* names) {
        return slow(reader, instance, index, names);
    }
    """
    ctypedef PyObject* (*fastpath_slot_slow_t)(void*, PyObject*, Py_ssize_t, PyObject*)
    PyObject* _slot_at "fastpath_slot_at"(object instance, PyTypeObject* fast, Py_ssize_t offset)
    object _slot_cold "fastpath_slot_cold"(fastpath_slot_slow_t slow, void* reader, object instance, Py_ssize_t index,
                                           object names)


cdef inline object _slot_read_slow(void* memory, object instance, Py_ssize_t index, object names):
    # another class than the last (laid out now), or not read by offset, or the slot unset (getattr's
    # AttributeError names it)
    cdef SlotReader* reader = <SlotReader*>memory
    cdef PyObject* value
    if <PyObject*>Py_TYPE(instance) != reader.kind:
        slot_reader_layout(reader, type(instance), names)
        value = _slot_at(instance, reader.fast, reader.offsets[index])
        if value != NULL:
            return <object>value
    return getattr(instance, <object>_tuple_item(names, index))


cdef inline object slot_read(SlotReader* reader, object instance, Py_ssize_t index, tuple names):
    """getattr(instance, names[index]): by offset when instance's exact class is the one laid out and
    the slot is set (a few instructions), else the cold path, which lays out a new class and falls back
    to getattr. `names` is the same tuple at every call with this reader."""
    cdef PyObject* value = _slot_at(instance, reader.fast, reader.offsets[index])
    if value != NULL:
        return <object>value
    return _slot_cold(<fastpath_slot_slow_t>_slot_read_slow, reader, instance, index, names)
