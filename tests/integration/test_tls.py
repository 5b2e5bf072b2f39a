"""Transport security: gRPC over TLS and mutual TLS, certificates reread on SIGHUP, plaintext refused off
loopback, a plaintext health-only listener for probes, Postgres with sslmode=verify-full, and database
passwords kept out of every line the service writes."""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import asyncpg
import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from points.v1 import points_pb2 as pb
from points.v1 import points_pb2_grpc
from tests.harness import ROOT, Credentials, ServiceProcess, add_merchant, run as _run

pytestmark = pytest.mark.timeout(180)

CONNECT_TIMEOUT_SECONDS = 10


def write_identity(
    directory: pathlib.Path, ca: trustme.CA, name: str, *hosts: str, not_after: dt.datetime | None = None
) -> tuple[str, str]:
    """A certificate for hosts issued by ca, as cert (chain) and key PEM files; returns their paths."""
    issued = ca.issue_cert(*(hosts or ("localhost", "127.0.0.1")), not_after=not_after)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


def write_ca(directory: pathlib.Path, ca: trustme.CA, name: str) -> str:
    path = directory / f"{name}.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def tls_channel(target: str, ca: trustme.CA, client: tuple[str, str] | None = None) -> grpc.Channel:
    key = chain = None
    if client is not None:
        chain, key = pathlib.Path(client[0]).read_bytes(), pathlib.Path(client[1]).read_bytes()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem.bytes(), private_key=key, certificate_chain=chain
    )
    return grpc.secure_channel(target, credentials)


def health_status(channel: grpc.Channel) -> int:
    """The service's health over the channel; raises grpc.RpcError when the connection is refused."""
    return (
        health_pb2_grpc.HealthStub(channel)
        .Check(health_pb2.HealthCheckRequest(), timeout=CONNECT_TIMEOUT_SECONDS)
        .status
    )


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    with channel:
        with pytest.raises(grpc.RpcError) as raised:
            health_status(channel)
    return raised.value.code()


def test_tls_server_serves_a_client_trusting_its_ca_and_refuses_plaintext_and_other_cas(
    create_database, service_factory, tmp_path
):
    url = create_database()
    add_merchant(url, "shop", 1000)
    ca = trustme.CA()
    cert, key = write_identity(tmp_path, ca, "server")
    service = service_factory(url, "--tls-cert-file", cert, "--tls-key-file", key)

    with tls_channel(service.target, ca) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = points_pb2_grpc.PointsServiceStub(grpc.intercept_channel(channel, Credentials(url)))
        earned = stub.Earn(
            pb.EarnRequest(merchant_id="shop", member_id="m", purchase_amount=10_000, idempotency_key="tls-earn-1"),
            timeout=30,
        )
        assert earned.points == 1000 and earned.balance == 1000
    # a plaintext client gets no service at all: the TLS handshake never happens
    assert refused(grpc.insecure_channel(service.target)) == grpc.StatusCode.UNAVAILABLE
    # nor does a client that does not trust the server's CA
    assert refused(tls_channel(service.target, trustme.CA())) == grpc.StatusCode.UNAVAILABLE
    with tls_channel(service.target, ca) as channel:  # and the server is still serving afterwards
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    assert any('"transport": "TLS"' in line for line in service.log_lines)
    # the certificate's expiry, for the alert that asks for its renewal
    assert certificate_expiry(service) > time.time() + 30 * 86_400
    # refused handshakes leave no non-JSON lines from gRPC's C core in the log
    assert all(line.startswith("{") for line in service.log_lines if line.strip()), service.log_lines


