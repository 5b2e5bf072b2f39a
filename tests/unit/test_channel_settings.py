"""The program's channel settings (docs/RULES.md section 12): rates in range, never more than the fee in
all, a known agent scope; every problem named at once, through the configuration codec."""

from __future__ import annotations

import pytest

from processor import rules
from processor.rules import ChannelSettings, ConfigError


def decode(channel) -> rules.ProgramVersion:
    return rules.version_from_config("alliance", 1, 0, {"channel": channel})


def test_defaults_pay_nothing_and_cover_the_subtree():
    settings = decode({}).channel
    assert settings == ChannelSettings()
    assert settings.agent_scope == rules.AGENT_SCOPE_SUBTREE
    assert [settings.agent_share_bps(level) for level in rules.REGION_LEVELS] == [0, 0, 0]
    assert decode(None).channel is None


def test_each_level_has_its_own_share():
    settings = decode({"province_agent_share_bps": 1, "city_agent_share_bps": 2, "county_agent_share_bps": 3}).channel
    assert [settings.agent_share_bps(level) for level in rules.REGION_LEVELS] == [1, 2, 3]


def test_rates_paying_a_merchants_fees_out_more_than_once_are_refused():
    with pytest.raises(ConfigError) as raised:
        decode({"promoter_commission_bps": 5_000, "province_agent_share_bps": 2_000, "county_agent_share_bps": 3_001})
    assert "must be at most 10000 (got 10001)" in str(raised.value)
    assert decode({"promoter_commission_bps": 5_000, "county_agent_share_bps": 5_000}).channel is not None


def test_every_problem_is_named():
    with pytest.raises(ConfigError) as raised:
        decode({"promoter_commission_bps": -1, "city_agent_share_bps": "5", "agent_scope": "country", "x": 1})
    message = str(raised.value)
    for expected in ("unknown", "city_agent_share_bps must be an integer"):
        assert expected in message, message
    with pytest.raises(ConfigError) as raised:
        decode({"promoter_commission_bps": -1, "agent_scope": "country"})
    message = str(raised.value)
    assert "promoter_commission_bps must be an integer in 0..10000 (got -1)" in message
    assert "agent_scope must be one of 'region', 'subtree' (got 'country')" in message
