"""Mutual-TLS contexts from PEM files, with refusals that say which file is wrong and why.

A context is built once per load; a reload builds a new one for new connections (pyOpenSSL >= 26.2
forbids changing a context that a connection already uses).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from fep.config import TLSFiles

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSConfigError(ValueError):
    pass


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise TLSConfigError(f"{what} {path} is not readable by this user (uid {os.getuid()})") from None
    except OSError as e:
        raise TLSConfigError(f"{what} {path} cannot be read: {e.strerror}") from None


def _read_key(path: Path) -> bytes:
    data = _read(path, "private key")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TLSConfigError(f"private key {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                             f"chmod 600 it")
    return data


def _private(cert: Path, key: Path) -> ssl.PrivateCertificate:
    cert_pem, key_pem = _read(cert, "certificate"), _read_key(key)
    try:
        return ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    except (SSL.Error, ValueError) as e:
        raise TLSConfigError(f"certificate {cert} and key {key} cannot be loaded together: {e}") from None


def _ca(path: Path) -> ssl.Certificate:
    try:
        return ssl.Certificate.loadPEM(_read(path, "CA certificate"))
    except (SSL.Error, ValueError) as e:
        raise TLSConfigError(f"CA certificate {path} is not a PEM certificate: {e}") from None


def client_options(files: TLSFiles, server_name: str) -> IOpenSSLClientConnectionCreator:
    """The hospital's side: our certificate and key, trust only the configured CA, verify the name."""
    extra: dict[str, object] = {"raiseMinimumTo": VERSIONS[files.min_version]}
    if files.ciphers:
        extra["acceptableCiphers"] = ssl.AcceptableCiphers.fromOpenSSLCipherString(files.ciphers)
    return ssl.optionsForClientTLS(server_name, trustRoot=_ca(files.ca),
                                   clientCertificate=_private(files.cert, files.key),
                                   extraCertificateOptions=extra)


def server_options(files: TLSFiles) -> ssl.CertificateOptions:
    """The bureau's side (the simulator): a client certificate from the configured CA is required."""
    own = _private(files.cert, files.key)
    return ssl.CertificateOptions(
        privateKey=own.privateKey.original, certificate=own.original,
        trustRoot=ssl.trustRootFromCertificates([_ca(files.ca)]),
        raiseMinimumTo=VERSIONS[files.min_version],
    )


def expiry(files: TLSFiles) -> dict[str, float]:
    """When the hospital certificate and the CA expire (Unix time), read once per (re)load."""
    out = {}
    for name, path in (("hospital", files.cert), ("ca", files.ca)):
        cert = x509.load_pem_x509_certificate(_read(path, "certificate"))
        out[name] = cert.not_valid_after_utc.timestamp()
    return out
