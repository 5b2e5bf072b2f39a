"""ProgramState's expiry lots cost in proportion to the lots an operation takes or changes, not to the
member's history (issue 14, docs/DESIGN.md stage 1), with exactly the semantics of the straightforward
implementation they replaced. `Reference` below is that implementation (the O(lots) code as it was:
the whole lots plus a virtual never-expiring lot handed to rules.consume / rules.restore /
rules.expire_due, a re-sort on every change, whole tuples compared on flush); random sequences of
credits, spends, restores, refunds of earns, expiries and nested batches (begin / commit /
rollback_newest / rollback / flush) run on both must give identical lots, pieces, flush() rows, expiry
results, rejections and expiry schedule."""

from __future__ import annotations

import heapq
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fastpath.lot_chain import CHAIN_LOTS_MIN, CHUNK_LOTS_MAX, LotChain
from processor import program as program_module
from processor import rules
from processor.domain import Rejection
from processor.program import _PERMANENT, OWNER_HOLD, OWNER_TRANSACTION, ProgramState

pytestmark = pytest.mark.timeout(300)

NOW = 1_800_000_000_000_000
GRACE = 40
VERSIONS = (
    rules.ProgramVersion("p", 1, 0, expiry_period_us=1_000),
    rules.ProgramVersion("p", 2, 0, expiry_period_us=150),  # earlier expiry: inserted mid-tuple
    rules.ProgramVersion("p", 3, 0, expiry_period_us=None),
)  # never-expiring points
MEMBERS = ("a", "b")


class Reference(ProgramState):
    """The lot operations as they were before issue 14's stage 1 (O(member's lots) each)."""

    def credit_lot(self, version, member_id, transaction_id, amount, issuer_id, now_us):
        if version is None or version.expiry_period_us is None or amount <= 0:
            return
        lot = rules.new_lot(version, transaction_id, amount, now_us, issuer_id)
        before = self.lots.get(member_id, ())
        self._set(self.lots, member_id, tuple(sorted(before + (lot,), key=rules._order)), "lots")
        # an entry when the member's soonest expiry changes (the heap's invariant), as _store_lots
        soonest_before = min((other.expires_at_us for other in before if other.expires_at_us is not None), default=None)
        if soonest_before is None or lot.expires_at_us < soonest_before:
            heapq.heappush(self._due, (lot.expires_at_us, member_id))

    def _with_permanent(self, member_id, spendable):
        lots = list(self.lots.get(member_id, ()))
        permanent = spendable - sum(lot.amount for lot in lots)
        assert permanent >= 0
        if permanent:
            lots.append(rules.Lot(_PERMANENT, permanent, None, ""))
        return lots

    def _store_lots(self, member_id, lots):
        kept = tuple(lot for lot in lots if lot.lot_id != _PERMANENT and lot.amount > 0)
        before = self.lots.get(member_id, ())
        if kept != before:
            self._set(self.lots, member_id, kept or None, "lots")
            soonest = min((lot.expires_at_us for lot in kept), default=None)
            if soonest is not None and soonest != min((lot.expires_at_us for lot in before), default=None):
                heapq.heappush(self._due, (soonest, member_id))

    def _lots_changed(self, member_id):
        before = {lot.key: lot for lot in self._lots_flushed.get(member_id, ())}
        after = {lot.key: lot for lot in self.lots.get(member_id, ())}
        return (
            [key for key in before if key not in after],
            [lot for key, lot in after.items() if before.get(key) != lot],
        )

    def consume(self, member_id, owner, amount, spendable, now_us):
        if amount <= 0:
            return
        after = rules.consume(self._with_permanent(member_id, spendable), amount, now_us)
        self._store_lots(member_id, after.lots)
        self._set(self.pieces, owner, after.pieces, "pieces")

    def restore(self, member_id, owner, amount, spendable, now_us, grace_us, keep_as=None):
        pieces = self.pieces.get(owner)
        if pieces is None:
            return
        total = sum(piece.amount for piece in pieces)
        amount = total if amount is None else min(amount, total)
        after = rules.restore(self._with_permanent(member_id, spendable), pieces, now_us, grace_us, amount)
        self._store_lots(member_id, after.lots)
        self._set(self.pieces, owner, None, "pieces")
        if after.left:
            self._set(self.pieces, keep_as or owner, after.left, "pieces")

    def due(self, now_us, limit):
        taken = []
        while self._due and self._due[0][0] <= now_us and len(taken) < limit:
            at_us, member_id = heapq.heappop(self._due)
            lots = self.lots.get(member_id, ())
            if not lots or lots[0].expires_at_us != at_us:
                continue  # stale: the member's entry at its soonest expiry is on the heap
            after = rules.expire_due(lots, now_us)
            if not after.pieces:
                continue
            pieces = after.pieces[: limit - len(taken)]
            remaining = after.lots + after.pieces[len(pieces) :]
            self._store_lots(member_id, sorted(remaining, key=rules._order))
            if len(pieces) < len(after.pieces):
                heapq.heappush(self._due, (after.pieces[len(pieces)].expires_at_us, member_id))
            taken += [(member_id, piece) for piece in pieces]
        return taken

    def expire_member(self, member_id, now_us):
        after = rules.expire_due(self.lots.get(member_id, ()), now_us)
        if after.pieces:
            self._store_lots(member_id, after.lots)
        return list(after.pieces)


