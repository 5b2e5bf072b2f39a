# cython: language_level=3
"""The per-earn records of the program rules (processor/rules.py: Lot, Grant, Earn; processor/program.py:
EarnRecord, and MemberRules, one per member) as values Python's cyclic garbage collector does not track.

Why: they live as long as their lot or their earn's refund window, about three per earn (docs/DESIGN.md
section 4, "The p99 at half load moved with the mode..."): as frozen slots dataclasses every one of
them was walked by each full (gen2) collection, ~0.4 µs an object, 37-104 ms a pass after 31,000
operations with the program. An object the collector does not track is never walked; a tuple holding
only such objects is untracked by the collector at its next pass (CPython's _PyTuple_MaybeUntrack), so
a member's tuple of lots and an earn's tuple of grants follow.

Why it is safe: `no_gc` means a cycle through one of these objects would never be collected (a leak,
never a crash). They hold only ints, strs, None, tuples and one another (an EarnRecord its Earn, an
Earn a tuple of Grants, a MemberRules a tuple of (day, amount) int pairs), all immutable and made before
the record that holds them, so they can form no cycle; what a field holds is not checked (as the
dataclasses did not), so a caller putting a list in one and the record in that list would leak both.

The Python API is the dataclasses': construction by position or keyword with the same defaults,
attribute access, frozen (setting any attribute raises AttributeError), __eq__ (same class, fields
equal), __hash__ (of the fields' tuple), __repr__ and pickling as theirs; no ordering. Instead of
dataclasses.replace (which needs a dataclass) each has `replace(**changes)`, keyword-only. `_fields`
(and `__match_args__`) names the fields in order, which processor/batch_log.py's columns and fingerprint
read. fastpath/_core.pyx builds them in C through the inline constructors of records.pxd (no __init__).
They need no pure-Python twin: they are plain values, and tests/unit/test_records.py checks that they
behave as the dataclasses did.
"""

cimport cython
from cpython.object cimport Py_EQ, PyObject, PyObject_RichCompareBool, PyTypeObject
from libc.stdlib cimport calloc

from fastpath.slots cimport READONLY, T_OBJECT_EX, PyMemberDef


cdef extern from "Python.h":
    object PyDescr_NewMember(PyTypeObject* type, PyMemberDef* member)
    void PyType_Modified(PyTypeObject* type)
    int PyDict_SetItem(PyObject* mapping, object key, object value) except -1


cdef object _KEEP = object()  # a field replace() was not given: kept as it is
_MEMBER_NAMES = []  # the C strings the member descriptors point to, kept alive with the module


cdef inline bint _equal(object a, object b) except -1:
    # as a tuple compares its items: identity first, then ==
    return PyObject_RichCompareBool(a, b, Py_EQ)


@cython.no_gc
cdef class Lot:
    """Points credited by one transaction (lot_id = its transaction id), `amount` of them left,
    expiring at expires_at_us (None: never), issued by issuer_id (a merchant, or the operator's
    merchant id for operator-funded points), to which breakage is attributed. A lot is keyed by
    (lot_id, expires_at_us): a restored part given a grace period is a second lot with the same id.
    A consumption is a list of Lot pieces: which lot, how much (`(piece.lot_id, piece.amount)`)."""

    _fields = ("lot_id", "amount", "expires_at_us", "issuer_id")
    __match_args__ = _fields

    def __init__(self, lot_id, amount, expires_at_us, issuer_id):
        self.lot_id = lot_id
        self.amount = amount
        self.expires_at_us = expires_at_us
        self.issuer_id = issuer_id

    @property
    def key(self):
        return (self.lot_id, self.expires_at_us)

    def live(self, now_us):
        """Spendable at now_us: a lot expires at its expires_at_us instant."""
        return self.expires_at_us is None or now_us < self.expires_at_us

    def replace(self, *, lot_id=_KEEP, amount=_KEEP, expires_at_us=_KEEP, issuer_id=_KEEP):
        """This lot with the given fields changed (as dataclasses.replace)."""
        return make_lot(
            self.lot_id if lot_id is _KEEP else lot_id,
            self.amount if amount is _KEEP else amount,
            self.expires_at_us if expires_at_us is _KEEP else expires_at_us,
            self.issuer_id if issuer_id is _KEEP else issuer_id,
        )

    def __eq__(self, other):
        if type(other) is not Lot:
            return NotImplemented
        cdef Lot o = <Lot>other
        return (_equal(self.lot_id, o.lot_id) and _equal(self.amount, o.amount)
                and _equal(self.expires_at_us, o.expires_at_us) and _equal(self.issuer_id, o.issuer_id))

    def __ne__(self, other):
        if type(other) is not Lot:
            return NotImplemented
        return not self.__eq__(other)

    def __hash__(self):
        return hash((self.lot_id, self.amount, self.expires_at_us, self.issuer_id))

    def __repr__(self):
        return (f"Lot(lot_id={self.lot_id!r}, amount={self.amount!r}, expires_at_us={self.expires_at_us!r}, "
                f"issuer_id={self.issuer_id!r})")

    def __reduce__(self):
        return (Lot, (self.lot_id, self.amount, self.expires_at_us, self.issuer_id))


