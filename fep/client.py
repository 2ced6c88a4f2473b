"""A small blocking client for scripts and people: post a trade to fep, look one up, confirm one.

    from fep.client import Client
    c = Client.unix("var/run/his.sock")          # or Client.tcp("127.0.0.1", 8097)
    answer = c.call("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": "..."}})
    answer["infcode"], answer["fep_msgid"], answer["fep_state"]
"""

from __future__ import annotations

import grp
import http.client
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fep import envelope


class Unreachable(ConnectionError):
    """fep could not be reached; the message names where and the likely cause."""


def unreachable(where: str, error: OSError, unix: bool) -> Unreachable:
    """What an operator should do about a failed connect to `where` (a socket path, or host:port)."""
    if isinstance(error, PermissionError):
        group = socket_group(Path(where))
        if group is None:
            return Unreachable(f"permission denied on {where}: only root and the socket's group may use it")
        return Unreachable(f"permission denied on {where}: only root and the group {group} may use it; join it "
                           f"(sudo usermod -aG {group} $USER, then log in again)")
    if isinstance(error, (FileNotFoundError, ConnectionRefusedError)):
        what = "there is no socket there" if isinstance(error, FileNotFoundError) else "nothing listens there"
        hint = "fep is not running, or this is not its socket" if unix else "fep is not running there"
        return Unreachable(f"cannot reach fep at {where}: {what}; {hint} (try `systemctl status fep`)")
    return Unreachable(f"cannot reach fep at {where}: {error.strerror or error}")


def socket_group(path: Path) -> str | None:
    """The group that may open a socket: the socket's own, or its directory's when that is what stops us."""
    for p in (path, path.parent):
        try:
            return grp.getgrgid(p.stat().st_gid).gr_name
        except (OSError, KeyError):
            continue
    return None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


@dataclass
class Client:
    unix_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 8097
    timeout: float = 70.0  # longer than fep's answer budget: fep always answers first

    @classmethod
    def unix(cls, path: str, timeout: float = 70.0) -> Client:
        return cls(unix_path=str(path), timeout=timeout)

    @classmethod
    def tcp(cls, host: str, port: int, timeout: float = 70.0) -> Client:
        return cls(host=host, port=port, timeout=timeout)

    @property
    def where(self) -> str:
        return self.unix_path or f"{self.host}:{self.port}"

    def _conn(self) -> http.client.HTTPConnection:
        conn = (_UnixConnection(self.unix_path, self.timeout) if self.unix_path else
                http.client.HTTPConnection(self.host, self.port, timeout=self.timeout))
        try:
            conn.connect()
        except OSError as e:
            raise unreachable(self.where, e, bool(self.unix_path)) from None
        return conn

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        conn = self._conn()
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            data = resp.read()
            if (resp.getheader("Content-Type") or "").startswith("application/octet-stream"):
                return resp.status, self.read_file_answer({k.lower(): v for k, v in resp.getheaders()}, data)
            return resp.status, envelope.loads(data)
        finally:
            conn.close()

    @staticmethod
    def read_file_answer(headers: dict[str, str], content: bytes) -> dict[str, Any]:
        """A download (9102) comes as the file itself, fep's fields as X-Fep-* headers; scripts get it as the
        envelope the journal keeps: output.file (filename, size, content_base64), fep_msgid, fep_state, ..."""
        headers = {k.lower(): v for k, v in headers.items()}
        answer = envelope.loads(envelope.file_answer(content, headers.get("content-disposition", "")))
        for key, value in headers.items():
            if key.startswith("x-fep-"):
                answer["fep_" + key[6:].replace("-", "_")] = value
        return answer

    def call(self, infno: str, input_: dict[str, Any], msgid: str | None = None, **fields: Any) -> dict[str, Any]:
        env: dict[str, Any] = {"infno": infno, "input": input_, "opter_type": "1", "opter": "his",
                               "opter_name": "HIS", **fields}
        if msgid:
            env["msgid"] = msgid
        return self.request("POST", "/fsi/api/rsfComIfsService/callService", envelope.dumps(env))[1]

    def lookup(self, msgid: str) -> dict[str, Any]:
        return self.request("GET", f"/fep/trades/{msgid}")[1]

    def confirm(self, msgid: str) -> dict[str, Any]:
        return self.request("POST", f"/fep/confirm/{msgid}")[1]
