"""The seed systems' program files (ops/programs/, issue 16): each loads with the program loader, and each of
its lines is documented against its seed in docs/RULES.md section 11 (one table row per key; a nested
object's keys as `key.subkey`)."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from processor import rules

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROGRAMS = ROOT / "ops" / "programs"
RULES_MD = ROOT / "docs" / "RULES.md"
SYSTEMS = ("good-luck-alliance", "zhongdian", "mobile-membership", "telecom-mall", "wanda-alliance")


def test_there_is_one_file_per_seed_system():
    assert sorted(path.stem for path in PROGRAMS.glob("*.json")) == sorted(SYSTEMS)


@pytest.mark.parametrize("system", SYSTEMS)
def test_the_file_loads_as_a_program_version_and_round_trips(system):
    config = json.loads((PROGRAMS / f"{system}.json").read_text())
    version = rules.version_from_config(system, 1, 0, config)
    stored = rules.version_to_config(version)
    assert {key: stored[key] for key in config} == config  # every line means what it says, nothing dropped


def _documented_lines(system: str) -> set[str]:
    text = RULES_MD.read_text()
    start = text.index(f"### ops/programs/{system}.json")
    end = text.find("\n### ", start + 1)
    section = text[start : end if end > 0 else len(text)]
    end = section.find("\n## ")
    section = section[: end if end > 0 else len(section)]
    return set(re.findall(r"^\| `([\w.]+)` \|", section, re.M))


@pytest.mark.parametrize("system", SYSTEMS)
def test_every_line_of_the_file_is_documented_against_the_seed(system):
    config = json.loads((PROGRAMS / f"{system}.json").read_text())
    lines = set()
    for key, value in config.items():
        if isinstance(value, dict):
            lines |= {f"{key}.{sub}" for sub in value}
        else:
            lines.add(key)
    assert lines == _documented_lines(system)


def test_a_file_with_an_unknown_or_invalid_setting_names_the_field():
    config = json.loads((PROGRAMS / "zhongdian.json").read_text())
    with pytest.raises(rules.ConfigError) as raised:
        rules.version_from_config("zhongdian", 1, 0, {**config, "merchant_match_bsp": 10_000, "fee_sale_bps": -1})
    message = str(raised.value)
    assert "unknown key 'merchant_match_bsp'" in message and "fee_sale_bps must be an integer in 0..10000" in message