def test_mutual_tls_from_environment_variables_requires_a_client_certificate_of_the_client_ca(
    create_database, service_factory, tmp_path
):
    url = create_database()
    server_ca, client_ca, other_ca = trustme.CA(), trustme.CA(), trustme.CA()
    cert, key = write_identity(tmp_path, server_ca, "server")
    clients = write_ca(tmp_path, client_ca, "clients")
    service = service_factory(
        url, env={"POINTS_TLS_CERT_FILE": cert, "POINTS_TLS_KEY_FILE": key, "POINTS_TLS_CLIENT_CA_FILE": clients}
    )
    good = write_identity(tmp_path, client_ca, "gateway", "gateway.example")
    foreign = write_identity(tmp_path, other_ca, "intruder", "gateway.example")

    assert refused(tls_channel(service.target, server_ca)) == grpc.StatusCode.UNAVAILABLE  # no certificate
    assert refused(tls_channel(service.target, server_ca, foreign)) == grpc.StatusCode.UNAVAILABLE
    assert refused(grpc.insecure_channel(service.target)) == grpc.StatusCode.UNAVAILABLE
    with tls_channel(service.target, server_ca, good) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    assert any('"transport": "mutual TLS"' in line for line in service.log_lines)

    # the client CA file is reread on SIGHUP too: clients of the old CA are refused from then on
    new_client_ca = trustme.CA()
    shutil.copyfile(write_ca(tmp_path, new_client_ca, "new-clients"), clients)
    service.process.send_signal(signal.SIGHUP)
    _wait_for_log(service, '"msg": "TLS certificates reloaded"', 1)
    renewed = write_identity(tmp_path, new_client_ca, "gateway-renewed", "gateway.example")
    with tls_channel(service.target, server_ca, renewed) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    assert refused(tls_channel(service.target, server_ca, good)) == grpc.StatusCode.UNAVAILABLE


def _wait_for_log(service: ServiceProcess, text: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sum(text in line for line in service.log_lines) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count}x {text!r} in the log:\n" + "".join(service.log_lines[-20:]))


def test_sighup_rereads_the_certificate_files_for_new_connections(create_database, service_factory, tmp_path):
    url = create_database()
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = write_identity(tmp_path, old_ca, "server")
    service = service_factory(url, "--tls-cert-file", cert, "--tls-key-file", key)
    held = tls_channel(service.target, old_ca)  # a connection opened before the rotation
    assert health_status(held) == health_pb2.HealthCheckResponse.SERVING

    # files that cannot be used: the reload fails, says so, and the old certificate stays in use
    pathlib.Path(key).write_text("not a key\n")
    service.process.send_signal(signal.SIGHUP)
    _wait_for_log(service, "TLS certificates not reloaded", 1)
    assert service.process.poll() is None
    with tls_channel(service.target, old_ca) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING

    # the rotated certificate, from another CA: new connections see it after SIGHUP
    expires = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(days=400)
    new_cert, new_key = write_identity(tmp_path, new_ca, "rotated", "localhost", "127.0.0.1", not_after=expires)
    shutil.copyfile(new_cert, cert)
    shutil.copyfile(new_key, key)
    service.process.send_signal(signal.SIGHUP)
    _wait_for_log(service, '"msg": "TLS certificates reloaded"', 1)
    with tls_channel(service.target, new_ca) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    assert refused(tls_channel(service.target, old_ca)) == grpc.StatusCode.UNAVAILABLE
    with held:  # an open connection keeps its session
        assert health_status(held) == health_pb2.HealthCheckResponse.SERVING
    assert certificate_expiry(service) == expires.timestamp()


def certificate_expiry(service: ServiceProcess) -> float:
    """points_tls_certificate_expiry_timestamp_seconds, scraped from the service's /metrics."""
    with urllib.request.urlopen(f"http://{service.metrics_target}/metrics", timeout=10) as response:
        exported = response.read().decode()
    (line,) = [
        line for line in exported.splitlines() if line.startswith("points_tls_certificate_expiry_timestamp_seconds ")
    ]
    return float(line.split()[1])


