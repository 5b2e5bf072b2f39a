"""What Python sees of fastpath/idempotency_table.pyx: the idempotency table's slots and probes in C."""

import array
from collections.abc import Callable, Iterable

from typing_extensions import disjoint_base

SLOTS_MIN: int
LOAD_MAX: float
DIST_MAX: int
REM_BITS: int
GROW_LOAD: str
GROW_DISTANCE: str

class TableError(Exception): ...

@disjoint_base  # an extension type: nothing can subclass it together with another
class Table:
    count: int
    rem_bits: int
    def __init__(self, slots: int = ...) -> None: ...
    @property
    def slots(self) -> int: ...
    @property
    def slots_array(self) -> array.array[int]: ...
    @property
    def memory_bytes(self) -> int: ...
    def dist_max(self) -> int: ...
    def reset(self, expected: int = 0) -> None: ...
    def maybe_stored(
        self, keys: Iterable[tuple[str, str]], newest: int, fingerprint: Callable[[str, str], int] | None = None
    ) -> dict[tuple[str, str], list[int]]: ...
    def add(
        self, batch_id: int, keys: Iterable[tuple[str, str]], fingerprint: Callable[[str, str], int] | None = None
    ) -> list[tuple[str, int, int, int, float]] | None: ...
    def remove(
        self,
        batches: Iterable[tuple[int, Iterable[tuple[str, str]]]],
        fingerprint: Callable[[str, str], int] | None = None,
    ) -> int: ...
