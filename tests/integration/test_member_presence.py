"""Member presence for spending and per-member spending caps (issue 13, sections 5 and 6), through the
real service and Postgres: a program whose member_verification is "spending" refuses Redeem and
Authorize without a right one-time code or PIN (PERMISSION_DENIED naming what is missing), locks a member
after verification_failures_max wrong proofs (RESOURCE_EXHAUSTED with the time, across a restart), lets
earns and captures through without proof, answers per operation in SubmitBatch; enrollment returns the
TOTP secret once; the hour cap refuses the spend that would pass it (RESOURCE_EXHAUSTED with a retry
time), also after a restart; GetBalance shows a member's links only to its acquiring merchant."""

from __future__ import annotations

import time

import grpc
import pyotp
import pytest

from points.v1 import admin_pb2, admin_pb2_grpc
from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import ServiceProcess, add_merchant, create_key, fetch, ledger_discrepancies
from tests.integration.helpers import (
    add_program_version,
    credential,
    earn,
    error_of,
    replay_flag,
    unique,
    wait_program_in_force,
)

pytestmark = pytest.mark.timeout(180)

FAILURES_MAX = 3
LOCKOUT_SECONDS = 600
HOUR_CAP = 5_000  # point-units per rolling hour
DAY_CAP = 9_000
PIN = "4821"


def _config() -> dict:
    return {
        "member_verification": "spending",
        "verification_failures_max": FAILURES_MAX,
        "verification_lockout_seconds": LOCKOUT_SECONDS,
        "member_points_spent_per_hour_max": HOUR_CAP,
        "member_points_spent_per_day_max": DAY_CAP,
    }


class World:
    def __init__(self, url: str):
        self.url = url
        self.operator = credential(create_key(url, "operator"))
        self.keys = {merchant: credential(add_merchant(url, merchant, 1000)) for merchant in ("shop-a", "shop-b")}
        add_program_version(url, _config())
        self.service: ServiceProcess | None = None
        self.start()
        wait_program_in_force(url)  # in force PROGRAM_LEAD_SECONDS after it was stored

    def start(self) -> None:
        self.service = ServiceProcess(self.url).start()
        self._channel = self.service.channel()
        self._bare = self.service.bare_channel()
        self.stub = points_pb2_grpc.PointsServiceStub(self._channel)
        self.admin = admin_pb2_grpc.MemberAdminServiceStub(self._bare)
        self.bare = points_pb2_grpc.PointsServiceStub(self._bare)

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        self._channel.close()
        self._bare.close()
        self.service.kill()

    def member(self, point_units: int = 20_000) -> str:
        member = unique("mem")
        earn(self.stub, "shop-a", member, point_units * 10)  # 10% give-back, no proof needed
        return member

    def enroll_totp(self, member: str) -> str:
        response = self.admin.EnrollMemberTotp(
            admin_pb2.EnrollMemberTotpRequest(member_id=member), metadata=self.operator, timeout=30
        )
        return response.secret_base32

    def set_pin(self, member: str, pin: str = PIN) -> None:
        self.admin.SetMemberPin(
            admin_pb2.SetMemberPinRequest(member_id=member, pin=pin), metadata=self.operator, timeout=30
        )

    def redeem(self, member: str, points: int, key: str | None = None, merchant: str = "shop-a", **proof):
        return self.stub.Redeem(
            pb.RedeemRequest(
                merchant_id=merchant,
                member_id=member,
                points=points,
                idempotency_key=key or unique("k"),
                member_proof=pb.MemberProof(**proof) if proof else None,
            ),
            timeout=30,
        )


@pytest.fixture(scope="module")
def world(create_database):
    world = World(create_database())
    yield world
    try:
        # checked while the service runs: it projects the batches it answered (after a SIGKILL only the
        # next start would)
        assert ledger_discrepancies(world.url) == []
    finally:
        world.stop()


def refused(call, code: grpc.StatusCode) -> str:
    error = error_of(call)
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    return error.details()


def wrong_code(secret: str) -> str:
    totp = pyotp.TOTP(secret)
    now = time.time()
    good = {totp.at(now), totp.at(now - 30), totp.at(now + 30)}
    return next(code for code in (f"{n:06d}" for n in range(1_000_000)) if code not in good)


# ---------------------------------------------------------------------------------------------------


