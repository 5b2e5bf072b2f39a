# cython: auto_pickle=False, autotestdict=False
"""PostgreSQL's binary COPY format, encoded in C: the projection's rows for `COPY ... FROM STDIN (FORMAT
binary)` through asyncpg's public `Connection.copy_to_table`.

Why: asyncpg's `copy_records_to_table` encodes each value through its Python-level codec path; its
timestamptz encoder alone calls the tzinfo several times a value (~2.2 us of a transactions row's
3.3). Here a row is read once, every value written by a C function chosen by the column's declared type,
and a value that is the same for every row of a call (a batch's created_at, the asset code) is encoded
once per call, not per row.

The format (PostgreSQL docs, "COPY", Binary Format): the 11-byte signature, an int32 of flags (0), an
int32 header-extension length (0); per tuple an int16 field count, then per field an int32 length and
that many bytes in network order (-1 and no bytes for NULL); a trailer int16 -1. Types as PostgreSQL's
send/recv functions read them: int2/int4/int8 big-endian, text as UTF-8 (the connection's client
encoding, UTF8 under asyncpg), timestamptz as int64 microseconds since 2000-01-01 00:00:00 UTC, jsonb
as a version byte 1 then the JSON text, json as the JSON text alone, bytea as its bytes, bigint[] as
array_send writes a one-dimensional array: int32 dimensions (1, or 0 when empty), int32 has-nulls (0),
int32 element type (int8's oid, 20), then per dimension int32 length and int32 lower bound (1), then
each element as a field (int32 length 8, int64); an element may not be NULL. text[] likewise, with
text's oid (25) and each element a field of its UTF-8 bytes (a transaction row's leg assets).

A value the declared type cannot take raises TypeError or ValueError naming the table, the column and
the row; the row being written is taken back, so the buffer never holds a partial tuple. There is no
silent conversion (asyncpg's int codecs truncate a float with int(); this refuses it).
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.datetime cimport (
    PyDateTime_Check,
    PyDateTime_DATE_GET_HOUR,
    PyDateTime_DATE_GET_MICROSECOND,
    PyDateTime_DATE_GET_MINUTE,
    PyDateTime_DATE_GET_SECOND,
    PyDateTime_GET_DAY,
    PyDateTime_GET_MONTH,
    PyDateTime_GET_YEAR,
    PyDelta_Check,
    datetime_tzinfo,
    import_datetime,
    timedelta_days,
    timedelta_microseconds,
    timedelta_seconds,
)
from cpython.dict cimport PyDict_Check, PyDict_GetItem
from cpython.long cimport PyLong_AsLongLong, PyLong_Check
from cpython.object cimport PyObject
from cpython.sequence cimport PySequence_Fast, PySequence_Fast_GET_ITEM, PySequence_Fast_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_Check
from libc.stdint cimport INT16_MAX, INT16_MIN, INT32_MAX, INT32_MIN, int32_t, int64_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

import array as _array
import datetime as _datetime

import_datetime()

# Where a column's value comes from (the third item of a column's spec): an index >= 0 into the row,
# or one of these.
CONSTANT = -1  # the value given to add() for the column: one value for every row of the call
LOOKUP = -2  # add()'s lookup mapping at the row's lookup key (NULL when the key is not in it)
# A transaction row's legs (migration 0022), from add()'s `legs`: the entries (transaction_id, account_id,
# amount[, asset]) whose transaction_id is the row's item 0, in their order: their account ids (bigint[]),
# amounts (bigint[]) and assets (text[]; NULL when every leg is in add()'s legs_asset, the asset of a
# 3-item entry). A row with no legs takes the column's value given to add(), else NULL.
LEG_ACCOUNTS = -3
LEG_AMOUNTS = -4
LEG_ASSETS = -5

cdef enum ColumnType:
    TYPE_INT2 = 1
    TYPE_INT4 = 2
    TYPE_INT8 = 3
    TYPE_TEXT = 4
    TYPE_TIMESTAMPTZ = 5
    TYPE_JSONB = 6
    TYPE_BYTEA = 7
    TYPE_JSON = 8
    TYPE_INT8_ARRAY = 9
    TYPE_TEXT_ARRAY = 10

# the names PostgreSQL's format_type() gives, and the short ones used in the store's column specs
TYPES = {
    "smallint": TYPE_INT2,
    "integer": TYPE_INT4,
    "bigint": TYPE_INT8,
    "text": TYPE_TEXT,
    "timestamptz": TYPE_TIMESTAMPTZ,
    "timestamp with time zone": TYPE_TIMESTAMPTZ,
    "jsonb": TYPE_JSONB,
    "json": TYPE_JSON,
    "bytea": TYPE_BYTEA,
    "bigint[]": TYPE_INT8_ARRAY,
    "text[]": TYPE_TEXT_ARRAY,
}

cdef bytes SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
# 1970-01-01 to 2000-01-01, PostgreSQL's epoch for timestamps
cdef int32_t INT8_OID = 20
cdef int32_t TEXT_OID = 25
cdef int64_t UNIX_TO_POSTGRES_DAYS = 10957
cdef int64_t MICROSECONDS_A_DAY = 86400000000
cdef object UTC = _datetime.timezone.utc


cdef inline int64_t _days_from_civil(int64_t y, int64_t m, int64_t d) noexcept:
    # days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil)
    y -= m <= 2
    cdef int64_t era = (y if y >= 0 else y - 399) // 400
    cdef int64_t yoe = y - era * 400
    cdef int64_t doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    cdef int64_t doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef class CopyEncoder:
    """The binary COPY stream of one table's rows. `columns` is a sequence of (name, type, source):
    type one of TYPES' keys, source an index into each row, CONSTANT or LOOKUP. add() appends rows,
    finish() the trailer; the result goes to copy_to_table(table, source=..., columns=names,
    format="binary")."""

    cdef char* data
    cdef Py_ssize_t length
    cdef Py_ssize_t capacity
    cdef Py_ssize_t column_count
    cdef int* types
    cdef Py_ssize_t* sources
    cdef readonly str table
    cdef readonly tuple names
    cdef readonly Py_ssize_t rows
    cdef bint finished
    cdef Py_ssize_t row_index  # of the row being written in add()'s rows; -1 for add()'s values

    def __cinit__(self, str table, columns):
        self.data = NULL
        self.types = NULL
        self.sources = NULL

    def __init__(self, str table, columns):
        cdef Py_ssize_t i
        specs = tuple(columns)
        if not 0 < len(specs) <= INT16_MAX:
            raise ValueError(f"COPY {table}: {len(specs)} columns; give 1..{INT16_MAX} (name, type, source)")
        self.table = table
        self.column_count = len(specs)
        self.types = <int*>realloc(NULL, self.column_count * sizeof(int))
        self.sources = <Py_ssize_t*>realloc(NULL, self.column_count * sizeof(Py_ssize_t))
        if self.types == NULL or self.sources == NULL:
            raise MemoryError()
        names = []
        for i, spec in enumerate(specs):
            name, type_name, source = spec
            if type_name not in TYPES:
                raise ValueError(
                    f"COPY {table}.{name}: type {type_name!r} cannot be encoded; one of {', '.join(TYPES)}"
                )
            if not isinstance(source, int) or source < LEG_ASSETS:
                raise ValueError(
                    f"COPY {table}.{name}: source {source!r} is not a row index, CONSTANT, LOOKUP or LEG_*"
                )
            if source in (LEG_ACCOUNTS, LEG_AMOUNTS) and type_name != "bigint[]" or (
                source == LEG_ASSETS and type_name != "text[]"
            ):
                raise ValueError(f"COPY {table}.{name}: a LEG_* column is bigint[] (accounts, amounts) or text[] (assets)")
            self.types[i] = TYPES[type_name]
            self.sources[i] = source
            names.append(name)
        self.names = tuple(names)
        self.rows = 0
        self.finished = False
        self._reserve(64)
        memcpy(self.data, PyBytes_AS_STRING(SIGNATURE), 11)
        self.length = 11
        self._int32(0)  # flags: no OIDs
        self._int32(0)  # header extension: none

    def __dealloc__(self):
        free(self.data)
        free(self.types)
        free(self.sources)

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t needed = self.length + extra
        cdef Py_ssize_t grown
        cdef char* data
        if needed <= self.capacity:
            return 0
        grown = self.capacity * 2 if self.capacity >= 4096 else 4096
        if grown < needed:
            grown = needed
        data = <char*>realloc(self.data, grown)
        if data == NULL:
            raise MemoryError(f"COPY {self.table}: cannot grow the buffer to {grown} bytes")
        self.data = data
        self.capacity = grown
        return 0

    # the callers reserved the room: these only store, in network order
    cdef inline void _int16(self, int v) noexcept:
        cdef unsigned char* p = <unsigned char*>self.data + self.length
        p[0] = (v >> 8) & 0xFF
        p[1] = v & 0xFF
        self.length += 2

    cdef inline void _array_header(self, int64_t size, Py_ssize_t count, int64_t oid) noexcept:
        # array_send's one-dimensional header, the field's length first (room reserved by the caller):
        # dimensions (0 when empty), has-nulls 0, the element type's oid, then the dimension's length
        # and lower bound 1 when not empty
        self._int32(size)
        self._int32(1 if count else 0)
        self._int32(0)
        self._int32(oid)
        if count:
            self._int32(count)
            self._int32(1)

    cdef inline void _int32(self, int64_t v) noexcept:
        cdef unsigned char* p = <unsigned char*>self.data + self.length
        cdef uint64_t u = <uint64_t>v
        p[0] = (u >> 24) & 0xFF
        p[1] = (u >> 16) & 0xFF
        p[2] = (u >> 8) & 0xFF
        p[3] = u & 0xFF
        self.length += 4

    cdef inline void _int64(self, int64_t v) noexcept:
        cdef unsigned char* p = <unsigned char*>self.data + self.length
        cdef uint64_t u = <uint64_t>v
        cdef int k
        for k in range(8):
            p[k] = (u >> (56 - 8 * k)) & 0xFF
        self.length += 8

    cdef int _bytes(self, const char* s, Py_ssize_t n, int prefix) except -1:
        # a field of n bytes, after one version byte when prefix >= 0 (jsonb)
        cdef Py_ssize_t size = n + (1 if prefix >= 0 else 0)
        if size > INT32_MAX:
            raise ValueError(f"COPY {self.table}: a value of {n} bytes is longer than a field can be")
        self._reserve(4 + size)
        self._int32(size)
        if prefix >= 0:
            self.data[self.length] = <char>prefix
            self.length += 1
        memcpy(self.data + self.length, s, n)
        self.length += n
        return 0

    cdef int _value(self, Py_ssize_t column, object value) except -1:
        cdef int kind = self.types[column]
        cdef int64_t number
        cdef const char* text
        cdef Py_ssize_t size
        if value is None:
            self._reserve(4)
            self._int32(-1)
            return 0
        if kind == TYPE_INT8 or kind == TYPE_INT4 or kind == TYPE_INT2:
            if not PyLong_Check(value):
                raise TypeError(self._wrong(column, value, "an int"))
            try:
                number = PyLong_AsLongLong(value)
            except OverflowError:
                raise ValueError(self._wrong(column, value, "an int in range")) from None
            if kind == TYPE_INT8:
                self._reserve(12)
                self._int32(8)
                self._int64(number)
            elif kind == TYPE_INT4:
                if number < INT32_MIN or number > INT32_MAX:
                    raise ValueError(self._wrong(column, value, "an int in range"))
                self._reserve(8)
                self._int32(4)
                self._int32(number)
            else:
                if number < INT16_MIN or number > INT16_MAX:
                    raise ValueError(self._wrong(column, value, "an int in range"))
                self._reserve(6)
                self._int32(2)
                self._int16(<int>number)
            return 0
        if kind == TYPE_TEXT or kind == TYPE_JSONB or kind == TYPE_JSON:
            if not PyUnicode_Check(value):
                raise TypeError(self._wrong(column, value, "a str"))
            try:
                text = PyUnicode_AsUTF8AndSize(value, &size)
            except UnicodeError as error:
                raise ValueError(f"{self._where(column)}: the text is not valid Unicode ({error})") from None
            self._bytes(text, size, 1 if kind == TYPE_JSONB else -1)
            return 0
        if kind == TYPE_TIMESTAMPTZ:
            self._reserve(12)
            self._int32(8)
            self._int64(self._timestamp(column, value))
            return 0
        if kind == TYPE_BYTEA:
            if isinstance(value, bytes):
                self._bytes(PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value), -1)
            elif isinstance(value, bytearray):
                self._bytes(PyByteArray_AS_STRING(value), PyByteArray_GET_SIZE(value), -1)
            else:
                raise TypeError(self._wrong(column, value, "bytes or a bytearray"))
            return 0
        if kind == TYPE_INT8_ARRAY:
            self._int8_array(column, value)
            return 0
        if kind == TYPE_TEXT_ARRAY:
            self._text_array(column, value)
            return 0
        raise AssertionError(f"{self._where(column)}: type code {kind} has no encoder")

    cdef int _int8_array(self, Py_ssize_t column, object value) except -1:
        # a one-dimensional bigint[] (the leg columns of a packed transaction row); a str, bytes or a
        # mapping is refused rather than read as a sequence of something
        cdef Py_ssize_t count, i, size
        cdef int64_t number
        cdef object item
        if isinstance(value, (str, bytes, bytearray, dict)) or not isinstance(value, (list, tuple, _array.array)):
            raise TypeError(self._wrong(column, value, "a list, tuple or array of ints"))
        count = len(value)
        size = 12 + (8 + 12 * count if count else 0)
        if size > INT32_MAX:
            raise ValueError(f"{self._where(column)}: an array of {count} elements is longer than a field can be")
        self._reserve(4 + size)
        self._array_header(size, count, INT8_OID)
        for i in range(count):
            item = value[i]
            if not PyLong_Check(item):
                raise TypeError(self._wrong(column, value, f"ints only (element {i} is {type(item).__name__})"))
            try:
                number = PyLong_AsLongLong(item)
            except OverflowError:
                raise ValueError(self._wrong(column, value, f"ints in range (element {i})")) from None
            self._int32(8)
            self._int64(number)
        return 0

    cdef int _text_array(self, Py_ssize_t column, object value) except -1:
        # a one-dimensional text[] (a packed transaction row's leg assets); as _int8_array, a str (a
        # sequence of characters) is refused, and so is any element that is not a str
        cdef Py_ssize_t count, i, size, n
        cdef const char* text
        cdef object item
        if isinstance(value, (str, bytes, bytearray, dict)) or not isinstance(value, (list, tuple)):
            raise TypeError(self._wrong(column, value, "a list or tuple of strs"))
        count = len(value)
        size = 12 + (8 if count else 0)
        for i in range(count):
            item = value[i]
            if not PyUnicode_Check(item):
                raise TypeError(self._wrong(column, value, f"strs only (element {i} is {type(item).__name__})"))
            PyUnicode_AsUTF8AndSize(item, &n)
            size += 4 + n
            if size > INT32_MAX:
                raise ValueError(f"{self._where(column)}: an array of {count} elements is longer than a field can be")
        self._reserve(4 + size)
        self._array_header(size, count, TEXT_OID)
        for i in range(count):
            text = PyUnicode_AsUTF8AndSize(value[i], &n)
            self._int32(n)
            memcpy(self.data + self.length, text, n)
            self.length += n
        return 0

    cdef int _leg_ints(self, Py_ssize_t column, object legs, Py_ssize_t first, Py_ssize_t count,
                       Py_ssize_t item) except -1:
        # item 1 (account id) or 2 (amount) of legs[first:first + count] (a list or tuple), a bigint[]
        cdef Py_ssize_t size = 12 + (8 + 12 * count if count else 0)
        cdef Py_ssize_t i
        cdef int64_t number
        cdef object entry, value
        if size > INT32_MAX:
            raise ValueError(f"{self._where(column)}: {count} legs are longer than a field can be")
        self._reserve(4 + size)
        self._array_header(size, count, INT8_OID)
        for i in range(count):
            entry = <object>PySequence_Fast_GET_ITEM(legs, first + i)
            value = entry[item]
            if not PyLong_Check(value):
                raise TypeError(self._wrong(column, entry, f"legs of ints (leg {i} has a {type(value).__name__})"))
            try:
                number = PyLong_AsLongLong(value)
            except OverflowError:
                raise ValueError(self._wrong(column, entry, f"legs of ints in range (leg {i})")) from None
            self._int32(8)
            self._int64(number)
        return 0

    cdef int _leg_assets(self, Py_ssize_t column, object legs, Py_ssize_t first, Py_ssize_t count,
                         str default) except -1:
        # item 3 of legs[first:first + count] (default for a 3-item entry) as a text[], or NULL when all
        # are the default
        cdef Py_ssize_t i
        cdef bint other = False
        cdef object entry
        for i in range(count):
            entry = <object>PySequence_Fast_GET_ITEM(legs, first + i)
            if len(entry) > 3 and entry[3] != default:
                other = True
                break
        if not other:
            self._reserve(4)
            self._int32(-1)
            return 0
        assets = []
        for i in range(count):
            entry = <object>PySequence_Fast_GET_ITEM(legs, first + i)
            assets.append(entry[3] if len(entry) > 3 else default)
        self._text_array(column, assets)
        return 0

    cdef int64_t _timestamp(self, Py_ssize_t column, object value) except? -1:
        # microseconds since 2000-01-01 UTC of an aware datetime; a naive one is refused: which zone
        # it means is a guess (asyncpg takes the machine's local zone)
        cdef int64_t offset_us = 0
        cdef int64_t days, us
        if not PyDateTime_Check(value):
            raise TypeError(self._wrong(column, value, "a datetime with a tzinfo"))
        zone = datetime_tzinfo(value)
        if zone is None:
            raise ValueError(self._wrong(column, value, "a datetime with a tzinfo (naive: which zone?)"))
        if zone is not UTC:
            offset = value.utcoffset()
            if offset is None or not PyDelta_Check(offset):
                raise ValueError(self._wrong(column, value, "a datetime whose tzinfo gives a utcoffset"))
            offset_us = (
                timedelta_days(offset) * MICROSECONDS_A_DAY
                + <int64_t>timedelta_seconds(offset) * 1000000
                + timedelta_microseconds(offset)
            )
        days = _days_from_civil(
            PyDateTime_GET_YEAR(value), PyDateTime_GET_MONTH(value), PyDateTime_GET_DAY(value)
        ) - UNIX_TO_POSTGRES_DAYS
        us = (
            (<int64_t>PyDateTime_DATE_GET_HOUR(value) * 3600
             + PyDateTime_DATE_GET_MINUTE(value) * 60
             + PyDateTime_DATE_GET_SECOND(value)) * 1000000
            + PyDateTime_DATE_GET_MICROSECOND(value)
        )
        return days * MICROSECONDS_A_DAY + us - offset_us

    cdef str _where(self, Py_ssize_t column):
        if self.row_index < 0:
            return f"COPY {self.table}.{self.names[column]}, the value given for every row"
        return f"COPY {self.table}.{self.names[column]}, row {self.row_index} of the rows given"

    cdef str _wrong(self, Py_ssize_t column, object value, str wanted):
        type_name = "?"
        for key, code in TYPES.items():
            if code == self.types[column]:
                type_name = key
                break
        return (
            f"{self._where(column)}: {type(value).__name__} {value!r} cannot be written as {type_name}; "
            f"the column takes {wanted} or None (a bug in the code that built the row)"
        )

    def add(self, rows, values=None, lookup=None, Py_ssize_t lookup_key=0, legs=None, str legs_asset="POINTS"):
        """Appends `rows` (a sequence of tuples or lists). `values` maps a column name to its value for
        every row of this call: required for a CONSTANT column, and the value of an indexed column in a
        row too short to have it (None: NULL). `lookup` (a dict) gives a LOOKUP column's value at
        row[lookup_key]. `legs` (entries (transaction_id, account_id, amount[, asset])) gives the LEG_*
        columns of the row whose item 0 is their transaction_id; an entry of no row is a ValueError (its
        leg would be lost). Each distinct value is encoded once per call."""
        cdef Py_ssize_t i, n, source, start, size, r, j, row_count
        cdef Py_ssize_t count = self.column_count
        cdef PyObject* found
        cdef PyObject* group
        cdef dict groups = None
        cdef Py_ssize_t grouped = 0
        cdef Py_ssize_t legs_count = 0, leg_first, leg_count
        cdef Py_ssize_t* spans = NULL
        cdef object legs_fast = None, leg_seq, rows_fast, transaction_id
        if self.finished:
            raise ValueError(f"COPY {self.table}: add() after finish()")
        if lookup is not None and not PyDict_Check(lookup):
            raise TypeError(f"COPY {self.table}: lookup must be a dict, got {type(lookup).__name__}")
        # the call's values, each encoded once: (start, end) of its bytes in `encoded`
        given = {} if values is None else dict(values)
        unknown = set(given) - set(self.names)
        if unknown:
            raise ValueError(f"COPY {self.table}: values for columns it does not have: {sorted(unknown)}")
        encoded = {}
        self.row_index = -1
        for i in range(count):
            name = self.names[i]
            if name in given:
                start = self.length
                try:
                    self._value(i, given[name])
                    encoded[i] = PyBytes_FromStringAndSize(self.data + start, self.length - start)
                finally:
                    self.length = start
            elif self.sources[i] == CONSTANT:
                raise ValueError(f"COPY {self.table}.{self.names[i]}: a CONSTANT column needs its value in values")
        rows_fast = PySequence_Fast(rows, "rows must be a sequence of tuples or lists")
        row_count = PySequence_Fast_GET_SIZE(rows_fast)
        try:
            if legs is not None:
                legs_fast = PySequence_Fast(legs, "legs must be a sequence of entries")
                legs_count = PySequence_Fast_GET_SIZE(legs_fast)
                # The usual order (the state machine's): each transaction's entries together, the
                # transactions in the rows' order. One walk finds each row's span of entries, with no
                # object allocated per row (a list per transaction, ~1,000 a batch, woke the collector:
                # batches of 90 ms among 1 ms ones). Any other order: grouped in a dict.
                spans = <Py_ssize_t*>malloc((2 * row_count + 1) * sizeof(Py_ssize_t))
                if spans == NULL:
                    raise MemoryError()
                j = 0
                for r in range(row_count):
                    row = <object>PySequence_Fast_GET_ITEM(rows_fast, r)
                    spans[2 * r] = j
                    if len(row):
                        transaction_id = row[0]
                        while j < legs_count and (<object>PySequence_Fast_GET_ITEM(legs_fast, j))[0] == transaction_id:
                            j += 1
                    spans[2 * r + 1] = j - spans[2 * r]
                if j < legs_count:
                    free(spans)
                    spans = NULL
                    groups = {}
                    for entry in legs_fast:
                        key = entry[0]
                        group = PyDict_GetItem(groups, key)
                        if group == NULL:
                            groups[key] = [entry]
                        else:
                            (<list>group).append(entry)
            self.row_index = 0
            for r in range(row_count):
                row = <object>PySequence_Fast_GET_ITEM(rows_fast, r)
                start = self.length
                try:
                    fast = PySequence_Fast(row, "a row must be a tuple or a list")
                    n = PySequence_Fast_GET_SIZE(fast)
                    # this row's legs: leg_seq[leg_first:leg_first + leg_count]
                    leg_seq, leg_first, leg_count = legs_fast, 0, 0
                    if spans != NULL:
                        leg_first, leg_count = spans[2 * r], spans[2 * r + 1]
                    elif groups is not None and n > 0:
                        group = PyDict_GetItem(groups, <object>PySequence_Fast_GET_ITEM(fast, 0))
                        if group != NULL:
                            leg_seq, leg_count = <object>group, len(<list>group)
                    self._reserve(2)
                    self._int16(<int>count)
                    for i in range(count):
                        source = self.sources[i]
                        if 0 <= source < n:
                            self._value(i, <object>PySequence_Fast_GET_ITEM(fast, source))
                        elif source == LOOKUP:
                            if lookup is None:
                                raise ValueError(f"{self._where(i)}: a LOOKUP column needs add(lookup=...)")
                            if lookup_key >= n:
                                raise IndexError(f"{self._where(i)}: the row has no item {lookup_key} to look up")
                            found = PyDict_GetItem(lookup, <object>PySequence_Fast_GET_ITEM(fast, lookup_key))
                            self._value(i, None if found == NULL else <object>found)
                        elif source <= LEG_ACCOUNTS and leg_count > 0:
                            if source == LEG_ASSETS:
                                self._leg_assets(i, leg_seq, leg_first, leg_count, legs_asset)
                            else:
                                self._leg_ints(i, leg_seq, leg_first, leg_count, 1 if source == LEG_ACCOUNTS else 2)
                        elif i in encoded:
                            value_bytes = encoded[i]
                            size = PyBytes_GET_SIZE(value_bytes)
                            self._reserve(size)
                            memcpy(self.data + self.length, PyBytes_AS_STRING(value_bytes), size)
                            self.length += size
                        elif source <= LEG_ACCOUNTS:
                            self._reserve(4)
                            self._int32(-1)  # no legs and no value given: NULL
                        else:
                            raise IndexError(
                                f"{self._where(i)}: the row has {n} items, none at {source}, and add() was given "
                                "no value for the column"
                            )
                except BaseException:
                    self.length = start  # no partial tuple in the stream
                    raise
                if groups is not None and leg_count > 0:
                    grouped += 1
                self.rows += 1
                self.row_index += 1
        finally:
            free(spans)
        if groups is not None and grouped < len(groups):
            present = {row[0] for row in rows_fast if len(row)}
            lost = sorted(key for key in groups if key not in present)
            if lost:
                raise ValueError(
                    f"COPY {self.table}: legs of transactions {lost[:5]} are not among the rows given (they "
                    "would be lost; a bug in the code that built the batch)"
                )

    def finish(self):
        """The stream with its trailer, as a memoryview: copy_to_table takes `bytes` for a file path."""
        if not self.finished:
            self._reserve(2)
            self._int16(-1)
            self.finished = True
        return memoryview(PyBytes_FromStringAndSize(self.data, self.length))
