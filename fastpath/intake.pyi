"""What Python sees of fastpath/intake.pyx (SubmitBatch's intake and answer in C)."""

from typing import Any, Callable

OPERATION_FIELDS: list[str]

class Intake:
    @property
    def position(self) -> int: ...
    def __init__(
        self,
        operation: type,
        earn_method: Any,
        redeem_method: Any,
        settings: Any,
        rate_limits: Any,
        admit: Callable[[str, dict[str, Any]], Any],
        rate_limited: Callable[[str, float, str], Any],
    ) -> None: ...
    def run(
        self,
        operations: Any,
        start: int,
        checked: dict[str, Any],
        results: list[Any],
        indexes: list[int],
        kinds: list[str],
        ops: list[Any],
        redeems: bool,
    ) -> int: ...
    def respond_encoded(
        self,
        refused: list[Any],
        indexes: list[int],
        kinds: list[str],
        ops: list[Any],
        to_result: Callable[[str, Any], Any],
        ok: Any,
        applied: int,
        prefix: str,
    ) -> bytes: ...
