"""A program version as JSON (processor/rules.py version_to_config / version_from_config /
program_from_rows): the exact round trip of every field, the defaults of missing keys, and the refusal
of each kind of bad configuration with a message naming the key and what is allowed."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest

from points.v1 import admin_pb2
from processor import admin, rules
from processor.domain import OPERATOR_ID
from processor.rules import (
    ConfigError,
    DividendSettings,
    Level,
    MerchantTerms,
    Program,
    ProgramVersion,
    Promotion,
    Rate,
)

pytestmark = pytest.mark.timeout(30)

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "ops" / "program.example.json"
COLUMNS = {"program_id", "version", "effective_from_us"}

# Every setting differs from its default, each nested class appears with every field set, and the
# optional values appear both set and None.
EVERY_FIELD = ProgramVersion(
    "alliance",
    3,
    1_800_000_000_000_000,
    expiry_period_us=365 * rules.DAY_US,
    restore_grace_us=7 * rules.DAY_US,
    levels=(
        Level("registered", 0, 0, 10_000),
        Level("blue", 500_000, 1_000, 11_000),
        Level("gold", 1_000_000, 5_000, 15_000),
    ),
    tier_window_us=180 * rules.DAY_US,
    dividends=DividendSettings(
        threshold_point_units=10**9, growth_bps=2_000, rate_bps_schedule=(50, 75, 100), credit_limit_bps=30_000
    ),
    acquiring_share_bps=100,
    referral_bonus_point_units=10_000,
    referral_minimum_purchase=5_000,
    promotions=(
        Promotion(
            "double-weekend",
            1_800_000_000_000_000,
            1_800_172_800_000_000,
            rules.SCOPE_NETWORK,
            multiplier_bps=20_000,
            budget_point_units=10**8,
        ),
        Promotion(
            "cafe-bonus",
            1_800_000_000_000_000,
            1_900_000_000_000_000,
            rules.SCOPE_MERCHANT,
            "cafe",
            bonus_point_units=500,
            budget_point_units=10**6,
            sponsor_id="cafe",
        ),
        Promotion(
            "gold-boost",
            1_800_000_000_000_000,
            1_900_000_000_000_000,
            rules.SCOPE_TIER,
            "gold",
            multiplier_bps=12_500,
            budget_point_units=10**7,
        ),
    ),
    merchant_terms=(
        MerchantTerms("cafe", acquiring_share_bps=250, conversion_rate=Rate(3, 2)),
        MerchantTerms("bakery", conversion_rate=Rate(1, 100)),
        MerchantTerms("florist", acquiring_share_bps=0, star_rating=2),
    ),
    operator_store_merchant_id="alliance-store",
    member_verification=rules.VERIFICATION_SPENDING,
    verification_failures_max=3,
    verification_lockout_seconds=600,
    member_points_spent_per_hour_max=50_000,
    member_points_spent_per_day_max=200_000,
    # issue 16, the seed systems
    merchant_match_bps=10_000,
    signup_bonus_point_units=5_000,
    referral_share_bps=8_000,
    level_points=rules.LEVEL_POINTS_TOTAL,
    fee_sale_bps=1_000,
    give_back_bps_min=100,
    give_back_bps_max=10_000,
    star_fee_rebate_bps=(500, 1_000, 2_000),
    merchant_vouchers_anywhere=True,
    acquiring_reward_asset=rules.ASSET_VOUCHERS,
    acquiring_at_acquirer=True,
    merchant_voucher_credit=True,
    channel=rules.ChannelSettings(
        promoter_commission_bps=2_000,
        province_agent_share_bps=500,
        city_agent_share_bps=1_000,
        county_agent_share_bps=1_500,
        agent_scope=rules.AGENT_SCOPE_REGION,
    ),
    member_transfers=rules.TRANSFERS_ON,
    member_transfer_fee_bps=100,
    member_points_transferred_per_day_max=50_000,
)


def decode(config, version: int = 2) -> ProgramVersion:
    return rules.version_from_config("alliance", version, 1_800_000_000_000_000, config)


def problems_of(config) -> str:
    with pytest.raises(ConfigError) as raised:
        decode(config)
    message = str(raised.value)
    assert message.startswith("program 'alliance' version 2: ")
    return message


def valid_config(**changes) -> dict:
    return {**rules.version_to_config(EVERY_FIELD), **changes}


# ---------------------------------------------------------------------------------------------------
# Round trip


def test_every_setting_differs_from_its_default_in_the_fixture():
    """So the round trip below would notice a field the codec forgot or mixed up with its default."""
    for field in dataclasses.fields(ProgramVersion):
        if field.name not in COLUMNS:
            assert getattr(EVERY_FIELD, field.name) != field.default, field.name
    assert {p.scope for p in EVERY_FIELD.promotions} == {rules.SCOPE_NETWORK, rules.SCOPE_MERCHANT, rules.SCOPE_TIER}


def test_round_trip_is_exact_for_every_field_through_json_text():
    config = rules.version_to_config(EVERY_FIELD)
    assert set(config) == set(rules.CONFIG_KEYS) == {f.name for f in dataclasses.fields(ProgramVersion)} - COLUMNS
    text = json.dumps(config)  # JSON-safe: what jsonb and the CLI carry
    again = rules.version_from_config("alliance", 3, 1_800_000_000_000_000, json.loads(text))
    assert again == EVERY_FIELD
    assert rules.version_to_config(again) == config


def test_program_rules_has_a_field_for_every_setting_with_the_same_name():
    """ProgramsService carries a version as ProgramRules (proto/points/v1/admin.proto): a setting the proto
    lacks could be set only through a program file, and GetProgram would not show it."""
    assert {f.name for f in admin_pb2.ProgramRules.DESCRIPTOR.fields} == set(rules.CONFIG_KEYS)
    assert {f.name for f in admin_pb2.ProgramMerchantTerms.DESCRIPTOR.fields} == {
        f.name for f in dataclasses.fields(MerchantTerms)
    }


def test_round_trip_is_exact_for_every_field_through_program_rules():
    """version -> ProgramRules (GetProgram) -> bytes -> configuration (SetProgramVersion) -> the same
    version, for every field, a 0-star merchant staying rated 0 and an unrated one unrated."""
    zero_stars = dataclasses.replace(
        EVERY_FIELD, merchant_terms=(*EVERY_FIELD.merchant_terms, MerchantTerms("kiosk", star_rating=0))
    )
    for version in (EVERY_FIELD, zero_stars):
        message = admin.rules_message(rules.version_to_config(version))
        wire = admin_pb2.ProgramRules.FromString(message.SerializeToString())
        again = rules.version_from_config("alliance", 3, 1_800_000_000_000_000, admin.rules_config(wire))
        assert again == version
    ratings = {t.merchant_id: t.HasField("star_rating") for t in message.merchant_terms}
    assert ratings == {"cafe": False, "bakery": False, "florist": True, "kiosk": True}


def test_unset_program_rules_are_the_defaults_and_are_answered_set():
    assert rules.version_from_config("alliance", 1, 0, admin.rules_config(admin_pb2.ProgramRules())) == (
        ProgramVersion("alliance", 1, 0)
    )
    answered = admin.rules_message(rules.version_to_config(ProgramVersion("alliance", 1, 0)))
    seeds = ("merchant_match_bps", "give_back_bps_min", "give_back_bps_max", "level_points", "acquiring_reward_asset")
    assert all(answered.HasField(name) for name in seeds)
    assert (answered.give_back_bps_min, answered.give_back_bps_max, answered.level_points) == (300, 2_000, "base")
    assert (answered.acquiring_reward_asset, list(answered.star_fee_rebate_bps)) == ("POINTS", [])


def test_config_spells_rates_and_nones_as_documented():
    config = rules.version_to_config(EVERY_FIELD)
    assert config["merchant_terms"] == [
        {
            "merchant_id": "cafe",
            "acquiring_share_bps": 250,
            "conversion_rate": {"numerator": 3, "denominator": 2},
            "star_rating": None,
        },
        {
            "merchant_id": "bakery",
            "acquiring_share_bps": None,
            "conversion_rate": {"numerator": 1, "denominator": 100},
            "star_rating": None,
        },
        {"merchant_id": "florist", "acquiring_share_bps": 0, "conversion_rate": None, "star_rating": 2},
    ]
    assert config["dividends"] == {
        "threshold_point_units": 10**9,
        "growth_bps": 2_000,
        "rate_bps_schedule": [50, 75, 100],
        "credit_limit_bps": 30_000,
    }
    assert config["promotions"][1] == {
        "promotion_id": "cafe-bonus",
        "start_us": 1_800_000_000_000_000,
        "end_us": 1_900_000_000_000_000,
        "scope": "merchant",
        "scope_id": "cafe",
        "multiplier_bps": 0,
        "bonus_point_units": 500,
        "budget_point_units": 10**6,
        "sponsor_id": "cafe",
    }
    default = rules.version_to_config(ProgramVersion("alliance", 1, 0))
    assert default["expiry_period_us"] is None and default["tier_window_us"] is None and default["dividends"] is None
    assert not COLUMNS & set(default)


def test_missing_keys_take_the_defaults_and_the_stored_form_spells_them_out():
    assert decode({}) == ProgramVersion("alliance", 2, 1_800_000_000_000_000)
    partial = decode(
        {
            "acquiring_share_bps": 100,
            "dividends": {"threshold_point_units": 5},
            "levels": [{"name": "base", "threshold_point_units": 0}],
        }
    )
    assert partial.dividends == DividendSettings(5)
    assert partial.levels == (Level("base", 0),)
    full = rules.version_to_config(partial)
    assert full["dividends"] == {
        "threshold_point_units": 5,
        "growth_bps": 1_500,
        "rate_bps_schedule": [50],
        "credit_limit_bps": 50_000,
    }
    assert full["restore_grace_us"] == 30 * rules.DAY_US


def test_the_example_file_is_the_plan_and_round_trips():
    config = json.loads(EXAMPLE.read_text())
    version = rules.version_from_config("alliance", 1, 0, config)
    assert [(level.name, level.threshold_point_units) for level in version.levels] == [
        ("registered", 0),
        ("blue", 500_000),
        ("yellow", 1_000_000),
        ("red", 2_000_000),
    ]
    assert version.expiry_period_us == 365 * rules.DAY_US
    assert version.acquiring_share_bps == 100
    assert version.referral_bonus_point_units > 0
    assert rules.version_to_config(version) == config


# ---------------------------------------------------------------------------------------------------
# Refusals


def test_not_an_object_is_refused_with_the_keys_expected():
    for config in ([], "levels", 7, None):
        message = problems_of(config)
        assert "the configuration must be an object with keys expiry_period_us, restore_grace_us, levels" in message


def test_unknown_keys_are_named_with_the_keys_allowed_at_every_level():
    message = problems_of(
        valid_config(expiry_days=365, levels=[{"name": "registered", "threshold_point_units": 0, "multiplier": 2}])
    )
    assert "has unknown key 'expiry_days'; the keys are expiry_period_us," in message
    assert (
        "levels[0] has unknown key 'multiplier'; the keys are name, threshold_point_units, bonus_point_units, "
        "multiplier_bps"
    ) in message
    message = problems_of(
        valid_config(
            merchant_terms=[
                {"merchant_id": "cafe", "conversion_rate": {"numerator": 1, "denominator": 2, "round": "down"}}
            ]
        )
    )
    assert "merchant_terms[0].conversion_rate has unknown key 'round'; the keys are numerator, denominator" in message


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("restore_grace_us", "30d", 'restore_grace_us must be an integer (got "30d")'),
        ("acquiring_share_bps", 1.5, "acquiring_share_bps must be an integer (got 1.5)"),
        ("referral_bonus_point_units", True, "referral_bonus_point_units must be an integer (got true)"),
        ("referral_minimum_purchase", None, "referral_minimum_purchase must be an integer (got null)"),
        ("expiry_period_us", "never", 'expiry_period_us must be an integer (got "never"), or null for never expire'),
        ("tier_window_us", [1], "tier_window_us must be an integer (got [1]), or null for in total"),
        (
            "dividends",
            5,
            "dividends must be an object with keys threshold_point_units, growth_bps, rate_bps_schedule, "
            "credit_limit_bps (got 5), or null for no dividend pool",
        ),
        ("levels", {"name": "x"}, "levels must be a list of level objects, lowest first"),
        ("promotions", None, "promotions must be a list of promotion objects (got null)"),
        ("merchant_terms", "cafe", 'merchant_terms must be a list of merchant terms objects (got "cafe")'),
    ],
)
def test_wrong_types_are_named_with_the_type_expected(key, value, expected):
    assert expected in problems_of(valid_config(**{key: value}))


def test_nested_wrong_types_and_missing_keys_name_their_path():
    config = valid_config(
        levels=[
            {"name": "registered", "threshold_point_units": 0},
            {"name": 7, "threshold_point_units": "500"},
            {"threshold_point_units": 1_000_000},
        ],
        dividends={"threshold_point_units": 10, "rate_bps_schedule": [50, "75"]},
        promotions=[{"promotion_id": "p", "start_us": 0, "end_us": 10, "scope": "network", "budget_point_units": 1.0}],
    )
    message = problems_of(config)
    for expected in (
        "levels[1].name must be a string of at most 200 characters (got 7)",
        'levels[1].threshold_point_units must be an integer (got "500")',
        "levels[2] needs name (required: name, threshold_point_units)",
        'dividends.rate_bps_schedule[1] must be an integer (got "75")',
        "promotions[0].budget_point_units must be an integer (got 1.0)",
    ):
        assert expected in message


def test_nested_range_problems_come_from_the_rules_with_their_path():
    message = problems_of(
        valid_config(
            levels=[
                {"name": "registered", "threshold_point_units": 0},
                {"name": "blue", "threshold_point_units": -1, "multiplier_bps": 5_000},
            ],
            merchant_terms=[
                {"merchant_id": "cafe", "acquiring_share_bps": 20_000},
                {"merchant_id": "bakery", "conversion_rate": {"numerator": 0, "denominator": 2}},
            ],
            dividends={"threshold_point_units": 10, "rate_bps_schedule": [100, 50]},
        )
    )
    assert (
        "levels[1]: level 'blue': threshold_point_units must be an integer in 0..9223372036854775807 (got -1)"
        in message
    )
    assert (
        "multiplier_bps (10000 = 1x; a level never earns less than the merchant gives) must be an integer in "
        "10000..100000 (got 5000)" in message
    )
    assert (
        "merchant_terms[0]: merchant terms of 'cafe': acquiring_share_bps must be an integer in 0..10000 "
        "(got 20000)" in message
    )
    assert "merchant_terms[1].conversion_rate: rate: numerator must be an integer in 1..1000000000 (got 0)" in message
    assert "dividends: dividend settings: rate_bps_schedule must not decrease from round to round: (100, 50)" in message


def test_checks_across_fields_are_made_once_the_parts_decode():
    message = problems_of(
        valid_config(
            levels=[{"name": "registered", "threshold_point_units": 0}, {"name": "blue", "threshold_point_units": 0}],
            promotions=[
                {
                    "promotion_id": "p",
                    "start_us": 0,
                    "end_us": 10,
                    "scope": "tier",
                    "scope_id": "gold",
                    "bonus_point_units": 5,
                    "budget_point_units": 10,
                }
            ],
            merchant_terms=[{"merchant_id": "cafe"}, {"merchant_id": "cafe"}],
        )
    )
    assert "thresholds must increase: 'blue' (0) is not above 'registered' (0)" in message
    assert "promotion 'p' names level 'gold', which is not one of ['blue', 'registered']" in message
    assert "merchant_terms must name each merchant once: ['cafe', 'cafe']" in message


def test_one_answer_lists_problems_of_every_kind_at_once():
    message = problems_of(
        valid_config(
            colour="red",  # unknown key
            acquiring_share_bps=20_000,  # range, top level
            restore_grace_us="1d",  # type, top level
            levels=[{"name": "registered", "threshold_point_units": 0, "bonus_point_units": -5}],  # nested range
            promotions=[{"promotion_id": "p"}],
        )
    )  # nested missing keys
    assert "unknown key 'colour'" in message
    assert "acquiring_share_bps must be an integer in 0..10000 (got 20000)" in message
    assert 'restore_grace_us must be an integer (got "1d")' in message
    assert "levels[0]: level 'registered': bonus_point_units must be an integer in 0..9223372036854775807" in message
    assert "promotions[0] needs start_us, end_us, scope" in message
    assert message.endswith("correct these and send the whole configuration again")


def test_a_promotion_naming_a_level_is_not_checked_against_levels_that_did_not_decode():
    message = problems_of(
        valid_config(
            levels=[{"name": "registered", "threshold_point_units": 0}, {"name": "gold", "threshold_point_units": "x"}],
            promotions=[
                {
                    "promotion_id": "p",
                    "start_us": 0,
                    "end_us": 10,
                    "scope": "tier",
                    "scope_id": "gold",
                    "bonus_point_units": 5,
                    "budget_point_units": 10,
                }
            ],
        )
    )
    assert "levels[1].threshold_point_units must be an integer" in message
    assert "names level" not in message


def test_lists_and_names_are_bounded():
    levels = [{"name": f"l{i}", "threshold_point_units": i} for i in range(rules.LEVELS_MAX + 1)]
    assert f"levels has {rules.LEVELS_MAX + 1} entries; at most {rules.LEVELS_MAX}" in problems_of(
        valid_config(levels=levels)
    )
    schedule = [50] * (rules.RATE_SCHEDULE_MAX + 1)
    assert "dividends.rate_bps_schedule has 1001 entries; at most 1000" in problems_of(
        valid_config(dividends={"threshold_point_units": 1, "rate_bps_schedule": schedule})
    )
    assert "merchant_terms[0].merchant_id must be a string of at most 200 characters" in problems_of(
        valid_config(merchant_terms=[{"merchant_id": "m" * 201}])
    )


def test_the_version_columns_are_checked_too():
    with pytest.raises(ConfigError, match="version must be an integer in 1.."):
        rules.version_from_config("alliance", 0, 0, {})
    with pytest.raises(ConfigError, match="program_id must be a non-empty string"):
        rules.version_from_config("", 1, 0, {})


def test_a_sponsor_other_than_the_operator_or_the_merchant_itself_is_refused():
    promotion = {
        "promotion_id": "p",
        "start_us": 0,
        "end_us": 10,
        "scope": "merchant",
        "scope_id": "cafe",
        "bonus_point_units": 5,
        "budget_point_units": 10,
        "sponsor_id": "bakery",
    }
    assert "sponsor_id must be 'operator' or, for a merchant promotion, that merchant" in problems_of(
        valid_config(promotions=[promotion])
    )
    assert (
        decode(valid_config(promotions=[{**promotion, "sponsor_id": OPERATOR_ID}])).promotions[0].sponsor_id
        == OPERATOR_ID
    )


# ---------------------------------------------------------------------------------------------------
# Stored rows


def row(version: int, effective_from_us: int, config) -> dict:
    return {"version": version, "effective_from_us": effective_from_us, "config": config}


def test_program_from_rows_orders_versions_and_reads_json_text():
    first = rules.version_to_config(ProgramVersion("alliance", 1, 100))
    second = rules.version_to_config(EVERY_FIELD)
    program = rules.program_from_rows("alliance", [row(2, 200, json.dumps(second)), row(1, 100, first)])
    assert program == Program(
        "alliance",
        (ProgramVersion("alliance", 1, 100), dataclasses.replace(EVERY_FIELD, version=2, effective_from_us=200)),
    )
    assert program.at(150).version == 1 and program.at(200).version == 2


def test_program_from_no_rows_is_none():
    assert rules.program_from_rows("alliance", []) is None


def test_program_from_rows_refuses_a_history_out_of_order():
    config = rules.version_to_config(ProgramVersion("alliance", 1, 0))
    with pytest.raises(ConfigError, match="effective_from_us must increase"):
        rules.program_from_rows("alliance", [row(1, 200, config), row(2, 100, config)])
    with pytest.raises(ConfigError, match="numbered 1, 2, 3"):
        rules.program_from_rows("alliance", [row(2, 200, config)])


def test_the_operator_store_is_a_merchant_id_or_none():
    assert decode(valid_config(operator_store_merchant_id=None)).operator_store_merchant_id is None
    assert decode(valid_config(operator_store_merchant_id="shop")).operator_store_merchant_id == "shop"
    assert "operator_store_merchant_id must be a merchant id" in problems_of(
        valid_config(operator_store_merchant_id="")
    )
    assert "operator_store_merchant_id must be a string" in problems_of(valid_config(operator_store_merchant_id=7))


def test_member_presence_and_spending_cap_settings_are_checked():
    message = problems_of(
        valid_config(
            member_verification="always",
            verification_failures_max=0,
            verification_lockout_seconds=31 * 86_400,
            member_points_spent_per_hour_max=-1,
            member_points_spent_per_day_max="lots",
        )
    )
    assert "member_verification must be one of 'off', 'spending' (got 'always')" in message
    assert "verification_failures_max" in message and "verification_lockout_seconds" in message
    assert "member_points_spent_per_hour_max (0 = no cap)" in message
    assert "member_points_spent_per_day_max must be an integer" in message
    default = ProgramVersion("alliance", 1, 0)
    assert (
        default.member_verification,
        default.verification_failures_max,
        default.verification_lockout_seconds,
        default.member_points_spent_per_hour_max,
        default.member_points_spent_per_day_max,
    ) == ("off", 5, 900, 0, 0)