class Twin:
    """The new ProgramState and the Reference driven alike, with the members' spendable points
    (posted − held) kept as the pipeline keeps them."""

    def __init__(self):
        self.new, self.ref = ProgramState(), Reference()
        self.spendable = {m: 0 for m in MEMBERS}
        self.now = NOW
        self.next_id = 1
        self.steps = 0
        self.owner_member: dict[tuple[int, int], str] = {}
        self.marks: list[dict[str, int]] = []  # spendable points at each open batch's begin
        self.begin()

    def both(self, call):
        """call(state) on both: same result, or the same rejection with the same message."""
        outcomes = []
        for state in (self.new, self.ref):
            try:
                outcomes.append(("ok", call(state)))
            except Rejection as error:
                outcomes.append(("rejected", type(error), str(error)))
        assert outcomes[0] == outcomes[1]
        return outcomes[0]

    def check(self):
        self.steps += 1
        new, ref = self.new, self.ref
        assert new.lots == ref.lots
        assert new.pieces == ref.pieces
        assert sorted(new._due) == sorted(ref._due)
        # the heap's invariant, which due() relies on to skip stale entries: an entry at every member's
        # soonest expiry
        entries = set(new._due)
        for member_id, lots in new.lots.items():
            if lots and lots[0].expires_at_us is not None:
                assert (lots[0].expires_at_us, member_id) in entries, (member_id, lots[0])
        assert new._dirty["lots"] == ref._dirty["lots"]
        for member_id, lots in new.lots.items():
            # as fastpath/lot_chain.pyx defines a member's lots: a tuple of a few, a chain of chunks of 1 to
            # CHUNK_LOTS_MAX lots beyond, its length theirs
            # (a chain shrinks back to a tuple at CHAIN_LOTS_MIN lots)
            assert type(lots) is (
                tuple if len(lots) <= CHAIN_LOTS_MIN else LotChain if len(lots) > CHUNK_LOTS_MAX else type(lots)
            )
            if type(lots) is LotChain:
                assert lots.length == sum(map(len, lots.chunks))
                assert all(0 < len(chunk) <= CHUNK_LOTS_MAX for chunk in lots.chunks)
            assert list(lots) == sorted(lots, key=rules._order) and all(lot.amount > 0 for lot in lots)
            assert sum(lot.amount for lot in lots) <= self.spendable[member_id]

    def step(self, rng: random.Random, op: str):
        member_id = rng.choice(MEMBERS)
        if op == "credit":
            version = rng.choice(VERSIONS)
            amount = rng.randint(1, 60)
            transaction_id = self.next_id
            self.next_id += 1
            self.both(
                lambda s: s.credit_lot(version, member_id, transaction_id, amount, rng_issuer(transaction_id), self.now)
            )
            self.spendable[member_id] += amount
        elif op == "consume":
            amount = rng.randint(0, 120)
            owner = (rng.choice((OWNER_HOLD, OWNER_TRANSACTION)), self.next_id)
            self.next_id += 1
            outcome = self.both(lambda s: s.consume(member_id, owner, amount, self.spendable[member_id], self.now))
            if outcome[0] == "ok":
                self.spendable[member_id] -= amount
                self.owner_member[owner] = member_id
        elif op == "restore":
            owners = sorted(self.new.pieces)
            if not owners:
                self.check()
                return
            owner = rng.choice(owners)
            pieces = self.new.pieces[owner]
            member_id = self.owner_member[owner]  # the member whose points the owner took
            total = sum(piece.amount for piece in pieces)
            amount = rng.choice((None, rng.randint(0, total + 5)))
            keep_as = rng.choice((None, (OWNER_TRANSACTION, self.next_id)))
            self.next_id += 1
            back = total if amount is None else min(amount, total)
            self.both(
                lambda s: s.restore(member_id, owner, amount, self.spendable[member_id], self.now, GRACE, keep_as)
            )
            if keep_as is not None:
                self.owner_member[keep_as] = member_id
            self.spendable[member_id] += back
        elif op == "take":
            lots = self.new.lots.get(member_id, ())
            own = rng.choice(lots).lot_id if lots and rng.random() < 0.8 else self.next_id
            amount = rng.randint(0, min(self.spendable[member_id], 80))
            outcome = self.both(lambda s: s._take(member_id, amount, self.spendable[member_id], self.now, own))
            if outcome[0] == "ok":
                self.spendable[member_id] -= amount
        elif op == "expire_member":
            outcome = self.both(lambda s: s.expire_member(member_id, self.now))
            self.spendable[member_id] -= sum(piece.amount for piece in outcome[1])
        elif op == "due":
            limit = rng.randint(1, 4)
            outcome = self.both(lambda s: s.due(self.now, limit))
            for taken_from, piece in outcome[1]:
                self.spendable[taken_from] -= piece.amount
        elif op == "tick":
            self.now += rng.choice((1, 10, 40, 100, 300))
        elif op == "flush":
            new, ref = self.new.flush(), self.ref.flush()
            assert new.lots == ref.lots
            assert new.pieces == ref.pieces
            self.begin()
        elif op == "begin":
            self.begin()
        elif op == "commit":
            if len(self.new._undo) > 1:
                self.both(lambda s: s.commit())
                self.marks.pop(0)
        elif op == "rollback_newest":
            if len(self.new._undo) > 1:
                self.both(lambda s: s.rollback_newest())
                self.spendable = self.marks.pop()
        elif op == "rollback":
            self.both(lambda s: s.rollback())
            self.spendable = self.marks[0] if self.marks else self.spendable
            self.marks = []
            self.begin()
        self.check()

    def begin(self):
        self.both(lambda s: s.begin())
        self.marks.append(dict(self.spendable))


