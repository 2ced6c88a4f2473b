"""A small world for end-to-end tests, scripts/chaos and scripts/bench: a real bureau simulator and a
real fep daemon, as processes, over real mutual TLS on loopback, each with its state in one directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing, contextmanager
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

import yaml

from fep import envelope, pki
from fep.client import Client
from fep.config import SECRETS as FEP_SECRETS
from fep.sim.gateway import SECRETS as SIM_SECRETS
from fep.sim.gateway import gateway_layout

ROOT = Path(__file__).resolve().parents[2]  # the repository: conf/ holds the development defaults
ZHANG = {"psn_no": "43010000000000000001", "certno": "430102198001010011", "insutype": "310"}
LI = {"psn_no": "43010000000000000002", "certno": "430102199002020022", "insutype": "390"}
WANG = {"psn_no": "43010000000000000003", "certno": "430102197503030033", "insutype": "310"}
# 异地 patients (conf/sim.yaml): ZHAO insured in another province, who settles only under a filing (备案);
# QIAN in another city of this province
ZHAO = {"psn_no": "44030000000000000004", "certno": "440301198504040044", "insutype": "310",
        "insuplc_admdvs": "440300"}
QIAN = {"psn_no": "43040000000000000005", "certno": "430405196605050055", "insutype": "390",
        "insuplc_admdvs": "430400"}

# Region profiles as the test world runs them (use_profile): each style's URL and settings, and which of
# the generated secrets each side reads. The URLs are the regions' own (reference §2).
REGION_PATHS = {"guangdong": "/ebus/gdyb_inf/poc/hsa/hgs", "jilin": "/mbs/fmi/fsi/api/callFsiService/callService"}
REGION_SETTINGS: dict[str, dict[str, str]] = {"guangdong": {"paasid": "fep_test_paasid"},
                                              "hunan": {"api_version": "1.0.0"}, "jiangsu": {"api_version": "1.0.0"},
                                              "jilin": {"username": "fep_test"}}


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n different free ports: each socket is held until all are chosen, so the kernel cannot hand one out twice."""
    held = [socket.socket() for _ in range(n)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def wait_for(predicate: Any, timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class World:
    def __init__(self, tmp: Path, pki: Path) -> None:
        self.dir = tmp
        self.pki = pki
        self.sim_port, self.control_port, self.his_port, self.metrics_port = free_ports(4)
        self.fep_config = tmp / "conf" / "fep.yaml"
        self.sim_config = tmp / "conf" / "sim.yaml"
        self.sim: subprocess.Popen[bytes] | None = None
        self.fep: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self.journal_url: str | None = None  # share_journal: the journal on PostgreSQL, shared with a peer node
        self.peer: Peer | None = None
        self.region: tuple[dict[str, Any], dict[str, Any]] = ({}, {})  # (fep, sim) changes of use_profile
        self.configure()

    # ---- configuration ------------------------------------------------------------------------------
    def configure(self, fep: dict[str, Any] | None = None, trades: dict[str, dict[str, Any]] | None = None,
                  sim: dict[str, Any] | None = None) -> None:
        """Write both configs from the development defaults, with the test's changes on top."""
        (self.dir / "conf").mkdir(exist_ok=True)
        doc = yaml.safe_load((ROOT / "conf" / "fep.yaml").read_text())
        doc["his"].update(tcp_port=self.his_port, unix=str(self.dir / "run" / "his.sock"))
        doc["admin"] = {"unix": str(self.dir / "run" / "admin.sock"), "metrics_port": self.metrics_port}
        doc["bureau"]["endpoints"][0]["url"] = f"https://127.0.0.1:{self.sim_port}/fsi/api/rsfComIfsService/callService"
        doc["bureau"]["tls"] = {"ca": str(self.pki / "ca.pem"), "cert": str(self.pki / "hospital.pem"),
                                "key": str(self.pki / "hospital.key")}
        doc["journal"]["path"] = str(self.dir / "lib" / "journal.db")
        doc["resolution"] = {"max_tries": 6, "backoff": [0, 0.2, 0.5, 1]}
        # A 2601's "no record" is believed this long after the original was lost (the late grace): short here.
        doc["bureau"]["late_grace"] = 5
        doc["trades"] = str(ROOT / "conf" / "trades.yaml")
        # Most stories begin at registration, without the 1101 an HIS makes first: their trades go as the HIS
        # sent them. The stories of 异地 patients (tests/test_remote.py) ask for the production default, refuse.
        doc["remote"] = {"without_1101": "forward"}
        doc["trade_overrides"] = trades or {}
        _merge(doc, self.region[0])
        _merge(doc, fep or {})
        if self.peer is not None:
            doc["journal"].update(url=self.journal_url, node=f"a 127.0.0.1:{self.his_port}", lease_check=0.5,
                                  path=str(self.local_file("a")))
            self.peer.write_config(doc)
        self.fep_config.write_text(yaml.safe_dump(doc, allow_unicode=True))
        sdoc = yaml.safe_load((ROOT / "conf" / "sim.yaml").read_text())
        sdoc.update(listen_port=self.sim_port, control_port=self.control_port, ledger=str(self.dir / "sim" / "ledger.db"))
        sdoc["tls"] = {"ca": str(self.pki / "ca.pem"), "cert": str(self.pki / "bureau.pem"),
                       "key": str(self.pki / "bureau.key")}
        _merge(sdoc, self.region[1])
        _merge(sdoc, sim or {})
        self.sim_config.write_text(yaml.safe_dump(sdoc, allow_unicode=True))

    def use_profile(self, style: str, link_security: str = "mutual_tls", url_layout: str | None = None,
                    paths: dict[str, str] | None = None) -> dict[str, Path]:
        """Both sides on a region profile (README, "Region profiles") and link security, with test secrets
        generated in the world's directory, as the test PKI is. Kept through later configure() calls.
        Returns the secret files (tests spoil one to see the gateway refuse)."""
        files = pki.gateway_secrets(self.dir / "secrets")
        base = REGION_PATHS.get(style, "/fsi/api/rsfComIfsService/callService")
        scheme = "http" if link_security == "plain_http" else "https"
        fep_profile: dict[str, Any] = {"style": style, **REGION_SETTINGS.get(style, {}),
                                       "secrets": {n: str(files[n]) for n in FEP_SECRETS[style]}}
        sim_profile: dict[str, Any] = {"style": style, "path": base, **REGION_SETTINGS.get(style, {}),
                                       "secrets": {n: str(files[n]) for n in SIM_SECRETS[style]}}
        sim_profile.pop("api_version", None)
        fep_profile["url_layout"] = sim_profile["url_layout"] = url_layout or gateway_layout(style)
        if paths:
            sim_profile["paths"] = paths
        fep_doc: dict[str, Any] = {"bureau": {"profile": fep_profile, "link_security": link_security,
                                              "endpoints": [{"name": "sim", "server_name": pki.BUREAU_NAME,
                                                             "url": f"{scheme}://127.0.0.1:{self.sim_port}{base}"}]}}
        if link_security == "server_tls":
            fep_doc["bureau"]["tls"] = {"ca": str(self.pki / "ca.pem")}
        self.region = (fep_doc, {"profile": sim_profile, "link_security": link_security})
        self.configure()
        return files

    def share_journal(self, url: str) -> Peer:
        """Two nodes on one PostgreSQL journal (README, "Two boxes"): this world's fep is node a, the peer is
        node b with listeners and local files of its own; both reach the same simulated bureau."""
        self.journal_url = url
        self.peer = Peer(self.dir / "b")
        self.configure()
        return self.peer

    def to_gateway(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        """One raw request to the simulated bureau's gateway, as the link is secured (tests of refusals)."""
        import http.client
        import ssl

        doc = yaml.safe_load(self.sim_config.read_text())
        if doc.get("link_security", "mutual_tls") == "plain_http":
            conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", self.sim_port, timeout=10)
        else:
            ctx = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
            ctx.load_cert_chain(str(self.pki / "hospital.pem"), str(self.pki / "hospital.key"))
            ctx.check_hostname = False
            conn = http.client.HTTPSConnection("127.0.0.1", self.sim_port, context=ctx, timeout=10)
        try:
            conn.request("POST", path, body, headers)
            resp = conn.getresponse()
            return resp.status, envelope.loads(resp.read())
        finally:
            conn.close()

    def expire_tokens(self) -> None:
        """The gateway forgets every bearer token it issued (jilin), as after its restart."""
        _http("POST", self.control_port, "/tokens/expire", {})

    def gateway(self) -> dict[str, Any]:
        """The simulated gateway's style and how many requests it refused."""
        return _http("GET", self.control_port, "/gateway")

    # ---- processes ------------------------------------------------------------------------------------
    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{args[0]}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "fep.cli", *args], cwd=self.dir, stdout=log,
                                stderr=subprocess.STDOUT)

    def start_sim(self) -> None:
        self.sim = self._spawn("sim", "--config", str(self.sim_config))
        wait_for(lambda: _port_open(self.control_port), what="the simulator to listen")

    def start_fep(self, wait: bool = True) -> subprocess.Popen[bytes]:
        self.fep = self._spawn("run", "--config", str(self.fep_config))
        if wait:
            # both sides: a test may scrape /metrics first thing, and the metrics port opens after the HIS's
            wait_for(lambda: self.fep.poll() is not None or (_port_open(self.his_port) and
                                                              _port_open(self.metrics_port)), what="fep to listen")
            assert self.fep.poll() is None, f"fep exited: {self.log('run')}"
        return self.fep

    def start_peer(self) -> subprocess.Popen[bytes]:
        assert self.peer is not None, "share_journal first"
        log = open(self.dir / "run-b.log", "ab")
        self.peer.proc = subprocess.Popen([sys.executable, "-m", "fep.cli", "run", "--config", str(self.peer.config)],
                                          cwd=self.dir, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.peer.proc.poll() is not None or _port_open(self.peer.his_port), what="node b to listen")
        assert self.peer.proc.poll() is None, f"node b exited: {self.log('run-b')}"
        return self.peer.proc

    def kill_peer(self) -> None:
        assert self.peer is not None and self.peer.proc is not None
        self.peer.proc.send_signal(signal.SIGKILL)
        self.peer.proc.wait()
        self.kills += 1

    def admin_socket(self, node: str = "a") -> Path:
        return self.dir / "run" / "admin.sock" if node == "a" else self.peer.dir / "run" / "admin.sock"  # type: ignore[union-attr]

    def his_socket(self, node: str = "a") -> Path:
        return self.dir / "run" / "his.sock" if node == "a" else self.peer.dir / "run" / "his.sock"  # type: ignore[union-attr]

    def node_alive(self, node: str) -> bool:
        return self.fep_alive() if node == "a" else self.peer is not None and self.peer.alive()

    def start_node(self, node: str) -> None:
        self.start_fep() if node == "a" else self.start_peer()

    def kill_node(self, node: str) -> None:
        self.kill_fep() if node == "a" else self.kill_peer()

    def leading(self, among: tuple[str, ...] = ("a", "b")) -> str | None:
        """The node that leads now (takes trades), as each says over its admin socket; None: neither. `among`:
        only those asked (a hung node would hold the question up)."""
        for node in among:
            try:
                status, doc = Client.unix(str(self.admin_socket(node)), timeout=5).request("GET", "/status")
            except OSError:
                continue
            if status == 200 and doc.get("role") == "leader":
                return node
        return None

    def role(self, node: str = "a") -> dict[str, Any]:
        """`fep status` of node a or b, as JSON (its role and who leads among it)."""
        admin = self.admin_socket(node)
        done = subprocess.run([sys.executable, "-m", "fep.cli", "status", "--json", "--admin", str(admin)],
                              capture_output=True, text=True, timeout=60, cwd=self.dir)
        return json.loads(done.stdout) if done.returncode == 0 else {"role": None, "error": done.stderr}

    def wait_for_standby(self, node: str) -> None:
        """Until `node` says it stands by. When it does not, the error says what its status said last and how
        its log ends: a pair's rare slow start is otherwise only 'timed out'."""
        seen: dict[str, Any] = {}

        def stands_by() -> bool:
            nonlocal seen
            seen = self.role(node)
            return seen.get("role") == "standby"
        try:
            wait_for(stands_by, what=f"node {node} to stand by")
        except AssertionError as e:
            log = self.log("run" if node == "a" else "run-b")
            raise AssertionError(f"{e}; its status last said {seen}; its log ends:\n{log[-4000:]}") from None

    def start(self) -> World:
        self.start_sim()
        self.start_fep()
        return self

    def kill_fep(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut."""
        assert self.fep is not None
        self.fep.send_signal(signal.SIGKILL)
        self.fep.wait()
        self.kills += 1

    # ---- the simulator crashes too (scripts/chaos) ------------------------------------------------------
    sim_kills = 0

    @property
    def sim_ledger_path(self) -> Path:
        """The bureau's ledger file (settlements, answers): scripts/chaos reads it read-only."""
        return self.dir / "sim" / "ledger.db"

    @property
    def journal_path(self) -> Path:
        return self.dir / "lib" / "journal.db"

    def local_file(self, node: str = "a") -> Path:
        """Node a's or b's journal.path on a pair (share_journal): no journal, only what an earlier release
        left on the node (its code book, monthly archive files beside it) until fep takes it into PostgreSQL."""
        return (self.dir if node == "a" else self.dir / "b") / "lib" / "local.db"

    def kill_sim(self) -> None:
        """SIGKILL the bureau simulator: trades in flight die with it, its ledger keeps what it committed."""
        assert self.sim is not None
        self.sim.send_signal(signal.SIGKILL)
        self.sim.wait()
        self.sim_kills += 1

    def restart_sim(self) -> None:
        """Start the simulator again on the same ledger and ports. Its faults were in memory and are gone;
        its settlements, stored answers and sign-ins are in the ledger and stay."""
        if self.sim is not None and self.sim.poll() is None:
            return
        self.start_sim()

    def sim_alive(self) -> bool:
        return self.sim is not None and self.sim.poll() is None

    def fep_alive(self) -> bool:
        return self.fep is not None and self.fep.poll() is None

    def stop(self) -> None:
        for proc in (self.fep, self.peer and self.peer.proc, self.sim):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- the HIS side --------------------------------------------------------------------------------
    @property
    def his(self) -> Client:
        return Client.unix(str(self.dir / "run" / "his.sock"), timeout=60)

    @property
    def his_tcp(self) -> Client:
        return Client.tcp("127.0.0.1", self.his_port, timeout=60)

    def post_raw(self, body: bytes, path: str = "/fsi/api/rsfComIfsService/callService") -> tuple[int, dict[str, Any]]:
        return self.his_tcp.request("POST", path, body)

    # ---- the bureau side ---------------------------------------------------------------------------------
    def fault(self, **spec: Any) -> None:
        _http("POST", self.control_port, "/faults", spec)

    def expire_sessions(self) -> None:
        _http("POST", self.control_port, "/sessions/expire", {})

    def latency(self, ms: float | None = None) -> dict[str, float]:
        """The simulated bureau's latency: set it (ms, when given); {"ms": ..., "waiting": requests in it now}."""
        return _http("POST", self.control_port, "/latency", {"ms": ms}) if ms is not None else \
            _http("GET", self.control_port, "/latency")

    def bypass(self, infno: str, msgid: str, input_: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """Post a trade straight to the bureau with the hospital's certificate, behind fep's back (as an
        operator working in the bureau's own system does); `fields`: more of the envelope (insuplc_admdvs)."""
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
        ctx.load_cert_chain(str(self.pki / "hospital.pem"), str(self.pki / "hospital.key"))
        body = envelope.dumps({"infno": infno, "msgid": msgid, "input": input_, **fields})
        with socket.create_connection(("127.0.0.1", self.sim_port)) as raw:
            with ctx.wrap_socket(raw, server_hostname="bureau.fep.test") as s:
                s.sendall(b"POST / HTTP/1.1\r\nHost: bureau\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                          % len(body) + body)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        return envelope.loads(data.split(b"\r\n\r\n", 1)[1])

    def adjust(self, setl_id: str, medfee: str) -> None:
        _http("POST", self.control_port, "/ledger/adjust", {"setl_id": setl_id, "medfee": medfee})

    def forget(self, setl_id: str) -> None:
        _http("POST", self.control_port, "/ledger/forget", {"setl_id": setl_id})

    def refuse(self, setl_id: str, amount: str, reason: str) -> None:
        """The bureau's audit refuses (拒付) `amount` of a settlement, saying why (the status trade reports it)."""
        _http("POST", self.control_port, "/clearing/refuse", {"setl_id": setl_id, "amount": amount, "reason": reason})

    def backdate_settlements(self, to: date) -> None:
        """Move today's settlements to the day `to`, at the bureau and in fep's journal alike (the bureau's
        setl_time, in its ledger and in the answer fep stored, and when fep journalled it): a month's
        settlements told on a day after the month, for month-end clearing. Both are stopped for it and
        started again, as after a night's maintenance."""
        from fep.journal import body_text, stored_body

        today, days = date.today().isoformat(), (date.today() - to).days

        def earlier(text: str) -> str:
            return (datetime.strptime(text[:19], "%Y-%m-%d %H:%M:%S") - timedelta(days=days)).strftime(
                "%Y-%m-%d %H:%M:%S")

        self.stop()
        with closing(sqlite3.connect(self.sim_ledger_path)) as c, c:
            for setl_id, at in c.execute("SELECT setl_id, setl_time FROM settlements WHERE substr(setl_time, 1, 10) "
                                         "= ?", (today,)).fetchall():
                c.execute("UPDATE settlements SET setl_time=? WHERE setl_id=?", (earlier(at), setl_id))
        with closing(sqlite3.connect(self.journal_path)) as c, c:
            for id_, answer, created in c.execute("SELECT id, answer, created FROM trades WHERE setl_id IS NOT NULL "
                                                  "AND answer IS NOT NULL").fetchall():
                doc = envelope.loads(body_text(answer))
                info = (doc.get("output") or {}).get("setlinfo") or {}
                if str(info.get("setl_time", ""))[:10] == today:
                    info["setl_time"] = earlier(str(info["setl_time"]))
                    c.execute("UPDATE trades SET answer=?, created=? WHERE id=?",
                              (stored_body(envelope.dumps(doc).decode("utf-8")), created - days * 86400, id_))
        self.start()

    def clear_faults(self) -> None:
        _http("DELETE", self.control_port, "/faults")

    def ledger(self) -> list[dict[str, Any]]:
        return _http("GET", self.control_port, "/ledger")

    def bureau_request(self, msgid: str) -> dict[str, Any]:
        """The envelope of `msgid` as the bureau read it (one of the last 200 it received)."""
        return _http("GET", self.control_port, f"/requests/{msgid}")

    def bureau_path(self, msgid: str) -> str:
        """The path `msgid` came to at the bureau."""
        return str(_http("GET", self.control_port, f"/requests/{msgid}/path")["path"])

    def sim_answers(self) -> list[tuple[str, str]]:
        with closing(sqlite3.connect(self.dir / "sim" / "ledger.db")) as c:
            return c.execute("SELECT msgid, infno FROM answers ORDER BY rowid").fetchall()

    # ---- the journal, read as an auditor would ---------------------------------------------------------------
    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """A read of the journal, SQLite's or (share_journal) PostgreSQL's, in the journal's own SQL."""
        if self.journal_url is not None:
            import psycopg
            from psycopg.rows import dict_row

            from fep.dialect import to_postgres

            with psycopg.connect(self.journal_url, row_factory=dict_row) as pg:
                return list(pg.execute(to_postgres(sql), params or None))  # type: ignore[arg-type]
        with closing(sqlite3.connect(f"file:{self.dir / 'lib' / 'journal.db'}?mode=ro", uri=True)) as c:
            c.row_factory = sqlite3.Row
            return [dict(r) for r in c.execute(sql, params)]

    def journal(self, where: str = "1 = 1", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Rows as stored, requests and answers as they were sent and received (fep.journal.body_text)."""
        from fep.journal import body_text

        rows = self.query(f"SELECT * FROM trades WHERE {where} ORDER BY id", params)
        for r in rows:
            for k in ("request", "answer", "late_answer"):
                if r[k] is not None:
                    r[k] = body_text(r[k])
        return rows

    def trade(self, msgid: str) -> dict[str, Any]:
        rows = self.journal("msgid=?", (msgid,))
        assert rows, f"{msgid} is not in the journal"
        return rows[0]

    def events(self, msgid: str) -> list[str]:
        return [r["event"] for r in self.query("SELECT event FROM events WHERE msgid=? ORDER BY id", (msgid,))]

    def assert_ledgers_agree(self) -> None:
        """Every settlement the bureau holds is one the journal holds as settled, to the fen, and back."""
        ours = {r["setl_id"]: r for r in self.journal("setl_id IS NOT NULL AND state IN ('ANSWERED','CONFIRMED')")}
        theirs = {s["setl_id"]: s for s in self.ledger() if s["state"] != "reversed"}
        assert set(ours) == set(theirs), f"journal {sorted(ours)} != bureau {sorted(theirs)}"
        for setl_id, row in ours.items():
            setl = envelope.loads(row["answer"])["output"]["setlinfo"]
            assert Decimal(str(setl["medfee_sumamt"])) == Decimal(theirs[setl_id]["medfee"]), setl_id
            assert row["msgid"] == theirs[setl_id]["msgid"], setl_id
        reversed_at_bureau = {s["msgid"] for s in self.ledger() if s["state"] == "reversed"}
        reversed_here = {r["msgid"] for r in self.journal("state='REVERSED'")}
        assert reversed_at_bureau <= reversed_here, f"reversed at the bureau but not in the journal: " \
                                                    f"{reversed_at_bureau - reversed_here}"

    # ---- scenarios (tests/test_agreement.py, tests/test_stranded.py): the operator's and auditor's tools ----
    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The `fep` admin command, run as the operator runs it, against this world's admin socket."""
        return subprocess.run([sys.executable, "-m", "fep.cli", *args, "--admin", str(self.dir / "run" / "admin.sock")],
                              capture_output=True, text=True, timeout=60, cwd=self.dir)

    def end_outage(self) -> None:
        """The bureau is reachable again (the `refuse` fault cleared); every other fault stays armed."""
        _http("DELETE", self.control_port, "/faults?mode=refuse")

    def wait_state(self, msgid: str, *states: str, timeout: float = 20) -> dict[str, Any]:
        """The journal row once it is in one of `states`; on a timeout, the failure says where it is instead."""
        deadline = time.monotonic() + timeout
        while True:
            row = self.trade(msgid)
            if row["state"] in states:
                return row
            if time.monotonic() >= deadline:
                raise AssertionError(f"{row['infno']} {msgid} is still {row['state']} after {timeout} s, not "
                                     f"{' or '.join(states)} (note: {row['note']}); events {self.events(msgid)}")
            time.sleep(0.05)

    def history(self, msgid: str) -> list[tuple[str, str, str | None]]:
        """(event, state, note) of each transition of a trade, oldest first: what `fep show` prints."""
        return [(r["event"], r["state"], r["note"]) for r in self.query(
            "SELECT event, state, note FROM events WHERE msgid=? ORDER BY id", (msgid,))]

    def sim_answer(self, msgid: str) -> dict[str, Any] | None:
        """The answer the bureau stored for a msgid it processed (None: it never processed it)."""
        with sqlite3.connect(self.dir / "sim" / "ledger.db") as c:
            row = c.execute("SELECT response FROM answers WHERE msgid=?", (msgid,)).fetchone()
        return envelope.loads(row[0]) if row else None

    def live(self) -> list[str]:
        """The msgids of the settlements (and cancels) the bureau holds in force, in its own order."""
        return [s["msgid"] for s in self.ledger() if s["state"] == "live"]

    @contextmanager
    def outage(self) -> Iterator[None]:
        """The bureau is down (connections refused) inside the block, and back up after it."""
        self.fault(mode="refuse")
        try:
            yield
        finally:
            self.clear_faults()

    @contextmanager
    def journal_on_tmpfs(self, options: str) -> Iterator[Path]:
        """fep's journal directory (lib/) on a tmpfs of its own, mounted with `options` ("ro", "size=8m").
        Skips the test when not root or when the mount fails. fep and the simulator are stopped before the
        tmpfs is unmounted, whatever happens."""
        import pytest

        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        lib = self.dir / "lib"
        lib.mkdir(parents=True, exist_ok=True)
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(lib)], capture_output=True,
                               text=True)
        if mount.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs on {lib}: {mount.stderr.strip()}")
        try:
            yield lib
        finally:
            self.stop()
            if subprocess.run(["umount", str(lib)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(lib)], capture_output=True)


class Peer:
    """Node b of a pair (World.share_journal): its own ports, sockets and local files, the same journal."""

    def __init__(self, base: Path) -> None:
        self.dir = base
        self.his_port, self.metrics_port = free_ports(2)
        self.config = base / "fep.yaml"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, node_a: dict[str, Any]) -> None:
        import copy

        doc = copy.deepcopy(node_a)
        self.dir.mkdir(parents=True, exist_ok=True)
        doc["his"].update(tcp_port=self.his_port, unix=str(self.dir / "run" / "his.sock"))
        doc["admin"] = {"unix": str(self.dir / "run" / "admin.sock"), "metrics_port": self.metrics_port}
        doc["journal"].update(path=str(self.dir / "lib" / "local.db"), node=f"b 127.0.0.1:{self.his_port}")
        self.config.write_text(yaml.safe_dump(doc, allow_unicode=True))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> None:
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def _http(method: str, port: int, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return envelope.loads(resp.read())


# ---- the HIS's side of an outpatient visit ------------------------------------------------------------------
FEES = [  # national code, count, price
    ("XA01AAA001A001010100001", "2", "12.50"),
    ("XB02BBB002B002020200002", "1", "38.00"),
    ("001102000010000", "1", "25.00"),
    ("250101001", "1", "30.00"),
]


class Visit:
    """What an HIS does for one outpatient visit, step by step, through fep."""

    def __init__(self, his: Client, person: dict[str, str], fees: list[tuple[str, str, str]] = FEES) -> None:
        self.his, self.person, self.fees = his, person, fees
        self.mdtrt_id = ""
        self.chrg_bchno = f"B{time.time_ns() % 10**12}"
        self.medfee = sum((Decimal(c) * Decimal(p) for _, c, p in fees), Decimal("0"))

    def identify(self) -> dict[str, Any]:
        return self.his.call("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": self.person["certno"]}})

    def register(self) -> dict[str, Any]:
        a = self.his.call("2201", {"data": {"psn_no": self.person["psn_no"], "insutype": self.person["insutype"],
                                            "begntime": "2026-11-23 09:00:00", "mdtrt_cert_type": "02",
                                            "mdtrt_cert_no": self.person["certno"], "ipt_otp_no": self.chrg_bchno,
                                            "atddr_no": "D001", "dr_name": "医生", "dept_code": "01",
                                            "dept_name": "内科", "caty": "A03"}})
        if a["infcode"] == 0:
            self.mdtrt_id = a["output"]["data"]["mdtrt_id"]
        return a

    def diagnose(self) -> dict[str, Any]:
        return self.his.call("2203", {"mdtrtinfo": {"mdtrt_id": self.mdtrt_id, "psn_no": self.person["psn_no"],
                                                    "med_type": "11", "begntime": "2026-11-23 09:00:00"},
                                      "diseinfo": [{"diag_type": "1", "diag_srt_no": "1", "diag_code": "J06.900",
                                                    "diag_name": "急性上呼吸道感染", "vali_flag": "1"}]})

    def upload_fees(self, **extra: Any) -> dict[str, Any]:
        return self.his.call("2204", self.fee_input(), **extra)

    def fee_input(self) -> dict[str, Any]:
        """The 2204 input of the visit's fees."""
        lines = [{"feedetl_sn": f"{self.chrg_bchno}{i}", "mdtrt_id": self.mdtrt_id, "psn_no": self.person["psn_no"],
                  "chrg_bchno": self.chrg_bchno, "rx_circ_flag": "0", "fee_ocur_time": "2026-11-23 09:30:00",
                  "med_list_codg": code, "medins_list_codg": f"H-{code[-6:]}", "cnt": Decimal(cnt),
                  "pric": Decimal(pric), "det_item_fee_sumamt": Decimal(cnt) * Decimal(pric),
                  "bilg_dept_codg": "01", "bilg_dept_name": "内科", "bilg_dr_codg": "D001", "bilg_dr_name": "医生",
                  "hosp_appr_flag": "1"} for i, (code, cnt, pric) in enumerate(self.fees)]
        return {"feedetail": lines}

    def inpatient_fees(self, n: int, batch: str = "") -> dict[str, Any]:
        """A 2301 input of `n` fee lines as an inpatient ward uploads them (each line the fields HIS programs
        fill, about 700 bytes of JSON): 5,000 lines are about 3.5 MB. `batch` keeps feedetl_sn unique across
        uploads of one visit."""
        batch = batch or self.chrg_bchno
        lines = []
        for i in range(n):
            code, cnt, pric = self.fees[i % len(self.fees)]
            lines.append({
                "feedetl_sn": f"{batch}{i:06d}", "init_feedetl_sn": "", "mdtrt_id": self.mdtrt_id,
                "drord_no": f"YZ{batch}{i // 10:05d}", "psn_no": self.person["psn_no"], "med_type": "21",
                "fee_ocur_time": "2026-11-23 09:30:00", "med_list_codg": code, "medins_list_codg": f"H-{code[-6:]}",
                "det_item_fee_sumamt": Decimal(cnt) * Decimal(pric), "cnt": Decimal(cnt), "pric": Decimal(pric),
                "bilg_dept_codg": "0301", "bilg_dept_name": "心血管内科病区", "bilg_dr_codg": "D00123",
                "bilg_dr_name": "王建国", "acord_dept_codg": "0301", "acord_dept_name": "心血管内科病区",
                "orders_dr_code": "D00123", "orders_dr_name": "王建国", "hosp_appr_flag": "1",
                "tcmdrug_used_way": "", "etip_flag": "0", "etip_hosp_code": "", "dscg_tkdrug_flag": "0",
                "matn_fee_flag": "0", "memo": "", "expContent": ""})
        return {"feedetail": lines}

    def settlement_input(self) -> dict[str, Any]:
        return {"data": {"psn_no": self.person["psn_no"], "mdtrt_cert_type": "02",
                         "mdtrt_cert_no": self.person["certno"], "med_type": "11", "medfee_sumamt": self.medfee,
                         "psn_setlway": "01", "mdtrt_id": self.mdtrt_id, "chrg_bchno": self.chrg_bchno,
                         "insutype": self.person["insutype"], "acct_used_flag": "1"}}

    def presettle(self) -> dict[str, Any]:
        return self.his.call("2206", self.settlement_input())

    def settle(self, msgid: str | None = None) -> dict[str, Any]:
        return self.his.call("2207", self.settlement_input(), msgid=msgid)

    def cancel(self, setl_id: str) -> dict[str, Any]:
        return self.his.call("2208", {"data": {"setl_id": setl_id, "mdtrt_id": self.mdtrt_id,
                                               "psn_no": self.person["psn_no"]}})

    def open(self) -> None:
        """1101 -> 2201 -> 2203, each answered by the bureau: ready for fee uploads."""
        for step in (self.identify, self.register, self.diagnose):
            answer = step()
            assert answer["infcode"] == 0, answer

    def up_to_settlement(self) -> None:
        """The visit opened and its fees uploaded (2204), each answered by the bureau."""
        self.open()
        answer = self.upload_fees()
        assert answer["infcode"] == 0, answer

    # ---- scenarios: the HIS's other calls, and what HTTP status it got ---------------------------------------
    def post(self, infno: str, input_: dict[str, Any], msgid: str | None = None) -> tuple[int, dict[str, Any]]:
        """The same request as `his.call`, with the HTTP status too (a 4xx is a refusal nothing journalled)."""
        env: dict[str, Any] = {"infno": infno, "input": input_, "opter_type": "1", "opter": "his",
                               "opter_name": "HIS"}
        if msgid:
            env["msgid"] = msgid
        return self.his.request("POST", "/fsi/api/rsfComIfsService/callService", envelope.dumps(env))

    def identity_input(self) -> dict[str, Any]:
        return {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": self.person["certno"]}}

    def cancel_input(self, setl_id: str) -> dict[str, Any]:
        return {"data": {"setl_id": setl_id, "mdtrt_id": self.mdtrt_id, "psn_no": self.person["psn_no"]}}

    def reversal_input(self, omsgid: str, oinfno: str = "2207") -> dict[str, Any]:
        """What the HIS sends to have one of its own trades reversed (2601)."""
        return {"data": {"psn_no": self.person["psn_no"], "omsgid": omsgid, "oinfno": oinfno}}

    def file(self, infno: str = "2501") -> dict[str, Any]:
        """A filing (备案) for the person: 2501 转院备案, under which a 异地 patient who needs one may settle."""
        return self.his.call(infno, {"data": {"psn_no": self.person["psn_no"], "insutype": self.person["insutype"],
                                              "begndate": "2026-11-01", "enddate": "2027-10-31",
                                              "fixmedins_code": "H43010000001", "memo": "转外就医"}})

    def discharge(self) -> dict[str, Any]:
        return self.his.call("2402", {"dscginfo": {"mdtrt_id": self.mdtrt_id, "psn_no": self.person["psn_no"],
                                                   "insutype": self.person["insutype"],
                                                   "endtime": "2026-11-23 11:00:00", "dscg_way": "1"}})

    def another(self, fees: list[tuple[str, str, str]] | None = None) -> Visit:
        """A second batch of fees in this same visit (same mdtrt_id)."""
        more = Visit(self.his, self.person, fees or [("250101001", "1", "30.00")])
        more.mdtrt_id = self.mdtrt_id
        return more

    def bad_upload(self) -> Visit:
        """Fees in this visit with a code the bureau does not know: it refuses the 2204 (医保目录编码不存在)."""
        return self.another([("NOT-A-NATIONAL-CODE", "1", "1.00")])


def reversed_settlement(world: World, visit: Visit, msgid: str | None = None) -> dict[str, Any]:
    """A 2207 (under the HIS's `msgid`, if given) the bureau settles but whose answer it drops, so fep reverses
    it (2601). Returns what the HIS heard, once the reversal is done."""
    world.fault(mode="drop_after", infno="2207", times=1)
    answer = visit.settle(msgid)
    wait_for(lambda: world.trade(answer["fep_msgid"])["state"] == "REVERSED", what="the reversal")
    return answer


def settled_state(world: World, msgid: str, states: tuple[str, ...], timeout: float = 20) -> dict[str, Any]:
    """The trade's journal row, once it is in one of `states`."""
    return wait_for(lambda: (r := world.trade(msgid))["state"] in states and r, timeout=timeout,
                    what=f"{msgid} to reach {states} (now {world.trade(msgid)['state']})")


def queued_uploads(visit: Visit, n: int, tag: str = "Q") -> list[str]:
    """`n` fee uploads of the visit while the bureau is down, each a batch of its own: each must be QUEUED."""
    msgids = []
    for i in range(n):
        visit.chrg_bchno = f"{visit.mdtrt_id[-8:]}{tag}{i}"
        answer = visit.upload_fees()
        assert answer["fep_state"] == "QUEUED", answer
        msgids.append(answer["fep_msgid"])
    return msgids


def late_settlement(world: World, late_by: float, late_grace: float | None = 10) -> Visit:
    """Zhang up to his settlement in a world (started here) whose 2207 times out after 1 s, fep waiting
    `late_grace` s for late answers (None: its default), and whose bureau answers the next 2207 `late_by` s
    after settling it. The test settles (visit.settle()) after any faults of its own."""
    world.configure(trades={"2207": {"timeout": 1}},
                    fep={"bureau": {"late_grace": late_grace}} if late_grace is not None else None)
    world.start()
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    world.fault(mode="late", infno="2207", seconds=late_by, times=1)
    return visit


def parked_settlement(world: World, visit: Visit) -> dict[str, Any]:
    """A 2207 whose answer is lost and whose reversal the bureau keeps refusing (系统繁忙), until fep parks
    it for a person; the faults are cleared afterwards. Returns what the HIS heard."""
    world.fault(mode="drop_after", infno="2207", times=1)
    world.fault(mode="error", infno="2601", message="系统繁忙")
    answer = visit.settle()
    wait_for(lambda: world.trade(answer["fep_msgid"])["state"] == "NEEDS_ATTENTION", timeout=30,
             what="the settlement to be parked")
    world.clear_faults()
    return answer


def his_msgid(n: int) -> str:
    """A well-formed msgid chosen by the HIS (a different institution code from fep's own)."""
    return f"H43010000099{time.strftime('%Y%m%d%H%M%S')}{n % 10000:04d}"


# ---- scenarios: shared arrangements (tests/test_agreement.py, tests/test_stranded.py) -------------------------
def settled_visit(world: World, person: dict[str, str]) -> tuple[Visit, dict[str, Any]]:
    """A visit opened, its fees uploaded and settled, all answered by the bureau: (the visit, the 2207's answer)."""
    visit = Visit(world.his, person)
    visit.up_to_settlement()
    answer = visit.settle()
    assert answer["infcode"] == 0, said(answer)
    return visit, answer


def said(answer: dict[str, Any]) -> str:
    """What the HIS heard, in one line, for an assertion's message."""
    return (f"{answer.get('fep_state')} infcode {answer.get('infcode')}: {answer.get('err_msg') or ''} "
            f"{answer.get('fep_note') or ''}").strip()


def setl_id(answer: dict[str, Any]) -> str:
    return str(answer["output"]["setlinfo"]["setl_id"])


def parked_upload(world: World, visit: Visit) -> dict[str, Any]:
    """An upload acknowledged as queued while the bureau was down, which the bureau refuses when it is replayed
    (an unknown code), so fep parks it (NEEDS_ATTENTION). The bureau is up afterwards. Returns what the HIS
    heard (QUEUED)."""
    with world.outage():
        answer = visit.bad_upload().upload_fees()
        assert answer["fep_state"] == "QUEUED", said(answer)
    world.wait_state(answer["fep_msgid"], "NEEDS_ATTENTION")
    return answer


# ---- the HIS's side of an inpatient stay (住院: 24xx admission and discharge, 23xx fees and settlement) ----------
def ok(answer: dict[str, Any]) -> bool:
    """The bureau said success, whether it writes infcode as a number or as a string (sim `infcode_type`)."""
    return str(answer.get("infcode")).strip() == "0"


IPT_FEES = [  # national code, count, price: a few days on the ward
    ("XA01AAA001A001010100001", "6", "12.50"),
    ("XB02BBB002B002020200002", "3", "38.00"),
    ("250101001", "2", "30.00"),
]


class Stay:
    """What an HIS does for one inpatient stay, step by step, through fep: admit (2401), upload fees (2301),
    pre-settle (2303), settle (2304), discharge (2402), cancel the settlement (2305), and the undoing of an
    admission (2404) or a discharge (2405). The mdtrt_id is the bureau's, from the admission's answer."""

    def __init__(self, his: Client, person: dict[str, str], fees: list[tuple[str, str, str]] = IPT_FEES) -> None:
        self.his, self.person, self.fees = his, person, fees
        self.mdtrt_id = ""
        self.ipt_no = f"Z{time.time_ns() % 10**12}"
        self.medfee = sum((Decimal(c) * Decimal(p) for _, c, p in fees), Decimal("0"))
        self._lines = 0

    def admit(self, msgid: str | None = None) -> dict[str, Any]:
        a = self.his.call("2401", {
            "mdtrtinfo": {"psn_no": self.person["psn_no"], "insutype": self.person["insutype"],
                          "begntime": "2026-11-23 08:00:00", "mdtrt_cert_type": "02",
                          "mdtrt_cert_no": self.person["certno"], "med_type": "21", "ipt_no": self.ipt_no,
                          "atddr_no": "D001", "chfpdr_name": "医生", "adm_diag_dscr": "肺炎", "adm_dept_codg": "03",
                          "adm_dept_name": "呼吸内科", "adm_bed": "12", "dscg_maindiag_code": "J18.900",
                          "dscg_maindiag_name": "肺炎", "insuplc_admdvs": self.person.get("insuplc_admdvs", "430100"),
                          "mdtrtarea_admvs": "430100"},
            "diseinfo": [{"psn_no": self.person["psn_no"], "diag_type": "1", "maindiag_flag": "1", "diag_srt_no": "1",
                          "diag_code": "J18.900", "diag_name": "肺炎", "diag_time": "2026-11-23 08:00:00",
                          "vali_flag": "1"}]}, msgid=msgid)
        if ok(a):
            self.mdtrt_id = str(a["output"]["result"]["mdtrt_id"])
        return a

    def upload_fees(self, fees: list[tuple[str, str, str]] | None = None, **extra: Any) -> dict[str, Any]:
        lines = []
        for code, cnt, pric in fees or self.fees:
            self._lines += 1
            lines.append({"feedetl_sn": f"{self.ipt_no[-6:]}{self._lines:04d}", "mdtrt_id": self.mdtrt_id,
                          "psn_no": self.person["psn_no"], "med_type": "21", "fee_ocur_time": "2026-11-23 10:00:00",
                          "med_list_codg": code, "medins_list_codg": f"H-{code[-6:]}", "cnt": Decimal(cnt),
                          "pric": Decimal(pric), "det_item_fee_sumamt": Decimal(cnt) * Decimal(pric),
                          "bilg_dept_codg": "03", "bilg_dept_name": "呼吸内科", "bilg_dr_codg": "D001",
                          "bilg_dr_name": "医生", "hosp_appr_flag": "1"})
        return self.his.call("2301", {"feedetail": lines}, **extra)

    def settlement_input(self) -> dict[str, Any]:
        return {"data": {"psn_no": self.person["psn_no"], "mdtrt_cert_type": "02",
                         "mdtrt_cert_no": self.person["certno"],
                         "medfee_sumamt": self.medfee, "psn_setlway": "01", "mdtrt_id": self.mdtrt_id,
                         "insutype": self.person["insutype"], "acct_used_flag": "1",
                         "insuplc_admdvs": self.person.get("insuplc_admdvs", "430100"),
                         "mdtrtarea_admvs": "430100", "mid_setl_flag": "0"}}

    def presettle(self) -> dict[str, Any]:
        return self.his.call("2303", self.settlement_input())

    def settle(self, msgid: str | None = None) -> dict[str, Any]:
        return self.his.call("2304", self.settlement_input(), msgid=msgid)

    def discharge(self) -> dict[str, Any]:
        return self.his.call("2402", {"dscginfo": {
            "mdtrt_id": self.mdtrt_id, "psn_no": self.person["psn_no"], "insutype": self.person["insutype"],
            "endtime": "2026-11-26 10:00:00", "dscg_way": "1", "dscg_dept_codg": "03", "dscg_dept_name": "呼吸内科"}})

    def cancel(self, setl_id: str) -> dict[str, Any]:
        """2305: the settlement is cancelled by a negative settlement of its own."""
        return self.his.call("2305", {"data": {"mdtrt_id": self.mdtrt_id, "setl_id": setl_id,
                                               "psn_no": self.person["psn_no"]}})

    def cancel_fees(self) -> dict[str, Any]:
        return self.his.call("2302", {"data": [{"feedetl_sn": "0000", "mdtrt_id": self.mdtrt_id,
                                                "psn_no": self.person["psn_no"]}]})

    def cancel_discharge(self) -> dict[str, Any]:
        return self.his.call("2405", {"data": {"mdtrt_id": self.mdtrt_id, "psn_no": self.person["psn_no"]}})

    def cancel_admission(self) -> dict[str, Any]:
        return self.his.call("2404", {"data": {"mdtrt_id": self.mdtrt_id, "psn_no": self.person["psn_no"]}})

    def query(self, setl_id: str) -> dict[str, Any]:
        """5203: the settlement as the bureau holds it."""
        return self.his.call("5203", {"data": {"psn_no": self.person["psn_no"], "setl_id": setl_id,
                                               "mdtrt_id": self.mdtrt_id}})

    def up_to_settlement(self) -> None:
        """Admitted and the fees uploaded, each answered by the bureau: ready to settle."""
        for step in (self.admit, self.upload_fees):
            answer = step()
            assert ok(answer), said(answer)


def admitted(his: Client, person: dict[str, str]) -> Visit:
    """A Visit whose mdtrt_id is an inpatient stay the bureau admitted (2401): for 2301 uploads of its fees."""
    stay = Stay(his, person)
    answer = stay.admit()
    assert ok(answer), answer
    visit = Visit(his, person)
    visit.mdtrt_id = stay.mdtrt_id
    return visit