def test_redeem_without_proof_is_refused_naming_what_is_missing_and_moves_nothing(world):
    member = world.member()
    detail = refused(lambda: world.redeem(member, 100), grpc.StatusCode.PERMISSION_DENIED)
    assert "no one-time code app or PIN enrolled" in detail and "EnrollMemberTotp" in detail
    world.enroll_totp(member)
    detail = refused(lambda: world.redeem(member, 100), grpc.StatusCode.PERMISSION_DENIED)
    assert "member_proof is missing" in detail and "member_proof.totp_code" in detail
    detail = refused(lambda: world.redeem(member, 100, pin=PIN), grpc.StatusCode.PERMISSION_DENIED)
    assert "no PIN set" in detail
    balance = world.stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30)
    assert (balance.posted, balance.held) == (20_000, 0)


def test_a_right_code_spends_once_and_the_same_code_again_is_refused(world):
    member = world.member()
    secret = world.enroll_totp(member)
    code = pyotp.TOTP(secret).now()
    key = unique("k")
    first = world.redeem(member, 700, key=key, totp_code=code)
    assert (first.points, first.balance) == (700, 19_300)
    # a retry of the same operation (same key) with the same code replays its outcome
    again, call = world.stub.Redeem.with_call(
        pb.RedeemRequest(
            merchant_id="shop-a",
            member_id=member,
            points=700,
            idempotency_key=key,
            member_proof=pb.MemberProof(totp_code=code),
        ),
        timeout=30,
    )
    assert again == first and replay_flag(call) == "true"
    # the same code for another operation is a replay of the code: refused, and nothing moves
    detail = refused(lambda: world.redeem(member, 700, totp_code=code), grpc.StatusCode.PERMISSION_DENIED)
    assert "used already" in detail
    assert world.stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30).posted == 19_300


def test_a_retry_of_a_spend_done_replays_even_without_proof(world):
    member = world.member()
    world.set_pin(member)
    key = unique("k")
    first = world.redeem(member, 250, key=key, pin=PIN)
    again, call = world.stub.Redeem.with_call(
        pb.RedeemRequest(merchant_id="shop-a", member_id=member, points=250, idempotency_key=key), timeout=30
    )
    assert again == first and replay_flag(call) == "true"
    # nor with a wrong PIN, which is then not counted as a failure
    for _ in range(FAILURES_MAX):
        again = world.redeem(member, 250, key=key, pin="0000")
        assert again == first
    state = world.admin.GetMemberVerification(
        admin_pb2.GetMemberVerificationRequest(member_id=member), metadata=world.operator, timeout=30
    ).verification
    assert state.failures == 0 and not state.HasField("locked_until")


