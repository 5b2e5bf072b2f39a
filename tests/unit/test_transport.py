"""Transport settings, the loopback rule, URL redaction and log scrubbing (no database, no network)."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from processor import config, logs
from processor.store import redact, url_secrets
from processor.transport import TransportSecurityError, is_loopback, require_secure_listen


@pytest.mark.parametrize(
    "host,loopback",
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("[::1]", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("10.0.0.5", False),
        ("192.168.1.1", False),
        ("db.internal", False),
        ("localhost.evil.example", False),
        ("", False),
    ],
)
def test_loopback_is_localhost_or_a_loopback_literal(host, loopback):
    assert is_loopback(host) is loopback


def test_plaintext_off_loopback_needs_insecure_and_tls_lifts_the_rule():
    require_secure_listen(config.Settings(listen="127.0.0.1:0"))
    require_secure_listen(config.Settings(listen="[::1]:50051"))
    with pytest.raises(TransportSecurityError) as raised:
        require_secure_listen(config.Settings(listen="0.0.0.0:50051"))
    assert "\n" not in str(raised.value) and "--insecure" in str(raised.value)
    require_secure_listen(config.Settings(listen="0.0.0.0:50051", insecure=True))
    require_secure_listen(config.Settings(listen="0.0.0.0:50051", tls_cert_file="c", tls_key_file="k"))


def test_listeners_default_to_loopback():
    settings = config.load({}, environ={})
    assert settings.listen.startswith("127.0.0.1:") and settings.metrics_listen.startswith("127.0.0.1:")
    assert settings.health_listen == "" and settings.insecure is False and settings.tls_cert_file == ""


def test_tls_settings_come_from_environment_variables_and_flags_win():
    settings = config.load(
        {"tls_key_file": "/flag.key"},
        environ={
            "POINTS_TLS_CERT_FILE": "/env.crt",
            "POINTS_TLS_KEY_FILE": "/env.key",
            "POINTS_TLS_CLIENT_CA_FILE": "/clients.pem",
            "POINTS_INSECURE": "yes",
        },
    )
    assert (settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file) == (
        "/env.crt",
        "/flag.key",
        "/clients.pem",
    )
    assert settings.insecure is True
    assert config.load({}, environ={"POINTS_INSECURE": "0"}).insecure is False
    with pytest.raises(ValueError, match="POINTS_INSECURE='maybe' is not a boolean"):
        config.load({}, environ={"POINTS_INSECURE": "maybe"})


@pytest.mark.parametrize(
    "values,message",
    [
        ({"tls_cert_file": "c"}, "tls_cert_file and tls_key_file go together"),
        ({"tls_key_file": "k"}, "tls_cert_file and tls_key_file go together"),
        ({"tls_client_ca_file": "ca"}, "tls_client_ca_file (mutual TLS) needs tls_cert_file"),
        ({"health_listen": "nowhere"}, "health_listen 'nowhere' must be HOST:PORT"),
        ({"database_url": "postgresql://u:pa#ss@h/db"}, "database_url has a host:port that is not a number"),
    ],
)
def test_inconsistent_transport_settings_are_refused(values, message):
    with pytest.raises(ValueError) as raised:
        config.Settings(**values)
    assert message in str(raised.value)
    assert "pa#ss" not in str(raised.value)


def test_insecure_flag_is_a_switch():
    import argparse

    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    assert parser.parse_args(["--insecure"]).insecure is True
    assert parser.parse_args([]).insecure is None  # the environment may still turn it on


@pytest.mark.parametrize(
    "url,shown",
    [
        ("postgresql://points:s3cret@db:5432/points", "postgresql://points:***@db:5432/points"),
        (
            "postgresql://points:s3cret@db/points?sslmode=verify-full&password=other&sslrootcert=/ca.pem",
            "postgresql://points:***@db/points?sslmode=verify-full&password=***&sslrootcert=/ca.pem",
        ),
        (
            "postgresql://db/points?user=points&PassWord=x1&sslpassword=x2",
            "postgresql://db/points?user=points&PassWord=***&sslpassword=***",
        ),
        ("postgresql://points:p%40ss@h1:5432,h2:5432/points", "postgresql://points:***@h1:5432,h2:5432/points"),
        ("postgresql://postgres:@/points?host=/tmp/pg", "postgresql://postgres:@/points?host=/tmp/pg"),
        ("postgresql://points@db/points", "postgresql://points@db/points"),
    ],
)
def test_redact_hides_passwords_in_the_userinfo_and_the_query_string(url, shown):
    assert redact(url) == shown


def test_url_secrets_are_the_passwords_as_written_and_decoded():
    assert url_secrets("postgresql://u:p%40ss@h/db?password=a+b&sslpassword=k%2Fey") == {
        "p%40ss",
        "p@ss",
        "a+b",
        "a b",
        "k%2Fey",
        "k/ey",
    }
    assert url_secrets("postgresql://u@h/db?sslmode=require") == set()


@pytest.fixture
def secrets_registry(monkeypatch):
    monkeypatch.setattr(logs, "_secrets", ())


def test_hidden_secrets_are_scrubbed_from_log_lines_exceptions_and_streams(secrets_registry, monkeypatch):
    logs.hide("hunter2-password", 'quo"ted', "ab")  # "ab" is too short to scrub
    formatter = logs.JsonFormatter()
    try:
        raise ConnectionError("cannot connect to postgresql://u:hunter2-password@db/points")
    except ConnectionError:
        record = logging.LogRecord(
            "t", logging.ERROR, __file__, 1, "failed with %s", ("hunter2-password",), sys.exc_info()
        )
    record.url = 'postgresql://u:quo"ted@db'
    line = formatter.format(record)
    entry = json.loads(line)
    # the secret as written and as JSON escapes it (not the bare "quo": the line carries this file's path,
    # which may contain it, e.g. a checkout named after a quota)
    assert "hunter2" not in line and 'quo"ted' not in line and 'quo\\"ted' not in line
    assert entry["msg"] == "failed with ***" and "u:***@db" in entry["exc"] and entry["url"] == "postgresql://u:***@db"
    assert logs.scrub("ab cd") == "ab cd"

    sink = io.StringIO()
    stream = logs.ScrubbingStream(sink)
    print("error: hunter2-password refused", file=stream)
    assert sink.getvalue() == "error: *** refused\n"

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    try:
        raise ValueError("bad DSN postgresql://u:hunter2-password@db")
    except ValueError:
        logs._excepthook(*sys.exc_info())
    assert "bad DSN postgresql://u:***@db" in sys.stderr.getvalue()


def test_server_certificates_hand_grpc_a_reload_once_and_keep_the_old_ones_when_it_fails(tmp_path):
    import datetime as dt

    import trustme

    from processor import metrics
    from processor.transport import ServerCertificates

    def write(ca, name, days):
        issued = ca.issue_cert("localhost", not_after=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days))
        cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        key.write_bytes(issued.private_key_pem.bytes())
        return cert, key

    cert, key = write(trustme.CA(), "server", 100)
    certificates = ServerCertificates(str(cert), str(key))
    first = certificates.fingerprint
    assert len(first) == 64 and certificates._fetch() is None  # nothing new: gRPC keeps what it has
    assert metrics.tls_certificate_expiry._value.get() == certificates.expires_at.timestamp()

    other_cert, _ = write(trustme.CA(), "other", 200)
    cert.write_bytes(other_cert.read_bytes())  # a certificate whose key is not the key file's
    assert certificates.reload() is False
    assert certificates._fetch() is None and certificates.fingerprint == first

    new_cert, new_key = write(trustme.CA(), "new", 300)
    cert.write_bytes(new_cert.read_bytes())
    key.write_bytes(new_key.read_bytes())
    assert certificates.reload() is True
    assert certificates.fingerprint != first
    assert certificates._fetch() is not None  # the next handshake gets the new certificate ...
    assert certificates._fetch() is None  # ... once
    assert metrics.tls_certificate_expiry._value.get() == certificates.expires_at.timestamp()

    expired_cert, expired_key = write(trustme.CA(), "expired", -1)
    cert.write_bytes(expired_cert.read_bytes())
    key.write_bytes(expired_key.read_bytes())
    assert certificates.reload() is False
    with pytest.raises(TransportSecurityError, match="expired at"):
        ServerCertificates(str(cert), str(key))
