"""loadtest/projection_write.py files each statement the projection runs under the table it writes: every
SQL string in Store._write_many, _write_updates and _write_rules names its table, so no statement's cost
is lumped under another's (or under "select") in the per-table figures."""

from __future__ import annotations

import ast
import inspect
import textwrap

from loadtest.projection_write import Probe
from processor.store import Store


WRITES = ("INSERT INTO", "UPDATE ", "MERGE INTO", "DELETE FROM")


def sql_strings(function) -> list[str]:
    """The function's SQL texts that write a table."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and any(w in node.value for w in WRITES)
    ]


def test_every_write_statement_is_filed_under_its_table():
    tables = {
        Probe.table(sql)
        for function in (Store._write_many, Store._write_updates, Store._write_rules)
        for sql in sql_strings(function)
        if "set_config" not in sql  # the member events' position setting: no table, no rows
    }
    assert "select" not in tables
    assert {"members", "accounts", "transactions", "holds", "member_programs", "lots"} <= tables


def test_a_statement_is_filed_under_the_first_table_it_writes():
    assert Probe.table("WITH u AS (UPDATE holds h SET status = 2 RETURNING 1) SELECT count(*) FROM u") == "holds"
    assert Probe.table("MERGE INTO member_programs AS m USING x ON true") == "member_programs"
    assert Probe.table("INSERT INTO lots (member_id) SELECT 1 ON CONFLICT DO NOTHING") == "lots"
    assert Probe.table("SELECT pg_notify($1, $2)") == "select"
