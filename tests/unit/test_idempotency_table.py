"""The in-memory idempotency table (processor/idempotency.py): a key it has no entry of is new, a key
it has may be stored, in the batches its entries name; hits, misses, forced collisions, the purge's
removals, growth (each doubling moves a rem bit into the home), the packed slots (batch ids rebuilt from
their low 32 bits across the 2**32 wrap and below zero; candidates only among keys with the same home
and rem), a differential test against a Counter, the false-candidate rate and the longest probe at
LOAD_MAX, and why a batch rolled back needs no undo (its keys are added only once committed: see the
pipeline test). Every test runs on the compiled table (fastpath/idempotency_table.pyx) and on its
pure-Python twin (fastpath/idempotency_reference.py); a differential test feeds both the same random
operations and compares their slots bit for bit."""

from __future__ import annotations

import hashlib
import logging
import pathlib
import random
from collections import Counter

import pytest

from fastpath import idempotency_reference, idempotency_table
from processor import domain, idempotency
from processor.idempotency import (
    BATCH_ID_SPAN_MAX,
    DIST_MAX,
    LOAD_MAX,
    REM_BITS,
    REM_BITS_FLOOR,
    SLOTS_MIN,
    IdempotencyTable,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(params=[idempotency_table.Table, idempotency_reference.Table], ids=["compiled", "python"])
def kernel(request):
    """The table's slots and walks: compiled, or the pure-Python twin."""
    return request.param


def stable(merchant_id: str, key: str) -> int:
    """A 64-bit fingerprint that is the same in every run (Python's hash is salted per process): a test
    asserting that many new keys have no candidate uses it, so its outcome is fixed rather than right
    all but ~load * 2**-24 of the time per key (see the rate test below)."""
    return int.from_bytes(hashlib.blake2b(f"{merchant_id}\0{key}".encode(), digest_size=8).digest(), "big", signed=True)


def keys(prefix: str, count: int, merchant: str = "shop") -> list[tuple[str, str]]:
    return [(merchant, f"{prefix}-{i}") for i in range(count)]


def fingerprint_bits(table: IdempotencyTable) -> int:
    """How many low bits of a fingerprint the table keeps: the home's and the rem's."""
    return table.slots.bit_length() - 1 + table.rem_bits


def test_a_key_never_added_is_new_and_an_added_one_may_be_stored_in_its_batch(kernel):
    table = IdempotencyTable(fingerprint=stable, kernel=kernel)
    stored, new = keys("stored", 500), keys("new", 500)
    table.add(7, stored)
    assert table.count == 500
    assert table.maybe_stored(stored + new) == {k: [7] for k in stored}
    assert all(table.may_contain(*k) for k in stored)
    assert not any(table.may_contain(*k) for k in new)


def test_the_merchant_is_part_of_the_key(kernel):
    table = IdempotencyTable(kernel=kernel)
    table.add(1, [("shop", "order-1")])
    assert table.maybe_stored([("shop", "order-1"), ("cafe", "order-1")]) == {("shop", "order-1"): [1]}


def test_keys_sharing_a_fingerprint_are_all_reported_and_removed_one_at_a_time(kernel):
    # every key of merchant "x" has one fingerprint: the table cannot tell them apart, so each is read,
    # from every batch an entry of the fingerprint names
    shared = 7 << 32 | 7
    table = IdempotencyTable(
        fingerprint=lambda merchant_id, key: shared if merchant_id == "x" else hash(key), kernel=kernel
    )
    table.add(3, [("x", "first")])
    assert table.maybe_stored([("x", "first"), ("x", "second"), ("y", "first")]) == {
        ("x", "first"): [3],
        ("x", "second"): [3],
    }
    table.add(4, [("x", "second")])  # the second record is its own entry
    assert table.count == 2
    assert table.maybe_stored([("x", "second")]) == {("x", "second"): [3, 4]}
    assert table.remove([(3, [("x", "first")])], table.epoch) == 1  # the first purged: the second still hits
    assert table.maybe_stored([("x", "second")]) == {("x", "second"): [4]}
    assert table.remove([(4, [("x", "second")])], table.epoch) == 1
    assert not table.may_contain("x", "anything") and table.count == 0


def test_a_fingerprint_of_zero_is_stored_and_only_the_bits_above_home_and_rem_do_not_matter(kernel):
    # 2**16 slots: home = bits 0-15, rem = bits 16-39; a slot holds distance + 1, so a fingerprint of 0
    # in batch 0 is still an occupied (non-zero) slot
    above = 1 << (16 + REM_BITS)
    prints = {"zero": 0, "above": above, "far-above": 5 * above, "home": 1, "rem": 1 << 16, "top-rem": 1 << 39}
    table = IdempotencyTable(fingerprint=lambda merchant_id, key: prints[key], kernel=kernel)
    assert fingerprint_bits(table) == 16 + REM_BITS
    table.add(0, [("shop", "zero")])
    assert table.count == 1
    # zero, above and far-above differ only above bit 39: each may be stored in batch 0; a key differing
    # in one home bit or one rem bit is new
    assert table.maybe_stored([("shop", key) for key in prints]) == {
        ("shop", "zero"): [0],
        ("shop", "above"): [0],
        ("shop", "far-above"): [0],
    }
    assert table.remove([(0, [("shop", "far-above")])], table.epoch) == 1  # the entry (home 0, rem 0, batch 0)
    assert table.count == 0 and table.maybe_stored([("shop", "zero")]) == {}


def test_batch_ids_are_rebuilt_from_their_low_bits_across_the_wrap_and_below_zero(kernel):
    table = IdempotencyTable(kernel=kernel)
    legacy, before, after = ("shop", "legacy"), ("shop", "before"), ("shop", "after")
    wrap = 1 << 32
    table.add(-3, [legacy])  # moved by migration 0023: a negative id (low bits 0xFFFFFFFD)
    table.add(10, [before])
    assert table.maybe_stored([legacy, before]) == {legacy: [-3], before: [10]}
    table = IdempotencyTable(kernel=kernel)
    table.add(wrap - 2, [before])  # low bits 0xFFFFFFFE
    table.add(wrap + 5, [after])  # low bits 5: past the wrap
    assert table.newest_batch_id == wrap + 5
    assert table.maybe_stored([before, after]) == {before: [wrap - 2], after: [wrap + 5]}
    assert table.remove([(wrap - 2, [before])], table.epoch) == 1  # the purge finds it by its low bits
    assert table.maybe_stored([before, after]) == {after: [wrap + 5]}


def test_a_batch_id_2_to_the_32_from_the_newest_is_refused(kernel):
    table = IdempotencyTable(kernel=kernel)
    table.add(10, [("shop", "a")])
    with pytest.raises(domain.InvariantViolation):
        table.add(10 + BATCH_ID_SPAN_MAX, [("shop", "b")])
    table.add(10 + BATCH_ID_SPAN_MAX - 1, [("shop", "c")])
    with pytest.raises(domain.InvariantViolation):
        table.add(9, [("shop", "d")])  # older than 2**32 batches before the newest


def test_a_purged_key_is_new_again_and_a_reused_key_survives_the_old_records_purge(kernel):
    table = IdempotencyTable(kernel=kernel)
    table.add(1, [("shop", "a"), ("shop", "b")])
    assert table.remove([(1, [("shop", "a")])], table.epoch) == 1
    assert table.maybe_stored([("shop", "a"), ("shop", "b")]) == {("shop", "b"): [1]}
    # "b" purged in Postgres, used again and committed before the purge's removal ran: two records
    # passed through the table, one is still stored (batch 2's), the entry stays
    table.add(2, [("shop", "b")])
    table.remove([(1, [("shop", "b")])], table.epoch)
    assert table.maybe_stored([("shop", "b")]) == {("shop", "b"): [2]}


def test_a_purge_removes_only_the_entries_of_the_batches_it_deleted(kernel):
    table = IdempotencyTable(fingerprint=stable, kernel=kernel)
    for batch_id in range(1, 11):
        table.add(batch_id, keys(f"b{batch_id}", 100))
    assert table.remove([(b, keys(f"b{b}", 100)) for b in range(1, 6)], table.epoch) == 500
    assert table.count == 500
    assert table.maybe_stored(keys("b3", 100)) == {}
    assert table.maybe_stored(keys("b8", 100)) == {k: [8] for k in keys("b8", 100)}


def test_removals_computed_before_a_rebuild_are_dropped(kernel):
    table = IdempotencyTable(kernel=kernel)
    table.add(1, [("shop", "a")])
    epoch = table.epoch
    table.reset(10)  # a recovery rebuilt it (from rows the purge may or may not have deleted)
    table.add(1, [("shop", "a")])
    assert table.remove([(1, [("shop", "a")])], epoch) == 0
    assert table.may_contain("shop", "a")


def test_removing_a_key_never_added_changes_nothing(kernel):
    table = IdempotencyTable(kernel=kernel)
    table.add(1, keys("k", 100))
    assert table.remove([(1, [("shop", "absent")])], table.epoch) == 0
    assert table.remove([(2, keys("k", 100))], table.epoch) == 0  # its keys, another batch: not its entries
    assert table.count == 100 and list(table.maybe_stored(keys("k", 100))) == keys("k", 100)


def test_random_adds_and_removals_agree_with_a_counter_across_the_wrap_around(kernel):
    # a distinct fingerprint per key, their home slots a window of 3,000 around the table's last slot
    # (3,000 entries at the end: a full window, long runs): runs that wrap past the last slot, so Robin
    # Hood insertion and backward-shift deletion are exercised across the wrap
    rng = random.Random(14)

    def clustered(merchant_id: str, key: str) -> int:
        i = int(key.rpartition("-")[2])
        return (SLOTS_MIN - 2_000 + (i * 7_919) % 3_000) % SLOTS_MIN + (i + 1) * SLOTS_MIN

    table = IdempotencyTable(fingerprint=clustered, kernel=kernel)
    model: dict[tuple[str, str], list[int]] = {}
    universe = keys("k", 6_000)
    for batch_id in range(1, 21):
        added = rng.sample(universe, 300)
        table.add(batch_id, added)
        for k in added:
            model.setdefault(k, []).append(batch_id)
        present = [k for k, ids in model.items() if ids]
        removed = rng.sample(present, min(len(present), 150))
        batches: dict[int, list[tuple[str, str]]] = {}
        for k in removed:
            batches.setdefault(model[k].pop(rng.randrange(len(model[k]))), []).append(k)
        assert table.remove(list(batches.items()), table.epoch) == len(removed)
        assert table.count == sum(map(len, model.values()))
    # an entry in the table's first slots sits farther from home than its slot number: its home is
    # before the wrap
    assert any((value >> 32 & 0xFF) - 1 > i for i, value in enumerate(table._slots[:1_000]))
    assert table.slots == SLOTS_MIN
    found = table.maybe_stored(universe)
    assert {k: sorted(ids) for k, ids in found.items()} == {k: sorted(ids) for k, ids in model.items() if ids}


def test_the_table_grows_and_keeps_every_key(kernel):
    table = IdempotencyTable(fingerprint=stable, kernel=kernel)
    stored = keys("k", 3 * SLOTS_MIN)
    table.add(1, stored)
    assert table.slots > SLOTS_MIN and table.count == len(stored)
    assert table.maybe_stored(stored) == {k: [1] for k in stored}
    assert table.maybe_stored(keys("other", 1_000)) == {}


def test_memory_is_a_few_slots_of_8_bytes_per_key(kernel):
    table = IdempotencyTable(kernel=kernel)
    table.reset(200_000)
    table.add(1, keys("k", 200_000))
    assert table.slots == 1 << 19  # sized by the rebuild's estimate: no growth while loading
    assert table.memory_bytes / table.count < 24  # 8 bytes a slot, at most 3 slots a key after a rebuild


def test_each_doubling_moves_a_rem_bit_into_the_home_and_keeps_every_key(kernel):
    table = IdempotencyTable(fingerprint=stable, slots=8, kernel=kernel)
    stored = keys("k", 3_000)
    for batch_id in range(1, 31):
        table.add(batch_id, stored[(batch_id - 1) * 100 : batch_id * 100])
    assert table.slots == 4_096 and table.rem_bits == REM_BITS - 9  # 8 -> 4,096 slots: nine doublings
    assert fingerprint_bits(table) == 3 + REM_BITS  # the bits kept stay those of the first geometry
    assert table.maybe_stored(stored) == {k: [i // 100 + 1] for i, k in enumerate(stored)}
    assert table.maybe_stored(keys("other", 1_000)) == {}


def test_growth_below_the_rem_bits_floor_still_keeps_every_key_and_says_to_size_the_table(caplog, kernel):
    table = IdempotencyTable(fingerprint=stable, slots=2, kernel=kernel)
    stored = keys("k", 40_000)
    with caplog.at_level(logging.WARNING, logger="points.idempotency"):
        table.add(1, stored)
    assert table.rem_bits < REM_BITS_FLOOR
    assert any("few fingerprint bits" in r.getMessage() for r in caplog.records)
    assert table.count == len(stored) and table.maybe_stored(stored) == {k: [1] for k in stored}


def test_a_fingerprint_giving_hundreds_of_keys_one_home_is_refused_not_grown_without_end(kernel):
    table = IdempotencyTable(fingerprint=lambda merchant_id, key: 42, kernel=kernel)
    table.add(1, keys("k", DIST_MAX + 1))  # distances 0..DIST_MAX: fits
    with pytest.raises(domain.InvariantViolation, match="64-bit hash"):
        table.add(2, [("shop", "one-too-many")])
    assert table.slots == SLOTS_MIN


@pytest.mark.parametrize("collisions", ["few-low-bits", "equal-fingerprints", "shared-parts"])
@pytest.mark.parametrize("seed", [1, 2])
def test_random_operations_agree_with_a_counter_of_records_and_never_call_a_stored_key_new(collisions, seed, kernel):
    """Adds, purges and lookups of stored and new keys on a table that starts at 8 slots (so it doubles
    again and again), batch ids crossing the 2**32 wrap, with forced collisions: the table's answer for
    any key is exactly the batches of the records whose fingerprints agree with the key's on the bits it
    keeps (home and rem): so never "new" for a stored key, and no other candidate."""
    rng = random.Random(f"{collisions}-{seed}")
    universe = keys("k", 600)
    parts = [rng.getrandbits(64) for _ in range(64)]

    def forced(merchant_id: str, key: str) -> int:
        i = int(key.rpartition("-")[2])
        if collisions == "few-low-bits":  # 3 values in the low 4 bits: homes crowd until the table is large
            return (parts[i % 64] ^ rng_free(i)) << 4 | i % 3
        if collisions == "equal-fingerprints":  # 5 keys a fingerprint: one value, five keys' records
            return rng_free(i // 5)
        # home bits from one small pool, rem bits from another, upper bits from a third: equal homes
        # with other rems, equal rems in other homes, equal homes and rems with other upper bits
        return (parts[i % 4] & 0x3FF) | (parts[i // 4 % 4] & ~0x3FF & (1 << 30) - 1) | parts[i // 16 % 32] << 30

    def rng_free(i: int) -> int:
        return int.from_bytes(hashlib.blake2b(f"{seed}-{i}".encode(), digest_size=8).digest(), "big")

    table = IdempotencyTable(fingerprint=forced, slots=8, kernel=kernel)
    model: Counter[tuple[tuple[str, str], int]] = Counter()
    batch_id = BATCH_ID_SPAN_MAX - 2_000 - rng.randrange(1_000)
    for step in range(3_000):
        action = rng.random()
        if action < 0.55:
            batch_id += rng.randrange(1, 4)
            added = rng.sample(universe, rng.randrange(1, 4))
            table.add(batch_id, added)
            model.update((k, batch_id) for k in added)
        elif action < 0.85 and model:
            purged = rng.sample(sorted(model), min(len(model), rng.randrange(1, 5)))
            assert table.remove([(b, [k]) for k, b in purged], table.epoch) == len(purged)
            model.subtract(purged)
            model = +model
        else:
            asked = rng.sample(universe, 20)
            stored = {k for k, _ in model}
            answer = table.maybe_stored(asked)
            for k in asked:
                if k in stored:  # never "new" for a stored key: that would post a retry twice
                    assert {b for k2, b in model if k2 == k} <= set(answer[k])
        assert table.count == sum(model.values())
        if step % 250 == 249:
            kept = (1 << fingerprint_bits(table)) - 1
            expected: dict[int, set[int]] = {}
            for k, b in model:
                expected.setdefault(forced(*k) & kept, set()).add(b)
            answer = table.maybe_stored(universe)
            assert {k: set(ids) for k, ids in answer.items()} == {
                k: expected[forced(*k) & kept] for k in universe if forced(*k) & kept in expected
            }
            assert all(len(ids) == len(set(ids)) for ids in answer.values())
    assert table.slots >= 256 and table.rem_bits <= REM_BITS - 5  # it grew, several times
    assert batch_id > BATCH_ID_SPAN_MAX  # the ids crossed the wrap of their low 32 bits


def test_the_longest_probe_at_load_max_on_2_to_the_20_slots_is_far_under_the_distance_byte(kernel):
    table = IdempotencyTable(slots=1 << 20, kernel=kernel)
    table.add(1, keys("k", int((1 << 20) * LOAD_MAX) - 1))
    assert table.slots == 1 << 20  # not grown: just under LOAD_MAX
    assert table.dist_max() < DIST_MAX // 4  # measured: 20-30 (Robin Hood's longest run is ~log n)


def test_new_keys_meet_a_false_candidate_about_once_in_2_to_the_24_lookups_per_stored_key_in_their_home(kernel):
    # Only a stored key with the new key's home and its 24-bit rem is a candidate: ~ load * 2**-24 per
    # new key (0.00003 a batch of 1,000 at 30M keys in 2**26 slots; the 32-bit tags before gave stored /
    # 2**32 each: about 23 here, 7 a batch at 30M). The salted default fingerprint: any run may meet one.
    table = IdempotencyTable(kernel=kernel)
    table.reset(1_000_000)
    for batch_id in range(1, 1_001):
        table.add(batch_id, keys(f"b{batch_id}", 1_000))
    new = keys("new", 100_000, merchant="cafe")
    expected = 100_000 * LOAD_MAX * 2**-REM_BITS  # a bound: the load is at most LOAD_MAX; 0.0045
    false = table.maybe_stored(new)
    assert len(false) <= 2, (len(false), expected)  # P(3 or more) ~ expected**3 / 6 ~ 1e-8


def test_an_entry_that_would_sit_farther_than_the_distance_byte_grows_the_table_which_splits_the_run(kernel):
    # 300 keys with one home (slot 5 of 1,024) and distinct rems: the 256th would sit DIST_MAX + 1 away;
    # doubling moves each rem's lowest bit into the home, so the run splits in two of ~150
    table = IdempotencyTable(
        fingerprint=lambda merchant_id, key: int(key.rpartition("-")[2]) << 10 | 5, slots=1_024, kernel=kernel
    )
    stored = keys("k", 300)
    table.add(1, stored)
    assert table.slots == 2_048 and table.rem_bits == REM_BITS - 1  # grown once, at 0.29 full: by distance
    assert table.dist_max() < DIST_MAX
    assert table.maybe_stored(stored + keys("k", 400)[300:]) == {k: [1] for k in stored}


@pytest.mark.parametrize("seed", [3, 4])
def test_the_compiled_table_and_its_python_twin_agree_answer_for_answer_and_slot_for_slot(seed, caplog):
    """The same random adds (doublings by load and by distance from 8 slots, batch ids across the 2**32
    wrap and below zero), purges and look-ups on both kernels, with fingerprints crowding few homes and
    rems: the same answers, counts, geometry and every slot equal after each step."""
    rng = random.Random(seed)
    universe = keys("k", 2_000) + keys("k", 500, merchant="cafe")
    pool = [rng.getrandbits(24) for _ in range(300)]  # the low 24 bits: keys share homes and rems
    prints = {k: rng.getrandbits(64) & ~0xFFFFFF | rng.choice(pool) for k in universe}
    crowded = [k for k in universe if rng.random() < 0.35]
    for k in crowded:  # one home until the table passes 1,024 slots: a run past DIST_MAX, growth by distance
        prints[k] = prints[k] & ~0x3FF | 0x155

    def forced(merchant_id: str, key: str) -> int:
        return prints[(merchant_id, key)] - (1 << 63)  # negative half the time: the low 64 bits are used

    compiled = IdempotencyTable(fingerprint=forced, slots=8, kernel=idempotency_table.Table)
    python = IdempotencyTable(fingerprint=forced, slots=8, kernel=idempotency_reference.Table)
    stored: list[tuple[int, tuple[str, str]]] = []
    batch_id = -5
    caplog.set_level(logging.WARNING, logger="points.idempotency")
    for step in range(400):
        action = rng.random()
        if action < 0.5:
            batch_id += rng.choice([1, 1, 2, 1 << 31])  # now and then a jump: ids cross 2**32
            added = rng.sample(universe, rng.randrange(1, 40))
            compiled.add(batch_id, added)
            python.add(batch_id, added)
            stored += [(batch_id, k) for k in added]
        elif action < 0.75 and stored:
            purged = [stored.pop(rng.randrange(len(stored))) for _ in range(min(len(stored), rng.randrange(1, 20)))]
            purged += [(batch_id + 1, universe[0])]  # never added in that batch: no entry dropped
            batches = [(b, [k]) for b, k in purged]
            assert compiled.remove(batches, compiled.epoch) == python.remove(batches, python.epoch)
        else:
            asked = rng.sample(universe, 50) + crowded[:5]
            assert compiled.maybe_stored(asked) == python.maybe_stored(asked)
        assert (compiled.count, compiled.slots, compiled.rem_bits) == (python.count, python.slots, python.rem_bits)
        if step % 20 == 0:
            assert compiled._slots == python._slots
    assert compiled._slots == python._slots and compiled.count == len(stored)
    assert compiled.slots >= 1_024 and batch_id > 1 << 32  # it grew, and the ids crossed the wrap
    reasons = {getattr(r, "reason", None) for r in caplog.records}
    assert {idempotency_table.GROW_LOAD, idempotency_table.GROW_DISTANCE} <= reasons  # both ways of growing
    assert compiled.maybe_stored(universe) == python.maybe_stored(universe)
    assert compiled.dist_max() == python.dist_max()


def test_the_compiled_default_fingerprint_is_pythons_hash_of_the_pair():
    """The compiled table hashes the (merchant_id, key) tuple in C: the fingerprint the module documents,
    so a table built with an explicit `fingerprint` function holds the same slots."""
    pairs = keys("k", 5_000) + keys("k", 5_000, merchant="cafe") + [("", ""), ("é", "ключ")]
    default = IdempotencyTable()
    explicit = IdempotencyTable(fingerprint=lambda merchant_id, key: idempotency.fingerprint(merchant_id, key))
    assert explicit._custom is not None and default._custom is None  # the explicit one is called per key
    default.add(1, pairs)
    explicit.add(1, pairs)
    assert default._slots == explicit._slots
    default.fingerprint = explicit.fingerprint  # replaced after construction, as the integration tests do
    assert default._custom is explicit.fingerprint


def test_the_table_in_service_is_the_compiled_one():
    assert isinstance(IdempotencyTable()._table, idempotency_table.Table)
