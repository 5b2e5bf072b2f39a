# A member's lots as a chain of chunks (fastpath/lot_chain.pyx), declared for the modules that read and
# build chains in C (fastpath/kernel_rows.pyx): the fields read directly, `splice` called without Python.

cimport cython


@cython.final
cdef class LotChain:
    cdef readonly tuple chunks
    cdef readonly Py_ssize_t length


cdef object splice(object lots, Py_ssize_t passed, list head, list tail)