def _serve(*arguments: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    environment.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "processor", "serve", *arguments],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_plaintext_on_a_non_loopback_address_is_refused_in_one_line_before_anything_listens(how):
    # Postgres is unreachable on purpose: a start that got past the check would fail there instead,
    # with another message; the metrics port is fixed so we can see it was never bound either
    metrics_port = _free_port()
    arguments = [
        "--database-url",
        "postgresql://points@127.0.0.1:1/points",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
    ]
    if how == "flag":
        result = _serve("--listen", "0.0.0.0:0", *arguments)
    else:
        result = _serve(*arguments, env={"POINTS_LISTEN": "0.0.0.0:0"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: refusing plaintext gRPC on non-loopback address 0.0.0.0:0")
    assert "--tls-cert-file" in lines[0] and "--insecure" in lines[0]
    assert "SERVING" not in result.stdout
    with socket.socket() as probe:  # the metrics endpoint was never started
        probe.bind(("127.0.0.1", metrics_port))


def test_unreadable_or_expired_certificate_files_stop_the_start_naming_the_file(tmp_path):
    result = _serve(
        "--database-url",
        "postgresql://points@127.0.0.1:1/points",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--tls-cert-file",
        str(tmp_path / "missing.crt"),
        "--tls-key-file",
        str(tmp_path / "missing.key"),
    )
    assert result.returncode != 0
    assert f"cannot read TLS certificate file {tmp_path / 'missing.crt'}" in result.stderr
    expired_cert, expired_key = write_identity(
        tmp_path, trustme.CA(), "expired", not_after=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    )
    result = _serve(
        "--database-url",
        "postgresql://points@127.0.0.1:1/points",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--tls-cert-file",
        expired_cert,
        "--tls-key-file",
        expired_key,
    )
    assert result.returncode != 0
    assert f"error: TLS certificate {expired_cert} expired at" in result.stderr
    result = _serve("--tls-cert-file", "x.crt")
    assert result.returncode != 0
    assert "tls_cert_file and tls_key_file go together" in result.stderr


def test_health_listener_answers_probes_in_plaintext_and_serves_nothing_else(
    create_database, service_factory, tmp_path
):
    url = create_database()
    ca = trustme.CA()
    cert, key = write_identity(tmp_path, ca, "server")
    service = service_factory(url, "--tls-cert-file", cert, "--tls-key-file", key, "--health-listen", "127.0.0.1:0")
    entries = [json.loads(line) for line in service.log_lines if line.startswith("{")]
    (listening,) = [e for e in entries if e["msg"] == "health listening"]
    with grpc.insecure_channel(listening["address"]) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as raised:
            points_pb2_grpc.PointsServiceStub(channel).GetBalance(
                pb.GetBalanceRequest(member_id="m"), timeout=CONNECT_TIMEOUT_SECONDS
            )
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---------------------------------------------------------------------------------------------------
# Postgres over TLS


class TlsPostgres:
    """A Postgres (pgserver's binaries) listening on 127.0.0.1 with TLS required on TCP and a password."""

    PASSWORD = "pg-pass-" + uuid.uuid4().hex[:12]

    def __init__(self, directory: pathlib.Path, bin_directory: pathlib.Path):
        self.bin = bin_directory
        self.directory = directory
        self.data = directory / "data"
        self.ca = trustme.CA()
        self.ca_file = write_ca(directory, self.ca, "postgres-ca")
        self.user = None
        if os.geteuid() == 0:  # postgres refuses to run as root: pgserver's system user runs it
            from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

            self.user = "pgserver"
            ensure_user_exists(self.user)
            ensure_prefix_permissions(directory)
            directory.chmod(0o755)
        self.port = _free_port()

    def _run(self, *arguments: str) -> None:
        subprocess.run(
            [str(self.bin / arguments[0]), *arguments[1:]],
            check=True,
            user=self.user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

    def start(self) -> "TlsPostgres":
        self.data.mkdir()
        if self.user:
            shutil.chown(self.data, self.user, self.user)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=utf8",
        )
        cert, key = write_identity(self.data, self.ca, "server", "localhost", "127.0.0.1")
        os.chmod(key, 0o600)
        if self.user:
            for path in (cert, key):
                shutil.chown(path, self.user, self.user)
        # TCP only with TLS (hostssl); the local socket (trust) is for the test's own set-up
        (self.data / "pg_hba.conf").write_text("local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data} -c ssl=on -c ssl_cert_file={cert} -c ssl_key_file={key}"
        self._run("pg_ctl", "-D", str(self.data), "-w", "-o", options, "-l", str(self.data / "log"), "start")
        _run(self._setup())
        return self

    async def _setup(self) -> None:
        connection = await asyncpg.connect(host=str(self.data), port=self.port, user="postgres", database="postgres")
        try:
            await connection.execute(f"ALTER USER postgres PASSWORD '{self.PASSWORD}'")
            await connection.execute('CREATE DATABASE "points"')
        finally:
            await connection.close()

    def url(self, ca_file: str | None = None, password: str | None = None, query: str = "") -> str:
        return (
            f"postgresql://postgres:{password or self.PASSWORD}@127.0.0.1:{self.port}/points"
            f"?sslmode=verify-full&sslrootcert={ca_file or self.ca_file}{query}"
        )

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass


def postgres_with_ssl() -> pathlib.Path | None:
    """The bin directory of a Postgres built with OpenSSL: Debian's (package postgresql, on the machines
    this project runs on); pgserver's embedded build has no SSL."""
    for candidate in sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "postgres").exists() and (candidate / "initdb").exists():
            return candidate
    return None


@pytest.fixture(scope="module")
def tls_postgres(tmp_path_factory):
    bin_directory = postgres_with_ssl()
    if bin_directory is None:
        pytest.skip(
            "no Postgres built with SSL (Debian package postgresql: apt-get install postgresql); "
            "the embedded pgserver build has none"
        )
    server = TlsPostgres(tmp_path_factory.mktemp("pgtls"), bin_directory)
    try:
        yield server.start()
    finally:
        server.stop()


def test_postgres_with_sslmode_verify_full_serves_and_a_wrong_ca_stops_the_start(
    tls_postgres, service_factory, tmp_path
):
    service = service_factory(tls_postgres.url())
    add_merchant(tls_postgres.url(), "tls-shop", 1000)
    with service.channel() as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        earned = points_pb2_grpc.PointsServiceStub(channel).Earn(
            pb.EarnRequest(
                merchant_id="tls-shop", member_id="m", purchase_amount=5_000, idempotency_key="verify-full-earn"
            ),
            timeout=30,
        )
        assert earned.points == 500
    rows = _run(_ssl_sessions(tls_postgres))
    assert rows and all(row["ssl"] for row in rows), "every TCP session of the service must use TLS"
    service.kill()

    wrong_ca = write_ca(tmp_path, trustme.CA(), "wrong-ca")
    result = _serve(
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--database-url",
        tls_postgres.url(ca_file=wrong_ca),
    )
    assert result.returncode != 0
    assert "SERVING" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "certificate" in last and "sslrootcert" in last, result.stderr


async def _ssl_sessions(server: TlsPostgres):
    connection = await asyncpg.connect(host=str(server.data), port=server.port, user="postgres", database="points")
    try:
        return await connection.fetch(
            """SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
               WHERE a.application_name LIKE 'points%' AND a.client_addr IS NOT NULL"""
        )
    finally:
        await connection.close()


def _serve_until_serving(directory: pathlib.Path, url: str, merchant: str) -> tuple[str, str]:
    """Runs `python -m processor --log-level DEBUG serve` until it is SERVING, earns once, stops it with
    SIGTERM; returns everything it wrote (stdout, stderr)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    environment.pop("DATABASE_URL", None)
    out, err = directory / "stdout", directory / "stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "processor",
                "--log-level",
                "DEBUG",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--database-url",
                url,
            ],
            cwd=ROOT,
            env=environment,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 60
        while "SERVING" not in out.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "SERVING" in out.read_text(), err.read_text()[-3000:]
        target = out.read_text().split("SERVING on ")[1].split()[0]
        with grpc.intercept_channel(grpc.insecure_channel(target), Credentials(url)) as channel:
            points_pb2_grpc.PointsServiceStub(channel).Earn(
                pb.EarnRequest(
                    merchant_id=merchant, member_id="m2", purchase_amount=5_000, idempotency_key=uuid.uuid4().hex
                ),
                timeout=30,
            )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    return out.read_text(), err.read_text()


def test_database_passwords_never_appear_in_any_line_the_service_writes(tls_postgres, tmp_path):
    query_secret = "query-pass-" + uuid.uuid4().hex[:12]
    url = tls_postgres.url(query=f"&password={query_secret}")
    merchant = "shop-" + uuid.uuid4().hex[:8]
    add_merchant(url, merchant, 1000)
    stdout, stderr = _serve_until_serving(tmp_path, url, merchant)
    assert f"database postgresql://postgres:***@127.0.0.1:{tls_postgres.port}/points?" in stdout
    assert "&password=***" in stdout and '"msg": "database ready"' in stderr and '"code": "OK"' in stderr
    assert tls_postgres.PASSWORD not in stdout + stderr and query_secret not in stdout + stderr

    # a start that fails: the messages quote the database, never its password
    wrong = "wrong-pass-" + uuid.uuid4().hex[:12]
    result = _serve(
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--database-url",
        tls_postgres.url(password=wrong, query=f"&password={query_secret}"),
    )
    assert result.returncode != 0
    assert "error: Postgres refused the login: password authentication failed" in result.stderr
    assert wrong not in result.stdout + result.stderr and query_secret not in result.stdout + result.stderr
    # a URL the driver cannot parse: its error message may quote the URL
    result = _serve(
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--database-url",
        f"postgresql://postgres:{wrong}@127.0.0.1:notaport/points",
    )
    assert result.returncode != 0
    assert wrong not in result.stdout + result.stderr, result.stderr
