# C-level declarations of the fast path; what Python sees is in _core.pyi.
from libc.stdint cimport int32_t, int64_t

# An anonymous cpdef enum makes every name both a C constant for the kernels and a plain Python int
# attribute of the module, so the two can never disagree.
cpdef enum:
    # statuses
    OK = 0
    INSUFFICIENT_POINTS = 1
    UNKNOWN_MEMBER = 2
    UNKNOWN_HOLD = 3
    HOLD_EXPIRED = 4
    HOLD_CAPTURED = 5
    HOLD_VOIDED = 6
    WRONG_MERCHANT = 7
    CAPTURE_EXCEEDS_HOLD = 8
    UNKNOWN_TRANSACTION = 9
    REFUND_EXCEEDS_REMAINING = 10
    NOT_REFUNDABLE = 11
    OVERFLOW = 12
    CAPACITY = 13
    # hold statuses (holds.status in Postgres)
    HOLD_OPEN = 1
    HOLD_STATUS_CAPTURED = 2
    HOLD_STATUS_VOIDED = 3
    HOLD_STATUS_EXPIRED = 4
    # transaction kinds (transactions.kind in Postgres)
    KIND_EARN = 1
    KIND_CAPTURE = 2
    KIND_REDEEM = 3
    KIND_REFUND_REDEMPTION = 4
    KIND_REFUND_EARN = 5

# Which field an undo record restores.
cdef enum UndoField:
    UNDO_MEMBER_POSTED = 1
    UNDO_MEMBER_HELD = 2
    UNDO_HOLD_STATUS = 3
    UNDO_TRANSACTION_REFUNDED = 4


# What a kernel hands back besides its status; the def wrapper turns it into the tuple of the contract.
cdef struct Outcome:
    int64_t member
    int64_t amount
    int64_t posted
    int64_t available
    int32_t kind


cdef class Ledger:
    cdef int64_t members_max
    cdef int64_t holds_max
    cdef int64_t transactions_max

    # members: slot -> posted, held; member_slots (str -> slot) and member_ids (slot -> str) index them
    cdef readonly int64_t members_count
    cdef int64_t members_capacity
    cdef int64_t* member_posted
    cdef int64_t* member_held
    cdef dict member_slots
    cdef list member_ids

    # holds: resident holds of any status, in creation order until forget_resolved() compacts them
    cdef readonly int64_t holds_resident_count
    cdef readonly int64_t holds_open_count
    cdef int64_t holds_capacity
    cdef int64_t* hold_ids
    cdef int64_t* hold_member
    cdef int64_t* hold_amount
    cdef int64_t* hold_expires_at_us
    cdef int32_t* hold_merchant
    cdef int32_t* hold_status
    cdef dict hold_slots

    # transactions that refunds may refer to
    cdef readonly int64_t transactions_resident_count
    cdef int64_t transactions_capacity
    cdef int64_t* transaction_ids
    cdef int64_t* transaction_member
    cdef int64_t* transaction_amount
    cdef int64_t* transaction_refunded
    cdef int32_t* transaction_merchant
    cdef int32_t* transaction_kind
    cdef dict transaction_slots

    # binary min-heap on (expires_at_us, hold slot); it shares holds_capacity because every hold slot
    # has at most one entry between rebuilds
    cdef int64_t heap_count
    cdef int64_t* heap_expires_at_us
    cdef int64_t* heap_hold

    # undo log: records of (field, slot, old value), plus the counts at begin()
    cdef bint recording
    cdef int64_t undo_count
    cdef int64_t undo_capacity
    cdef int32_t* undo_field
    cdef int64_t* undo_slot
    cdef int64_t* undo_old
    cdef int64_t begin_members_count
    cdef int64_t begin_holds_resident_count
    cdef int64_t begin_holds_open_count
    cdef int64_t begin_transactions_resident_count

    cdef int _reserve_members(self, int64_t needed) except -1
    cdef int _reserve_holds(self, int64_t needed) except -1
    cdef int _reserve_transactions(self, int64_t needed) except -1
    cdef int _reserve_undo(self, int64_t records) except -1
    cdef int _record(self, int32_t field, int64_t slot, int64_t old_value) except -1
    cdef int _set_posted(self, int64_t member, int64_t value) except -1
    cdef int _set_held(self, int64_t member, int64_t value) except -1
    cdef int _set_hold_status(self, int64_t hold, int32_t status) except -1
    cdef int _set_refunded(self, int64_t transaction, int64_t value) except -1
    cdef int _check_member_after(self, int64_t member, int64_t posted, int64_t held) except -1
    cdef int _check_member_slot(self, int64_t member_slot) except -1
    cdef int64_t _add_member(self, str member_id, int64_t posted) except -1
    cdef int64_t _add_hold(self, int64_t hold_id, int64_t member, int32_t merchant, int64_t amount,
                           int64_t expires_at_us, int32_t status) except -1
    cdef int64_t _add_transaction(self, int64_t transaction_id, int32_t kind, int64_t member,
                                  int32_t merchant, int64_t amount, int64_t refunded) except -1
    cdef int _release_hold(self, int64_t hold, int32_t status) except -1
    cdef int32_t _resolvable(self, int64_t hold, int64_t merchant, int64_t now_us) except -1
    cdef int _check_new_transaction(self, int64_t transaction_id) except -1

    cdef int64_t _load_member(self, str member_id, int64_t posted) except -1
    cdef int _load_hold(self, int64_t hold_id, int64_t member_slot, int64_t merchant, int64_t amount,
                        int64_t expires_at_us, int64_t status) except -1
    cdef int _load_transaction(self, int64_t transaction_id, int64_t kind, int64_t member_slot,
                               int64_t merchant, int64_t amount, int64_t refunded) except -1
    cdef int32_t _earn(self, str member_id, int64_t merchant, int64_t points,
                       int64_t transaction_id, Outcome* outcome) except -1
    cdef int32_t _authorize(self, int64_t member_slot, int64_t merchant, int64_t points,
                            int64_t hold_id, int64_t expires_at_us, Outcome* outcome) except -1
    cdef int32_t _capture(self, int64_t hold_id, int64_t merchant, int64_t points,
                          int64_t transaction_id, int64_t now_us, Outcome* outcome) except -1
    cdef int32_t _void(self, int64_t hold_id, int64_t merchant, int64_t now_us,
                       Outcome* outcome) except -1
    cdef int32_t _redeem(self, int64_t member_slot, int64_t merchant, int64_t points,
                         int64_t transaction_id, Outcome* outcome) except -1
    cdef int32_t _refund(self, int64_t transaction_id, int64_t merchant, int64_t points,
                         int64_t refund_transaction_id, Outcome* outcome) except -1
    cdef list _expire_holds(self, int64_t now_us, int64_t limit)

    cdef bint _heap_less(self, int64_t left, int64_t right) noexcept
    cdef void _heap_swap(self, int64_t left, int64_t right) noexcept
    cdef int _heap_push(self, int64_t expires_at_us, int64_t hold) except -1
    cdef void _heap_pop(self) noexcept
    cdef void _heap_sift_down(self, int64_t position) noexcept
    cdef void _heap_rebuild(self) noexcept
