# cython: language_level=3
"""Each member's points balance after each transaction of a batch (processor/events.py balances_after, the
change feed's member_balance_after), in C: the Python walk cost ~1.1-1.5 µs an operation of the
committer's CPU with the program in force (PYTHONPATH=. python /tmp-style script: the state machine's
batches, a CPU timer around it), a fifth of the apply itself.

The same walk as the twin, processor/events.py `_balances_after_python` (its docstring says how it works;
tests/unit/test_balances_after.py compares the three walks on the state machine's batches and on random
ones): the members' final balances looked up once a batch, the points moves on their accounts gathered,
then one walk back over the transactions undoing each one's moves. Here the accounts are numbered as
they are met and their balances kept in a C array, so the walk does no dict or int-object work but the
answer's. Returns None, for the caller to take the general walk (events._balances_after_any_order),
when the moves are not grouped by transaction in id order or a balance would leave int64 on the way
back; raises TransactionOrderError when the transactions are not in id order.
"""

cimport cython
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc

from fastpath._core cimport Ledger


cdef extern from *:
    """
    static inline int points_sub_overflows(int64_t a, int64_t b, int64_t *out) {
        return __builtin_sub_overflow(a, b, out);
    }
    """
    int points_sub_overflows(int64_t a, int64_t b, int64_t *out)


class TransactionOrderError(ValueError):
    """A batch's transactions are not in id order (the caller raises its invariant violation)."""


@cython.boundscheck(False)
@cython.wraparound(False)
def balances_after_ordered(list transactions not None, list entries not None, new_members, ledger):
    """transaction_id -> its member's posted balance right after it (transactions without a member, or
    whose member has no account, left out), in transaction order; None when the general walk must answer
    (see the module's docstring). `transactions`: tuples (transaction_id, kind, merchant_id, member_id,
    ...); `entries`: tuples (transaction_id, account_id, amount[, asset_code]); `new_members`: pairs
    (member_id, account_id) new in the batch; `ledger`: the fast path after the batch."""
    cdef Py_ssize_t count = PyList_GET_SIZE(transactions)
    cdef Py_ssize_t entry_count = PyList_GET_SIZE(entries)
    cdef Py_ssize_t i, at, moves = 0, known = 0
    cdef int64_t later, transaction_id, move_id
    cdef int64_t *balances = NULL
    cdef Py_ssize_t *owner = NULL
    cdef Py_ssize_t *move_account = NULL
    cdef int64_t *move_transaction = NULL
    cdef int64_t *move_amount = NULL
    cdef tuple row
    cdef object member_id, account_id, found_index
    cdef PyObject *found
    cdef dict index_of_member = {}  # member_id -> the number of its account (or -1: none)
    cdef dict index_of_account = {}  # account id -> its number
    cdef dict result = {}
    cdef list ids
    cdef object news = dict(new_members) if new_members else None
    cdef Ledger core = ledger if type(ledger) is Ledger else None
    cdef int64_t slot
    member_slot, member_account, balance = ledger.member_slot, ledger.member_account, ledger.balance
    if count == 0:
        return result
    owner = <Py_ssize_t *> malloc(count * sizeof(Py_ssize_t))
    balances = <int64_t *> malloc(count * sizeof(int64_t))  # at most one account a transaction
    move_account = <Py_ssize_t *> malloc((entry_count + 1) * sizeof(Py_ssize_t))
    move_transaction = <int64_t *> malloc((entry_count + 1) * sizeof(int64_t))
    move_amount = <int64_t *> malloc((entry_count + 1) * sizeof(int64_t))
    if not owner or not balances or not move_account or not move_transaction or not move_amount:
        free(owner); free(balances); free(move_account); free(move_transaction); free(move_amount)
        raise MemoryError()
    try:
        # each transaction's member: its account's number, its final balance read once
        for i in range(count):
            row = <tuple?> <object> PyList_GET_ITEM(transactions, i)
            member_id = <object> PyTuple_GET_ITEM(row, 3)
            found = PyDict_GetItem(index_of_member, member_id)
            if found is not NULL:
                owner[i] = <Py_ssize_t> <object> found
                continue
            owner[i] = -1
            if member_id:
                if core is not None:  # the compiled Ledger's own arrays: no call, no tuple
                    found = PyDict_GetItem(core.member_slots, member_id)
                    slot = -1 if found is NULL else <int64_t> <object> found
                else:
                    slot = member_slot(member_id)
                if slot >= 0:
                    account_id = (news.get(member_id) if news is not None else None) or (
                        core.member_accounts[slot] if core is not None else member_account(slot)
                    ) or 0
                    if account_id:
                        found = PyDict_GetItem(index_of_account, account_id)
                        if found is NULL:
                            balances[known] = core.member_posted[slot] if core is not None else balance(slot)[0]
                            PyDict_SetItem(index_of_account, account_id, known)
                            owner[i] = known
                            known += 1
                        else:
                            owner[i] = <Py_ssize_t> <object> found
            PyDict_SetItem(index_of_member, member_id, owner[i])
        # the points moves on those accounts, in the entries' order
        for i in range(entry_count):
            row = <tuple?> <object> PyList_GET_ITEM(entries, i)
            found = PyDict_GetItem(index_of_account, <object> PyTuple_GET_ITEM(row, 1))
            if found is NULL:
                continue
            if PyTuple_GET_SIZE(row) >= 4 and <object> PyTuple_GET_ITEM(row, 3) != "POINTS":
                continue
            move_account[moves] = <Py_ssize_t> <object> found
            move_transaction[moves] = <int64_t> <object> PyTuple_GET_ITEM(row, 0)
            move_amount[moves] = <int64_t> <object> PyTuple_GET_ITEM(row, 2)
            moves += 1
        # the walk back: each transaction's member balance, then its moves undone
        ids = [None] * count
        at = moves - 1
        move_id = move_transaction[at] if moves else -1
        later = 0
        for i in range(count - 1, -1, -1):
            row = <tuple> <object> PyList_GET_ITEM(transactions, i)
            transaction_id = <int64_t> <object> PyTuple_GET_ITEM(row, 0)
            if i < count - 1 and transaction_id >= later:
                raise TransactionOrderError("a batch's transactions are in id order")
            later = transaction_id
            if owner[i] >= 0:
                ids[i] = balances[owner[i]]
            while at >= 0 and move_id == transaction_id:
                if points_sub_overflows(balances[move_account[at]], move_amount[at], &balances[move_account[at]]):
                    return None  # beyond int64: the general walk, in Python's integers, answers
                at -= 1
                move_id = move_transaction[at] if at >= 0 else -1
        if at >= 0:
            return None  # moves not grouped by transaction in id order (or of a transaction not in the batch)
        for i in range(count):
            if owner[i] >= 0:
                row = <tuple> <object> PyList_GET_ITEM(transactions, i)
                PyDict_SetItem(result, <object> PyTuple_GET_ITEM(row, 0), ids[i])
        return result
    finally:
        free(owner)
        free(balances)
        free(move_account)
        free(move_transaction)
        free(move_amount)
