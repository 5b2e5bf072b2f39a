"""Transport security of the gRPC listener: TLS and mutual TLS from PEM files, reread on SIGHUP, and
the rule that plaintext gRPC is served on loopback only unless the operator says --insecure."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import ssl
import threading

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from processor import metrics
from processor.config import Settings

log = logging.getLogger("points.transport")


class TransportSecurityError(Exception):
    """The listener's security settings cannot be honoured; the message says what to change."""


def is_loopback(host: str) -> bool:
    """True for localhost and 127.0.0.0/8 / ::1 literals; any other name or address is not loopback (a
    name is not resolved: what it resolves to may change after the check)."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_secure_listen(settings: Settings) -> None:
    """Refuses plaintext gRPC on a non-loopback address unless settings.insecure. Called before anything
    binds, so a refused start leaves nothing listening."""
    host = settings.listen.rpartition(":")[0]
    if settings.tls_cert_file or settings.insecure or is_loopback(host):
        return
    raise TransportSecurityError(
        f"refusing plaintext gRPC on non-loopback address {settings.listen}: give --tls-cert-file and "
        "--tls-key-file (POINTS_TLS_CERT_FILE, POINTS_TLS_KEY_FILE), or --insecure (POINTS_INSECURE=1) "
        "to serve without TLS"
    )


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise TransportSecurityError(f"cannot read {what} {path}: {error.strerror or error}") from None


# a certificate expiring sooner than this is logged as a warning at every load
CERTIFICATE_EXPIRY_WARNING_SECONDS = 14 * 86_400


def _leaf(chain_pem: bytes, path: str) -> x509.Certificate:
    """The first (leaf) certificate of a PEM chain: the one the server presents."""
    try:
        return x509.load_pem_x509_certificate(chain_pem)
    except ValueError as error:
        raise TransportSecurityError(f"TLS certificate file {path} holds no PEM certificate ({error})") from None


class ServerCertificates:
    """The server's certificate, key and (for mutual TLS) client CA, read from their files at start and
    again on `reload()` (SIGHUP). gRPC asks `_fetch` before each new connection's handshake; it answers
    the newly read material once, then None (no change). A reload that fails (a missing file, a key that
    does not match the certificate) is logged and the previous material stays in use."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = ""):
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.fingerprint = ""
        self.expires_at: dt.datetime | None = None
        self._initial = self._load()

    def _load(self) -> grpc.ServerCertificateConfiguration:
        chain = _read(self.cert_file, "TLS certificate file")
        key = _read(self.key_file, "TLS key file")
        client_ca = _read(self.client_ca_file, "TLS client CA file") if self.client_ca_file else None
        # grpc only finds out at a handshake that a file is unusable; the ssl module checks now
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, ValueError) as error:
            raise TransportSecurityError(
                f"TLS certificate {self.cert_file} and key {self.key_file} are not a PEM certificate chain and "
                f"its private key ({error.reason if isinstance(error, ssl.SSLError) else error})"
            ) from None
        if client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca_file)
            except (ssl.SSLError, ValueError) as error:
                raise TransportSecurityError(
                    f"TLS client CA file {self.client_ca_file} holds no PEM CA certificate ({error})"
                ) from None
        leaf = _leaf(chain, self.cert_file)
        expires_at = leaf.not_valid_after_utc
        now = dt.datetime.now(dt.timezone.utc)
        if expires_at <= now:  # every client would refuse it: say so now rather than at each handshake
            raise TransportSecurityError(
                f"TLS certificate {self.cert_file} expired at {expires_at.isoformat()}; install a renewed one"
            )
        if (expires_at - now).total_seconds() < CERTIFICATE_EXPIRY_WARNING_SECONDS:
            log.warning(
                "TLS certificate expires soon; renew it and send SIGHUP",
                extra={"file": self.cert_file, "expires_at": expires_at.isoformat()},
            )
        self.fingerprint = leaf.fingerprint(hashes.SHA256()).hex()
        self.expires_at = expires_at
        metrics.tls_certificate_expiry.set(expires_at.timestamp())
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=client_ca)

    def reload(self) -> bool:
        """Rereads the files; new connections use them. Returns False (and keeps the old ones) on failure."""
        try:
            configuration = self._load()
        except TransportSecurityError as error:
            log.error("TLS certificates not reloaded; the previous ones stay in use", extra={"error": str(error)})
            return False
        with self._lock:
            self._pending = configuration
        log.info(
            "TLS certificates reloaded",
            extra={
                "certificate_sha256": self.fingerprint,
                "expires_at": self.expires_at.isoformat(),
                "mutual_tls": bool(self.client_ca_file),
            },
        )
        return True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            configuration, self._pending = self._pending, None
        return configuration

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=bool(self.client_ca_file)
        )


def server_certificates(settings: Settings) -> ServerCertificates | None:
    """The listener's certificates when TLS is configured, else None (plaintext)."""
    if not settings.tls_cert_file:
        return None
    return ServerCertificates(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)


def channel_credentials(ca_file: str = "", cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """Client credentials: trust ca_file (else the system's roots); present cert_file/key_file if given."""
    root = _read(ca_file, "TLS CA file") if ca_file else None
    chain = _read(cert_file, "TLS client certificate file") if cert_file else None
    key = _read(key_file, "TLS client key file") if key_file else None
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
