"""What Python sees of fastpath/kernel_rows.pyx (the rules kernel's lots write-back in C; the twin is
fastpath/kernel_rows_reference.py, whose docstrings say what it returns)."""

import array
from collections.abc import Sequence
from typing import Any

from fastpath.lot_chain import LotChain
from fastpath.records import Lot

def lots_after_run(
    taken_rows: set[int],
    new_by_row: dict[int, list[int]],
    tier_members: list[tuple[str, Any, tuple[Lot, ...] | LotChain]],
    prefixes: list[tuple[int, int]],
    pool_lots: list[Lot | None],
    lot_amount: Sequence[int],
) -> list[tuple[Any, ...]]: ...
def lots_written(
    rows: list[tuple[Any, ...]],
    table: dict[str, tuple[Lot, ...] | LotChain],
    flushed: dict[str, tuple[Lot, ...] | LotChain],
    touched: dict[str, set[Any] | None],
    created_by: dict[str, set[Any]],
    diffs: dict[str, Any],
    dirty: set[str],
    totals: dict[str, tuple[tuple[Lot, ...] | LotChain, int]],
    due: list[tuple[int, str]],
    missing: object,
) -> list[Any]: ...
def operation_columns(
    ops: list[Any], earn: object, op_earn: int, op_redeem: int
) -> tuple[array.array[int], array.array[int], array.array[int], array.array[int]]: ...
def lots_checked(
    dirty: set[str],
    table: dict[str, tuple[Lot, ...] | LotChain],
    totals: dict[str, tuple[tuple[Lot, ...] | LotChain, int]],
    keep_from: int,
    ledger: Any,
) -> tuple[str, int, int, int] | None: ...
def kernel_member(machine: Any, run: Any, tables: Any, op: Any, now_us: int) -> int: ...
def rows_of(keys: set[Any], table: dict[Any, Any], default: Any = ...) -> dict[Any, Any]: ...
def lots_rows(keys: set[str], diffs: dict[str, Any], changed: Any) -> dict[str, Any]: ...
def created_rows(created: dict[str, Any], keys: set[str]) -> dict[str, Any]: ...
def kernel_lots(
    machine: Any, run: Any
) -> tuple[list[Lot], array.array[int], array.array[int], array.array[int], list[tuple[int, int]]]: ...
