"""Test credentials: a CA-signed SuperLink certificate with the loopback SANs, SuperNode keys Flower can read."""

from __future__ import annotations

import ipaddress
import stat

import pytest

pytest.importorskip("cryptography")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key  # noqa: E402
from tests.cli_runner import prelort  # noqa: E402

from prelort.flower.certs import make_certificates  # noqa: E402


def test_server_certificate_is_signed_by_the_ca_and_names_loopback_and_extra_hosts(tmp_path):
    creds = make_certificates(tmp_path, supernodes=0, hosts=["superlink.example.org", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}
    ips = {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3")}
    assert set(san.get_values_for_type(x509.IPAddress)) == ips
    assert stat.S_IMODE(creds.server_key.stat().st_mode) == 0o600
    assert creds.supernode_keys == []


def test_supernode_keys_are_openssh_ec_pairs_that_match(tmp_path):
    creds = make_certificates(tmp_path, supernodes=2)
    assert [p.name for p, _ in creds.supernode_keys] == ["supernode_1", "supernode_2"]
    publics = set()
    for private_path, public_path in creds.supernode_keys:
        private = load_ssh_private_key(private_path.read_bytes(), None)
        public = load_ssh_public_key(public_path.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
        publics.add(public_path.read_bytes())
    assert len(publics) == 2


def test_prelort_certs_writes_the_files_and_never_overwrites_them(tmp_path):
    out = tmp_path / "certs"
    proc = prelort("certs", "--out", str(out), "--supernodes", "1", "--host", "superlink.example.org")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "ca.crt",
        "ca.key",
        "server.key",
        "server.pem",
        "supernode_1",
        "supernode_1.pub",
    ]
    assert f"SuperNode key pair:  {out / 'supernode_1'} {out / 'supernode_1.pub'}" in proc.stdout
    san = x509.load_pem_x509_certificate((out / "server.pem").read_bytes()).extensions
    names = san.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "superlink.example.org" in names
    ca = (out / "ca.crt").read_bytes()
    proc = prelort("certs", "--out", str(out))  # a second run would replace the CA the SuperNodes trust
    assert proc.returncode == 2 and "already holds ca.crt, ca.key, server.key, server.pem, supernode_1" in proc.stderr
    assert (out / "ca.crt").read_bytes() == ca
    proc = prelort("certs", "--out", str(out), "--supernodes", "0", "--force")
    assert proc.returncode == 0, proc.stderr
    assert (out / "ca.crt").read_bytes() != ca
    for bad, message in (
        (["--supernodes", "-1"], "--supernodes must be >= 0"),
        (["--days", "0"], "--days must be >= 1"),
    ):
        proc = prelort("certs", "--out", str(tmp_path / "other"), *bad)
        assert proc.returncode == 2 and proc.stderr == f"error: {message}, got {bad[1]}\n"
        assert not (tmp_path / "other").exists()
