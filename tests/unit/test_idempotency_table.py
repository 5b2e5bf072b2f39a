"""The in-memory idempotency table (processor/idempotency.py): a key it has no entry of is new, a key
it has may be stored; hits, misses, forced collisions, the purge's removals, growth, and why a batch
rolled back needs no undo (its keys are added only once committed: see the pipeline test)."""

from __future__ import annotations

import random

from processor.idempotency import SLOTS_MIN, IdempotencyTable


def keys(prefix: str, count: int, merchant: str = "shop") -> list[tuple[str, str]]:
    return [(merchant, f"{prefix}-{i}") for i in range(count)]


def test_a_key_never_added_is_new_and_an_added_one_may_be_stored():
    table = IdempotencyTable()
    stored, new = keys("stored", 500), keys("new", 500)
    table.add(stored)
    assert table.count == 500
    assert table.maybe_stored(stored + new) == stored
    assert all(table.may_contain(*k) for k in stored)
    assert not any(table.may_contain(*k) for k in new)


def test_the_merchant_is_part_of_the_key():
    table = IdempotencyTable()
    table.add([("shop", "order-1")])
    assert table.maybe_stored([("shop", "order-1"), ("cafe", "order-1")]) == [("shop", "order-1")]


def test_keys_sharing_a_fingerprint_are_all_reported_and_removed_one_at_a_time():
    # every key of merchant "x" has fingerprint 7: the table cannot tell them apart, so each is read
    table = IdempotencyTable(fingerprint=lambda merchant_id, key: 7 if merchant_id == "x" else hash(key) or 1)
    table.add([("x", "first")])
    assert table.maybe_stored([("x", "first"), ("x", "second"), ("y", "first")]) == [("x", "first"), ("x", "second")]
    table.add([("x", "second")])  # the second record is its own entry
    assert table.count == 2
    assert table.remove([("x", "first")], table.epoch) == 1  # the first purged: the second still hits
    assert table.may_contain("x", "second")
    assert table.remove([("x", "second")], table.epoch) == 1
    assert not table.may_contain("x", "anything") and table.count == 0


def test_a_purged_key_is_new_again_and_a_reused_key_survives_the_old_records_purge():
    table = IdempotencyTable()
    table.add([("shop", "a"), ("shop", "b")])
    assert table.remove([("shop", "a")], table.epoch) == 1
    assert table.maybe_stored([("shop", "a"), ("shop", "b")]) == [("shop", "b")]
    # "b" purged in Postgres, used again and committed before the purge's removal ran: two records
    # passed through the table, one is still stored, the entry stays
    table.add([("shop", "b")])
    table.remove([("shop", "b")], table.epoch)
    assert table.may_contain("shop", "b")


def test_removals_computed_before_a_rebuild_are_dropped():
    table = IdempotencyTable()
    table.add([("shop", "a")])
    epoch = table.epoch
    table.reset(10)  # a recovery rebuilt it (from rows the purge may or may not have deleted)
    table.add([("shop", "a")])
    assert table.remove([("shop", "a")], epoch) == 0
    assert table.may_contain("shop", "a")


def test_removing_a_key_never_added_changes_nothing():
    table = IdempotencyTable()
    table.add(keys("k", 100))
    assert table.remove([("shop", "absent")], table.epoch) == 0
    assert table.count == 100 and table.maybe_stored(keys("k", 100)) == keys("k", 100)


def test_random_adds_and_removals_agree_with_a_counter_across_the_wrap_around():
    # a distinct fingerprint per key, their home slots the table's last 1,500: one long probe run that
    # wraps past the last slot, so backward-shift deletion is exercised across the wrap
    rng = random.Random(14)

    def clustered(merchant_id: str, key: str) -> int:
        i = int(key.rpartition("-")[2])
        return -((i % 1_500) + 1) - (i // 1_500) * SLOTS_MIN

    table = IdempotencyTable(fingerprint=clustered)
    model: dict[tuple[str, str], int] = {}
    universe = keys("k", 6_000)
    for _ in range(20):
        added = rng.sample(universe, 300)
        table.add(added)
        for k in added:
            model[k] = model.get(k, 0) + 1
        present = [k for k, n in model.items() if n]
        removed = rng.sample(present, min(len(present), 150))
        assert table.remove(removed, table.epoch) == len(removed)
        for k in removed:
            model[k] -= 1
        assert table.count == sum(model.values())
    assert table.count > 1_500  # the run is longer than the homes it starts from: it wrapped
    assert table.slots == SLOTS_MIN
    assert set(table.maybe_stored(universe)) == {k for k, n in model.items() if n}


def test_the_table_grows_and_keeps_every_key():
    table = IdempotencyTable()
    stored = keys("k", 3 * SLOTS_MIN)
    table.add(stored)
    assert table.slots > SLOTS_MIN and table.count == len(stored)
    assert table.maybe_stored(stored) == stored
    assert table.maybe_stored(keys("other", 1_000)) == []


def test_memory_is_a_few_slots_of_8_bytes_per_key():
    table = IdempotencyTable()
    table.reset(200_000)
    table.add(keys("k", 200_000))
    assert table.slots == 1 << 19  # sized by the rebuild's estimate: no growth while loading
    assert table.memory_bytes / table.count < 24  # 8 bytes a slot, at most 3 slots a key after a rebuild