@cython.no_gc
cdef class Grant:
    """A promotion's bonus on one earn: `amount` point-units funded by sponsor_id."""

    _fields = ("promotion_id", "sponsor_id", "amount")
    __match_args__ = _fields

    def __init__(self, promotion_id, sponsor_id, amount):
        self.promotion_id = promotion_id
        self.sponsor_id = sponsor_id
        self.amount = amount

    def replace(self, *, promotion_id=_KEEP, sponsor_id=_KEEP, amount=_KEEP):
        """This grant with the given fields changed (as dataclasses.replace)."""
        cdef Grant made = Grant.__new__(Grant)
        made.promotion_id = self.promotion_id if promotion_id is _KEEP else promotion_id
        made.sponsor_id = self.sponsor_id if sponsor_id is _KEEP else sponsor_id
        made.amount = self.amount if amount is _KEEP else amount
        return made

    def __eq__(self, other):
        if type(other) is not Grant:
            return NotImplemented
        cdef Grant o = <Grant>other
        return (_equal(self.promotion_id, o.promotion_id) and _equal(self.sponsor_id, o.sponsor_id)
                and _equal(self.amount, o.amount))

    def __ne__(self, other):
        if type(other) is not Grant:
            return NotImplemented
        return not self.__eq__(other)

    def __hash__(self):
        return hash((self.promotion_id, self.sponsor_id, self.amount))

    def __repr__(self):
        return f"Grant(promotion_id={self.promotion_id!r}, sponsor_id={self.sponsor_id!r}, amount={self.amount!r})"

    def __reduce__(self):
        return (Grant, (self.promotion_id, self.sponsor_id, self.amount))


@cython.no_gc
cdef class Earn:
    """The points of one earn transaction, all in the earn's lot: the merchant's base points, the
    operator-funded uplift of the member's level, and promotion grants."""

    _fields = ("base", "uplift", "grants")
    __match_args__ = _fields

    def __init__(self, base, uplift=0, grants=()):
        self.base = base
        self.uplift = uplift
        self.grants = grants

    @property
    def total(self):
        total = self.base + self.uplift
        for grant in self.grants:
            total += grant.amount
        return total

    def replace(self, *, base=_KEEP, uplift=_KEEP, grants=_KEEP):
        """This earn with the given fields changed (as dataclasses.replace)."""
        return make_earn(
            self.base if base is _KEEP else base,
            self.uplift if uplift is _KEEP else uplift,
            self.grants if grants is _KEEP else grants,
        )

    def __eq__(self, other):
        if type(other) is not Earn:
            return NotImplemented
        cdef Earn o = <Earn>other
        return _equal(self.base, o.base) and _equal(self.uplift, o.uplift) and _equal(self.grants, o.grants)

    def __ne__(self, other):
        if type(other) is not Earn:
            return NotImplemented
        return not self.__eq__(other)

    def __hash__(self):
        return hash((self.base, self.uplift, self.grants))

    def __repr__(self):
        return f"Earn(base={self.base!r}, uplift={self.uplift!r}, grants={self.grants!r})"

    def __reduce__(self):
        return (Earn, (self.base, self.uplift, self.grants))


