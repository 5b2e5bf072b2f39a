"""Read-your-writes through the gRPC API (issue 14 stage 5): a read of the relational tables right after an
answer shows the answered operation, every time, while other clients load the service. Today a batch's rows
are written before its answer, so these pass trivially; once rows are projected off the answer path they
are the guard that every such read waits for the projection (Pipeline.projected()). Each read is repeated
ROUNDS times, after unary calls and after SubmitBatch. Also: the tests' own helper for reading the ledger
after calls (tests.harness.wait_projected) waits for the projection and can fail."""

from __future__ import annotations

import asyncio
import csv
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import pytest
from google.protobuf import timestamp_pb2

from points.v1 import admin_pb2 as apb
from points.v1 import admin_pb2_grpc
from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import ServiceProcess, add_merchant, create_key, fetch, ledger_discrepancies, wait_projected
from tests.integration.helpers import add_program_version, credential, earn, replay_flag, unique, wait_program_in_force

ROUNDS = 200
BATCH_OPERATIONS = 5  # a SubmitBatch of the member under test
LOAD_BATCH_OPERATIONS = 20  # a SubmitBatch of the background load
LOAD_MERCHANTS = ("load-a", "load-b")
CALL_TIMEOUT_SECONDS = 30
PERIODS = 4  # settlement periods closed under load


