"""Member administration (issue 15) through the real service and Postgres: support keys and their
limits, AdjustPoints, ReverseTransaction (of adjustments and transfers; of till transactions in
test_member_reversals.py), FreezeMember / UnfreezeMember (also inside
SubmitBatch), CloseMember, the operator's and support agents' reads; each happy path and each refusal,
with reconcile clean after; and adjustments and reversals under concurrent till traffic."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import time
import urllib.request

import grpc
import pytest
from google.protobuf import timestamp_pb2

from points.v1 import admin_pb2 as apb
from points.v1 import admin_pb2_grpc
from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import ServiceProcess, add_merchant, create_key, fetch, ledger_discrepancies
from tests.integration.helpers import (
    add_program_version,
    cli,
    credential,
    earn,
    error_of,
    funded_member,
    replay_flag,
    unique,
    wait_program_in_force,
)

pytestmark = pytest.mark.timeout(300)

PER_CALL_MAX = 5_000  # point-units, the support key's limits
PER_DAY_MAX = 8_000
GOODWILL, CORRECTION, SIGN_UP = (
    apb.ADJUSTMENT_REASON_GOODWILL,
    apb.ADJUSTMENT_REASON_CORRECTION,
    apb.ADJUSTMENT_REASON_SIGN_UP,
)


def _support_key(url: str, per_call: int, per_day: int) -> str:
    """A support key, as `key create --support` makes one (the CLI itself is tested below)."""
    from processor import auth, member_store
    from processor.store import Store

    async def create() -> str:
        key = auth.new_key()
        store = await Store.open(url, 2)
        try:
            await store.migrate()
            await member_store.insert_support_key(store.pool, key.key_id, key.secret_sha256, "tests", per_call, per_day)
        finally:
            await store.close()
        return key.key

    return asyncio.run(create())


class World:
    def __init__(self, url: str, program: dict | None = None):
        self.url = url
        self.operator = credential(create_key(url, "operator"))
        self.keys = {m: credential(add_merchant(url, m, 1000)) for m in ("shop-a", "shop-b")}
        self.support = credential(_support_key(url, PER_CALL_MAX, PER_DAY_MAX))
        if program is not None:
            add_program_version(url, program)
        self.start()
        if program is not None:
            wait_program_in_force(url)  # in force PROGRAM_LEAD_SECONDS after it was stored

    def start(self) -> None:
        self.service = ServiceProcess(self.url).start()
        self._channel = self.service.channel()
        self._bare = self.service.bare_channel()
        self.stub = points_pb2_grpc.PointsServiceStub(self._channel)
        self.admin = admin_pb2_grpc.MemberAdminServiceStub(self._bare)

    def stop(self) -> None:
        self._channel.close()
        self._bare.close()
        self.service.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def adjust(self, member: str, points: int, key: str | None = None, who=None, reason=GOODWILL, note: str = ""):
        return self.admin.AdjustPoints(
            apb.AdjustPointsRequest(
                member_id=member, points=points, reason=reason, note=note, idempotency_key=key or unique("adj")
            ),
            metadata=who or self.operator,
            timeout=30,
        )

    def adjust_call(self, member: str, points: int, key: str):
        return self.admin.AdjustPoints.with_call(
            apb.AdjustPointsRequest(member_id=member, points=points, reason=GOODWILL, idempotency_key=key),
            metadata=self.operator,
            timeout=30,
        )

    def reverse(self, transaction_id: str, key: str | None = None):
        return self.admin.ReverseTransaction(
            apb.ReverseTransactionRequest(
                transaction_id=transaction_id,
                reason=CORRECTION,
                note="wrong member",
                idempotency_key=key or unique("rev"),
            ),
            metadata=self.operator,
            timeout=30,
        )

    def freeze(self, member: str, reason: str = "card reported stolen", who=None):
        return self.admin.FreezeMember(
            apb.FreezeMemberRequest(member_id=member, reason=reason), metadata=who or self.operator, timeout=30
        )

    def unfreeze(self, member: str):
        return self.admin.UnfreezeMember(
            apb.UnfreezeMemberRequest(member_id=member), metadata=self.operator, timeout=30
        )

    def close(self, member: str, key: str | None = None):
        return self.admin.CloseMember(
            apb.CloseMemberRequest(member_id=member, reason="member asked", idempotency_key=key or unique("close")),
            metadata=self.operator,
            timeout=30,
        )

    def balance(self, member: str, who=None) -> apb.MemberAdminServiceGetBalanceResponse:
        return self.admin.GetBalance(
            apb.MemberAdminServiceGetBalanceRequest(member_id=member), metadata=who or self.operator, timeout=30
        )

    def history(self, member: str, who=None) -> list[pb.Transaction]:
        return list(
            self.admin.ListTransactions(
                apb.MemberAdminServiceListTransactionsRequest(member_id=member, page_size=200),
                metadata=who or self.operator,
                timeout=30,
            ).transactions
        )

    def redeem(self, member: str, points: int, merchant: str = "shop-a"):
        return self.stub.Redeem(
            pb.RedeemRequest(merchant_id=merchant, member_id=member, points=points, idempotency_key=unique("k")),
            timeout=30,
        )

    def authorize(self, member: str, points: int):
        return self.stub.Authorize(
            pb.AuthorizeRequest(merchant_id="shop-a", member_id=member, points=points, idempotency_key=unique("k")),
            timeout=30,
        )


@pytest.fixture(scope="module")
def world(create_database):
    world = World(create_database())
    yield world
    world.stop()
    assert ledger_discrepancies(world.url) == []


def refused(call, code: grpc.StatusCode) -> str:
    error = error_of(call)
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    return error.details()


# --- AdjustPoints ----------------------------------------------------------------------------------


def test_a_credit_opens_a_new_member_funded_by_operator_adjustments_and_is_in_its_history(world):
    member = unique("mem")
    response = world.adjust(member, 1_500, reason=SIGN_UP, note="welcome")
    assert (response.points, response.balance, response.available) == (1_500, 1_500, 1_500)
    assert response.transaction_id.startswith("txn_")
    balance = world.balance(member)
    assert (balance.posted, balance.held, balance.available) == (1_500, 0, 1_500)
    assert balance.status.state == apb.MEMBER_STATE_ACTIVE
    (row,) = world.history(member)
    assert (row.transaction_id, row.kind, row.points, row.merchant_id) == (
        response.transaction_id,
        pb.TRANSACTION_KIND_ADJUSTMENT_CREDIT,
        1_500,
        "operator",
    )
    (stored,) = fetch(
        world.url,
        "SELECT points, reason, note FROM member_adjustments WHERE transaction_id = $1",
        int(response.transaction_id[4:]),
    )
    assert (stored["points"], stored["reason"], stored["note"]) == (1_500, SIGN_UP, "welcome")
    with urllib.request.urlopen(f"http://{world.service.metrics_target}/metrics", timeout=10) as response:
        scraped = response.read().decode()
    assert re.search(r'^points_program_transactions_total\{kind="adjustment_credit"\} [1-9]', scraped, re.M)
    assert ledger_discrepancies(world.url) == []


def test_a_debit_takes_points_back_but_never_below_zero_available(world):
    member = funded_member(world.stub, "shop-a", 2_000)
    world.authorize(member, 500)  # held: 1_500 available
    detail = refused(lambda: world.adjust(member, -1_600), grpc.StatusCode.FAILED_PRECONDITION)
    assert "1500 point-units available" in detail and "below zero" in detail
    response = world.adjust(member, -1_500, reason=CORRECTION)
    assert (response.points, response.balance, response.available) == (-1_500, 500, 0)
    assert [t.kind for t in world.history(member)][0] == pb.TRANSACTION_KIND_ADJUSTMENT_DEBIT
    assert world.history(member)[0].points == -1_500
    assert ledger_discrepancies(world.url) == []


def test_an_adjustment_is_idempotent_per_key_and_a_different_request_under_it_is_refused(world):
    member, key = unique("mem"), unique("adj")
    first, first_call = world.adjust_call(member, 700, key)
    again, again_call = world.adjust_call(member, 700, key)
    assert again.transaction_id == first.transaction_id and again.balance == 700
    assert replay_flag(first_call) is None and replay_flag(again_call) == "true"
    detail = refused(lambda: world.adjust_call(member, 800, key), grpc.StatusCode.ALREADY_EXISTS)
    assert "points differs" in detail
    assert world.balance(member).posted == 700


def test_bad_adjustments_are_refused_with_the_field_named_and_nothing_posted(world):
    member = funded_member(world.stub, "shop-a", 1_000)
    assert "points" in refused(lambda: world.adjust(member, 0), grpc.StatusCode.INVALID_ARGUMENT)
    reason = refused(
        lambda: world.adjust(member, 10, reason=apb.ADJUSTMENT_REASON_UNSPECIFIED), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "GOODWILL" in reason
    assert "note" in refused(lambda: world.adjust(member, 10, note="x" * 201), grpc.StatusCode.INVALID_ARGUMENT)
    assert "no points account" in refused(lambda: world.adjust(unique("nobody"), -10), grpc.StatusCode.NOT_FOUND)
    refused(lambda: world.adjust(member, 10, who=world.keys["shop-a"]), grpc.StatusCode.PERMISSION_DENIED)
    assert world.balance(member).posted == 1_000
    assert len(world.history(member)) == 1


# --- support keys ----------------------------------------------------------------------------------


def test_a_support_key_adjusts_within_its_limits_per_call_and_per_day(create_database):
    url = create_database()  # a database of its own: the day's use of the key starts at zero
    add_merchant(url, "shop-a", 1000)
    support = credential(_support_key(url, 3_000, 5_000))
    service = ServiceProcess(url).start()
    try:
        with service.bare_channel() as channel:
            admin = admin_pb2_grpc.MemberAdminServiceStub(channel)

            def adjust(points: int, key: str | None = None):
                return admin.AdjustPoints(
                    apb.AdjustPointsRequest(
                        member_id="mem-s", points=points, reason=GOODWILL, idempotency_key=key or unique("adj")
                    ),
                    metadata=support,
                    timeout=30,
                )

            detail = refused(lambda: adjust(3_001), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "at most 3000 point-units per call" in detail
            adjust(3_000, "first")
            adjust(3_000, "first")  # a replay counts once
            adjust(-1_000)  # a debit counts by its size
            detail = refused(lambda: adjust(1_001), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "adjusted 4000 of its 5000 point-units today" in detail
            adjust(-1_000)  # exactly to the limit
            refused(lambda: adjust(1), grpc.StatusCode.RESOURCE_EXHAUSTED)
        # the day's use survives a restart (it is read from member_adjustments)
        service.kill()
        service = ServiceProcess(url).start()
        with service.bare_channel() as channel:
            admin = admin_pb2_grpc.MemberAdminServiceStub(channel)
            error = error_of(
                lambda: admin.AdjustPoints(
                    apb.AdjustPointsRequest(member_id="mem-s", points=1, reason=GOODWILL, idempotency_key="after"),
                    metadata=support,
                    timeout=30,
                )
            )
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            balance = admin.GetBalance(apb.MemberAdminServiceGetBalanceRequest(member_id="mem-s"), metadata=support)
            assert balance.posted == 1_000
    finally:
        service.kill()
    assert ledger_discrepancies(url) == []


def test_a_support_key_reads_any_member_but_calls_nothing_else(world):
    member = funded_member(world.stub, "shop-b", 900)
    assert world.balance(member, who=world.support).posted == 900
    assert [t.kind for t in world.history(member, who=world.support)] == [pb.TRANSACTION_KIND_EARN]
    for call in (
        lambda: world.freeze(member, who=world.support),
        lambda: world.admin.CloseMember(
            apb.CloseMemberRequest(member_id=member, idempotency_key="k"), metadata=world.support, timeout=30
        ),
        lambda: world.admin.EnrollMemberTotp(
            apb.EnrollMemberTotpRequest(member_id=member), metadata=world.support, timeout=30
        ),
        lambda: world.admin.ReverseTransaction(
            apb.ReverseTransactionRequest(transaction_id="txn_1", reason=CORRECTION, idempotency_key="k"),
            metadata=world.support,
            timeout=30,
        ),
    ):
        assert "support key cannot call" in refused(call, grpc.StatusCode.PERMISSION_DENIED)
    # a support key is no till's key, nor an operator's elsewhere
    refused(
        lambda: world.stub.GetBalance(pb.GetBalanceRequest(member_id=member), metadata=world.support, timeout=30),
        grpc.StatusCode.PERMISSION_DENIED,
    )


def test_key_create_support_needs_both_limits_and_makes_a_working_key(world):
    missing = cli("key", "create", "--support", "--points-per-call-max", "100", "--database-url", world.url)
    assert missing.returncode != 0 and "--points-per-day-max" in missing.stderr
    made = cli(
        "key",
        "create",
        "--support",
        "--points-per-call-max",
        "100",
        "--points-per-day-max",
        "1000",
        "--database-url",
        world.url,
    )
    assert made.returncode == 0, made.stderr
    key = credential(made.stdout.split()[-1])
    member = unique("mem")
    assert world.adjust(member, 100, who=key).balance == 100
    refused(lambda: world.adjust(member, 101, who=key), grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_issue_api_key_makes_support_keys_with_their_limits_on_both_services(world):
    support = apb.API_KEY_KIND_SUPPORT
    services = (
        admin_pb2_grpc.MerchantAdminServiceStub(world._bare).IssueApiKey,
        admin_pb2_grpc.MerchantAdminStub(world._bare).IssueApiKey,  # the deprecated name, same bytes
    )
    for issue in services:
        made = issue(
            apb.IssueApiKeyRequest(
                kind=support, description="desk", support_points_per_call_max=200, support_points_per_day_max=300
            ),
            metadata=world.operator,
            timeout=30,
        )
        key = credential(made.key)
        member = unique("mem")
        assert world.adjust(member, 200, who=key).balance == 200
        detail = refused(lambda: world.adjust(member, 201, who=key), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "at most 200 point-units per call" in detail
        detail = refused(lambda: world.adjust(member, 150, who=key), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "adjusted 200 of its 300 point-units today" in detail
        refused(lambda: world.freeze(member, who=key), grpc.StatusCode.PERMISSION_DENIED)
    issue = services[0]
    for request, field in (
        (apb.IssueApiKeyRequest(kind=support, support_points_per_call_max=200), "support_points_per_day_max"),
        (
            apb.IssueApiKeyRequest(
                kind=support, merchant_ids=["shop-a"], support_points_per_call_max=1, support_points_per_day_max=1
            ),
            "merchant_ids",
        ),
        (
            apb.IssueApiKeyRequest(
                kind=apb.API_KEY_KIND_MERCHANT, merchant_ids=["shop-a"], support_points_per_call_max=1
            ),
            "support_points_per_call_max",
        ),
    ):
        detail = refused(lambda: issue(request, metadata=world.operator, timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
        assert field in detail


# --- FreezeMember / UnfreezeMember -----------------------------------------------------------------


def test_a_frozen_member_earns_but_cannot_spend_until_unfrozen(world):
    member = funded_member(world.stub, "shop-a", 3_000)
    status = world.freeze(member).status
    assert status.state == apb.MEMBER_STATE_FROZEN and status.reason == "card reported stolen"
    assert status.frozen_at.seconds > 0
    again = world.freeze(member, reason="second").status  # keeps the first freeze
    assert (again.reason, again.frozen_at) == (status.reason, status.frozen_at)
    earn(world.stub, "shop-a", member, 10_000)  # +1_000
    detail = refused(lambda: world.redeem(member, 100), grpc.StatusCode.FAILED_PRECONDITION)
    assert f"member '{member}' is frozen since" in detail
    refused(lambda: world.authorize(member, 100), grpc.StatusCode.FAILED_PRECONDITION)
    refused(lambda: world.adjust(member, -100), grpc.StatusCode.FAILED_PRECONDITION)
    assert world.adjust(member, 100).balance == 4_100  # a credit is no spend
    operations = [
        pb.Operation(
            earn=pb.EarnRequest(
                merchant_id="shop-a", member_id=member, purchase_amount=1_000, idempotency_key=unique("k")
            )
        ),
        pb.Operation(
            redeem=pb.RedeemRequest(merchant_id="shop-a", member_id=member, points=50, idempotency_key=unique("k"))
        ),
    ]
    results = world.stub.SubmitBatch(pb.SubmitBatchRequest(operations=operations), timeout=60).results
    assert [r.outcome for r in results] == [pb.OPERATION_OUTCOME_APPLIED, pb.OPERATION_OUTCOME_REJECTED]
    assert results[1].status_code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "frozen" in results[1].message
    assert world.balance(member).status.state == apb.MEMBER_STATE_FROZEN
    # durable: a restart still refuses the spend
    world.restart()
    refused(lambda: world.redeem(member, 100), grpc.StatusCode.FAILED_PRECONDITION)
    assert world.unfreeze(member).status.state == apb.MEMBER_STATE_ACTIVE
    assert world.redeem(member, 100).balance == 4_100
    events = [
        r["event"]
        for r in fetch(world.url, "SELECT event FROM member_status_log WHERE member_id = $1 ORDER BY event_id", member)
    ]
    assert events == ["frozen", "unfrozen"]
    assert ledger_discrepancies(world.url) == []


def test_freezing_an_unknown_member_is_not_found(world):
    assert "no points account" in refused(lambda: world.freeze(unique("nobody")), grpc.StatusCode.NOT_FOUND)


# --- ReverseTransaction ----------------------------------------------------------------------------


def test_a_reversal_mirrors_an_adjustment_once(world):
    member = funded_member(world.stub, "shop-a", 1_000)
    credit = world.adjust(member, 400)
    key = unique("rev")
    reversal = world.reverse(credit.transaction_id, key)
    assert (reversal.points, reversal.balance, reversal.original_transaction_id) == (-400, 1_000, credit.transaction_id)
    assert world.reverse(credit.transaction_id, key).transaction_id == reversal.transaction_id  # a replay
    detail = refused(lambda: world.reverse(credit.transaction_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert f"reversed already, by {reversal.transaction_id}" in detail
    debit = world.adjust(member, -300)
    assert world.reverse(debit.transaction_id).points == 300
    history = world.history(member)
    assert [t.kind for t in history[:2]] == [pb.TRANSACTION_KIND_REVERSAL_CREDIT, pb.TRANSACTION_KIND_ADJUSTMENT_DEBIT]
    assert history[0].original_transaction_id == debit.transaction_id
    assert world.balance(member).posted == 1_000
    assert ledger_discrepancies(world.url) == []


def test_a_reversal_of_spent_points_a_refund_or_a_refunded_earn_is_refused_whole_a_plain_earn_mirrored(world):
    member = unique("mem")
    credit = world.adjust(member, 500)
    world.redeem(member, 300)
    detail = refused(lambda: world.reverse(credit.transaction_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert "were spent" in detail and "200 available" in detail
    assert world.balance(member).posted == 200  # nothing of it was posted
    # a refund is not reversed (the merchant makes the sale again); an earn refunded in part is not either
    earned = earn(world.stub, "shop-a", member, 1_000)
    refund = world.stub.Refund(
        pb.RefundRequest(
            merchant_id="shop-a", transaction_id=earned.transaction_id, points=40, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    detail = refused(lambda: world.reverse(refund.transaction_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert "is of kind refund_of_earn (5)" in detail and "makes the sale again" in detail
    detail = refused(lambda: world.reverse(earned.transaction_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert "refunded in part (40 of 100 point-units)" in detail
    # with no program in force an earn is one posting (member + base, merchant_issued - base): its mirror
    plain = unique("mem")
    issued = fetch(
        world.url, "SELECT balance FROM account_balances WHERE kind = 'merchant_issued' AND owner_id = 'shop-b'"
    )[0]["balance"]
    made = earn(world.stub, "shop-b", plain, 3_000)
    reversal = world.reverse(made.transaction_id)
    assert (reversal.points, reversal.balance) == (-300, 0)
    after = fetch(
        world.url, "SELECT balance FROM account_balances WHERE kind = 'merchant_issued' AND owner_id = 'shop-b'"
    )[0]["balance"]
    assert after == issued
    detail = refused(
        lambda: world.stub.Refund(
            pb.RefundRequest(
                merchant_id="shop-b", transaction_id=made.transaction_id, points=10, idempotency_key=unique("k")
            ),
            timeout=30,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "was reversed by the operator" in detail
    refused(lambda: world.reverse("txn_999999999"), grpc.StatusCode.NOT_FOUND)
    refused(lambda: world.reverse("nonsense"), grpc.StatusCode.INVALID_ARGUMENT)
    assert ledger_discrepancies(world.url) == []


# --- CloseMember -----------------------------------------------------------------------------------


def test_closing_waits_for_holds_moves_the_rest_to_breakage_and_refuses_every_later_call(world):
    member = funded_member(world.stub, "shop-a", 2_000)
    hold = world.authorize(member, 300)
    detail = refused(lambda: world.close(member), grpc.StatusCode.FAILED_PRECONDITION)
    assert "open holds (300 point-units" in detail
    world.stub.Void(
        pb.VoidRequest(merchant_id="shop-a", authorization_id=hold.authorization_id, idempotency_key=unique("k")),
        timeout=30,
    )
    key = unique("close")
    closed = world.close(member, key)
    assert closed.points_to_breakage == 2_000 and closed.transaction_id
    assert world.close(member, key).transaction_id == closed.transaction_id  # a replay
    balance = world.balance(member)
    assert (balance.posted, balance.status.state) == (0, apb.MEMBER_STATE_CLOSED)
    assert world.history(member)[0].kind == pb.TRANSACTION_KIND_MEMBER_CLOSURE
    for call in (
        lambda: earn(world.stub, "shop-a", member, 1_000),
        lambda: world.redeem(member, 1),
        lambda: world.adjust(member, 100),
        lambda: world.freeze(member),
        lambda: world.unfreeze(member),
        lambda: world.close(member),
    ):
        assert "is closed since" in refused(call, grpc.StatusCode.FAILED_PRECONDITION)
    (breakage,) = fetch(
        world.url,
        "SELECT sum(e.amount) AS s FROM entries e JOIN accounts a USING (account_id) "
        "WHERE e.transaction_id = $1 AND a.kind = 'operator_breakage'",
        int(closed.transaction_id[4:]),
    )
    assert breakage["s"] == 2_000
    events = [r["event"] for r in fetch(world.url, "SELECT event FROM member_status_log WHERE member_id = $1", member)]
    assert events == ["closed"]
    assert ledger_discrepancies(world.url) == []


def test_closing_an_unknown_member_is_not_found(world):
    refused(lambda: world.close(unique("nobody")), grpc.StatusCode.NOT_FOUND)


# --- under concurrent traffic ----------------------------------------------------------------------


def test_adjustments_and_reversals_under_concurrent_till_traffic_balance_to_the_answers(world):
    members = [funded_member(world.stub, "shop-a", 10_000) for _ in range(4)]
    expected = {member: 10_000 for member in members}
    rounds = 12

    def till(member: str, merchant: str) -> int:
        moved = 0
        for i in range(rounds):
            if i % 2:
                moved += earn(world.stub, merchant, member, 1_000).points
            else:
                world.redeem(member, 150, merchant)
                moved -= 150
        return moved

    def operator(member: str) -> int:
        moved = 0
        for i in range(rounds):
            adjusted = world.adjust(member, 200 if i % 3 else -100)
            moved += adjusted.points
            if i % 4 == 0:
                moved += world.reverse(adjusted.transaction_id).points
        return moved

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        jobs = {}
        for member in members:
            jobs[pool.submit(till, member, "shop-a")] = member
            jobs[pool.submit(till, member, "shop-b")] = member
            jobs[pool.submit(operator, member)] = member
        for job, member in jobs.items():
            expected[member] += job.result()
    for member in members:
        assert world.balance(member).posted == expected[member]
        assert sum(t.points for t in world.history(member)) == expected[member]
    assert ledger_discrepancies(world.url) == []


def test_reconcile_reports_an_adjustment_a_reversal_or_a_closed_member_that_does_not_hold(create_database):
    url = create_database()
    add_merchant(url, "shop-a", 1000)
    operator = credential(create_key(url, "operator"))
    service = ServiceProcess(url).start()
    try:
        with service.bare_channel() as channel:
            admin = admin_pb2_grpc.MemberAdminServiceStub(channel)

            def adjust(member: str, points: int) -> str:
                request = apb.AdjustPointsRequest(
                    member_id=member, points=points, reason=GOODWILL, idempotency_key=unique("adj")
                )
                return admin.AdjustPoints(request, metadata=operator, timeout=30).transaction_id

            adjusted = adjust("mem-1", 500)
            reversed_ = adjust("mem-1", 300)
            reversal = admin.ReverseTransaction(
                apb.ReverseTransactionRequest(transaction_id=reversed_, reason=CORRECTION, idempotency_key="r"),
                metadata=operator,
                timeout=30,
            ).transaction_id
            adjust("mem-2", 100)
    finally:
        service.terminate()  # graceful: its projector writes the last batches' rows before it exits
    assert ledger_discrepancies(url) == []
    fetch(url, "UPDATE member_adjustments SET points = 501 WHERE transaction_id = $1", int(adjusted[4:]))
    fetch(url, "DELETE FROM member_reversals WHERE reversal_transaction_id = $1", int(reversal[4:]))
    fetch(
        url,
        "INSERT INTO member_status (member_id, state, closed_at, updated_at) VALUES ('mem-2', 'closed', now(), now())",
    )
    assert ledger_discrepancies(url) == [
        f"adjustment {adjusted[4:]} (kind 16) records 501 point-units, its entries move 500 on its member",
        f"reversal {reversal[4:]} is not the recorded, exact mirror of its original transaction's entries",
        "closed member mem-2 holds 100 point-units and 0 open holds",
    ]


# --- aliases ---------------------------------------------------------------------------------------


def test_an_alias_names_its_member_at_the_till_until_it_is_removed(world):
    member = funded_member(world.stub, "shop-a", 1_000)
    card = unique("card")
    bound = world.admin.AddMemberAlias(apb.AddMemberAliasRequest(member_id=member, alias=card), metadata=world.operator)
    assert (bound.member_id, bound.alias) == (member, card)
    # binding it again to the same member is no change; to another member it is refused
    world.admin.AddMemberAlias(apb.AddMemberAliasRequest(member_id=member, alias=card), metadata=world.operator)
    other = funded_member(world.stub, "shop-a", 100)
    detail = refused(
        lambda: world.admin.AddMemberAlias(
            apb.AddMemberAliasRequest(member_id=other, alias=card), metadata=world.operator
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert f"names member '{member}'" in detail
    # a member with an account of its own cannot become an alias; an unknown member has none
    refused(
        lambda: world.admin.AddMemberAlias(
            apb.AddMemberAliasRequest(member_id=member, alias=other), metadata=world.operator
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    refused(
        lambda: world.admin.AddMemberAlias(
            apb.AddMemberAliasRequest(member_id=unique("nobody"), alias=unique("card")), metadata=world.operator
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    earn(world.stub, "shop-a", card, 10_000)  # +1_000 to the member
    assert world.redeem(card, 300).balance == 1_700
    # MemberAdminService reads the card's member too: its history, not NOT_FOUND
    assert [t.transaction_id for t in world.history(card)] == [t.transaction_id for t in world.history(member)]
    assert world.stub.GetBalance(pb.GetBalanceRequest(member_id=card), timeout=30).posted == 1_700
    assert world.adjust(card, 300).balance == 2_000
    world.restart()  # durable
    assert world.redeem(card, 100).balance == 1_900
    removed = world.admin.RemoveMemberAlias(apb.RemoveMemberAliasRequest(alias=card), metadata=world.operator)
    assert removed.member_id == member
    refused(
        lambda: world.admin.RemoveMemberAlias(apb.RemoveMemberAliasRequest(alias=card), metadata=world.operator),
        grpc.StatusCode.NOT_FOUND,
    )
    # the lost card now names nobody: a redeem on it finds no account
    refused(lambda: world.redeem(card, 1), grpc.StatusCode.NOT_FOUND)
    assert world.balance(member).posted == 1_900
    assert ledger_discrepancies(world.url) == []


def test_a_frozen_members_alias_is_frozen_too(world):
    member = funded_member(world.stub, "shop-a", 500)
    card = unique("card")
    world.admin.AddMemberAlias(apb.AddMemberAliasRequest(member_id=member, alias=card), metadata=world.operator)
    world.freeze(card)  # an alias names the member in MemberAdminService as well
    assert f"member '{member}' is frozen" in refused(lambda: world.redeem(card, 1), grpc.StatusCode.FAILED_PRECONDITION)
    world.unfreeze(member)
    assert world.redeem(card, 1).balance == 499


# --- households ------------------------------------------------------------------------------------


def test_a_households_members_earn_into_and_spend_from_one_balance_and_leaving_moves_nothing(world):
    head = funded_member(world.stub, "shop-a", 400)  # its own points stay its own
    partner = funded_member(world.stub, "shop-a", 200)
    created = world.admin.CreateHousehold(apb.CreateHouseholdRequest(head_member_id=head), metadata=world.operator)
    household = created.household_id
    world.admin.JoinHousehold(
        apb.JoinHouseholdRequest(household_id=household, member_id=partner), metadata=world.operator
    )
    earn(world.stub, "shop-a", head, 10_000)  # +1_000 to the household
    earn(world.stub, "shop-b", partner, 5_000)  # +500 to the household
    shared = f"household:{household}"
    assert world.balance(shared).posted == 1_500
    assert world.redeem(partner, 1_200).balance == 300  # the partner spends the head's earn too
    refused(lambda: world.redeem(head, 301), grpc.StatusCode.FAILED_PRECONDITION)
    # a till's GetBalance of a member shows the shared balance it spends, and says so; the operator's
    # shows the member's own account and names its household
    till = world.stub.GetBalance(pb.GetBalanceRequest(member_id=head), timeout=30)
    assert (till.member_id, till.household_id, till.posted) == (shared, household, 300)
    own = world.balance(head)
    assert (own.member_id, own.household_id, own.posted) == (head, household, 400)
    # one household at a time; an unknown household is not found
    detail = refused(
        lambda: world.admin.CreateHousehold(
            apb.CreateHouseholdRequest(head_member_id=partner), metadata=world.operator
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert f"in household '{household}' already" in detail
    refused(
        lambda: world.admin.JoinHousehold(
            apb.JoinHouseholdRequest(household_id="hh-none", member_id=head), metadata=world.operator
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    # a member in a household is closed only after leaving it
    assert "leaves it first" in refused(lambda: world.close(partner), grpc.StatusCode.FAILED_PRECONDITION)
    left = world.admin.LeaveHousehold(apb.LeaveHouseholdRequest(member_id=partner), metadata=world.operator)
    assert left.household_id == household
    refused(
        lambda: world.admin.LeaveHousehold(apb.LeaveHouseholdRequest(member_id=partner), metadata=world.operator),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert world.balance(shared).posted == 300  # nothing moved back
    assert world.redeem(partner, 200).balance == 0  # its own 200 again
    world.restart()
    assert world.redeem(head, 300).balance == 0  # still in the household after a restart
    assert world.balance(head).posted == 400
    assert ledger_discrepancies(world.url) == []


# --- TransferPoints --------------------------------------------------------------------------------

TRANSFER_FEE_BPS = 250
TRANSFER_DAY_MAX = 5_000
PIN = "4821"


@pytest.fixture(scope="module")
def transfers(create_database):
    """A world whose program allows transfers (2.5% fee, 5_000 point-units a day) and asks for the
    member's proof for spending; points expire after a year (so spends consume lots)."""
    url = create_database()
    world = World(
        url,
        {
            "member_transfers": "on",
            "member_transfer_fee_bps": TRANSFER_FEE_BPS,
            "member_points_transferred_per_day_max": TRANSFER_DAY_MAX,
            "member_verification": "spending",
            "expiry_period_us": 365 * 86_400_000_000,
        },
    )
    yield world
    world.stop()
    assert ledger_discrepancies(url) == []