@cython.no_gc
cdef class EarnRecord:
    """An earn made under a program: what its refunds take back in proportion (earn_rules)."""

    _fields = ("member_id", "merchant_id", "version", "earn", "acquirer_id", "acquiring", "refunded_base",
               "made_at_us")
    __match_args__ = _fields

    def __init__(self, member_id, merchant_id, version, earn, acquirer_id, acquiring, refunded_base=0,
                 made_at_us=0):
        self.member_id = member_id
        self.merchant_id = merchant_id
        self.version = version
        self.earn = earn
        self.acquirer_id = acquirer_id
        self.acquiring = acquiring
        self.refunded_base = refunded_base
        self.made_at_us = made_at_us

    def replace(self, *, member_id=_KEEP, merchant_id=_KEEP, version=_KEEP, earn=_KEEP, acquirer_id=_KEEP,
                acquiring=_KEEP, refunded_base=_KEEP, made_at_us=_KEEP):
        """This record with the given fields changed (as dataclasses.replace)."""
        return make_earn_record(
            self.member_id if member_id is _KEEP else member_id,
            self.merchant_id if merchant_id is _KEEP else merchant_id,
            self.version if version is _KEEP else version,
            self.earn if earn is _KEEP else earn,
            self.acquirer_id if acquirer_id is _KEEP else acquirer_id,
            self.acquiring if acquiring is _KEEP else acquiring,
            self.refunded_base if refunded_base is _KEEP else refunded_base,
            self.made_at_us if made_at_us is _KEEP else made_at_us,
        )

    def __eq__(self, other):
        if type(other) is not EarnRecord:
            return NotImplemented
        cdef EarnRecord o = <EarnRecord>other
        return (_equal(self.member_id, o.member_id) and _equal(self.merchant_id, o.merchant_id)
                and _equal(self.version, o.version) and _equal(self.earn, o.earn)
                and _equal(self.acquirer_id, o.acquirer_id) and _equal(self.acquiring, o.acquiring)
                and _equal(self.refunded_base, o.refunded_base) and _equal(self.made_at_us, o.made_at_us))

    def __ne__(self, other):
        if type(other) is not EarnRecord:
            return NotImplemented
        return not self.__eq__(other)

    def __hash__(self):
        return hash((self.member_id, self.merchant_id, self.version, self.earn, self.acquirer_id, self.acquiring,
                     self.refunded_base, self.made_at_us))

    def __repr__(self):
        return (f"EarnRecord(member_id={self.member_id!r}, merchant_id={self.merchant_id!r}, "
                f"version={self.version!r}, earn={self.earn!r}, acquirer_id={self.acquirer_id!r}, "
                f"acquiring={self.acquiring!r}, refunded_base={self.refunded_base!r}, "
                f"made_at_us={self.made_at_us!r})")

    def __reduce__(self):
        return (EarnRecord, (self.member_id, self.merchant_id, self.version, self.earn, self.acquirer_id,
                             self.acquiring, self.refunded_base, self.made_at_us))


