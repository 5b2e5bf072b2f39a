"""Idempotency decided in memory (processor/idempotency.py), against a real Postgres: the committer
in-process, so the table and its reads can be watched. A batch of new keys reads no stored outcome; a
retry reads and replays; two keys forced to one fingerprint behave as two keys; the table is rebuilt
by a restart, and after a batch refused by Postgres (a key written around the service) by the resync."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import asyncpg
import pytest

from processor import config, domain, metrics
from processor.domain import Code, Method, Operation, Outcome
from processor.pipeline import Pipeline
from processor.store import Store
from tests.harness import add_merchant, fetch, ledger_discrepancies
from tests.integration.helpers import unique
from tests.integration.idempotency_rows import age_records, insert_records, record

pytestmark = pytest.mark.timeout(120)


def keys_read() -> float:
    return metrics.registry.get_sample_value("points_idempotency_keys_read_total") or 0.0


async def open_pipeline(url: str, fingerprint=None, settings: config.Settings | None = None) -> Pipeline:
    store = await Store.open(url, 4)
    await store.migrate()
    await store.acquire_writer_lock()
    pipeline = Pipeline(settings or config.Settings(), store)
    if fingerprint is not None:
        pipeline.idempotency.fingerprint = fingerprint  # before recovery: the rebuild uses it too
    await pipeline.recover()
    pipeline.start()
    return pipeline


async def close_pipeline(pipeline: Pipeline) -> None:
    await pipeline.stop()
    await pipeline.store.close()


def earn_operation(pipeline: Pipeline, merchant: str, member: str, purchase: int, key: str) -> Operation:
    row = pipeline.merchants.by_id[merchant]
    return Operation(
        method=Method.EARN,
        merchant_id=merchant,
        merchant_slot=row.merchant_slot,
        idempotency_key=key,
        request={"member_id": member, "purchase_amount": purchase},
        member_id=member,
        purchase_amount=purchase,
        points=domain.earn_point_units(purchase, row.give_back_bps),
    )


async def earn(pipeline: Pipeline, merchant: str, member: str, purchase: int, key: str) -> Outcome:
    return await asyncio.wait_for(pipeline.submit(earn_operation(pipeline, merchant, member, purchase, key)), 30)


async def earn_batch(pipeline: Pipeline, merchant: str, orders: list[tuple[str, int, str]]) -> list[Outcome]:
    ops = [earn_operation(pipeline, merchant, member, purchase, key) for member, purchase, key in orders]
    await asyncio.wait_for(asyncio.shield(pipeline.enqueue_many(ops).future), 30)
    return [op.outcome for op in ops]


@pytest.fixture
def database(create_database) -> tuple[str, str]:
    url = create_database()
    merchant = unique("m")
    add_merchant(url, merchant, 1000)
    return url, merchant


def test_new_keys_read_nothing_and_a_retry_reads_and_replays(database):
    url, merchant = database

    async def go():
        pipeline = await open_pipeline(url)
        try:
            before = keys_read()
            orders = [(unique("ann"), 1_000 + i, unique("k")) for i in range(50)]
            first = await earn_batch(pipeline, merchant, orders)
            assert [o.code for o in first] == [Code.OK] * 50 and not any(o.replayed for o in first)
            assert keys_read() == before, "a batch of new keys read no stored outcome"
            assert pipeline.idempotency.count == 50
            again = await earn_batch(pipeline, merchant, orders[:10] + [(unique("bob"), 500, unique("k"))])
            assert keys_read() == before + 10, "only the retried keys were read"
            assert [o.replayed for o in again] == [True] * 10 + [False]
            assert [o.fields for o in again[:10]] == [o.fields for o in first[:10]]
        finally:
            await close_pipeline(pipeline)

    asyncio.run(go())
    assert ledger_discrepancies(url) == []


def test_two_keys_of_one_fingerprint_are_two_operations_and_each_replays(database):
    url, merchant = database
    member = unique("ann")

    async def go():
        pipeline = await open_pipeline(url, fingerprint=lambda merchant_id, key: 42)  # every key collides
        try:
            first = await earn(pipeline, merchant, member, 1_000, "first")
            before = keys_read()
            second = await earn(pipeline, merchant, member, 3_000, "second")  # hits the table, is not stored
            assert keys_read() == before + 1, "the colliding key was read from Postgres"
            assert second.code is Code.OK and not second.replayed
            assert second.fields["transaction_id"] != first.fields["transaction_id"]
            assert second.fields["balance"] == first.fields["points"] + second.fields["points"]
            assert pipeline.idempotency.count == 2
            replayed_first = await earn(pipeline, merchant, member, 1_000, "first")
            replayed_second = await earn(pipeline, merchant, member, 3_000, "second")
            assert (replayed_first.replayed, replayed_first.fields) == (True, first.fields)
            assert (replayed_second.replayed, replayed_second.fields) == (True, second.fields)
            reused = await earn(pipeline, merchant, member, 9_999, "second")
            assert reused.code is Code.ALREADY_EXISTS and "purchase_amount" in reused.message
        finally:
            await close_pipeline(pipeline)

    asyncio.run(go())
    assert len(fetch(url, "SELECT 1 FROM transactions WHERE merchant_id = $1", merchant)) == 2
    assert ledger_discrepancies(url) == []


def test_a_key_stored_before_a_restart_replays_after_it(database):
    url, merchant = database
    member, key = unique("ann"), unique("k")

    async def before_restart() -> Outcome:
        pipeline = await open_pipeline(url)
        try:
            return await earn(pipeline, merchant, member, 2_500, key)
        finally:
            await close_pipeline(pipeline)

    async def after_restart(first: Outcome) -> None:
        pipeline = await open_pipeline(url)
        try:
            assert pipeline.idempotency.count == 1 and pipeline.idempotency.may_contain(merchant, key)
            retried = await earn(pipeline, merchant, member, 2_500, key)
            assert (retried.code, retried.replayed, retried.fields) == (Code.OK, True, first.fields)
        finally:
            await close_pipeline(pipeline)

    first = asyncio.run(before_restart())
    assert first.code is Code.OK and not first.replayed
    asyncio.run(after_restart(first))
    assert len(fetch(url, "SELECT 1 FROM transactions WHERE merchant_id = $1", merchant)) == 1
    assert ledger_discrepancies(url) == []


def test_a_key_written_around_the_running_service_is_seen_from_the_next_recovery(database):
    # A record written around the running service (not in its table): the batch that reuses the key
    # takes it as new (the in-memory table decides, processor/idempotency.py). Since migration 0023
    # Postgres holds the records one row per batch, with no per-key primary key to refuse the second
    # record at the projection (what stopped the service here before): the batch is answered and
    # projected, and the service keeps serving. The next recovery rebuilds the table from Postgres,
    # and a retry of the key then replays the older record (the first one stored) without posting again.
    url, merchant = database
    member, outside, other = unique("ann"), unique("k"), unique("k")
    fields = {"transaction_id": 999_999, "points": 7, "balance": 7, "give_back_bps": 1000, "created_at_us": 1}

    async def around() -> None:
        pipeline = await open_pipeline(url)
        try:
            await earn(pipeline, merchant, member, 1_000, unique("k"))  # the member exists
            await insert_records(
                pipeline.store.pool,
                [record(merchant, outside, {"member_id": member, "purchase_amount": 70}, "OK", fields)],
            )
            answered = await earn_batch(pipeline, merchant, [(member, 70, outside), (member, 500, other)])
            assert [(o.code, o.replayed) for o in answered] == [(Code.OK, False), (Code.OK, False)]
            await pipeline.projected()
            assert pipeline.ready and pipeline._task is not None and not pipeline._task.done()
        finally:
            await close_pipeline(pipeline)

    async def after_recovery() -> None:
        pipeline = await open_pipeline(url)
        try:
            before = keys_read()
            retried = await earn(pipeline, merchant, member, 70, outside)
            assert keys_read() == before + 1
            assert (retried.code, retried.replayed, retried.fields) == (Code.OK, True, fields)
        finally:
            await close_pipeline(pipeline)

    asyncio.run(around())
    asyncio.run(after_recovery())
    assert (
        len(fetch(url, "SELECT 1 FROM transactions WHERE merchant_id = $1 AND member_id = $2", merchant, member)) == 3
    )


def test_the_retention_purge_drops_the_keys_it_deleted_from_the_table(database):
    url, merchant = database
    member, old, recent = unique("ann"), unique("k"), unique("k")

    async def go():
        pipeline = await open_pipeline(url)
        try:
            await earn(pipeline, merchant, member, 1_000, old)
            await earn(pipeline, merchant, member, 2_000, recent)
            # their records are in their batches' rows, written with the appends
            assert await age_records(pipeline.store.pool, old, "40 days") == 1
            table, epoch = pipeline.idempotency, pipeline.idempotency.epoch
            deleted = await pipeline.store.purge_idempotency(
                dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30),
                deleted_keys=lambda keys: table.remove(keys, epoch),
            )
            assert deleted == 1 and table.count == 1
            assert not table.may_contain(merchant, old) and table.may_contain(merchant, recent)
            before = keys_read()
            again = await earn(pipeline, merchant, member, 1_000, old)  # past retention: a new operation
            assert again.code is Code.OK and not again.replayed and keys_read() == before
            assert (await earn(pipeline, merchant, member, 2_000, recent)).replayed
        finally:
            await close_pipeline(pipeline)

    asyncio.run(go())
    assert ledger_discrepancies(url) == []


def test_a_retry_of_a_batch_not_yet_projected_replays_without_waiting_for_the_projector(database):
    # The record is durable with its batch's log append (its idempotency_batches row goes in with the
    # log row, migration 0023): a retry reads it there while the projector is held, well within a
    # projection wait that would otherwise have refused it (before, the retry waited for the projection
    # to catch up, and was answered UNAVAILABLE past projection_wait_seconds).
    url, merchant = database
    member, key, other = unique("ann"), unique("k"), unique("k")

    async def go():
        pipeline = await open_pipeline(url, settings=config.Settings(projection_wait_seconds=0.5))
        blocker = await asyncpg.connect(url)
        try:
            await earn(pipeline, merchant, member, 1_000, unique("k"))
            assert await pipeline.projector.wait_through(pipeline._answered_batch_id, 60)
            await blocker.execute("BEGIN")
            await blocker.fetchval("SELECT through_batch_id FROM projection_state FOR UPDATE")  # the projector waits
            first = await earn(pipeline, merchant, member, 2_000, key)
            assert first.code is Code.OK and not first.replayed
            appended = pipeline._answered_batch_id
            assert pipeline.projector.through < appended, "the batch is not projected"
            before = keys_read()
            [retried, new] = await earn_batch(pipeline, merchant, [(member, 2_000, key), (member, 300, other)])
            assert keys_read() == before + 1
            assert (retried.code, retried.replayed, retried.fields) == (Code.OK, True, first.fields)
            assert new.code is Code.OK and not new.replayed
            assert pipeline.projector.through < appended, "the replay did not wait for the projection"
            # the same through the view, in Postgres, before any projection
            rows = await pipeline.store.pool.fetch(
                "SELECT method, outcome FROM idempotency_keys WHERE merchant_id = $1 AND idempotency_key = $2",
                merchant,
                key,
            )
            assert [tuple(r) for r in rows] == [("Earn", "OK")]
            await blocker.execute("ROLLBACK")
            # the projector catches up (after its retry's back-off: longer than this test's projection wait)
            assert await pipeline.projector.wait_through(pipeline._answered_batch_id, 60)
        finally:
            await blocker.close()
            await close_pipeline(pipeline)

    asyncio.run(go())
    assert (
        len(fetch(url, "SELECT 1 FROM transactions WHERE merchant_id = $1 AND member_id = $2", merchant, member)) == 3
    )
    assert ledger_discrepancies(url) == []


def test_records_stored_before_migration_0023_are_read_through_the_view_and_replayed_after_it(create_database):
    # A database whose idempotency_keys was a table (migrations through 0022), with records of two
    # batches (two created_at values): 0023 moves them into idempotency_batches (one row per created_at,
    # batch ids below zero), the view shows them as they were, and the service replays them.
    from tests.integration.test_copy_binary import migrate_rest, through_migration

    url = create_database()
    asyncio.run(through_migration(url, 22))
    merchant, member = unique("m"), unique("ann")
    fields = {"transaction_id": 424_242, "points": 50, "balance": 50, "give_back_bps": 1000, "created_at_us": 7}
    refused = ("FAILED_PRECONDITION", "member is frozen; unfreeze first")

    async def legacy() -> None:
        c = await asyncpg.connect(url)
        try:
            await c.executemany(
                """INSERT INTO idempotency_keys (merchant_id, idempotency_key, method, request, outcome, response,
                                                 message, created_at)
                   VALUES ($1, $2, 'Earn', $3, $4, $5, $6, $7)""",
                [
                    (
                        merchant,
                        "old-ok",
                        '{"member_id": "%s", "purchase_amount": 500}' % member,
                        "OK",
                        json.dumps(fields),
                        "",
                        dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc),
                    ),
                    (
                        merchant,
                        "old-refused",
                        '{"member_id":"%s","purchase_amount":70}' % member,
                        refused[0],
                        None,
                        refused[1],
                        dt.datetime(2026, 11, 2, tzinfo=dt.timezone.utc),
                    ),
                    (
                        merchant,
                        "old-other",
                        '{"member_id":"x","purchase_amount":1}',
                        "OK",
                        "{}",
                        None,
                        dt.datetime(2026, 11, 2, tzinfo=dt.timezone.utc),
                    ),
                ],
            )
        finally:
            await c.close()

    asyncio.run(legacy())
    asyncio.run(migrate_rest(url))
    add_merchant(url, merchant, 1000)
    rows = fetch(url, "SELECT batch_id, operations FROM idempotency_batches ORDER BY batch_id")
    assert [tuple(r) for r in rows] == [(-2, 1), (-1, 2)]  # newest first: -1 is the 2 November group
    view = {r["idempotency_key"]: r for r in fetch(url, "SELECT * FROM idempotency_keys")}
    assert set(view) == {"old-ok", "old-refused", "old-other"}
    assert view["old-ok"]["request"] == '{"member_id": "%s", "purchase_amount": 500}' % member  # as stored
    assert json.loads(view["old-ok"]["response"]) == fields and view["old-ok"]["message"] == ""
    assert (view["old-refused"]["outcome"], view["old-refused"]["response"], view["old-refused"]["message"]) == (
        refused[0],
        None,
        refused[1],
    )
    assert view["old-other"]["message"] is None

    async def go():
        pipeline = await open_pipeline(url)
        try:
            assert pipeline.idempotency.count == 3
            assert pipeline.idempotency.maybe_stored([(merchant, "old-ok")]) == {(merchant, "old-ok"): [-2]}
            ok = await earn(pipeline, merchant, member, 500, "old-ok")
            assert (ok.code, ok.replayed, ok.fields) == (Code.OK, True, fields)
            no = await earn(pipeline, merchant, member, 70, "old-refused")
            assert (no.code.name, no.replayed, no.message) == (refused[0], True, refused[1])
            reused = await earn(pipeline, merchant, member, 999, "old-ok")
            assert reused.code is Code.ALREADY_EXISTS and "purchase_amount" in reused.message
            new = await earn(pipeline, merchant, member, 500, unique("k"))
            assert new.code is Code.OK and not new.replayed
        finally:
            await close_pipeline(pipeline)

    asyncio.run(go())
    assert len(fetch(url, "SELECT 1 FROM transactions WHERE merchant_id = $1", merchant)) == 1