def test_wrong_proofs_lock_the_member_with_the_time_and_the_lock_survives_a_restart(world):
    member = world.member()
    secret = world.enroll_totp(member)
    world.set_pin(member)
    for left in range(FAILURES_MAX - 1, 0, -1):
        detail = refused(
            lambda: world.redeem(member, 100, totp_code=wrong_code(secret)), grpc.StatusCode.PERMISSION_DENIED
        )
        assert "member_proof.totp_code is wrong" in detail and f"{left} more wrong proof" in detail
    detail = refused(lambda: world.redeem(member, 100, pin="0000"), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "member_proof.pin is wrong" in detail and "may not spend until 20" in detail
    state = world.admin.GetMemberVerification(
        admin_pb2.GetMemberVerificationRequest(member_id=member), metadata=world.operator, timeout=30
    ).verification
    until = state.locked_until.seconds
    assert LOCKOUT_SECONDS - 60 < until - time.time() <= LOCKOUT_SECONDS + 1
    # a right PIN does not open the lock
    refused(lambda: world.redeem(member, 100, pin=PIN), grpc.StatusCode.RESOURCE_EXHAUSTED)
    world.restart()
    detail = refused(
        lambda: world.redeem(member, 100, totp_code=pyotp.TOTP(secret).now()), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    # locked_until.seconds is truncated, the message's instant rounded up to the second: at xx:59.5 the
    # two name different minutes
    assert any(time.strftime("%Y-%m-%dT%H:%M", time.gmtime(until + extra)) in detail for extra in (0, 1)), detail
    # the operator unlocks it; the right PIN spends
    reset = world.admin.ResetMemberVerification(
        admin_pb2.ResetMemberVerificationRequest(member_id=member), metadata=world.operator, timeout=30
    ).verification
    assert not reset.HasField("locked_until") and reset.failures == 0 and reset.totp_enrolled and reset.pin_set
    assert world.redeem(member, 100, pin=PIN).points == 100


def test_earn_needs_no_proof_authorize_does_and_capture_does_not(world):
    member = world.member()
    world.set_pin(member)
    assert earn(world.stub, "shop-b", member, 1_000).points == 100
    authorize = pb.AuthorizeRequest(merchant_id="shop-a", member_id=member, points=400, idempotency_key=unique("k"))
    detail = refused(lambda: world.stub.Authorize(authorize, timeout=30), grpc.StatusCode.PERMISSION_DENIED)
    assert "member_proof is missing" in detail
    # split tender (vouchers) is a spend of the member's assets too
    split = pb.RedeemRequest(
        merchant_id="shop-a", member_id=member, points=0, vouchers=100, idempotency_key=unique("k")
    )
    assert "member_proof is missing" in refused(
        lambda: world.stub.Redeem(split, timeout=30), grpc.StatusCode.PERMISSION_DENIED
    )
    authorize.member_proof.pin = PIN
    hold = world.stub.Authorize(authorize, timeout=30)
    capture = world.stub.Capture(
        pb.CaptureRequest(merchant_id="shop-a", authorization_id=hold.authorization_id, idempotency_key=unique("k")),
        timeout=30,
    )
    assert (capture.points, capture.balance) == (400, 20_100 - 400)


def test_submit_batch_answers_presence_per_operation(world):
    member = world.member()
    world.set_pin(member)
    operations = [
        pb.Operation(
            earn=pb.EarnRequest(
                merchant_id="shop-a", member_id=member, purchase_amount=1_000, idempotency_key=unique("k")
            )
        ),
        pb.Operation(
            redeem=pb.RedeemRequest(merchant_id="shop-a", member_id=member, points=100, idempotency_key=unique("k"))
        ),
        pb.Operation(
            redeem=pb.RedeemRequest(
                merchant_id="shop-a",
                member_id=member,
                points=200,
                idempotency_key=unique("k"),
                member_proof=pb.MemberProof(pin=PIN),
            )
        ),
        pb.Operation(
            authorize=pb.AuthorizeRequest(
                merchant_id="shop-a",
                member_id=member,
                points=300,
                idempotency_key=unique("k"),
                member_proof=pb.MemberProof(pin="9999"),
            )
        ),
    ]
    results = world.stub.SubmitBatch(pb.SubmitBatchRequest(operations=operations), timeout=60).results
    assert [r.outcome for r in results] == [
        pb.OPERATION_OUTCOME_APPLIED,
        pb.OPERATION_OUTCOME_PERMISSION_DENIED,
        pb.OPERATION_OUTCOME_APPLIED,
        pb.OPERATION_OUTCOME_PERMISSION_DENIED,
    ]
    assert results[1].status_code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "member_proof is missing" in results[1].message and "pin is wrong" in results[3].message
    balance = world.stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30)
    assert (balance.posted, balance.held) == (20_000 + 100 - 200, 0)


def test_enrollment_returns_the_secret_once(world):
    member = unique("mem")
    response = world.admin.EnrollMemberTotp(
        admin_pb2.EnrollMemberTotpRequest(member_id=member), metadata=world.operator, timeout=30
    )
    assert len(response.secret_base32) == 32 and response.secret_base32 in response.provisioning_uri
    assert (response.digits, response.period_seconds) == (6, 30)
    shown = world.admin.GetMemberVerification(
        admin_pb2.GetMemberVerificationRequest(member_id=member), metadata=world.operator, timeout=30
    )
    assert shown.verification.totp_enrolled and response.secret_base32 not in str(shown)
    detail = refused(
        lambda: world.admin.EnrollMemberTotp(
            admin_pb2.EnrollMemberTotpRequest(member_id=member), metadata=world.operator, timeout=30
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "replace=true" in detail
    replaced = world.admin.EnrollMemberTotp(
        admin_pb2.EnrollMemberTotpRequest(member_id=member, replace=True), metadata=world.operator, timeout=30
    )
    assert replaced.secret_base32 != response.secret_base32
    stored = fetch(world.url, "SELECT pin_hash FROM member_credentials WHERE member_id = $1", member)
    assert stored[0]["pin_hash"] is None
    # merchant keys may not enroll
    refused(
        lambda: world.admin.EnrollMemberTotp(
            admin_pb2.EnrollMemberTotpRequest(member_id=member), metadata=world.keys["shop-a"], timeout=30
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    detail = refused(
        lambda: world.admin.SetMemberPin(
            admin_pb2.SetMemberPinRequest(member_id=member, pin="12"), metadata=world.operator, timeout=30
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "4..12 digits" in detail


def test_the_pin_is_stored_only_as_a_salted_hash(world):
    member = unique("mem")
    world.set_pin(member, "73915")
    row = fetch(world.url, "SELECT * FROM member_credentials WHERE member_id = $1", member)[0]
    assert b"73915" not in row["pin_hash"] and len(row["pin_salt"]) == 16
    assert "73915" not in " ".join(str(value) for value in dict(row).values())
    assert not any("73915" in line for line in world.service.log_lines)


def test_the_hour_cap_refuses_the_spend_past_it_counting_holds_and_after_a_restart(world):
    member = world.member()
    world.set_pin(member)
    assert world.redeem(member, 3_000, pin=PIN).points == 3_000
    hold = world.stub.Authorize(
        pb.AuthorizeRequest(
            merchant_id="shop-a",
            member_id=member,
            points=1_500,
            idempotency_key=unique("k"),
            member_proof=pb.MemberProof(pin=PIN),
        ),
        timeout=30,
    )
    key = unique("k")
    detail = refused(lambda: world.redeem(member, 600, key=key, pin=PIN), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "3000 point-units spent in the last hour and 1500 in open holds" in detail
    assert "member_points_spent_per_hour_max" in detail and "retry after 20" in detail
    assert world.redeem(member, 500, pin=PIN).points == 500  # exactly at the cap
    world.stub.Void(
        pb.VoidRequest(merchant_id="shop-a", authorization_id=hold.authorization_id, idempotency_key=unique("k")),
        timeout=30,
    )
    # the refused key was not recorded: the same key goes through once the hold no longer counts
    assert world.redeem(member, 600, key=key, pin=PIN).points == 600
    detail = refused(lambda: world.redeem(member, 1_000, pin=PIN), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "4100 point-units spent in the last hour" in detail and "retry after 20" in detail
    world.restart()  # rebuilt from the journal
    refused(lambda: world.redeem(member, 1_000, pin=PIN), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert world.redeem(member, 900, pin=PIN).points == 900


def test_a_spend_above_the_cap_alone_is_refused_for_good(world):
    member = world.member()
    world.set_pin(member)
    detail = refused(lambda: world.redeem(member, HOUR_CAP + 1, pin=PIN), grpc.StatusCode.FAILED_PRECONDITION)
    assert f"spend at most {HOUR_CAP} point-units at once" in detail


def test_get_balance_shows_the_links_only_to_the_acquirer(world):
    referrer = world.member()
    member = unique("mem")
    world.stub.LinkMember(
        pb.LinkMemberRequest(
            merchant_id="shop-a", member_id=member, referrer_member_id=referrer, idempotency_key=unique("k")
        ),
        timeout=30,
    )
    earn(world.stub, "shop-a", member, 10_000)
    mine = world.bare.GetBalance(pb.GetBalanceRequest(member_id=member), metadata=world.keys["shop-a"], timeout=30)
    assert (mine.acquirer_id, mine.referrer_id) == ("shop-a", referrer)
    other = world.bare.GetBalance(pb.GetBalanceRequest(member_id=member), metadata=world.keys["shop-b"], timeout=30)
    assert (other.acquirer_id, other.referrer_id) == ("", "")
    assert (other.posted, other.available, other.level) == (mine.posted, mine.available, mine.level) != (0, 0, "")


def test_the_cli_enrolls_sets_a_pin_from_stdin_and_shows_no_secret(world):
    import json
    import os
    import subprocess
    import sys

    from tests.harness import ROOT

    member = world.member()

    def cli(*arguments: str, stdin: str = "") -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("DATABASE_URL", None)
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "processor",
                "member",
                *arguments,
                "--member-id",
                member,
                "--database-url",
                world.url,
            ],
            cwd=ROOT,
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    enrolled = cli("enroll-totp")
    assert enrolled.returncode == 0, enrolled.stderr
    secret = json.loads(enrolled.stdout)["secret_base32"]
    assert cli("enroll-totp").returncode == 1
    assert cli("set-pin", stdin="12\n").returncode == 2
    assert cli("set-pin", stdin="246810\n").returncode == 0
    shown = cli("show")
    assert json.loads(shown.stdout) == {
        "member_id": member,
        "totp_enrolled": True,
        "pin_set": True,
        "failures": 0,
        "locked_until": None,
    }
    assert secret not in shown.stdout
    assert world.redeem(member, 100, pin="246810").points == 100
    assert world.redeem(member, 100, totp_code=pyotp.TOTP(secret).now()).points == 100


def test_one_code_spends_once_even_twice_in_one_batch_and_a_stream_needs_proof_too(world):
    member = world.member()
    secret = world.enroll_totp(member)
    code = pyotp.TOTP(secret).now()
    operations = [
        pb.Operation(
            redeem=pb.RedeemRequest(
                merchant_id="shop-a",
                member_id=member,
                points=100,
                idempotency_key=unique("k"),
                member_proof=pb.MemberProof(totp_code=code),
            )
        )
        for _ in range(2)
    ]
    results = world.stub.SubmitBatch(pb.SubmitBatchRequest(operations=operations), timeout=60).results
    assert sorted(r.outcome for r in results) == [pb.OPERATION_OUTCOME_APPLIED, pb.OPERATION_OUTCOME_PERMISSION_DENIED]
    assert world.stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30).posted == 20_000 - 100
    requests = [
        pb.StreamRequest(
            correlation_id="c1",
            operation=pb.Operation(
                redeem=pb.RedeemRequest(merchant_id="shop-a", member_id=member, points=100, idempotency_key=unique("k"))
            ),
        )
    ]
    answers = list(world.stub.Stream(iter(requests), timeout=60))
    assert [(a.correlation_id, a.result.outcome) for a in answers] == [("c1", pb.OPERATION_OUTCOME_PERMISSION_DENIED)]
    assert "member_proof is missing" in answers[0].result.message


def test_with_a_secret_key_the_database_holds_totp_secrets_only_encrypted(create_database, service_factory):
    import base64
    import secrets as random

    url = create_database()
    operator = credential(create_key(url, "operator"))
    add_merchant(url, "shop-a", 1000)
    add_program_version(url, _config())
    service = service_factory(url, env={"POINTS_MEMBER_SECRET_KEY": base64.b64encode(random.token_bytes(32)).decode()})
    time.sleep(1.3)
    member = unique("mem")
    with service.channel() as channel, service.bare_channel() as bare:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        earn(stub, "shop-a", member, 100_000)
        secret = (
            admin_pb2_grpc.MemberAdminServiceStub(bare)
            .EnrollMemberTotp(admin_pb2.EnrollMemberTotpRequest(member_id=member), metadata=operator, timeout=30)
            .secret_base32
        )
        stored = fetch(url, "SELECT totp_secret FROM member_credentials WHERE member_id = $1", member)[0]["totp_secret"]
        assert stored.startswith("aesgcm:") and secret not in stored
        redeemed = stub.Redeem(
            pb.RedeemRequest(
                merchant_id="shop-a",
                member_id=member,
                points=100,
                idempotency_key=unique("k"),
                member_proof=pb.MemberProof(totp_code=pyotp.TOTP(secret).now()),
            ),
            timeout=30,
        )
        assert redeemed.points == 100


def test_concurrent_spends_never_pass_the_cap_together(world):
    from concurrent.futures import ThreadPoolExecutor

    member = world.member()
    world.set_pin(member)

    def spend(_):
        try:
            return world.redeem(member, 400, pin=PIN).points
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            return 0

    with ThreadPoolExecutor(max_workers=10) as pool:
        spent = list(pool.map(spend, range(10)))
    operations = [
        pb.Operation(
            redeem=pb.RedeemRequest(
                merchant_id="shop-a",
                member_id=member,
                points=400,
                idempotency_key=unique("k"),
                member_proof=pb.MemberProof(pin=PIN),
            )
        )
        for _ in range(10)
    ]
    results = world.stub.SubmitBatch(pb.SubmitBatchRequest(operations=operations), timeout=60).results
    spent += [r.redeem.points for r in results if r.outcome == pb.OPERATION_OUTCOME_APPLIED]
    assert all(r.outcome in (pb.OPERATION_OUTCOME_APPLIED, pb.OPERATION_OUTCOME_RETRY) for r in results)
    assert sum(spent) == HOUR_CAP // 400 * 400 == 4_800
    assert world.stub.GetBalance(pb.GetBalanceRequest(member_id=member), timeout=30).posted == 20_000 - 4_800


def test_metrics_count_presence_checks_and_cap_refusals(world):
    import re
    import urllib.request

    member = world.member()
    world.set_pin(member)
    refused(lambda: world.redeem(member, 100, pin="0000"), grpc.StatusCode.PERMISSION_DENIED)
    refused(
        lambda: world.redeem(member, HOUR_CAP, pin=PIN) and world.redeem(member, 1, pin=PIN),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    text = urllib.request.urlopen(f"http://{world.service.metrics_target}/metrics", timeout=30).read().decode()

    def value(name: str, label: str) -> float:
        match = re.search(rf"^{name}\{{{label}\}} (\S+)$", text, re.MULTILINE)
        assert match, f"{name}{{{label}}} not exported"
        return float(match.group(1))

    assert value("points_member_verifications_total", 'result="wrong"') >= 1
    assert value("points_member_verifications_total", 'result="accepted"') >= 2
    assert value("points_fastpath_rejections_total", 'reason="spending_cap"') >= 1
