"""loadtest/projector_cpu.py's rows per statement: read from each statement's command tag, so its µs a row
is the backend's CPU over the rows the statement really wrote."""

from __future__ import annotations

from loadtest.projector_cpu import tag_rows


def test_the_rows_are_the_command_tags_count():
    assert tag_rows("COPY 1150") == 1150
    assert tag_rows("INSERT 0 70") == 70
    assert tag_rows("MERGE 404") == 404
    assert tag_rows("DELETE 3") == 3
    assert tag_rows("UPDATE 0") == 0


def test_what_returns_no_tag_counts_no_rows():
    assert tag_rows(None) == 0
    assert tag_rows(17) == 0
    assert tag_rows([("a", 1)]) == 0
    assert tag_rows("SELECT") == 0
