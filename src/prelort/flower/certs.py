"""Test credentials for a TLS + authenticated Flower deployment, made with the ``cryptography`` package.

``make_certificates(out_dir, supernodes=N)`` writes

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (EC P-384);
* ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, whose subject
  alternative names cover ``localhost``, ``127.0.0.1`` and ``::1`` plus any ``hosts`` given;
* ``supernode_K`` / ``supernode_K.pub`` for K = 1..N: the SuperNodes' authentication key pairs,
  EC P-384 in OpenSSH format (what ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read).

These are for tests and trials: a production federation gets its server certificate from a real CA
and lets each SuperNode owner generate its own key pair (only the ``.pub`` half leaves the node).

Command line: ``prelort certs --out OUT_DIR --supernodes 2 [--host my.server.org ...]``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class Credentials:
    """Paths of the files :func:`make_certificates` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    supernode_keys: list[tuple[Path, Path]] = field(default_factory=list)  # (private, public)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "prelort test federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # keep order, drop repeats
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_certificates(
    out_dir: str | Path, supernodes: int = 2, hosts: Sequence[str] = (), days: int = 365
) -> Credentials:
    """Write a CA, a SuperLink certificate for ``localhost/127.0.0.1/::1`` + ``hosts``, and
    ``supernodes`` SuperNode key pairs into ``out_dir`` (created). Returns their paths."""
    if supernodes < 0:
        raise ValueError(f"supernodes must be >= 0, got {supernodes}")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("prelort test CA"))
        .issuer_name(_name("prelort test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("prelort SuperLink"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(_san([*DEFAULT_HOSTS, *hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    creds = Credentials(
        ca_cert=_write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM)),
        ca_key=_write(out / "ca.key", _pem_key(ca_key), private=True),
        server_cert=_write(out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM)),
        server_key=_write(out / "server.key", _pem_key(server_key), private=True),
    )
    for k in range(1, supernodes + 1):
        creds.supernode_keys.append(make_supernode_key(out / f"supernode_{k}"))
    return creds


def make_supernode_key(path: str | Path) -> tuple[Path, Path]:
    """One SuperNode authentication key pair: ``path`` (OpenSSH private key) and ``path.pub``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pub_path = path.with_name(path.name + ".pub")
    return _write(path, private, private=True), _write(pub_path, public + b"\n")
