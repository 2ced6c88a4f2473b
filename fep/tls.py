"""TLS contexts from PEM files, and the link's other secrets, with refusals that say which file is wrong and why.

A context is built once per load; a reload builds a new one for new connections (pyOpenSSL >= 26.2
forbids changing a context that a connection already uses). The gateway's secrets (app secrets, access
and secret keys, client secrets, SM2 keys) are files too, checked like the private key and reloaded with it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi, lib as _lib
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

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


def _read_private(path: Path, what: str) -> bytes:
    data = _read(path, what)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TLSConfigError(f"{what} {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                             f"chmod 600 it")
    return data


def _read_key(path: Path) -> bytes:
    return _read_private(path, "private key")


class Secret:
    """A secret's bytes, kept out of every repr, log line and admin answer."""

    __slots__ = ("name", "value")

    def __init__(self, name: str, value: bytes) -> None:
        self.name, self.value = name, value

    def __repr__(self) -> str:
        return f"<secret {self.name}>"


def load_secrets(files: tuple[tuple[str, Path], ...]) -> dict[str, Secret]:
    """Each named secret from its file (surrounding whitespace dropped), which only its owner may read."""
    out = {}
    for name, path in files:
        _reachable(name, path)
        value = _read_private(path, f"secret {name}").strip()
        if not value:
            raise TLSConfigError(f"secret {name} {path} is empty")
        out[name] = Secret(name, value)
    return out


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


def _buffered(bio: object) -> int:
    """Bytes waiting in one of a connection's memory BIOs (BIO_get_mem_data: pyOpenSSL has no public call)."""
    return int(_lib.BIO_get_mem_data(bio, _ffi.NULL))


_RECORD = 2**14  # a TLS record's most plaintext
_ROOM = 2**15  # a recv's buffer: more than a TLS record's 16 KB, so a record is always read whole


class _LinkTLS(TLSMemoryBIOProtocol):
    """Twisted's TLS memory BIO transport, asking OpenSSL only for what is there, and writing a message's
    records at once.

    Reading: Twisted calls recv until it
    raises WantReadError, then reads the outgoing BIO whether or not anything is in it (WantReadError again):
    two exceptions and five calls into OpenSSL, each a release of the interpreter lock, for every chunk
    received. Here the receive loop ends once the record read was read whole and no received byte is left
    in the incoming BIO (OpenSSL, without read-ahead, takes only whole records from it), and the outgoing
    BIO is read only when it holds something. A chunk that ends inside a record still ends in WantReadError,
    and close_notify, alerts and renegotiation take Twisted's own paths."""

    def _flushReceiveBIO(self) -> None:
        conn = self._tlsConnection
        while not self._lostTLSConnection:
            try:
                data = conn.recv(_ROOM)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._shutdownTLS()  # the peer's close_notify: answer it, then close (as Twisted does)
                self._tlsShutdownFinished(None)
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
                if len(data) < _ROOM and not _buffered(conn._into_ssl):
                    break
        if _buffered(conn._from_ssl):  # what reading made OpenSSL say: a close_notify's answer, a handshake's
            self._flushSendBIO()

    def _write(self, data: bytes) -> None:
        """A message's records go to the socket in one write. Twisted writes each 16 KB record on its own:
        for a big upload, hundreds of writes, each a system call (the connection writes at once,
        fep.transports) that Nagle holds back behind the one before."""
        if self._lostTLSConnection:
            return
        conn, view, sent = self._tlsConnection, memoryview(data), 0
        while sent < len(data):
            try:
                sent += conn.send(view[sent:sent + _RECORD])
            except SSL.WantReadError:  # (renegotiating) the rest waits for it, as in Twisted
                self._write_records()
                self._bufferedWrite(data[sent:])
                return
            except SSL.Error:
                self._write_records()  # what was made before the error goes, as in Twisted
                self._tlsShutdownFinished(Failure())
                return
        self._write_records()

    def _write_records(self) -> None:
        if pending := _buffered(self._tlsConnection._from_ssl):
            self.transport.write(self._tlsConnection.bio_read(pending))


def finished(transport: object) -> bool:
    """TLS is over on this transport: the peer's close_notify or an alert was read, though connectionLost may
    not have come yet. Twisted's TLS layer drops every write from then on (TLSMemoryBIOProtocol._write), so
    this is the test of a write that would never leave; asking OpenSSL (get_shutdown) would be a call
    into it, a release of the interpreter lock, each time the link looks at a connection (three a trade)."""
    return bool(getattr(transport, "_lostTLSConnection", False))


class WholeWrites(TLSMemoryBIOFactory):
    """TLS for a protocol that writes each message whole, in one write, as fep's HTTP does. Twisted's default
    TLS transport (BufferingTLSTransport, Twisted #11989) holds every write until the next reactor turn to
    gather small ones into one TLS record: a DelayedCall and two copies of the bytes per write, and a turn
    of delay, which a whole message gains nothing from."""

    protocol = _LinkTLS


def client_options(files: TLSFiles, server_name: str) -> IOpenSSLClientConnectionCreator:
    """The hospital's side: trust only the configured CA, verify the name; our certificate and key unless
    the link authenticates only the bureau (server_tls: no cert and key configured)."""
    extra: dict[str, object] = {"raiseMinimumTo": VERSIONS[files.min_version]}
    if files.ciphers:
        extra["acceptableCiphers"] = ssl.AcceptableCiphers.fromOpenSSLCipherString(files.ciphers)
    own = _private(files.cert, files.key) if files.cert and files.key else None
    return ssl.optionsForClientTLS(server_name, trustRoot=_ca(files.ca), clientCertificate=own,
                                   extraCertificateOptions=extra)


def server_options(files: TLSFiles, mutual: bool = True) -> ssl.CertificateOptions:
    """The bureau's side (the simulator): with `mutual`, a client certificate from the configured CA is required."""
    assert files.cert and files.key, "the bureau's side always has its certificate"
    own = _private(files.cert, files.key)
    trust = {"trustRoot": ssl.trustRootFromCertificates([_ca(files.ca)])} if mutual else {}
    return ssl.CertificateOptions(
        privateKey=own.privateKey.original, certificate=own.original,
        raiseMinimumTo=VERSIONS[files.min_version], **trust,
    )


def expiry(files: TLSFiles | None) -> dict[str, float]:
    """When the hospital certificate and the CA expire (Unix time), read once per (re)load; none over plain HTTP."""
    out: dict[str, float] = {}
    for name, path in (("hospital", files.cert if files else None), ("ca", files.ca if files else None)):
        if path is not None:
            cert = x509.load_pem_x509_certificate(_read(path, "certificate"))
            out[name] = cert.not_valid_after_utc.timestamp()
    return out


def _reachable(name: str, path: Path) -> None:
    """A secret's file that is not there is named by its key, not its path: the "path" may be the secret
    itself, pasted into fep.yaml (Base64 has '/' in it), and an error is printed and logged."""
    try:
        found = path.is_file()
    except OSError:
        found = False
    if not found:
        raise TLSConfigError(f"secret {name}: bureau.profile.secrets.{name} names a file that does not exist "
                             f"(or that this user cannot reach); "
                             f"it must be the path of the file that holds the secret, never the secret itself "
                             f"(the value is not shown, in case it is the secret)")
