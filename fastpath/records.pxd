# The per-earn records and the member rules (fastpath/records.pyx), declared for the modules that build them in C
# (fastpath/_core.pyx's earn_redeem_rows): the fields are set directly, no __init__ run. `no_gc` is on the
# classes in records.pyx (Cython takes it from there, not from here).

cimport cython


@cython.final
cdef class Lot:
    cdef readonly object lot_id
    cdef readonly object amount
    cdef readonly object expires_at_us
    cdef readonly object issuer_id


@cython.final
cdef class Grant:
    cdef readonly object promotion_id
    cdef readonly object sponsor_id
    cdef readonly object amount


@cython.final
cdef class Earn:
    cdef readonly object base
    cdef readonly object uplift
    cdef readonly object grants


@cython.final
cdef class EarnRecord:
    cdef readonly object member_id
    cdef readonly object merchant_id
    cdef readonly object version
    cdef readonly object earn
    cdef readonly object acquirer_id
    cdef readonly object acquiring
    cdef readonly object refunded_base
    cdef readonly object made_at_us


@cython.final
cdef class MemberRules:
    cdef readonly object acquirer_id
    cdef readonly object referrer_id
    cdef readonly object referral_paid
    cdef readonly object level
    cdef readonly object levels_reached
    cdef readonly object qualifying
    cdef readonly object day_buckets


cdef inline Lot make_lot(object lot_id, object amount, object expires_at_us, object issuer_id):
    cdef Lot made = Lot.__new__(Lot)
    made.lot_id = lot_id
    made.amount = amount
    made.expires_at_us = expires_at_us
    made.issuer_id = issuer_id
    return made


cdef inline Earn make_earn(object base, object uplift, object grants):
    cdef Earn made = Earn.__new__(Earn)
    made.base = base
    made.uplift = uplift
    made.grants = grants
    return made


cdef inline EarnRecord make_earn_record(object member_id, object merchant_id, object version, object earn,
                                       object acquirer_id, object acquiring, object refunded_base,
                                       object made_at_us):
    cdef EarnRecord made = EarnRecord.__new__(EarnRecord)
    made.member_id = member_id
    made.merchant_id = merchant_id
    made.version = version
    made.earn = earn
    made.acquirer_id = acquirer_id
    made.acquiring = acquiring
    made.refunded_base = refunded_base
    made.made_at_us = made_at_us
    return made