@cython.no_gc
cdef class MemberRules:
    """A member's links and tier state (member_programs). Immutable: a change is a new value, so the
    undo log can keep the old one. day_buckets: (day since epoch, base point-units), oldest first;
    levels_reached: bit i, levels[i] reached once (its bonus paid); qualifying: base point-units net of
    refunds, in total. One per member whose state changed since recovery (what recovery loaded is frozen)."""

    _fields = ("acquirer_id", "referrer_id", "referral_paid", "level", "levels_reached", "qualifying",
               "day_buckets")
    __match_args__ = _fields

    def __init__(self, acquirer_id=None, referrer_id=None, referral_paid=False, level="", levels_reached=0,
                 qualifying=0, day_buckets=()):
        self.acquirer_id = acquirer_id
        self.referrer_id = referrer_id
        self.referral_paid = referral_paid
        self.level = level
        self.levels_reached = levels_reached
        self.qualifying = qualifying
        self.day_buckets = day_buckets

    def replace(self, *, acquirer_id=_KEEP, referrer_id=_KEEP, referral_paid=_KEEP, level=_KEEP,
                levels_reached=_KEEP, qualifying=_KEEP, day_buckets=_KEEP):
        """These rules with the given fields changed (as dataclasses.replace)."""
        cdef MemberRules made = MemberRules.__new__(MemberRules)
        made.acquirer_id = self.acquirer_id if acquirer_id is _KEEP else acquirer_id
        made.referrer_id = self.referrer_id if referrer_id is _KEEP else referrer_id
        made.referral_paid = self.referral_paid if referral_paid is _KEEP else referral_paid
        made.level = self.level if level is _KEEP else level
        made.levels_reached = self.levels_reached if levels_reached is _KEEP else levels_reached
        made.qualifying = self.qualifying if qualifying is _KEEP else qualifying
        made.day_buckets = self.day_buckets if day_buckets is _KEEP else day_buckets
        return made

    def __eq__(self, other):
        if type(other) is not MemberRules:
            return NotImplemented
        cdef MemberRules o = <MemberRules>other
        return (_equal(self.acquirer_id, o.acquirer_id) and _equal(self.referrer_id, o.referrer_id)
                and _equal(self.referral_paid, o.referral_paid) and _equal(self.level, o.level)
                and _equal(self.levels_reached, o.levels_reached) and _equal(self.qualifying, o.qualifying)
                and _equal(self.day_buckets, o.day_buckets))

    def __ne__(self, other):
        if type(other) is not MemberRules:
            return NotImplemented
        return not self.__eq__(other)

    def __hash__(self):
        return hash((self.acquirer_id, self.referrer_id, self.referral_paid, self.level, self.levels_reached,
                     self.qualifying, self.day_buckets))

    def __repr__(self):
        return (f"MemberRules(acquirer_id={self.acquirer_id!r}, referrer_id={self.referrer_id!r}, "
                f"referral_paid={self.referral_paid!r}, level={self.level!r}, "
                f"levels_reached={self.levels_reached!r}, qualifying={self.qualifying!r}, "
                f"day_buckets={self.day_buckets!r})")

    def __reduce__(self):
        return (MemberRules, (self.acquirer_id, self.referrer_id, self.referral_paid, self.level,
                              self.levels_reached, self.qualifying, self.day_buckets))


cdef int _read_as_slots(type cls, tuple names, object sample) except -1:
    """Replaces the properties Cython makes of `cls`'s readonly fields by read-only member descriptors,
    what a slotted class's fields are: Python 3.11 specialises reading those (LOAD_ATTR_SLOT) and not a
    property's getter (measured, one process: lot.amount 23-24 ns a read by the property, 10 ns by the
    descriptor, as the dataclass's slot). The fields are the object's only ones, PyObject* after its
    header in declaration order (checked against tp_basicsize, and every field read back from `sample`,
    which holds `names` themselves as its values, else ImportError)."""
    cdef PyTypeObject* type_object = <PyTypeObject*>cls
    cdef Py_ssize_t count = len(names)
    cdef Py_ssize_t index
    cdef PyMemberDef* members
    if type_object.tp_basicsize != <Py_ssize_t>(sizeof(PyObject) + count * sizeof(PyObject*)):
        raise ImportError(f"fastpath.records: {cls.__name__} is not laid out as its {count} fields")
    # lives as long as the process: the descriptors point into it
    members = <PyMemberDef*>calloc(count, sizeof(PyMemberDef))
    if members == NULL:
        raise MemoryError()
    for index in range(count):
        encoded = names[index].encode()
        _MEMBER_NAMES.append(encoded)
        members[index].name = encoded
        members[index].type = T_OBJECT_EX
        members[index].offset = sizeof(PyObject) + index * sizeof(PyObject*)
        members[index].flags = READONLY
        members[index].doc = NULL
        PyDict_SetItem(type_object.tp_dict, names[index], PyDescr_NewMember(type_object, &members[index]))
    PyType_Modified(type_object)
    for index in range(count):
        if getattr(sample, names[index]) is not names[index]:
            raise ImportError(f"fastpath.records: {cls.__name__}.{names[index]} is not where it was expected")
    return 0


_read_as_slots(Lot, Lot._fields, Lot(*Lot._fields))
_read_as_slots(Grant, Grant._fields, Grant(*Grant._fields))
_read_as_slots(Earn, Earn._fields, Earn(*Earn._fields))
_read_as_slots(EarnRecord, EarnRecord._fields, EarnRecord(*EarnRecord._fields))
_read_as_slots(MemberRules, MemberRules._fields, MemberRules(*MemberRules._fields))
