"""A development PKI: a CA, the bureau's server certificate and the hospital's client certificate; and the
gateway secrets of the region profiles (app secret, access and secret keys, OAuth2 client, SM2 key pair).

For tests and `scripts/run` only; a real deployment gets its certificates and secrets from the bureau.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path

import gmalg
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BUREAU_NAME = "bureau.fep.test"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fep development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _issue(ca_key: ec.EllipticCurvePrivateKey, issuer: x509.Name, subject: x509.Name,
           key: ec.EllipticCurvePrivateKey, days: int, *, ca: bool = False,
           usage: x509.ObjectIdentifier | None = None, names: list[x509.GeneralName] | None = None,
           ) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
         .not_valid_after(now + timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def _pem(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def generate(directory: Path, days: int = 365, prefix: str = "") -> None:
    """Writes {prefix}ca.pem, bureau.pem/.key and hospital.pem/.key; `prefix` makes a second, foreign CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"fep development CA {prefix}".strip())
    ca = _issue(ca_key, ca_name, ca_name, ca_key, days * 2, ca=True)
    _pem(directory / f"{prefix}ca.pem", ca)
    for who, usage, names in (
        ("bureau", ExtendedKeyUsageOID.SERVER_AUTH,
         [x509.DNSName(BUREAU_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ("hospital", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("hospital.fep.test")]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(ca_key, ca_name, _name(f"{who}.fep.test"), key, days, usage=usage, names=names)
        _pem(directory / f"{prefix}{who}.pem", cert)
        _write_key(directory / f"{prefix}{who}.key", key)


def ensure(directory: Path) -> bool:
    """Generate the development PKI unless it is there; True if it was generated."""
    if (directory / "ca.pem").exists():
        return False
    generate(directory)
    return True


def gateway_secrets(directory: Path) -> dict[str, Path]:
    """Every secret a region profile names, each in its own file, mode 0600 (fep reads them only so):
    secret_key, access_key, client_id (16 bytes: it is the SM4 key too), client_secret, password,
    sm2_private_key (hex) and its sm2_public_key (hex, for the bureau's side). Both sides read these files."""
    directory.mkdir(parents=True, exist_ok=True)
    sk, pk = gmalg.SM2().generate_keypair()
    sk = sk.rjust(32, b"\0")  # gmalg gives the shortest form: 1 key in 256 would be 31 bytes, which fep refuses
    values = {"secret_key": secrets.token_hex(16), "access_key": f"AK{secrets.token_hex(8)}",
              "client_id": secrets.token_hex(8), "client_secret": secrets.token_urlsafe(24),
              "password": secrets.token_urlsafe(12), "sm2_private_key": sk.hex(), "sm2_public_key": pk.hex()}
    out = {}
    for name, value in values.items():
        _write_private(directory / name, value.encode("ascii") + b"\n")
        out[name] = directory / name
    return out
