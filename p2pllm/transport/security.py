"""Who may talk to this peer: the cluster secret, TLS between peers, and mutual authentication.

Every peer derives the same EC P-256 key pair from the cluster secret (scrypt, then a scalar),
and from it the same self-signed certificate (fixed subject, validity and serial; deterministic
ECDSA signature, RFC 6979). That one certificate is the server's certificate, the client's
certificate, and the only trusted root on both sides (mutual TLS, `require_client_auth`). So a
TLS handshake completes only between two holders of the secret; a peer with another secret or
none is refused by the other side's TLS stack before any RPC runs. See docs/security.md.

Nothing here ever puts the secret on the wire or in an mDNS record; only the certificate (its
public key) travels, inside the TLS handshake.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import re
import secrets as _secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ..errors import P2PError, UsageError

log = logging.getLogger(__name__)

CERT_NAME = "p2pllm-cluster"  # subject CN and SAN of the cluster certificate; the TLS target name
SECRET_ENV = "P2PLLM_SECRET"
MIN_SECRET_CHARS = 16  # shorter ones are accepted with a warning (they can be guessed offline)
# scrypt makes every guess of a user-chosen secret cost ~50 ms and 16 MiB (done once per start)
_KDF_SALT = b"p2pllm cluster key v1"
_KDF_N, _KDF_R, _KDF_P = 2**14, 8, 1
_NOT_BEFORE = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)
_REFUSAL_LOG_INTERVAL = 60.0  # seconds between two warnings about the same refused address


@dataclass(frozen=True)
class Credentials:
    """The PEM key and certificate every holder of one secret shares."""

    key_pem: bytes
    cert_pem: bytes


def derive_credentials(secret: str) -> Credentials:
    """The cluster's key and certificate: the same bytes on every peer holding `secret`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not secret:
        raise UsageError("the cluster secret is empty")
    seed = hashlib.scrypt(secret.encode(), salt=_KDF_SALT, n=_KDF_N, r=_KDF_R, p=_KDF_P, maxmem=64 * 2**20, dklen=48)
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 group order
    key = ec.derive_private_key(int.from_bytes(seed, "big") % (order - 1) + 1, ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CERT_NAME)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(CERT_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Credentials(key_pem, cert.public_bytes(serialization.Encoding.PEM))


@dataclass
class Security:
    """How this process talks to peers: mutual TLS from the cluster secret, or (insecure) plaintext."""

    credentials: Credentials | None
    _refusals: dict[str, float] = field(default_factory=dict, repr=False)

    @classmethod
    def from_secret(cls, secret: str) -> Security:
        if len(secret) < MIN_SECRET_CHARS:
            log.warning("the cluster secret is only %d characters: anyone who records a handshake can try to guess "
                        "it offline; prefer the generated one (`p2pllm join` without --secret)", len(secret))
        return cls(derive_credentials(secret))

    @classmethod
    def insecure(cls) -> Security:
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self.credentials is not None

    def describe(self) -> str:
        return "mutual TLS with the cluster secret" if self.enabled else "INSECURE (no secret, plaintext)"

    # -- gRPC plumbing ------------------------------------------------------------------------
    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Listen on `address` with this security; the bound port (0 when it failed)."""
        if self.credentials is None:
            return server.add_insecure_port(address)
        c = self.credentials
        creds = grpc.ssl_server_credentials([(c.key_pem, c.cert_pem)], root_certificates=c.cert_pem,
                                            require_client_auth=True)
        return server.add_secure_port(address, creds)

    def channel(self, address: str, options: list[tuple[str, object]]) -> grpc.aio.Channel:
        """A channel to a peer: it authenticates the peer and itself, or is plaintext when insecure."""
        if self.credentials is None:
            return grpc.aio.insecure_channel(address, options=options)
        c = self.credentials
        creds = grpc.ssl_channel_credentials(root_certificates=c.cert_pem, private_key=c.key_pem,
                                             certificate_chain=c.cert_pem)
        return grpc.aio.secure_channel(address, creds,
                                       options=[*options, ("grpc.ssl_target_name_override", CERT_NAME)])

    def note_failure(self, address: str, error: grpc.aio.AioRpcError) -> bool:
        """Log (at most once a minute per address) a peer that refused our handshake, or that we
        refused. True when `error` was such a refusal."""
        reason = refusal_reason(error, self.enabled)
        if reason is None:
            return False
        now = time.monotonic()
        if now - self._refusals.get(address, -1e9) >= _REFUSAL_LOG_INTERVAL:
            self._refusals[address] = now
            log.warning("refused peer at %s: %s; it is not a member", address, reason)
        return True


_HANDSHAKE_MARKERS = ("handshake", "ssl_error", "certificate_verify", "ssl routines", "wrong_version_number")


def refusal_reason(error: grpc.aio.AioRpcError, secure: bool) -> str | None:
    """Why a call failed at the TLS handshake (wrong or missing secret on one side), or None."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    details = (error.details() or "").lower()
    if secure and any(m in details for m in _HANDSHAKE_MARKERS):
        return "TLS handshake failed (it holds another cluster secret, or none)"
    if not secure and ("socket closed" in details or "connection reset" in details or "handshake" in details):
        return "it closed the connection (it probably requires a cluster secret; this peer runs --insecure)"
    return None


# ------------------------------------------------------------------------------ the secret on disk
def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "p2pllm"


def secret_path(cluster: str) -> Path:
    """Where the secret of `cluster` is kept (names that are not plain file names are hashed)."""
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", cluster) and not cluster.startswith("."):
        stem = cluster
    else:
        stem = "h-" + hashlib.sha256(cluster.encode()).hexdigest()[:24]
    return config_dir() / f"secret-{stem}"


def generate_secret() -> str:
    """192 random bits, never starting with "-" (1 in 64 would: `--secret -x...` reads as a flag)."""
    while (secret := _secrets.token_urlsafe(24)).startswith("-"):
        pass
    return secret


def load_secret(cluster: str) -> str | None:
    path = secret_path(cluster)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise P2PError(f"{path}: cannot read the cluster secret ({e.__class__.__name__})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users; run: chmod 600 %s", path, path)
    if not text:
        raise P2PError(f"{path} is empty; delete it to make a new secret, or pass --secret")
    return text


def store_secret(cluster: str, secret: str) -> Path:
    """Write a new secret file (mode 0600, its folder 0700); never overwrites one."""
    path = secret_path(cluster)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secret + "\n")
    except OSError as e:
        raise P2PError(f"cannot store the cluster secret in {path}: {e.strerror or e}") from None
    return path