@contextmanager
def background_load(service: ServiceProcess, merchants: tuple[str, ...]) -> Iterator[list[tuple]]:
    """Earns at `merchants` from other threads (unary calls and SubmitBatch, side by side) while the body
    runs. Yields the list of the earns answered, (merchant_id, transaction_id, points, created_at_us),
    complete once the body is done; fails the test if the load made no progress or a call of it failed."""
    stop = threading.Event()
    answered: list[tuple] = []
    failures: list[BaseException] = []

    def unary(worker: int) -> None:
        member, n = unique(f"load-{worker}"), 0
        with service.channel() as channel:
            stub = points_pb2_grpc.PointsServiceStub(channel)
            while not stop.is_set():
                n += 1
                merchant = merchants[n % len(merchants)]
                r = earn(stub, merchant, member, 1_000 + n)
                answered.append((merchant, r.transaction_id, r.points, _micros(r.created_at)))

    def batches(worker: int) -> None:
        member, n = unique(f"load-{worker}"), 0
        with service.channel() as channel:
            stub = points_pb2_grpc.PointsServiceStub(channel)
            while not stop.is_set():
                operations = []
                for _ in range(LOAD_BATCH_OPERATIONS):
                    n += 1
                    operations.append(
                        pb.Operation(
                            earn=pb.EarnRequest(
                                merchant_id=merchants[n % len(merchants)],
                                member_id=member,
                                purchase_amount=1_000 + n,
                                idempotency_key=f"{member}-{n}",
                            )
                        )
                    )
                response = stub.SubmitBatch(pb.SubmitBatchRequest(operations=operations), timeout=CALL_TIMEOUT_SECONDS)
                for operation, result in zip(operations, response.results):
                    assert result.outcome == pb.OPERATION_OUTCOME_APPLIED, result
                    answered.append(
                        (
                            operation.earn.merchant_id,
                            result.earn.transaction_id,
                            result.earn.points,
                            _micros(result.earn.created_at),
                        )
                    )

    def guarded(body, worker: int) -> None:
        try:
            body(worker)
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            failures.append(error)

    threads = [
        threading.Thread(target=guarded, args=(unary, 0), daemon=True),
        threading.Thread(target=guarded, args=(batches, 1), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        yield answered
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=CALL_TIMEOUT_SECONDS)
    assert not failures, f"the background load failed: {failures[0]!r}"
    assert answered, "the background load made no progress"


# the background load is there to keep the projector busy, not to meet the merchant rate limit (tested in
# test_limits.py): on a fast machine it passed 1,000 operations/s a merchant and was refused in part
NO_RATE_LIMIT = ("--merchant-operations-per-second", "0")


def _micros(moment: timestamp_pb2.Timestamp) -> int:
    return moment.seconds * 1_000_000 + moment.nanos // 1000


def _timestamp(micros: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000)


@pytest.fixture(scope="module")
def world(create_database):
    """A service without a program; the merchant under test and the load's merchants; clients."""
    url = create_database()
    for merchant in ("shop", "position-shop", *LOAD_MERCHANTS):
        add_merchant(url, merchant, 1000)
    service = ServiceProcess(url, *NO_RATE_LIMIT).start()
    with service.channel() as channel, service.bare_channel() as bare:
        yield {
            "url": url,
            "service": service,
            "points": points_pb2_grpc.PointsServiceStub(channel),
            "members": admin_pb2_grpc.MemberAdminServiceStub(channel),
            "clearing": admin_pb2_grpc.ClearingServiceStub(channel),
            "bare": admin_pb2_grpc.MemberAdminServiceStub(bare),  # calls that send their own key
        }
    service.kill()


def _batch_of_earns(stub, merchant: str, member: str) -> list[str]:
    """A SubmitBatch of BATCH_OPERATIONS earns of `member`; their transaction ids."""
    operations = [
        pb.Operation(
            earn=pb.EarnRequest(
                merchant_id=merchant, member_id=member, purchase_amount=100 + i, idempotency_key=unique("k")
            )
        )
        for i in range(BATCH_OPERATIONS)
    ]
    response = stub.SubmitBatch(pb.SubmitBatchRequest(operations=operations), timeout=CALL_TIMEOUT_SECONDS)
    assert [r.outcome for r in response.results] == [pb.OPERATION_OUTCOME_APPLIED] * BATCH_OPERATIONS
    return [r.earn.transaction_id for r in response.results]


def test_list_transactions_shows_the_operation_just_answered(world):
    stub, member = world["points"], unique("mem")
    with background_load(world["service"], LOAD_MERCHANTS):
        for round_ in range(ROUNDS):
            answered = earn(stub, "shop", member, 100 + round_).transaction_id
            page = stub.ListTransactions(
                pb.ListTransactionsRequest(member_id=member, page_size=1), timeout=CALL_TIMEOUT_SECONDS
            )
            assert [t.transaction_id for t in page.transactions] == [answered], f"round {round_}"
            batch = _batch_of_earns(stub, "shop", member)
            page = stub.ListTransactions(
                pb.ListTransactionsRequest(member_id=member, page_size=BATCH_OPERATIONS), timeout=CALL_TIMEOUT_SECONDS
            )
            assert sorted(t.transaction_id for t in page.transactions) == sorted(batch), f"round {round_}"


def test_member_admin_list_transactions_shows_the_operation_just_answered(world):
    stub, members, member = world["points"], world["members"], unique("mem")
    with background_load(world["service"], LOAD_MERCHANTS):
        for round_ in range(ROUNDS):
            answered = earn(stub, "shop", member, 100 + round_).transaction_id
            page = members.ListTransactions(
                apb.MemberAdminServiceListTransactionsRequest(member_id=member, page_size=1),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            assert [t.transaction_id for t in page.transactions] == [answered], f"round {round_}"
            batch = _batch_of_earns(stub, "shop", member)
            page = members.ListTransactions(
                apb.MemberAdminServiceListTransactionsRequest(member_id=member, page_size=BATCH_OPERATIONS),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            assert sorted(t.transaction_id for t in page.transactions) == sorted(batch), f"round {round_}"


def test_a_transaction_just_answered_can_be_reversed_at_once(world):
    """ReverseTransaction reads its original from the journal: one answered a moment ago is found."""
    stub, members = world["points"], world["members"]
    with background_load(world["service"], LOAD_MERCHANTS):
        for round_ in range(ROUNDS):
            member = unique("rev")
            original = (
                earn(stub, "shop", member, 1_000).transaction_id
                if round_ % 2
                else _batch_of_earns(stub, "shop", member)[-1]
            )
            reversed_ = members.ReverseTransaction(
                apb.ReverseTransactionRequest(
                    transaction_id=original,
                    reason=apb.ADJUSTMENT_REASON_CORRECTION,
                    note="read-your-writes",
                    idempotency_key=unique("rev"),
                ),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            assert reversed_.original_transaction_id == original, f"round {round_}"
    assert ledger_discrepancies(world["url"]) == []


def _support_keys(url: str, count: int, per_day: int) -> list[str]:
    """`count` support keys, each allowed `per_day` point-units of AdjustPoints a day (one database trip)."""
    from processor import auth, member_store

    async def create() -> list[str]:
        keys = [auth.new_key() for _ in range(count)]
        connection = await asyncpg.connect(url)
        try:
            for key in keys:
                await member_store.insert_support_key(
                    connection, key.key_id, key.secret_sha256, "tests", per_day, per_day
                )
        finally:
            await connection.close()
        return [key.key for key in keys]

    return asyncio.run(create())


def test_a_support_keys_retry_of_an_adjustment_just_answered_replays_within_its_limits(world):
    """A support key's retry is recognised from the idempotency records (and so uses none of its limits):
    one answered a moment ago is found. Each key may adjust exactly one adjustment's points a day, so a
    retry taken for a new adjustment would be refused RESOURCE_EXHAUSTED."""
    members, points = world["bare"], 7
    keys = _support_keys(world["url"], ROUNDS, points)
    with background_load(world["service"], LOAD_MERCHANTS):
        for round_, key in enumerate(keys):
            request = apb.AdjustPointsRequest(
                member_id=unique("adj"),
                points=points,
                reason=apb.ADJUSTMENT_REASON_GOODWILL,
                idempotency_key=unique("adj"),
            )
            first = members.AdjustPoints(request, metadata=credential(key), timeout=CALL_TIMEOUT_SECONDS)
            again, call = members.AdjustPoints.with_call(
                request, metadata=credential(key), timeout=CALL_TIMEOUT_SECONDS
            )
            assert (again.transaction_id, replay_flag(call)) == (first.transaction_id, "true"), f"round {round_}"


def test_the_merchant_position_counts_every_operation_answered(world):
    stub, clearing = world["points"], world["clearing"]
    issued = 0
    with background_load(world["service"], LOAD_MERCHANTS):
        for round_ in range(ROUNDS):
            if round_ % 2:
                issued += earn(stub, "position-shop", unique("pos"), 1_000 + round_).points
            else:
                _batch_of_earns(stub, "position-shop", unique("pos"))
                issued += sum((100 + i) * 1000 // 10_000 for i in range(BATCH_OPERATIONS))
            position = clearing.GetMerchantPosition(
                apb.GetMerchantPositionRequest(merchant_id="position-shop"), timeout=CALL_TIMEOUT_SECONDS
            ).position
            assert position.issued == issued, f"round {round_}"


PROMOTER_COMMISSION_BPS = 2000


def test_statements_and_reports_of_a_cut_hold_every_operation_answered_before_it(create_database, service_factory):
    """Periods closed while the load runs. Read at once after each close: each merchant's statement (alone
    and listed) and its exported lines hold exactly the earns answered and dated in the period; the
    promoter's channel statement (alone, listed, exported) is computed from those statements' fees; the
    alliance report issues what they issue; the positions count every earn answered before the reads."""
    url = create_database()
    for merchant in LOAD_MERCHANTS:
        add_merchant(url, merchant, 1000, fee_issued_bps=500)
    add_program_version(url, {"channel": {"promoter_commission_bps": PROMOTER_COMMISSION_BPS}})
    operator = credential(create_key(url, "operator"))
    service = service_factory(url, *NO_RATE_LIMIT)
    wait_program_in_force(url)  # in force PROGRAM_LEAD_SECONDS after it was stored
    with service.channel() as channel:
        clearing = admin_pb2_grpc.ClearingServiceStub(channel)
        payees = admin_pb2_grpc.ChannelServiceStub(channel)
        payees.RegisterPromoter(apb.RegisterPromoterRequest(promoter_id="pro"), metadata=operator)
        for merchant in LOAD_MERCHANTS:
            payees.AssignMerchantPromoter(
                apb.AssignMerchantPromoterRequest(merchant_id=merchant, promoter_id="pro"), metadata=operator
            )
        closed = []  # what was read right after each close
        with background_load(service, LOAD_MERCHANTS) as answered:
            for _ in range(PERIODS):
                time.sleep(0.3)
                cut = time.time_ns() // 1000
                period = clearing.CloseSettlementPeriod(
                    apb.CloseSettlementPeriodRequest(cut_off=_timestamp(cut)), timeout=CALL_TIMEOUT_SECONDS
                ).period
                answered_before = len(answered)
                positions = {
                    m: clearing.GetMerchantPosition(
                        apb.GetMerchantPositionRequest(merchant_id=m), timeout=CALL_TIMEOUT_SECONDS
                    ).position.issued
                    for m in LOAD_MERCHANTS
                }
                for merchant in LOAD_MERCHANTS:  # no fewer than the earns answered before the reads
                    assert positions[merchant] >= sum(a[2] for a in answered[:answered_before] if a[0] == merchant)
                closed.append(_read_period(clearing, payees, operator, period))
        # with the load stopped: the positions count exactly every earn answered
        final = {
            m: clearing.GetMerchantPosition(
                apb.GetMerchantPositionRequest(merchant_id=m), timeout=CALL_TIMEOUT_SECONDS
            ).position.issued
            for m in LOAD_MERCHANTS
        }
    opened = 0
    for read in closed:
        cut = _micros(read["period"].cut_off)
        in_period = [a for a in answered if opened <= a[3] < cut]
        assert in_period, "the load answered earns in every period"
        for merchant in LOAD_MERCHANTS:
            mine = [a for a in in_period if a[0] == merchant]
            statement = read["statements"][merchant]
            assert (statement.issued, statement.transactions) == (sum(a[2] for a in mine), len(mine)), merchant
            assert statement.fees > 0
            assert read["listed"][merchant] == statement
            assert read["exported"][merchant] == sorted(a[1] for a in mine), merchant
        fees = {m: read["statements"][m].fees for m in LOAD_MERCHANTS}
        promoter = read["promoter"]
        assert (promoter.fee_base, promoter.amount) == (
            sum(fees.values()),
            sum(
                fee * PROMOTER_COMMISSION_BPS // 10_000 for fee in fees.values()
            ),  # each merchant line rounded down (channel_store)
        )
        # (its transaction_id is set once the committer has posted it: not compared)
        assert [(s.payee_id, s.fee_base, s.amount) for s in read["promoters_listed"]] == [
            ("pro", promoter.fee_base, promoter.amount)
        ]
        assert read["promoter_lines"] == fees
        assert read["report"].issued == sum(a[2] for a in in_period)
        opened = cut
    for merchant in LOAD_MERCHANTS:
        assert final[merchant] == sum(a[2] for a in answered if a[0] == merchant)
    assert ledger_discrepancies(url) == []


def _read_period(clearing, payees, operator, period: apb.SettlementPeriod) -> dict:
    """Every read of a closed period's statements and reports, at once."""
    period_id = period.period_id
    statements = {
        m: clearing.GetStatement(
            apb.GetStatementRequest(merchant_id=m, period_id=period_id), timeout=CALL_TIMEOUT_SECONDS
        ).statement
        for m in LOAD_MERCHANTS
    }
    listed = clearing.ListStatements(
        apb.ListStatementsRequest(period_id=period_id), timeout=CALL_TIMEOUT_SECONDS
    ).statements
    promoter = apb.CHANNEL_PAYEE_KIND_PROMOTER
    promoter_lines = payees.ExportChannelStatement(
        apb.ExportChannelStatementRequest(period_id=period_id, payee_kind=promoter, payee_id="pro"),
        metadata=operator,
        timeout=CALL_TIMEOUT_SECONDS,
    ).csv
    lines = list(csv.DictReader(io.StringIO(promoter_lines.decode())))
    return {
        "period": period,
        "statements": statements,
        "listed": {s.merchant_id: s for s in listed},
        "exported": {m: _exported_transactions(clearing, period_id, m) for m in LOAD_MERCHANTS},
        "promoter": payees.GetChannelStatement(
            apb.GetChannelStatementRequest(period_id=period_id, payee_kind=promoter, payee_id="pro"),
            metadata=operator,
            timeout=CALL_TIMEOUT_SECONDS,
        ).statement,
        "promoters_listed": list(
            payees.ListChannelStatements(
                apb.ListChannelStatementsRequest(period_id=period_id, payee_kind=promoter),
                metadata=operator,
                timeout=CALL_TIMEOUT_SECONDS,
            ).statements
        ),
        "promoter_lines": {line["merchant_id"]: int(line["fees"]) for line in lines},
        "report": payees.GetAllianceReport(
            apb.GetAllianceReportRequest(period_id=period_id), metadata=operator, timeout=CALL_TIMEOUT_SECONDS
        ).report,
    }


def _exported_transactions(clearing, period_id: int, merchant: str) -> list[str]:
    """The transaction ids of the merchant's exported statement lines of the period, sorted."""
    response = clearing.ExportStatement(
        apb.ExportStatementRequest(period_id=period_id, merchant_id=merchant), timeout=CALL_TIMEOUT_SECONDS
    )
    rows = list(csv.reader(io.StringIO(response.csv.decode())))
    column = rows[0].index("transaction_id")
    return sorted(row[column] for row in rows[1:])


@pytest.fixture(scope="module")
def leveled(create_database):
    """A service whose program has levels: a member's first earn of 1,000 point-units reaches blue."""
    url = create_database()
    for merchant in ("shop", *LOAD_MERCHANTS):
        add_merchant(url, merchant, 1000)
    add_program_version(
        url,
        {
            "levels": [
                {"name": "registered", "threshold_point_units": 0},
                {"name": "blue", "threshold_point_units": 1_000, "multiplier_bps": 15_000},
            ]
        },
    )
    service = ServiceProcess(url, *NO_RATE_LIMIT).start()
    wait_program_in_force(url)  # in force PROGRAM_LEAD_SECONDS after it was stored
    yield url, service
    service.kill()


def test_the_level_history_shows_the_change_of_an_earn_just_answered(leveled):
    _, service = leveled
    with service.channel() as channel, background_load(service, LOAD_MERCHANTS):
        stub = points_pb2_grpc.PointsServiceStub(channel)
        for round_ in range(ROUNDS):
            member = unique("lvl")
            answered = earn(stub, "shop", member, 10_000)
            assert answered.level == "blue", "the program applies"
            history = stub.GetBalance(
                pb.GetBalanceRequest(member_id=member), timeout=CALL_TIMEOUT_SECONDS
            ).level_history
            assert [(c.to_level, c.transaction_id) for c in history] == [("blue", answered.transaction_id)], (
                f"round {round_}"
            )


# --- the tests' own read helper ---------------------------------------------------------------------


def _execute(url: str, sql: str) -> None:
    async def go() -> None:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(go())


def test_the_read_helpers_wait_for_the_projection_to_reach_the_last_logged_batch(create_database):
    """Without a batch log they read at once; with one, they wait until projection_state reaches its last
    batch, and fail the test if it does not in time (tables made by hand here: the projector's own tests
    drive the real ones)."""
    url = create_database()
    wait_projected(url, timeout=0.5)  # no batch_log table: rows are written before the answer
    _execute(
        url,
        """CREATE TABLE batch_log (batch_id bigint PRIMARY KEY);
           CREATE TABLE projection_state (through_batch_id bigint NOT NULL);
           INSERT INTO batch_log SELECT generate_series(1, 3);
           INSERT INTO projection_state VALUES (2);""",
    )
    with pytest.raises(AssertionError, match="did not reach batch 3"):
        wait_projected(url, timeout=0.3)
    # the projector catches up while a read waits: the read runs after it (it sees the projector's update)
    catch_up = threading.Timer(0.3, _execute, args=(url, "UPDATE projection_state SET through_batch_id = 3"))
    catch_up.start()
    try:
        assert fetch(url, "SELECT through_batch_id FROM projection_state")[0]["through_batch_id"] == 3
    finally:
        catch_up.join()
    wait_projected(url, timeout=0.5)
