"""A small world for end-to-end tests, scripts/chaos and scripts/bench: a real bureau simulator and a
real fep daemon, as processes, over real mutual TLS on loopback, each with its state in one directory."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from fep import envelope
from fep.client import Client

ROOT = Path(__file__).resolve().parents[2]  # the repository: conf/ holds the development defaults
ZHANG = {"psn_no": "43010000000000000001", "certno": "430102198001010011", "insutype": "310"}
LI = {"psn_no": "43010000000000000002", "certno": "430102199002020022", "insutype": "390"}
WANG = {"psn_no": "43010000000000000003", "certno": "430102197503030033", "insutype": "310"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        self.sim_port, self.control_port, self.his_port = free_port(), free_port(), free_port()
        self.metrics_port = free_port()
        self.fep_config = tmp / "conf" / "fep.yaml"
        self.sim_config = tmp / "conf" / "sim.yaml"
        self.sim: subprocess.Popen[bytes] | None = None
        self.fep: subprocess.Popen[bytes] | None = None
        self.kills = 0
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
        doc["trades"] = str(ROOT / "conf" / "trades.yaml")
        doc["trade_overrides"] = trades or {}
        _merge(doc, fep or {})
        self.fep_config.write_text(yaml.safe_dump(doc, allow_unicode=True))
        sdoc = yaml.safe_load((ROOT / "conf" / "sim.yaml").read_text())
        sdoc.update(listen_port=self.sim_port, control_port=self.control_port, ledger=str(self.dir / "sim" / "ledger.db"))
        sdoc["tls"] = {"ca": str(self.pki / "ca.pem"), "cert": str(self.pki / "bureau.pem"),
                       "key": str(self.pki / "bureau.key")}
        _merge(sdoc, sim or {})
        self.sim_config.write_text(yaml.safe_dump(sdoc, allow_unicode=True))

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
            wait_for(lambda: self.fep.poll() is not None or _port_open(self.his_port), what="fep to listen")
            assert self.fep.poll() is None, f"fep exited: {self.log('run')}"
        return self.fep

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

    def stop(self) -> None:
        for proc in (self.fep, self.sim):
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

    def bypass(self, infno: str, msgid: str, input_: dict[str, Any]) -> dict[str, Any]:
        """Post a trade straight to the bureau with the hospital's certificate, behind fep's back (as an
        operator working in the bureau's own system does)."""
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
        ctx.load_cert_chain(str(self.pki / "hospital.pem"), str(self.pki / "hospital.key"))
        body = envelope.dumps({"infno": infno, "msgid": msgid, "input": input_})
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

    def clear_faults(self) -> None:
        _http("DELETE", self.control_port, "/faults")

    def ledger(self) -> list[dict[str, Any]]:
        return _http("GET", self.control_port, "/ledger")

    def sim_answers(self) -> list[tuple[str, str]]:
        with closing(sqlite3.connect(self.dir / "sim" / "ledger.db")) as c:
            return c.execute("SELECT msgid, infno FROM answers ORDER BY rowid").fetchall()

    # ---- the journal, read as an auditor would ---------------------------------------------------------------
    def journal(self, where: str = "1", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Rows as stored, requests and answers as they were sent and received (fep.journal.body_text)."""
        from fep.journal import body_text

        with closing(sqlite3.connect(f"file:{self.dir / 'lib' / 'journal.db'}?mode=ro", uri=True)) as c:
            c.row_factory = sqlite3.Row
            rows = [dict(r) for r in c.execute(f"SELECT * FROM trades WHERE {where} ORDER BY id", params)]
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
        with closing(sqlite3.connect(f"file:{self.dir / 'lib' / 'journal.db'}?mode=ro", uri=True)) as c:
            return [r[0] for r in c.execute("SELECT event FROM events WHERE msgid=? ORDER BY id", (msgid,))]

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
        lines = [{"feedetl_sn": f"{self.chrg_bchno}{i}", "mdtrt_id": self.mdtrt_id, "psn_no": self.person["psn_no"],
                  "chrg_bchno": self.chrg_bchno, "rx_circ_flag": "0", "fee_ocur_time": "2026-11-23 09:30:00",
                  "med_list_codg": code, "medins_list_codg": f"H-{code[-6:]}", "cnt": Decimal(cnt),
                  "pric": Decimal(pric), "det_item_fee_sumamt": Decimal(cnt) * Decimal(pric),
                  "bilg_dept_codg": "01", "bilg_dept_name": "内科", "bilg_dr_codg": "D001", "bilg_dr_name": "医生",
                  "hosp_appr_flag": "1"} for i, (code, cnt, pric) in enumerate(self.fees)]
        return self.his.call("2204", {"feedetail": lines}, **extra)

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


def reversed_settlement(world: World, visit: Visit) -> dict[str, Any]:
    """A 2207 the bureau settles but whose answer it drops, so fep reverses it (2601). Returns what the
    HIS heard, once the reversal is done."""
    world.fault(mode="drop_after", infno="2207", times=1)
    answer = visit.settle()
    wait_for(lambda: world.trade(answer["fep_msgid"])["state"] == "REVERSED", what="the reversal")
    return answer


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
