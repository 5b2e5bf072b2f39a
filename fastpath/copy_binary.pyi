"""What Python sees of fastpath/copy_binary.pyx: PostgreSQL's binary COPY stream, encoded in C."""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from typing_extensions import disjoint_base

CONSTANT: int
LOOKUP: int
LEG_ACCOUNTS: int
LEG_AMOUNTS: int
LEG_ASSETS: int
TYPES: dict[str, int]

@disjoint_base  # an extension type: nothing can subclass it together with another
class CopyEncoder:
    table: str
    names: tuple[str, ...]
    rows: int
    def __init__(self, table: str, columns: Iterable[tuple[str, str, int]]) -> None: ...
    def add(
        self,
        rows: Iterable[Sequence[Any]],
        values: Mapping[str, Any] | None = None,
        lookup: dict[Any, Any] | None = None,
        lookup_key: int = 0,
        legs: Iterable[Sequence[Any]] | None = None,
        legs_asset: str = "POINTS",
    ) -> None: ...
    def finish(self) -> memoryview: ...