def _transfer(world, sender: str, receiver: str, points: int, key: str | None = None, pin: str | None = PIN):
    return world.admin.TransferPoints(
        apb.TransferPointsRequest(
            from_member_id=sender,
            to_member_id=receiver,
            points=points,
            idempotency_key=key or unique("tr"),
            member_proof=pb.MemberProof(pin=pin) if pin else None,
        ),
        metadata=world.operator,
        timeout=30,
    )


def _with_pin(world, member: str) -> str:
    world.admin.SetMemberPin(apb.SetMemberPinRequest(member_id=member, pin=PIN), metadata=world.operator, timeout=30)
    return member


def test_a_transfer_moves_points_less_the_fee_once_per_key_and_both_histories_show_it(transfers):
    world = transfers
    sender = _with_pin(world, funded_member(world.stub, "shop-a", 4_000))
    receiver = funded_member(world.stub, "shop-b", 100)
    key = unique("tr")
    sent = _transfer(world, sender, receiver, 2_000, key)
    assert (sent.points, sent.fee, sent.received, sent.balance, sent.available) == (2_000, 50, 1_950, 2_000, 2_000)
    assert _transfer(world, sender, receiver, 2_000, key).transaction_id == sent.transaction_id  # a replay
    assert world.balance(receiver).posted == 2_050
    (out,) = [t for t in world.history(sender) if t.kind == pb.TRANSACTION_KIND_TRANSFER]
    (into,) = [t for t in world.history(receiver) if t.kind == pb.TRANSACTION_KIND_TRANSFER]
    assert (out.transaction_id, out.points, into.transaction_id, into.points) == (
        sent.transaction_id,
        -2_000,
        sent.transaction_id,
        1_950,
    )
    (fees,) = fetch(
        world.url,
        "SELECT balance FROM account_balances WHERE kind = 'operator_transfer_fees' AND owner_id = 'operator'",
    )
    assert fees["balance"] == 50
    assert ledger_discrepancies(world.url) == []


