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
    # operation codes of apply_batch()
    OP_EARN = 1
    OP_AUTHORIZE = 2
    OP_CAPTURE = 3
    OP_VOID = 4
    OP_REDEEM = 5
    OP_REFUND = 6

# Which field an undo record restores.
cdef enum UndoField:
    UNDO_MEMBER_POSTED = 1
    UNDO_MEMBER_HELD = 2
    UNDO_HOLD_STATUS = 3
    UNDO_TRANSACTION_REFUNDED = 4


# Where an open batch begins: the undo records and the counts before its begin(). Creations are
# appended at the end of their arrays, so cutting back to these counts removes them.
cdef struct BatchMark:
    int64_t undo_count
    int64_t members_count
    int64_t holds_resident_count
    int64_t holds_open_count
    int64_t transactions_resident_count


# What a kernel hands back besides its status; a def wrapper turns it into the tuple of the contract,
# apply_batch() into one row of its output arrays. Written only on OK, except `involved`.
cdef struct Outcome:
    int64_t member
    int64_t amount
    int64_t posted
    int64_t available
    int32_t kind
    # The member the operation concerns, once the kernel knows it, on any status (apply_batch's
    # out_member); the caller sets it to -1 first. Left so for an unknown hold or transaction and
    # for another merchant's.
    int64_t involved


cdef class Ledger:
    cdef int64_t members_max
    cdef int64_t holds_max
    cdef int64_t transactions_max

    # members: slot -> posted, held, account id (0: not known); member_slots (str -> slot) and
    # member_ids (slot -> str) index them
    cdef readonly int64_t members_count
    cdef int64_t members_capacity
    cdef int64_t* member_posted
    cdef int64_t* member_held
    cdef int64_t* member_accounts
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

    # undo log: one array of records (field, slot, old value); each open batch is a mark into it,
    # oldest first. Records below the oldest mark belong to committed batches and are dead until
    # commit() compacts them away.
    cdef readonly int64_t batches_open
    cdef int64_t batches_capacity
    cdef BatchMark* batch_marks
    cdef int64_t undo_count
    cdef int64_t undo_capacity
    cdef int32_t* undo_field
    cdef int64_t* undo_slot
    cdef int64_t* undo_old

    cdef int _reserve_members(self, int64_t needed) except -1
    cdef int _reserve_holds(self, int64_t needed) except -1
    cdef int _reserve_transactions(self, int64_t needed) except -1
    cdef int _reserve_undo(self, int64_t records) except -1
    cdef int _reserve_batches(self, int64_t needed) except -1
    cdef int _record(self, int32_t field, int64_t slot, int64_t old_value) except -1
    cdef int _set_posted(self, int64_t member, int64_t value) except -1
    cdef int _set_held(self, int64_t member, int64_t value) except -1
    cdef int _set_hold_status(self, int64_t hold, int32_t status) except -1
    cdef int _set_refunded(self, int64_t transaction, int64_t value) except -1
    cdef int _check_member_after(self, int64_t member, int64_t posted, int64_t held) except -1
    cdef int _check_member_slot(self, int64_t member_slot) except -1
    cdef int64_t _add_member(self, str member_id, int64_t posted, int64_t account_id) except -1
    cdef int64_t _add_hold(self, int64_t hold_id, int64_t member, int32_t merchant, int64_t amount,
                           int64_t expires_at_us, int32_t status) except -1
    cdef int64_t _add_transaction(self, int64_t transaction_id, int32_t kind, int64_t member,
                                  int32_t merchant, int64_t amount, int64_t refunded) except -1
    cdef int _release_hold(self, int64_t hold, int32_t status) except -1
    cdef int32_t _resolvable(self, int64_t hold, int64_t merchant, int64_t now_us) except -1
    cdef int _check_new_transaction(self, int64_t transaction_id) except -1
    cdef int _compact_undo(self) except -1
    cdef int _rollback_to(self, int64_t batch) except -1

    cdef int64_t _load_member(self, str member_id, int64_t posted, int64_t account_id) except -1
    cdef int64_t _ensure_member(self, str member_id) except -2
    cdef int _load_hold(self, int64_t hold_id, int64_t member_slot, int64_t merchant, int64_t amount,
                        int64_t expires_at_us, int64_t status) except -1
    cdef int _load_transaction(self, int64_t transaction_id, int64_t kind, int64_t member_slot,
                               int64_t merchant, int64_t amount, int64_t refunded) except -1
    cdef int32_t _earn(self, str member_id, int64_t member, int64_t merchant, int64_t points,
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
    cdef int64_t _apply_batch(self, int64_t count, const int64_t[:] method, const int64_t[:] member,
                              const int64_t[:] merchant, const int64_t[:] points,
                              const int64_t[:] ref_id, const int64_t[:] new_id,
                              const int64_t[:] expires_at_us, int64_t now_us,
                              int64_t[:] out_status, int64_t[:] out_member, int64_t[:] out_amount,
                              int64_t[:] out_posted, int64_t[:] out_available,
                              int64_t[:] out_kind) except -1

    cdef int _apply_earn_redeem(self, int64_t count, const int64_t[:] method,
                                const int64_t[:] member, const int64_t[:] merchant,
                                const int64_t[:] points, const int64_t[:] purchase,
                                const int64_t[:] fee_bps, const int64_t[:] tier,
                                int64_t[:] tier_qualifying, int64_t[:] tier_reached,
                                const int64_t[:] tier_acquirer, const int64_t[:] tier_acquiring_bps,
                                int64_t[:] tier_lot_head, int64_t[:] tier_lot_tail,
                                int64_t[:] tier_lot_total, int64_t[:] lot_amount,
                                int64_t[:] lot_expires_at_us, int64_t[:] lot_next,
                                const int64_t[:] level_threshold,
                                const int64_t[:] level_multiplier_bps,
                                int64_t new_lot_expires_at_us, int64_t* next_transaction_id,
                                int64_t* lots_used, int64_t* pieces_used,
                                int64_t[:] out_status, int64_t[:] out_created,
                                int64_t[:] out_posted, int64_t[:] out_available,
                                int64_t[:] out_total, int64_t[:] out_fee,
                                int64_t[:] out_level_before, int64_t[:] out_level_after,
                                int64_t[:] out_reward, int64_t[:] out_reward_id, int64_t[:] out_lot,
                                int64_t[:] out_piece_start, int64_t[:] out_piece_end,
                                int64_t[:] out_due_at_us, int64_t[:] piece_lot,
                                int64_t[:] piece_amount) except -1

    cdef bint _heap_less(self, int64_t left, int64_t right) noexcept
    cdef void _heap_swap(self, int64_t left, int64_t right) noexcept
    cdef int _heap_push(self, int64_t expires_at_us, int64_t hold) except -1
    cdef void _heap_pop(self) noexcept
    cdef void _heap_sift_down(self, int64_t position) noexcept
    cdef void _heap_rebuild(self) noexcept
