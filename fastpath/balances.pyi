"""What Python sees of fastpath/balances.pyx (processor/events.py balances_after's walk in C; the twin is
processor/events.py _balances_after_python)."""

from typing import Any

class TransactionOrderError(ValueError): ...

def balances_after_ordered(
    transactions: list[tuple[Any, ...]], entries: list[tuple[Any, ...]], new_members: Any, ledger: Any
) -> dict[int, int] | None: ...
