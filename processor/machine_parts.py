"""What the state machine's posting mixins (processor/postings.py, rules_kernel.py, member_postings.py)
may use of LedgerStateMachine: its state, and the few methods one part calls of another. Declared once
here, for the type checker only (nothing is set or defined at run time), so the three mixins do not each
repeat the machine's attributes and method signatures."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from processor.config import Settings
    from processor.domain import Method, Operation, Outcome
    from processor.program import ProgramState
    from processor.state_machine import IdAllocator, Merchants
    from processor.store import BatchWrite, MerchantRow


class MachineParts:
    """The state LedgerStateMachine sets (its __init__) and the methods it defines, as the mixins see them."""

    settings: Settings
    merchants: Merchants
    ledger: Any  # fastpath.Ledger: the compiled kernel or its pure-Python twin
    program: ProgramState
    ids: IdAllocator
    operator_accounts: dict[str, int]
    account_ids: list[int]

    if TYPE_CHECKING:

        def _applied(
            self,
            op: Operation,
            write: BatchWrite,
            now_us: int,
            created: int,
            status: int,
            slot: int,
            amount: int,
            posted: int,
            available: int,
            kind: int,
        ) -> Outcome: ...

        def _fee(
            self, write: BatchWrite, transaction_id: int, merchant: MerchantRow, points: int, schedule: str
        ) -> int: ...

        def _kernel_one(
            self,
            op: Operation,
            slot: int,
            points: int,
            reference: int,
            created: int,
            expires: int,
            now_us: int,
            method: Method | None = None,
        ) -> tuple[int, ...]: ...

        def _expire_member(self, write: BatchWrite, member_id: str, now_us: int) -> None: ...

        def _voucher_account(self, write: BatchWrite, kind: str, owner: str) -> int: ...
