"""Logs: JSON lines for collectors, text for a person at a terminal, secrets scrubbed from both, and the
embedded Postgres' own chatter (initdb and pg_ctl command lines) only at DEBUG."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from processor import logs


@pytest.fixture
def stderr(monkeypatch):
    """A stream standing for stderr: set in the test itself (pytest's capture swaps sys.stderr between a
    fixture's setup and the test), and the handlers taken off afterwards."""
    stream = io.StringIO()
    yield lambda: monkeypatch.setattr(sys, "stderr", stream) or stream
    logging.getLogger().handlers[:] = []


def test_auto_is_json_when_not_a_terminal_and_text_when_asked(stderr):
    stderr = stderr()
    logs.hide("s3cr3t-password")
    logs.configure("INFO", "auto")
    logging.getLogger("points.test").info("hello s3cr3t-password", extra={"member": "m-1"})
    line = json.loads(stderr.getvalue().splitlines()[-1])
    assert (line["level"], line["logger"], line["msg"], line["member"]) == ("info", "points.test", "hello ***", "m-1")

    logs.configure("INFO", "text")
    logging.getLogger("points.test").warning("careful s3cr3t-password", extra={"member": "m-2"})
    text = stderr.getvalue().splitlines()[-1]
    assert text.endswith("warning points.test: careful ***  member=m-2"), text


def test_pgserver_lines_show_only_at_debug(stderr):
    stderr = stderr()
    logs.configure("INFO", "json")
    logging.getLogger("pgserver").info("Running commandline: initdb ...")
    assert stderr.getvalue() == ""
    logs.configure("DEBUG", "json")
    logging.getLogger("pgserver").info("Running commandline: initdb ...")
    assert "initdb" in stderr.getvalue()


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="json"):
        logs.configure("INFO", "xml")
