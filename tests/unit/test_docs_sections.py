"""docs/RULES.md's numbered sections are the targets of "docs/RULES.md section N" all over the tree
(code comments, proto comments, migrations, other docs): each number names one section, and every
reference names a section that exists, so a reader sent to "section N" lands on one page of rules."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
RULES_MD = ROOT / "docs" / "RULES.md"
SECTION = re.compile(r"^## (\d+)\. (.+)$", re.M)
# "docs/RULES.md section 12", "RULES.md section 11, "Reversals"", "`docs/RULES.md` section 11"
REFERENCE = re.compile(r"RULES\.md`? section (\d+)(?:, \"([^\"]+)\")?")
WHERE = ("processor", "proto", "docs", "ops", "README.md")
SUFFIXES = {".py", ".proto", ".sql", ".md", ".yml", ".json", ".example", ".pyx"}


def _sections() -> dict[int, tuple[str, str]]:
    """number -> (title, the section's text up to the next top-level heading)"""
    text = RULES_MD.read_text()
    heads = list(SECTION.finditer(text))
    numbers = [int(h.group(1)) for h in heads]
    duplicated = sorted({n for n in numbers if numbers.count(n) > 1})
    assert not duplicated, f"docs/RULES.md numbers more than one section {duplicated}"
    sections = {}
    for head in heads:
        end = text.find("\n## ", head.end())
        sections[int(head.group(1))] = (head.group(2), text[head.end() : end if end >= 0 else len(text)])
    return sections


def _references() -> list[tuple[str, int, int, str | None]]:
    found = []
    for where in WHERE:
        path = ROOT / where
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in SUFFIXES]
        for file in files:
            for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
                for match in REFERENCE.finditer(line):
                    found.append((f"{file.relative_to(ROOT)}:{number}", int(match.group(1)), number, match.group(2)))
    return found


def test_each_section_number_names_one_section():
    sections = _sections()
    assert sections, "docs/RULES.md has no numbered sections"


def test_every_reference_names_a_section_that_exists_and_holds_what_it_quotes():
    sections = _sections()
    references = _references()
    assert references, "no reference to docs/RULES.md's sections found: the pattern is stale"
    for where, number, _, quoted in references:
        assert number in sections, f"{where} sends the reader to docs/RULES.md section {number}, which does not exist"
        if quoted is not None:
            assert quoted in sections[number][1], (
                f"{where}: docs/RULES.md section {number} ({sections[number][0]}) says nothing of {quoted!r}"
            )


def test_channel_references_name_the_channel_section():
    """The channel's comments (migration 0013, channel code) send the reader to the channel's section."""
    sections = _sections()
    channel = [n for n, (title, _) in sections.items() if title.startswith("Channel economics")]
    assert len(channel) == 1
    for where, number, _, _ in _references():
        if "channel" in where:
            assert number == channel[0], f"{where} names section {number}, the channel's is {channel[0]}"
