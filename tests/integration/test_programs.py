"""The versioned program rules through the operator's API (admin.proto service Programs) and the CLI
(`python -m processor program set|show`), against a real service and Postgres: versions numbered 1, 2,
3 ..., each stored exactly as given and never changed; a start in the past or not after the previous
version's refused; a configuration that cannot be used refused with every problem named; operator keys
only. Every start is chosen ahead of the latest stored one, so the tests do not depend on each other
(except the first, which needs the fresh database of the module).
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import time

import grpc
import pytest
from google.protobuf import timestamp_pb2

from points.v1 import admin_pb2 as pb
from points.v1 import admin_pb2_grpc
from tests.harness import ROOT, add_merchant, create_key, fetch
from tests.integration.helpers import cli, credential, error_of, unique

pytestmark = pytest.mark.timeout(120)

LOAD_WAIT_SECONDS_MAX = 10
PROGRAM = "alliance"
EXAMPLE = ROOT / "ops" / "program.example.json"
HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US


def stamp(micros: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)


def micros_of(value: timestamp_pb2.Timestamp) -> int:
    return value.seconds * 1_000_000 + value.nanos // 1000


def assert_refused(call, code: grpc.StatusCode) -> grpc.RpcError:
    error = error_of(call)
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    return error


# ---------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def programs(channel):
    return admin_pb2_grpc.ProgramsStub(channel)


@pytest.fixture(scope="module")
def operator(service) -> tuple[tuple[str, str], ...]:
    return credential(create_key(service.database_url, "operator"))


def stored_rows(service) -> list:
    return fetch(
        service.database_url,
        """SELECT version, effective_from_us, config::text AS config, created_by
                                          FROM program_versions WHERE program_id = $1 ORDER BY version""",
        PROGRAM,
    )


def next_start_us(service) -> int:
    """A start every check accepts: an hour from now, and a day after the latest stored version's."""
    rows = stored_rows(service)
    latest = rows[-1]["effective_from_us"] if rows else 0
    return max(time.time_ns() // 1000 + HOUR_US, latest + DAY_US)


def every_field_rules() -> pb.ProgramRules:
    """Rules with every field of every message set (and each optional one explicitly)."""
    start = 1_900_000_000_000_000
    return pb.ProgramRules(
        expiry_period_us=365 * DAY_US,
        restore_grace_us=7 * DAY_US,
        levels=[
            pb.ProgramLevel(name="registered", threshold_point_units=0, bonus_point_units=0, multiplier_bps=10_000),
            pb.ProgramLevel(name="blue", threshold_point_units=500_000, bonus_point_units=1_000, multiplier_bps=11_000),
            pb.ProgramLevel(
                name="gold", threshold_point_units=1_000_000, bonus_point_units=5_000, multiplier_bps=15_000
            ),
        ],
        tier_window_us=180 * DAY_US,
        dividends=pb.ProgramDividends(
            threshold_point_units=10**9, growth_bps=2_000, rate_bps_schedule=[50, 75], credit_limit_bps=30_000
        ),
        acquiring_share_bps=100,
        referral_bonus_point_units=10_000,
        referral_minimum_purchase=5_000,
        promotions=[
            pb.ProgramPromotion(
                promotion_id="double",
                start_us=start,
                end_us=start + DAY_US,
                scope=pb.PROMOTION_SCOPE_NETWORK,
                scope_id="",
                multiplier_bps=20_000,
                bonus_point_units=0,
                budget_point_units=10**8,
                sponsor_id="operator",
            ),
            pb.ProgramPromotion(
                promotion_id="cafe-bonus",
                start_us=start,
                end_us=start + DAY_US,
                scope=pb.PROMOTION_SCOPE_MERCHANT,
                scope_id="cafe",
                multiplier_bps=0,
                bonus_point_units=500,
                budget_point_units=10**6,
                sponsor_id="cafe",
            ),
            pb.ProgramPromotion(
                promotion_id="gold-boost",
                start_us=start,
                end_us=start + DAY_US,
                scope=pb.PROMOTION_SCOPE_TIER,
                scope_id="gold",
                multiplier_bps=12_500,
                bonus_point_units=0,
                budget_point_units=10**7,
                sponsor_id="operator",
            ),
        ],
        merchant_terms=[
            pb.ProgramMerchantTerms(
                merchant_id="cafe", acquiring_share_bps=250, conversion_rate=pb.ProgramRate(numerator=3, denominator=2)
            ),
            pb.ProgramMerchantTerms(merchant_id="bakery", conversion_rate=pb.ProgramRate(numerator=1, denominator=100)),
            pb.ProgramMerchantTerms(merchant_id="florist", acquiring_share_bps=0, star_rating=2),
            pb.ProgramMerchantTerms(merchant_id="kiosk", star_rating=0),
        ],
        operator_store_merchant_id="alliance-store",
        member_verification="spending",
        verification_failures_max=3,
        verification_lockout_seconds=600,
        member_points_spent_per_hour_max=50_000,
        member_points_spent_per_day_max=200_000,
        channel=pb.ProgramChannel(
            promoter_commission_bps=2_000,
            province_agent_share_bps=500,
            city_agent_share_bps=1_000,
            county_agent_share_bps=1_500,
            agent_scope="region",
        ),
        member_transfers="on",
        member_transfer_fee_bps=100,
        member_points_transferred_per_day_max=50_000,
        # the seed systems' options (issue 16), each away from its default
        merchant_match_bps=10_000,
        signup_bonus_point_units=5_000,
        referral_share_bps=8_000,
        level_points="total",
        fee_sale_bps=1_000,
        give_back_bps_min=100,
        give_back_bps_max=10_000,
        star_fee_rebate_bps=[500, 1_000, 2_000],
        merchant_vouchers_anywhere=True,
        acquiring_reward_asset="VOUCHERS",
        acquiring_at_acquirer=True,
        merchant_voucher_credit=True,
    )


def plain_rules(**fields) -> pb.ProgramRules:
    return pb.ProgramRules(**{"acquiring_share_bps": 100, **fields})


# ---------------------------------------------------------------------------------------------------
# Setting and reading versions


def test_get_program_is_not_found_before_the_first_version(programs, operator):
    error = assert_refused(
        lambda: programs.GetProgram(pb.GetProgramRequest(), metadata=operator, timeout=30), grpc.StatusCode.NOT_FOUND
    )
    assert "program 'alliance' has no version yet" in error.details()
    assert "python -m processor program set" in error.details()


def test_versions_are_numbered_in_order_and_read_back_exactly(service, programs, operator):
    before = len(stored_rows(service))
    first_start = next_start_us(service)
    first = programs.SetProgramVersion(
        pb.SetProgramVersionRequest(effective_from=stamp(first_start), rules=every_field_rules()),
        metadata=operator,
        timeout=30,
    )
    second = programs.SetProgramVersion(
        pb.SetProgramVersionRequest(
            program_id=PROGRAM, effective_from=stamp(first_start + DAY_US), rules=plain_rules()
        ),
        metadata=operator,
        timeout=30,
    )
    assert (first.program_id, first.version, micros_of(first.effective_from)) == (PROGRAM, before + 1, first_start)
    assert (second.version, micros_of(second.effective_from)) == (before + 2, first_start + DAY_US)
    assert first.rules == every_field_rules()

    program = programs.GetProgram(pb.GetProgramRequest(), metadata=operator, timeout=30)
    assert program.program_id == PROGRAM
    assert [v.version for v in program.versions] == list(range(1, before + 3))
    assert program.versions[before] == first
    assert program.versions[before + 1] == second
    assert program.version_in_force < first.version  # both start in the future


def test_unset_fields_take_the_documented_defaults_and_are_returned_set(service, programs, operator):
    version = programs.SetProgramVersion(
        pb.SetProgramVersionRequest(effective_from=stamp(next_start_us(service)), rules=pb.ProgramRules()),
        metadata=operator,
        timeout=30,
    )
    rules = version.rules
    for name in (
        "expiry_period_us",
        "restore_grace_us",
        "tier_window_us",
        "acquiring_share_bps",
        "referral_bonus_point_units",
        "referral_minimum_purchase",
    ):
        assert rules.HasField(name), name
    assert (rules.expiry_period_us, rules.restore_grace_us, rules.tier_window_us) == (0, 30 * DAY_US, 0)
    assert (rules.acquiring_share_bps, rules.referral_bonus_point_units, rules.referral_minimum_purchase) == (0, 0, 1)
    assert [(level.name, level.threshold_point_units, level.multiplier_bps) for level in rules.levels] == [
        ("registered", 0, 10_000),
        ("blue", 500_000, 10_000),
        ("yellow", 1_000_000, 10_000),
        ("red", 2_000_000, 10_000),
    ]
    assert not rules.HasField("dividends") and not rules.promotions and not rules.merchant_terms
    assert not rules.HasField("channel")
    # the seed systems' options (issue 16) answer their defaults too
    assert (rules.merchant_match_bps, rules.signup_bonus_point_units, rules.referral_share_bps) == (0, 0, 0)
    assert (rules.level_points, rules.fee_sale_bps, rules.give_back_bps_min, rules.give_back_bps_max) == (
        "base",
        0,
        300,
        2_000,
    )
    assert (rules.acquiring_reward_asset, list(rules.star_fee_rebate_bps)) == ("POINTS", [])
    assert rules.HasField("merchant_vouchers_anywhere") and not rules.merchant_vouchers_anywhere
    assert rules.HasField("merchant_voucher_credit") and not rules.merchant_voucher_credit


def test_a_stored_version_holds_every_setting_and_who_stored_it(service, programs, operator):
    version = programs.SetProgramVersion(
        pb.SetProgramVersionRequest(
            effective_from=stamp(next_start_us(service)),
            rules=plain_rules(levels=[pb.ProgramLevel(name="base", threshold_point_units=0)]),
        ),
        metadata=operator,
        timeout=30,
    )
    row = stored_rows(service)[version.version - 1]
    config = json.loads(row["config"])
    assert config["levels"] == [
        {"name": "base", "threshold_point_units": 0, "bonus_point_units": 0, "multiplier_bps": 10_000}
    ]
    assert config["dividends"] is None and config["restore_grace_us"] == 30 * DAY_US  # defaults spelled out
    assert row["created_by"].startswith("api key ")


def test_an_unset_start_is_accepted_as_the_earliest_allowed(create_database, service_factory):
    # a database of its own: the module's has versions starting hours ahead, which an unset start cannot follow
    service = service_factory(create_database())
    operator = credential(create_key(service.database_url, "operator"))
    with service.bare_channel() as channel:
        version = admin_pb2_grpc.ProgramsStub(channel).SetProgramVersion(
            pb.SetProgramVersionRequest(rules=plain_rules()), metadata=operator, timeout=30
        )
    assert version.version == 1
    assert version.HasField("effective_from")


# ---------------------------------------------------------------------------------------------------
# Refusals


def test_a_bad_configuration_is_invalid_argument_naming_every_problem_and_stores_nothing(service, programs, operator):
    before = stored_rows(service)
    rules = plain_rules(
        acquiring_share_bps=20_000,
        levels=[
            pb.ProgramLevel(name="registered", threshold_point_units=0),
            pb.ProgramLevel(name="blue", threshold_point_units=0),
        ],
        merchant_terms=[
            pb.ProgramMerchantTerms(merchant_id="cafe", conversion_rate=pb.ProgramRate(numerator=0, denominator=1))
        ],
    )
    error = assert_refused(
        lambda: programs.SetProgramVersion(
            pb.SetProgramVersionRequest(effective_from=stamp(next_start_us(service)), rules=rules),
            metadata=operator,
            timeout=30,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    for expected in (
        "acquiring_share_bps must be an integer in 0..10000 (got 20000)",
        "thresholds must increase: 'blue' (0) is not above 'registered' (0)",
        "merchant_terms[0].conversion_rate: rate: numerator must be an integer in 1..1000000000",
    ):
        assert expected in error.details()
    assert stored_rows(service) == before


def test_bad_seed_options_are_invalid_argument_naming_each_and_store_nothing(service, programs, operator):
    before = stored_rows(service)
    rules = plain_rules(
        give_back_bps_min=5_000,
        give_back_bps_max=4_000,
        level_points="all",
        acquiring_reward_asset="CASH",
        merchant_voucher_credit=True,  # without dividends
        star_fee_rebate_bps=[0, 500],
        merchant_terms=[pb.ProgramMerchantTerms(merchant_id="cafe", star_rating=4)],
    )
    error = assert_refused(
        lambda: programs.SetProgramVersion(
            pb.SetProgramVersionRequest(effective_from=stamp(next_start_us(service)), rules=rules),
            metadata=operator,
            timeout=30,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    for expected in (
        "give_back_bps_min (5000) must not be above give_back_bps_max (4000)",
        "level_points must be one of 'base', 'total' (got 'all')",
        "acquiring_reward_asset must be 'POINTS' or 'VOUCHERS' (got 'CASH')",
        "merchant_voucher_credit needs dividends",
        "merchant_terms of 'cafe': star_rating 4 has no rebate in star_fee_rebate_bps (2 entries)",
    ):
        assert expected in error.details()
    assert stored_rows(service) == before


def test_a_promotion_without_a_scope_is_invalid_argument(service, programs, operator):
    rules = plain_rules(
        promotions=[
            pb.ProgramPromotion(promotion_id="p", start_us=0, end_us=10, bonus_point_units=1, budget_point_units=1)
        ]
    )
    error = assert_refused(
        lambda: programs.SetProgramVersion(
            pb.SetProgramVersionRequest(effective_from=stamp(next_start_us(service)), rules=rules),
            metadata=operator,
            timeout=30,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert (
        "promotions[0]: scope must be PROMOTION_SCOPE_NETWORK, PROMOTION_SCOPE_MERCHANT or PROMOTION_SCOPE_TIER"
        in error.details()
    )


def test_a_start_in_the_past_is_failed_precondition(service, programs, operator):
    before = stored_rows(service)
    past = time.time_ns() // 1000 - HOUR_US
    error = assert_refused(
        lambda: programs.SetProgramVersion(
            pb.SetProgramVersionRequest(effective_from=stamp(past), rules=plain_rules()), metadata=operator, timeout=30
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "never to the past" in error.details()
    assert "give a later start, or none" in error.details()
    assert stored_rows(service) == before


def test_a_start_not_after_the_previous_version_s_is_failed_precondition(service, programs, operator):
    latest = programs.SetProgramVersion(
        pb.SetProgramVersionRequest(effective_from=stamp(next_start_us(service)), rules=plain_rules()),
        metadata=operator,
        timeout=30,
    )
    for start in (micros_of(latest.effective_from), micros_of(latest.effective_from) - HOUR_US):
        error = assert_refused(
            lambda: programs.SetProgramVersion(
                pb.SetProgramVersionRequest(effective_from=stamp(start), rules=plain_rules()),
                metadata=operator,
                timeout=30,
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert f"not after version {latest.version}" in error.details()
        assert "versions apply in order" in error.details()
    assert len(stored_rows(service)) == latest.version


def test_another_program_id_is_invalid_argument(service, programs, operator):
    for call in (
        lambda: programs.GetProgram(pb.GetProgramRequest(program_id="gold"), metadata=operator, timeout=30),
        lambda: programs.SetProgramVersion(
            pb.SetProgramVersionRequest(
                program_id="gold", effective_from=stamp(next_start_us(service)), rules=plain_rules()
            ),
            metadata=operator,
            timeout=30,
        ),
    ):
        error = assert_refused(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert "is not this service's program 'alliance'" in error.details()


def test_merchant_and_gateway_keys_are_refused_and_no_key_is_unauthenticated(service, programs):
    merchant_id = unique("m")
    merchant_key = add_merchant(service.database_url, merchant_id)
    gateway_key = create_key(service.database_url, "gateway", [merchant_id])
    before = stored_rows(service)
    request = pb.SetProgramVersionRequest(effective_from=stamp(next_start_us(service)), rules=plain_rules())
    for key in (merchant_key, gateway_key):
        for call in (
            lambda: programs.SetProgramVersion(request, metadata=credential(key), timeout=30),
            lambda: programs.GetProgram(pb.GetProgramRequest(), metadata=credential(key), timeout=30),
        ):
            error = assert_refused(call, grpc.StatusCode.PERMISSION_DENIED)
            assert "cannot call points.v1.Programs; it takes a operator key" in error.details()
    assert_refused(lambda: programs.SetProgramVersion(request, timeout=30), grpc.StatusCode.UNAUTHENTICATED)
    assert stored_rows(service) == before


# ---------------------------------------------------------------------------------------------------
# The store: one version number per version, and a notice per version


async def _race(url: str, start_us: int, callers: int) -> list:
    from processor import rules
    from processor.store import Store, StoreError

    stores = [await Store.open(url, 2) for _ in range(callers)]
    try:
        results = await asyncio.gather(
            *(store.add_program_version(PROGRAM, start_us, {}, "race") for store in stores), return_exceptions=True
        )
    finally:
        for store in stores:
            await store.close()
    for result in results:
        assert isinstance(result, (rules.ProgramVersion, StoreError)), repr(result)
    return results


def test_concurrent_versions_with_one_start_store_exactly_one(service):
    from processor import rules

    before = len(stored_rows(service))
    results = asyncio.run(_race(service.database_url, next_start_us(service), 4))
    stored = [r for r in results if isinstance(r, rules.ProgramVersion)]
    assert [v.version for v in stored] == [before + 1]
    assert all("not after version" in str(r) for r in results if r not in stored)
    assert [r["version"] for r in stored_rows(service)] == list(range(1, before + 2))


async def _notices(url: str, start_us: int) -> list[str]:
    from processor.store import Store

    listener, writer = await Store.open(url, 2), await Store.open(url, 2)
    notices: list[str] = []
    received = asyncio.Event()

    def heard(program_id: str) -> None:
        notices.append(program_id)
        received.set()

    try:
        await listener.listen_program_changes(heard)
        await writer.add_program_version(PROGRAM, start_us, {}, "tests")
        await asyncio.wait_for(received.wait(), timeout=30)
        await listener.stop_listening()
        await writer.add_program_version(PROGRAM, start_us + DAY_US, {}, "tests")
        await asyncio.sleep(0.2)  # a notice to a stopped listener would arrive in this time
    finally:
        await listener.close()
        await writer.close()
    return notices


def test_a_stored_version_is_announced_to_listeners_until_they_stop(service):
    assert asyncio.run(_notices(service.database_url, next_start_us(service))) == [PROGRAM]


# ---------------------------------------------------------------------------------------------------
# The CLI


def loads(service) -> int:
    """How often the running service has (re)loaded the program's versions, by its log."""
    return sum('"msg": "program versions loaded"' in line for line in list(service.log_lines))


def test_cli_sets_the_example_and_shows_it_as_the_api_does(service, programs, operator):
    start_us = next_start_us(service)
    loaded_before = loads(service)
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start_us // 1_000_000)) + "Z"
    result = cli(
        "program", "set", "--file", str(EXAMPLE), "--effective-from", start, "--database-url", service.database_url
    )
    assert result.returncode == 0, result.stderr
    stored = json.loads(result.stdout)
    assert stored["config"] == json.loads(EXAMPLE.read_text())
    assert stored["effective_from_us"] == start_us // 1_000_000 * 1_000_000 and stored["effective_from"] == start
    assert stored["program_id"] == PROGRAM
    assert f"stored version {stored['version']} of program 'alliance'" in result.stderr
    deadline = time.monotonic() + LOAD_WAIT_SECONDS_MAX  # the service hears of it (NOTIFY) and reloads
    while loads(service) == loaded_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loads(service) > loaded_before, "the running service did not load the version the CLI stored"

    shown = cli("program", "show", "--database-url", service.database_url)
    assert shown.returncode == 0, shown.stderr
    listing = json.loads(shown.stdout)
    assert listing["program_id"] == PROGRAM
    assert [v["version"] for v in listing["versions"]] == list(range(1, stored["version"] + 1))
    assert listing["versions"][-1] == stored

    version = programs.GetProgram(pb.GetProgramRequest(), metadata=operator, timeout=30).versions[-1]
    assert (version.version, micros_of(version.effective_from)) == (stored["version"], stored["effective_from_us"])
    assert version.rules.acquiring_share_bps == 100
    assert [level.name for level in version.rules.levels] == ["registered", "blue", "yellow", "red"]


def test_cli_show_of_a_program_without_versions_is_an_empty_list(service):
    shown = cli("program", "show", "--program-id", "empty-program", "--database-url", service.database_url)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"program_id": "empty-program", "version_in_force": None, "versions": []}


def test_cli_refusals_say_why_and_exit_2(service, tmp_path: pathlib.Path):
    before = stored_rows(service)
    url = service.database_url
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"expiry_days": 365, "levels": [{"name": "registered", "threshold_point_units": 5}]}))
    not_json = tmp_path / "not.json"
    not_json.write_text("levels: [registered]")
    shown = tmp_path / "shown.json"
    shown.write_text(json.dumps({"program_id": PROGRAM, "version": 1, "config": {}}))
    cases = [
        (("--file", str(bad)), ["unknown key 'expiry_days'", "the first level ('registered') must have threshold 0"]),
        (("--file", str(not_json)), [f"{not_json} is not JSON"]),
        (("--file", str(tmp_path / "missing.json")), ["cannot read", "No such file"]),
        (("--file", str(shown)), ["looks like `program show` output"]),
        (("--file", str(EXAMPLE), "--effective-from", "2020-01-01T00:00:00Z"), ["never to the past"]),
        (("--file", str(EXAMPLE), "--effective-from", "2099-01-01T00:00:00"), ["has no time zone"]),
        (("--file", str(EXAMPLE), "--effective-from", "next tuesday"), ["is not an ISO 8601 time"]),
    ]
    for arguments, messages in cases:
        result = cli("program", "set", *arguments, "--database-url", url)
        assert result.returncode == 2, (arguments, result.stdout, result.stderr)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
        for message in messages:
            assert message in result.stderr, (arguments, result.stderr)
        assert result.stdout == ""
    assert stored_rows(service) == before