def test_transfers_are_refused_without_proof_beyond_balance_or_cap_frozen_or_to_oneself(transfers):
    world = transfers
    sender = _with_pin(world, funded_member(world.stub, "shop-a", 9_000))
    receiver = funded_member(world.stub, "shop-a", 100)
    detail = refused(lambda: _transfer(world, sender, receiver, 100, pin=None), grpc.StatusCode.PERMISSION_DENIED)
    assert "member_proof" in detail
    refused(lambda: _transfer(world, sender, receiver, 100, pin="0000"), grpc.StatusCode.PERMISSION_DENIED)
    refused(lambda: _transfer(world, sender, sender, 100), grpc.StatusCode.INVALID_ARGUMENT)
    refused(lambda: _transfer(world, sender, receiver, 0), grpc.StatusCode.INVALID_ARGUMENT)
    refused(lambda: _transfer(world, sender, unique("nobody"), 100), grpc.StatusCode.NOT_FOUND)
    _transfer(world, sender, receiver, 4_000)
    detail = refused(lambda: _transfer(world, sender, receiver, 1_001), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "sent 4000 of its 5000 point-units of transfers today" in detail
    world.freeze(sender)
    assert "is frozen since" in refused(
        lambda: _transfer(world, sender, receiver, 10), grpc.StatusCode.FAILED_PRECONDITION
    )
    world.unfreeze(sender)
    poor = _with_pin(world, funded_member(world.stub, "shop-a", 100))
    assert "cannot send 101" in refused(
        lambda: _transfer(world, poor, receiver, 101), grpc.StatusCode.FAILED_PRECONDITION
    )
    world.restart()  # the day's cap is read back from Postgres
    refused(lambda: _transfer(world, sender, receiver, 1_001), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert _transfer(world, sender, receiver, 1_000).received == 975
    assert world.balance(sender).posted == 4_000
    assert ledger_discrepancies(world.url) == []


def test_a_transfer_within_one_household_is_refused_without_using_its_key(transfers):
    """Members of one household share one balance: a transfer between them is refused, and the refusal
    is about their state, not the request: once one leaves, the same key carries the transfer out."""
    world = transfers
    head = funded_member(world.stub, "shop-a", 100)
    sender = _with_pin(world, funded_member(world.stub, "shop-a", 3_000))
    household = world.admin.CreateHousehold(
        apb.CreateHouseholdRequest(head_member_id=head), metadata=world.operator, timeout=30
    ).household_id
    world.admin.JoinHousehold(
        apb.JoinHouseholdRequest(household_id=household, member_id=sender), metadata=world.operator, timeout=30
    )
    key = unique("tr")
    assert "share one balance" in refused(
        lambda: _transfer(world, sender, head, 1_000, key), grpc.StatusCode.FAILED_PRECONDITION
    )
    world.admin.LeaveHousehold(apb.LeaveHouseholdRequest(member_id=sender), metadata=world.operator, timeout=30)
    sent = _transfer(world, sender, head, 1_000, key)
    assert (sent.points, sent.received) == (1_000, 975)
    assert ledger_discrepancies(world.url) == []


def test_transfers_are_refused_when_the_program_does_not_allow_them(world):
    sender = funded_member(world.stub, "shop-a", 1_000)
    receiver = funded_member(world.stub, "shop-a", 100)
    detail = refused(lambda: _transfer(world, sender, receiver, 100, pin=None), grpc.StatusCode.FAILED_PRECONDITION)
    assert "does not allow member-to-member transfers" in detail
    assert world.balance(sender).posted == 1_000


# --- merchants' own clearing reads -----------------------------------------------------------------


def test_a_merchant_key_reads_its_own_position_and_statements_and_no_one_elses(world):
    funded_member(world.stub, "shop-a", 500)
    clearing = admin_pb2_grpc.ClearingServiceStub(world._bare)
    cut = timestamp_pb2.Timestamp()
    cut.GetCurrentTime()
    period = clearing.CloseSettlementPeriod(
        apb.ClearingServiceCloseSettlementPeriodRequest(cut_off=cut), metadata=world.operator, timeout=60
    ).period
    own, other = world.keys["shop-a"], world.keys["shop-b"]
    position = clearing.GetMerchantPosition(
        apb.ClearingServiceGetMerchantPositionRequest(merchant_id="shop-a"), metadata=own, timeout=30
    ).position
    assert position.merchant_id == "shop-a"
    statement = clearing.GetStatement(
        apb.ClearingServiceGetStatementRequest(merchant_id="shop-a", period_id=period.period_id),
        metadata=own,
        timeout=30,
    ).statement
    assert statement.merchant_id == "shop-a"
    listed = clearing.ListStatements(apb.ClearingServiceListStatementsRequest(merchant_id="shop-a"), metadata=own)
    assert {s.merchant_id for s in listed.statements} == {"shop-a"}
    exported = clearing.ExportStatement(
        apb.ClearingServiceExportStatementRequest(merchant_id="shop-a", period_id=period.period_id), metadata=own
    )
    assert exported.csv.startswith(b"period_id") and exported.lines >= 1
    gateway = credential(create_key(world.url, "gateway", ["shop-a", "shop-b"]))
    assert (
        clearing.GetMerchantPosition(
            apb.ClearingServiceGetMerchantPositionRequest(merchant_id="shop-b"), metadata=gateway, timeout=30
        ).position.merchant_id
        == "shop-b"
    )
    for call in (
        lambda: clearing.GetMerchantPosition(
            apb.ClearingServiceGetMerchantPositionRequest(merchant_id="shop-a"), metadata=other, timeout=30
        ),
        lambda: clearing.GetStatement(
            apb.ClearingServiceGetStatementRequest(merchant_id="shop-a", period_id=period.period_id), metadata=other
        ),
        lambda: clearing.ListStatements(apb.ClearingServiceListStatementsRequest(merchant_id="shop-a"), metadata=other),
        lambda: clearing.ListStatements(
            apb.ClearingServiceListStatementsRequest(period_id=period.period_id), metadata=own
        ),
        lambda: clearing.ExportStatement(
            apb.ClearingServiceExportStatementRequest(period_id=period.period_id), metadata=own
        ),
        lambda: clearing.CloseSettlementPeriod(
            apb.ClearingServiceCloseSettlementPeriodRequest(cut_off=cut), metadata=own, timeout=30
        ),
    ):
        refused(call, grpc.StatusCode.PERMISSION_DENIED)
    # the operator still reads every merchant
    assert clearing.ListStatements(
        apb.ClearingServiceListStatementsRequest(period_id=period.period_id), metadata=world.operator
    ).statements


# --- MergeMembers ----------------------------------------------------------------------------------


def _merge(world, source: str, target: str, key: str | None = None):
    return world.admin.MergeMembers(
        apb.MergeMembersRequest(source_member_id=source, target_member_id=target, idempotency_key=key or unique("m")),
        metadata=world.operator,
        timeout=30,
    )


def test_a_merge_moves_the_points_and_the_source_id_then_acts_on_the_target(world):
    source = funded_member(world.stub, "shop-a", 700)
    target = funded_member(world.stub, "shop-b", 300)
    card = unique("card")
    world.admin.AddMemberAlias(apb.AddMemberAliasRequest(member_id=source, alias=card), metadata=world.operator)
    key = unique("m")
    merged = _merge(world, source, target, key)
    assert (merged.points, merged.balance, merged.available) == (700, 1_000, 1_000)
    assert _merge(world, source, target, key).transaction_id == merged.transaction_id  # a replay
    assert world.history(target)[0].kind == pb.TRANSACTION_KIND_MERGE and world.history(target)[0].points == 700
    assert world.history(source)[0].points == -700
    # the source id, and the source's own card, now act on the target
    earn(world.stub, "shop-a", source, 1_000)  # +100
    assert world.redeem(card, 50).balance == 1_050
    assert world.balance(source).member_id == target
    assert "name one member" in refused(lambda: _merge(world, source, target), grpc.StatusCode.FAILED_PRECONDITION)
    events = fetch(
        world.url,
        "SELECT member_id, event FROM member_status_log WHERE event = 'merged' AND member_id = ANY($1)",
        [source, target],
    )
    assert sorted((r["member_id"], r["event"]) for r in events) == sorted([(source, "merged"), (target, "merged")])
    world.restart()
    assert world.redeem(source, 50).balance == 1_000
    assert ledger_discrepancies(world.url) == []


def test_a_merged_members_id_cannot_be_unbound_so_the_merge_stays_whole(world):
    source = funded_member(world.stub, "shop-a", 400)
    target = funded_member(world.stub, "shop-b", 100)
    card = unique("card")
    world.admin.AddMemberAlias(apb.AddMemberAliasRequest(member_id=source, alias=card), metadata=world.operator)
    _merge(world, source, target)
    message = refused(
        lambda: world.admin.RemoveMemberAlias(apb.RemoveMemberAliasRequest(alias=source), metadata=world.operator),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert f"merged into '{target}'" in message and "not undone" in message
    # the source id and its card still act on the target, which holds the points
    earn(world.stub, "shop-a", source, 1_000)  # +100
    assert world.redeem(card, 50).balance == 550
    assert world.balance(source).member_id == target
    # a card of the merged member is still a card: it may be unbound
    world.admin.RemoveMemberAlias(apb.RemoveMemberAliasRequest(alias=card), metadata=world.operator)
    refused(lambda: world.redeem(card, 1), grpc.StatusCode.NOT_FOUND)
    assert ledger_discrepancies(world.url) == []


def test_a_merge_is_refused_whole_while_the_source_holds_points_or_either_cannot_take_part(world):
    source = funded_member(world.stub, "shop-a", 700)
    target = funded_member(world.stub, "shop-a", 300)
    hold = world.authorize(source, 100)
    assert "open holds" in refused(lambda: _merge(world, source, target), grpc.StatusCode.FAILED_PRECONDITION)
    world.stub.Void(
        pb.VoidRequest(merchant_id="shop-a", authorization_id=hold.authorization_id, idempotency_key=unique("k")),
        timeout=30,
    )
    world.freeze(source)
    assert "is frozen" in refused(lambda: _merge(world, source, target), grpc.StatusCode.FAILED_PRECONDITION)
    world.unfreeze(source)
    refused(lambda: _merge(world, source, unique("nobody")), grpc.StatusCode.NOT_FOUND)
    refused(lambda: _merge(world, source, source), grpc.StatusCode.INVALID_ARGUMENT)
    closed = funded_member(world.stub, "shop-a", 100)
    world.close(closed)
    assert "is closed" in refused(lambda: _merge(world, source, closed), grpc.StatusCode.FAILED_PRECONDITION)
    assert (world.balance(source).posted, world.balance(target).posted) == (700, 300)
    assert ledger_discrepancies(world.url) == []


def test_a_merge_under_a_program_moves_lots_and_counts_toward_the_targets_level(transfers):
    world = transfers  # points expire there, so earns make lots
    source = funded_member(world.stub, "shop-a", 4_000)
    target = funded_member(world.stub, "shop-b", 1_000)
    before = fetch(world.url, "SELECT sum(amount) AS s FROM lots WHERE member_id = $1", source)[0]["s"]
    assert before == 4_000
    qualifying = {
        r["member_id"]: r["qualifying_point_units"]
        for r in fetch(
            world.url,
            "SELECT member_id, qualifying_point_units FROM member_programs WHERE member_id = ANY($1)",
            [source, target],
        )
    }
    merged = _merge(world, source, target)
    assert merged.points == 4_000
    lots = fetch(
        world.url, "SELECT member_id, sum(amount) AS s FROM lots WHERE member_id = ANY($1) GROUP BY 1", [source, target]
    )
    assert {r["member_id"]: r["s"] for r in lots} == {target: 5_000}
    after = {
        r["member_id"]: r["qualifying_point_units"]
        for r in fetch(
            world.url,
            "SELECT member_id, qualifying_point_units FROM member_programs WHERE member_id = ANY($1)",
            [source, target],
        )
    }
    assert after == {source: 0, target: qualifying[source] + qualifying[target]}
    assert ledger_discrepancies(world.url) == []


def test_merges_adjustments_reversals_and_transfers_under_concurrent_till_traffic(transfers):
    """Tills earn and redeem while the operator adjusts, reverses, transfers between the members and merges
    new members into them; every member's balance is what the answers add up to, and reconcile is clean."""
    world = transfers
    members = [_with_pin(world, funded_member(world.stub, "shop-a", 20_000)) for _ in range(3)]
    extras = [[funded_member(world.stub, "shop-b", 500) for _ in range(3)] for _ in members]
    moved = {member: 20_000 for member in members}
    rounds = 9

    def till(member: str, merchant: str) -> dict[str, int]:
        delta = 0
        for i in range(rounds):
            if i % 2:
                delta += earn(world.stub, merchant, member, 1_000).points
            else:
                world.stub.Redeem(
                    pb.RedeemRequest(
                        merchant_id=merchant,
                        member_id=member,
                        points=150,
                        idempotency_key=unique("k"),
                        member_proof=pb.MemberProof(pin=PIN),
                    ),
                    timeout=30,
                )
                delta -= 150
        return {member: delta}

    def operator(index: int) -> dict[str, int]:
        member, other = members[index], members[(index + 1) % len(members)]
        deltas = {member: 0, other: 0}
        for i in range(rounds):
            adjusted = world.adjust(member, 200 if i % 3 else -100)
            deltas[member] += adjusted.points
            if i % 4 == 0:
                deltas[member] += world.reverse(adjusted.transaction_id).points
            if i % 3 == 0:
                sent = _transfer(world, member, other, 300)
                deltas[member] -= sent.points
                deltas[other] += sent.received
            if i < len(extras[index]):
                deltas[member] += _merge(world, extras[index][i], member).points
        return deltas

    with concurrent.futures.ThreadPoolExecutor(max_workers=9) as pool:
        jobs = [pool.submit(till, member, merchant) for member in members for merchant in ("shop-a", "shop-b")]
        jobs += [pool.submit(operator, index) for index in range(len(members))]
        for job in jobs:
            for member, delta in job.result().items():
                moved[member] += delta
    for member in members:
        assert world.balance(member).posted == moved[member]
        assert sum(t.points for t in world.history(member)) == moved[member]
    for extra in (e for group in extras for e in group):
        assert (
            fetch(world.url, "SELECT balance FROM account_balances WHERE owner_id = $1 AND kind = 'member'", extra)[0][
                "balance"
            ]
            == 0
        )
    assert ledger_discrepancies(world.url) == []


def test_a_refund_of_a_closed_members_redemption_is_its_only_credit_and_reconciles(world):
    member = funded_member(world.stub, "shop-a", 1_000)
    redeemed = world.redeem(member, 400)
    world.close(member)
    refund = world.stub.Refund(
        pb.RefundRequest(
            merchant_id="shop-a", transaction_id=redeemed.transaction_id, points=400, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    assert refund.points == 400
    assert world.balance(member).posted == 400
    assert ledger_discrepancies(world.url) == []


def test_a_reversal_naming_a_merged_member_is_refused(world):
    source, target = unique("mem"), funded_member(world.stub, "shop-a", 100)
    credit = world.adjust(source, 500)
    _merge(world, source, target)
    detail = refused(lambda: world.reverse(credit.transaction_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert f"merged into '{target}'" in detail


def test_a_merge_moves_the_sources_vouchers_and_the_voucher_credit_it_owes(create_database):
    url = create_database()
    operator = credential(create_key(url, "operator"))
    for merchant in ("shop-a", "shop-b"):
        add_merchant(url, merchant, 1000)
    add_program_version(
        url,
        {"dividends": {"threshold_point_units": 12_000, "rate_bps_schedule": [50], "credit_limit_bps": 50_000}},
    )
    service = ServiceProcess(url, "--dividend-check-seconds", "0.2").start()
    try:
        wait_program_in_force(url)  # in force PROGRAM_LEAD_SECONDS after it was stored
        with service.channel() as channel, service.bare_channel() as bare:
            stub, admin = points_pb2_grpc.PointsServiceStub(channel), admin_pb2_grpc.MemberAdminServiceStub(bare)
            alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
            earn(stub, "shop-a", alice, 100_000)  # 10,000 point-units
            earn(stub, "shop-a", bob, 50_000)  # 5,000: the pool reaches the threshold, a round pays vouchers
            deadline = time.monotonic() + 20
            while stub.GetBalance(pb.GetBalanceRequest(member_id=bob), timeout=30).vouchers != 25:
                assert time.monotonic() < deadline, "the dividend round did not arrive"
                time.sleep(0.1)
            # alice spends her 50 vouchers and 10 on credit
            stub.Redeem(
                pb.RedeemRequest(merchant_id="shop-b", member_id=alice, vouchers=60, idempotency_key=unique("k")),
                timeout=30,
            )
            earn(stub, "shop-b", carol, 1_000)

            def merge(source: str) -> apb.MergeMembersResponse:
                request = apb.MergeMembersRequest(
                    source_member_id=source, target_member_id=carol, idempotency_key=unique("m")
                )
                return admin.MergeMembers(request, metadata=operator, timeout=30)

            merge(alice)
            merge(bob)
            balance = stub.GetBalance(pb.GetBalanceRequest(member_id=carol), timeout=30)
            assert (balance.posted, balance.vouchers, balance.voucher_credit_used) == (15_100, 25, 10)
            for source in (alice, bob):
                moved = stub.GetBalance(pb.GetBalanceRequest(member_id=source), timeout=30)
                assert moved.member_id == carol  # the source id names the target now
    finally:
        service.kill()
    assert ledger_discrepancies(url) == []


def test_a_cards_alias_spends_with_its_members_proof_when_the_program_asks_for_one(transfers):
    world = transfers  # member presence required for spending
    member = _with_pin(world, funded_member(world.stub, "shop-a", 1_000))
    card = unique("card")
    world.admin.AddMemberAlias(apb.AddMemberAliasRequest(member_id=member, alias=card), metadata=world.operator)
    redeemed = world.stub.Redeem(
        pb.RedeemRequest(
            merchant_id="shop-a",
            member_id=card,
            points=100,
            idempotency_key=unique("k"),
            member_proof=pb.MemberProof(pin=PIN),
        ),
        timeout=30,
    )
    assert redeemed.balance == 900
    refused(
        lambda: world.stub.Redeem(
            pb.RedeemRequest(merchant_id="shop-a", member_id=card, points=100, idempotency_key=unique("k")),
            timeout=30,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


def test_a_transfer_is_reversed_as_its_exact_mirror_the_fee_included(transfers):
    world = transfers
    sender = _with_pin(world, funded_member(world.stub, "shop-a", 3_000))
    receiver = funded_member(world.stub, "shop-b", 100)
    sent = _transfer(world, sender, receiver, 1_000)
    reversal = world.reverse(sent.transaction_id)
    assert (reversal.member_id, reversal.points, reversal.balance) == (sender, 1_000, 3_000)
    assert world.balance(receiver).posted == 100
    (fees,) = fetch(
        world.url,
        "SELECT sum(amount) AS s FROM entries e JOIN accounts a USING (account_id) "
        "WHERE e.transaction_id = $1 AND a.kind = 'operator_transfer_fees'",
        int(reversal.transaction_id[4:]),
    )
    assert fees["s"] == -sent.fee
    # the sender's lots came back: all its points expire again, none became permanent
    (lots,) = fetch(world.url, "SELECT sum(amount) AS s FROM lots WHERE member_id = $1", sender)
    assert lots["s"] == 3_000
    # a transfer whose points the receiver spent is not reversed, nor anything partly
    again = _transfer(world, sender, receiver, 1_000)
    world.adjust(receiver, -(100 + again.received - 10))  # the receiver keeps 10 point-units
    detail = refused(lambda: world.reverse(again.transaction_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert "were spent" in detail and "10 available" in detail
    assert world.balance(sender).posted == 2_000
    assert ledger_discrepancies(world.url) == []


# --- the change feed sees member administration (EventsService.WatchEvents) --------------------------


def test_freeze_unfreeze_merge_and_close_are_events_of_the_change_feed_in_commit_order(world):
    from points.v1 import events_pb2, events_pb2_grpc

    source, target, leaver = (funded_member(world.stub, "shop-a", 1_000) for _ in range(3))
    world.freeze(source, reason="card reported stolen")
    world.unfreeze(source)
    world.admin.MergeMembers(
        apb.MergeMembersRequest(source_member_id=source, target_member_id=target, idempotency_key=unique("m")),
        metadata=world.operator,
        timeout=30,
    )
    world.close(leaver)
    feed = events_pb2_grpc.EventsServiceStub(world._bare)
    wanted = {
        events_pb2.EVENT_TYPE_MEMBER_FROZEN,
        events_pb2.EVENT_TYPE_MEMBER_UNFROZEN,
        events_pb2.EVENT_TYPE_MEMBER_MERGED,
        events_pb2.EVENT_TYPE_MEMBER_CLOSED,
    }
    seen: list[events_pb2.Event] = []
    call = feed.WatchEvents(events_pb2.WatchEventsRequest(), metadata=world.operator, timeout=60)
    try:
        for response in call:
            # the feed replays from its start: the module's earlier tests froze and closed members too
            seen += [e for e in response.events if e.type in wanted and e.member_id in (source, target, leaver)]
            if len(seen) >= 4:
                break
    finally:
        call.cancel()
    assert [(e.type, e.member_id) for e in seen] == [
        (events_pb2.EVENT_TYPE_MEMBER_FROZEN, source),
        (events_pb2.EVENT_TYPE_MEMBER_UNFROZEN, source),
        (events_pb2.EVENT_TYPE_MEMBER_MERGED, source),  # once, from the source's side
        (events_pb2.EVENT_TYPE_MEMBER_CLOSED, leaver),
    ]
    assert seen[0].member_frozen.frozen and seen[0].member_frozen.reason == "card reported stolen"
    assert not seen[1].member_frozen.frozen
    assert (seen[2].member_merged.source_member_id, seen[2].member_merged.target_member_id) == (source, target)
    assert seen[3].member_closed.reason == "member asked"
