# cython: language_level=3
"""The batch log payload's record columns (processor/batch_log.py `_Columns.pack`, its twin), in C: a list
of compiled records (fastpath/records.pyx) turned into one list per field, in one pass that reads the
fields directly, where the twin's `map(attrgetter)` per field does an attribute lookup per field per
record (~0.55 µs an operation of the committer's event loop with the program in force, about half of
batch_log.encode's CPU besides the pickling).

The columns are the twin's, value for value (tests/unit/test_log_columns.py compares them and the
payloads' bytes): a field whose values are all the same object (by identity) is a 1-tuple of it; an
EarnRecord's `earn` is its Earns' columns, an Earn's `grants` (records per value, the Grants' columns),
or None when every one is empty. A record of another class is a TypeError (the classes are final: an
exact type check).
"""

cimport cython
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject

from fastpath.records cimport Earn, EarnRecord, Grant, Lot, MemberRules


cdef object _column(list values):
    """`values`, or a 1-tuple of its first when every value is that same object (by identity)."""
    cdef Py_ssize_t n = PyList_GET_SIZE(values)
    cdef Py_ssize_t i
    cdef PyObject *first
    if n == 0:
        return values
    first = PyList_GET_ITEM(values, 0)
    for i in range(1, n):
        if PyList_GET_ITEM(values, i) != first:
            return values
    return (<object>first,)


cdef inline void _not(object record, type cls) except *:
    raise TypeError(f"{type(record).__qualname__} is not a {cls.__qualname__}: its records cannot be packed")


def pack_lots(list records):
    """Lots' columns: lot_id, amount, expires_at_us, issuer_id."""
    cdef list lot_id = [], amount = [], expires_at_us = [], issuer_id = []
    cdef Lot r
    for record in records:
        if type(record) is not Lot:
            _not(record, Lot)
        r = <Lot>record
        lot_id.append(r.lot_id)
        amount.append(r.amount)
        expires_at_us.append(r.expires_at_us)
        issuer_id.append(r.issuer_id)
    return [_column(lot_id), _column(amount), _column(expires_at_us), _column(issuer_id)]


def pack_grants(list records):
    """Grants' columns: promotion_id, sponsor_id, amount."""
    cdef list promotion_id = [], sponsor_id = [], amount = []
    cdef Grant r
    for record in records:
        if type(record) is not Grant:
            _not(record, Grant)
        r = <Grant>record
        promotion_id.append(r.promotion_id)
        sponsor_id.append(r.sponsor_id)
        amount.append(r.amount)
    return [_column(promotion_id), _column(sponsor_id), _column(amount)]


def pack_earns(list records):
    """Earns' columns: base, uplift, grants (None when every earn's is empty, else (grants per earn, the
    grants' columns))."""
    cdef list base = [], uplift = [], counts = [], flat = []
    cdef bint any_grants = False
    cdef Earn r
    for record in records:
        if type(record) is not Earn:
            _not(record, Earn)
        r = <Earn>record
        base.append(r.base)
        uplift.append(r.uplift)
        grants = r.grants
        if grants:
            any_grants = True
        counts.append(len(grants))
        flat.extend(grants)
    return [_column(base), _column(uplift), (counts, pack_grants(flat)) if any_grants else None]


def pack_earn_records(list records):
    """EarnRecords' columns: member_id, merchant_id, version, earn (the Earns' columns), acquirer_id,
    acquiring, refunded_base, made_at_us."""
    cdef list member_id = [], merchant_id = [], version = [], earn = [], acquirer_id = [], acquiring = []
    cdef list refunded_base = [], made_at_us = []
    cdef EarnRecord r
    for record in records:
        if type(record) is not EarnRecord:
            _not(record, EarnRecord)
        r = <EarnRecord>record
        member_id.append(r.member_id)
        merchant_id.append(r.merchant_id)
        version.append(r.version)
        earn.append(r.earn)
        acquirer_id.append(r.acquirer_id)
        acquiring.append(r.acquiring)
        refunded_base.append(r.refunded_base)
        made_at_us.append(r.made_at_us)
    return [
        _column(member_id),
        _column(merchant_id),
        _column(version),
        pack_earns(earn),
        _column(acquirer_id),
        _column(acquiring),
        _column(refunded_base),
        _column(made_at_us),
    ]


def pack_member_rules(list records):
    """MemberRules' columns: acquirer_id, referrer_id, referral_paid, level, levels_reached, qualifying,
    day_buckets."""
    cdef list acquirer_id = [], referrer_id = [], referral_paid = [], level = [], levels_reached = []
    cdef list qualifying = [], day_buckets = []
    cdef MemberRules r
    for record in records:
        if type(record) is not MemberRules:
            _not(record, MemberRules)
        r = <MemberRules>record
        acquirer_id.append(r.acquirer_id)
        referrer_id.append(r.referrer_id)
        referral_paid.append(r.referral_paid)
        level.append(r.level)
        levels_reached.append(r.levels_reached)
        qualifying.append(r.qualifying)
        day_buckets.append(r.day_buckets)
    return [
        _column(acquirer_id),
        _column(referrer_id),
        _column(referral_paid),
        _column(level),
        _column(levels_reached),
        _column(qualifying),
        _column(day_buckets),
    ]