def rng_issuer(transaction_id: int) -> str:
    return "m1" if transaction_id % 3 else "m2"


OPS = (
    ("credit",) * 6
    + ("consume",) * 4
    + ("restore",) * 3
    + ("take", "expire_member", "due", "due")
    + ("tick",) * 3
    + ("flush", "begin", "commit", "rollback_newest", "rollback")
)


# mostly credits and rare ticks: members gather hundreds of lots, chains of several chunks
# (fastpath/lot_chain.pyx's CHUNK_LOTS_MAX), whose spends, expiries and restores cross chunk boundaries
OPS_GROWING = (
    ("credit",) * 120
    + ("consume",) * 18
    + ("restore",) * 6
    + ("take",) * 3
    + ("expire_member", "due", "due", "tick", "flush", "begin", "commit", "rollback_newest")
)


def run(seed: int, steps: int, ops: tuple[str, ...] = OPS) -> Twin:
    twin = Twin()
    rng = random.Random(seed)
    for _ in range(steps):
        twin.step(rng, rng.choice(ops))
    return twin


@given(st.integers(min_value=0, max_value=2**32))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_sequences_match_the_reference(seed):
    twin = run(seed, 60)
    assert twin.steps == 60


def test_a_long_random_run_matches_the_reference():
    twin = run(14, 5_000)
    assert twin.steps == 5_000
    assert any(twin.new.lots.values())  # the run did hold lots at the end (not a vacuous comparison)


def test_a_long_run_of_members_with_many_lots_matches_the_reference():
    twin = Twin()
    rng = random.Random(3)
    chunks_max = 0
    for _ in range(4_000):
        twin.step(rng, rng.choice(OPS_GROWING))
        chunks_max = max([chunks_max, *(len(getattr(lots, "chunks", (lots,))) for lots in twin.new.lots.values())])
    assert chunks_max >= 4, f"the members' lots never took more than {chunks_max} chunks"


class Counted:
    """A key function that counts its calls."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *arguments):
        self.calls += 1
        return self.function(*arguments)


def test_work_is_proportional_to_the_lots_taken_not_to_the_lots_held(monkeypatch):
    lots = tuple(rules.Lot(i, 10, NOW + 1_000 + i, "m1") for i in range(1, 10_001))
    state = ProgramState()
    state.load_lots("m", lots)
    # (the expiry test of a lot a walk from the head passes, where a binary search's key was before)
    order, expiry = Counted(rules._order), Counted(program_module._expired)
    monkeypatch.setattr(rules, "_order", order)
    monkeypatch.setattr(program_module, "_expired", expiry)
    state.begin()

    state.consume("m", (OWNER_TRANSACTION, 20_001), 25, 100_000, NOW)  # lots 1 and 2 and half of 3
    after = state.lots["m"]
    assert state.pieces[(OWNER_TRANSACTION, 20_001)] == (lots[0], lots[1], rules.Lot(3, 5, lots[2].expires_at_us, "m1"))
    assert after[0] == rules.Lot(3, 5, lots[2].expires_at_us, "m1")
    assert len(after) == 9_998 and all(a is b for a, b in zip(after[1:], lots[3:]))  # the very same objects
    state.credit_lot(VERSIONS[0], "m", 20_002, 7, "m1", NOW + 20_000)  # expires last: appended
    state.restore("m", (OWNER_TRANSACTION, 20_001), 12, 100_000 - 25 + 7, NOW, GRACE)
    write = state.flush()
    calls = order.calls + expiry.calls
    assert calls <= 4 * 15 * 4, f"{calls} order-key calls for a member holding 10,000 lots"
    # lot 1 gone; 7 of lot 2 back (the last piece, 5 of lot 3, first: lot 3 is as flushed, no row)
    assert write.lots == {
        "m": (
            [lots[0].key],
            [rules.Lot(2, 7, lots[1].expires_at_us, "m1"), rules.Lot(20_002, 7, NOW + 20_000 + 1_000, "m1")],
        )
    }
    assert state.pieces[(OWNER_TRANSACTION, 20_001)] == (lots[0], rules.Lot(2, 3, lots[1].expires_at_us, "m1"))