@dataclass(frozen=True)
class Resolved:
    """The secret a command runs with and where it came from ("flag", "env", "file", "new", "insecure")."""

    secret: str | None
    source: str
    path: Path | None = None


def resolve_secret(cluster: str, secret: str | None, insecure: bool, *, create: bool) -> Resolved:
    """--secret, then $P2PLLM_SECRET, then the stored file of the cluster, then (join only) a new one."""
    env = os.environ.get(SECRET_ENV) or None
    if insecure:
        if secret:
            raise UsageError("--secret and --insecure contradict each other: pick one")
        return Resolved(None, "insecure")
    if secret:
        return Resolved(secret, "flag")
    if env:
        return Resolved(env, "env")
    stored = load_secret(cluster)
    if stored:
        return Resolved(stored, "file", secret_path(cluster))
    if not create:
        raise UsageError(f"no secret for cluster {cluster!r} (none in {secret_path(cluster)}): pass --secret S "
                         f"(the one `p2pllm join` printed) or set {SECRET_ENV}; --insecure for a cluster run without one")
    new = generate_secret()
    return Resolved(new, "new", store_secret(cluster, new))


def security_for(resolved: Resolved) -> Security:
    if resolved.secret is None:
        return Security.insecure()
    return Security.from_secret(resolved.secret)


def explain_refusal(address: str, error: grpc.aio.AioRpcError, secure: bool) -> str | None:
    """One line for a user whose command was refused at the handshake, or None."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    details = (error.details() or "").lower()
    if secure and "wrong_version_number" in details:
        # any server without TLS answers a TLS hello so (a plain HTTP server too): say both
        return (f"{address} does not speak TLS: a peer there runs without a secret (--insecure: pass --insecure "
                f"to talk to it), or it is not a p2pllm peer (a gateway's HTTP port? peers talk on their gRPC "
                f"--port, default 7700)")
    if "http1.x server" in details or "failed parsing http/2" in details:
        # without TLS, gRPC reached a server that does not speak HTTP/2 (most often the gateway's HTTP port given for
        # the gRPC one); it said "no p2pllm peer answers (unavailable)", as if nothing listened there
        return (f"{address} answers, but it is not a p2pllm peer's gRPC port (a gateway's HTTP port? peers talk on "
                f"their gRPC --port, default 7700)")
    if refusal_reason(error, secure) is None:
        return None
    if secure:
        return (f"the peer at {address} refused the TLS handshake: wrong cluster secret (pass the one `p2pllm join` "
                f"printed, with --secret or {SECRET_ENV})")
    return f"the peer at {address} requires the cluster secret: pass --secret S or set {SECRET_ENV}"
