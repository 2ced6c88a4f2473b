"""`fep sim`: the bureau simulator, a separate process speaking the national envelope over mutual TLS
(or, as `link_security` says, server-authenticated TLS or plain HTTP), behind the region profile's
gateway (fep.sim.gateway; `profile:` in sim.yaml).

Faults are switched at start (sim.yaml `faults:`) and at run time over a plain-HTTP control port on
loopback (POST /faults, DELETE /faults[?mode=MODE], GET /ledger, GET /requests/MSGID,
POST /sessions/expire, POST /tokens/expire, GET /gateway, POST /clearing/refuse), so tests and scripts/chaos can
break the link
the way the VPN breaks it. `latency_ms` (sim.yaml, and GET/POST /latency {"ms": N} at run time) makes every
answer take that long, as real bureaus take 50-500 ms: a timer, so the simulator keeps serving meanwhile.
"""

from __future__ import annotations

import signal
import sys
from collections import OrderedDict
from datetime import datetime
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from multipart import parse_options_header
from twisted.internet import defer, endpoints, task
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from fep import collector, envelope, logs, systemd, tls
from fep.config import TLSFiles
from fep.http11 import HTTPServerProtocol, Request, Response, render_response
from fep.sim.gateway import SimGateway, SimProfile
from fep.sim.ledger import FileAnswer, Ledger, Person, Remote

log = Logger()

REMEMBERED = 200  # envelopes kept for GET /requests/MSGID
REMEMBERED_BYTES = 64 << 20  # ... and at most this much of them: a 5,000-line upload is 3.5 MB
MODES = ("refuse", "drop_before", "drop_after", "late", "slow", "reset_mid", "error", "garble")
# `garble`: the trade is processed, and its answer arrives whole (HTTP 200, honest length) but unreadable, as
# the proxies and gateways in front of real bureaus answer: their error page, the bureau's JSON cut short, or
# a gateway's own JSON with no infcode in it.
GARBLES = ("html", "truncated", "no_infcode")


GATEWAY_REFUSALS = ("系统繁忙", "超时", "请稍后")


@dataclass
class Fault:
    """One switched-on fault. `every`: only every Nth matching trade; `times`: then it switches off."""

    mode: str
    infno: tuple[str, ...] = ()
    every: int = 1
    times: int | None = None
    seconds: float = 0.0  # `late`: answer this long after processing; `slow`: process (then answer) this long
    #                       after the trade arrived; `refuse`: down this long (0: until cleared)
    message: str = "模拟中心错误"
    form: str = "truncated"  # `garble`: which unreadable answer (GARBLES)
    seen: int = 0

    @property
    def at_the_door(self) -> bool:
        """A refusal of the bureau's front (busy, a timeout inside): given before any msgid is looked up."""
        return any(m in self.message for m in GATEWAY_REFUSALS)

    @classmethod
    def parse(cls, doc: dict[str, Any]) -> Fault:
        mode = doc.get("mode")
        if mode not in MODES:
            raise ValueError(f"fault mode must be one of {', '.join(MODES)}, got {mode!r}")
        infno = doc.get("infno") or ()
        form = doc.get("form", cls.form)
        if form not in GARBLES:
            raise ValueError(f"fault form must be one of {', '.join(GARBLES)}, got {form!r}")
        return cls(mode=mode, infno=tuple(str(i) for i in ([infno] if isinstance(infno, (str, int)) else infno)),
                   every=int(doc.get("every", 1)), times=doc.get("times"), seconds=float(doc.get("seconds", 0)),
                   message=str(doc.get("message", cls.message)), form=form)

    def fires(self, infno: str) -> bool:
        if self.infno and infno not in self.infno:
            return False
        if self.times is not None and self.times <= 0:
            return False
        self.seen += 1
        if self.seen % self.every:
            return False
        if self.times is not None:
            self.times -= 1
        return True


@dataclass
class SimConfig:
    host: str
    port: int
    control_port: int
    admdvs: str
    clr_optins: str
    tls: TLSFiles | None  # None with plain_http
    ledger: Path
    persons: list[Person]
    catalog: list[dict[str, str]]
    faults: list[Fault] = field(default_factory=list)
    infcode_type: str = "number"  # how the bureau writes infcode: number (0, -1) or string ("0", "-1")
    profile: SimProfile = field(default_factory=SimProfile)
    link_security: str = "mutual_tls"  # mutual_tls | server_tls | plain_http, as the region's link is
    diagnoses: list[dict[str, str]] = field(default_factory=list)  # ICD-10 (1307), version by version
    catalog_bulk: dict[str, int] = field(default_factory=dict)  # generated records per 13xx catalog or paged query
    file_upload: str = "any"  # 9101 taken as: json (Base64), multipart (jsonStr + file), or any
    remote: Remote = Remote()  # how 异地 settlements are cleared (sim.yaml `remote:`)
    latency_ms: float = 0.0  # every answer leaves this long after its request arrived


def load_config(path: Path) -> SimConfig:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    base = Path.cwd()

    def p(v: str) -> Path:
        return Path(v) if Path(v).is_absolute() else base / v

    security = str(doc.get("link_security", "mutual_tls"))
    if security not in ("mutual_tls", "server_tls", "plain_http"):
        raise ValueError(f"link_security must be mutual_tls, server_tls or plain_http, got {security!r}")
    t = doc.get("tls") if security != "plain_http" else None
    return SimConfig(
        host=str(doc.get("listen_host", "127.0.0.1")), port=int(doc.get("listen_port", 9443)),
        control_port=int(doc.get("control_port", 9444)), admdvs=str(doc.get("admdvs", "430100")),
        clr_optins=str(doc.get("clr_optins", "430199")),
        tls=TLSFiles(ca=p(t["ca"]), cert=p(t["cert"]), key=p(t["key"]), min_version=str(t.get("min_version", "1.2")))
        if t else None,
        ledger=p(doc["ledger"]),
        persons=[Person(psn_no=str(x["psn_no"]), psn_name=x["psn_name"], certno=str(x["certno"]),
                        insutype=str(x["insutype"]), psn_type=str(x["psn_type"]), balc=Decimal(str(x["balc"])),
                        deductible=Decimal(str(x["deductible"])), ratio=Decimal(str(x["ratio"])),
                        insuplc_admdvs=str(x["insuplc_admdvs"]), filing_required=bool(x.get("filing_required")))
                 for x in doc.get("persons", [])],
        catalog=[{"code": str(c["code"]), "name": c["name"], "lv": str(c["lv"]), "list_type": str(c["list_type"]),
                  "selfpay_prop": str(c.get("selfpay_prop", "0")), "vali_flag": str(c.get("vali_flag", "1")),
                  "ver": str(c.get("ver", 1))} for c in doc.get("catalog", [])],
        faults=[Fault.parse(f) for f in (doc.get("faults") or [])],
        infcode_type=str(doc.get("infcode_type", "number")),
        profile=SimProfile.parse(doc.get("profile") or {}, p),
        link_security=security,
        diagnoses=[{"code": str(d["code"]), "name": d["name"], "vali_flag": str(d.get("vali_flag", "1")),
                    "ver": str(d.get("ver", 1))} for d in doc.get("diagnoses", [])],
        catalog_bulk={str(k): int(v) for k, v in (doc.get("catalog_bulk") or {}).items()},
        file_upload=_one_of(str(doc.get("file_upload", "any")), FILE_UPLOADS, "file_upload"),
        remote=Remote(**{k: (int(v) if k == "page_size" else str(v)) for k, v in (doc.get("remote") or {}).items()}),
        latency_ms=latency_ms(doc.get("latency_ms", 0), "latency_ms"),
    )


def latency_ms(value: Any, key: str) -> float:
    """A latency in milliseconds: a number, zero or more."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{key} must be a number of milliseconds, zero or more, got {value!r}")
    return float(value)


FILE_UPLOADS = ("any", "json", "multipart")


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> str:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


class BureauProtocol(HTTPServerProtocol):
    """Applies the faults that act on the connection itself; the ledger decides the rest."""

    def __init__(self, sim: Simulator) -> None:
        super().__init__(self._handle, max_body=64 << 20)
        self.sim = sim

    def connectionMade(self) -> None:
        self.sim.connections.add(self)

    def connectionLost(self, reason: Any = None) -> None:
        self.sim.connections.discard(self)

    async def _handle(self, req: Request) -> Response:
        """The answer, no sooner than latency_ms after the request arrived. It is worked out at once, as a
        real bureau's many workers would, and held back by a timer: handled after the wait instead, the
        answers of requests that arrived together would queue behind each other on this one thread, and the
        bureau would be slower than it says."""
        arrived = self.sim.reactor.seconds()
        self.sim.waiting += 1
        try:
            response = await self._answer(req, arrived)
            await self._rest_of_latency(arrived)
        finally:
            self.sim.waiting -= 1
        return response

    async def _rest_of_latency(self, arrived: float) -> None:
        """Waits out what is left of the latency: a timer, so the other connections are served meanwhile."""
        rest = self.sim.latency_ms / 1000 - (self.sim.reactor.seconds() - arrived)
        if rest > 0:
            await task.deferLater(self.sim.reactor, rest)

    async def _answer(self, req: Request, arrived: float) -> Response:
        gw = self.sim.gateway
        if gw.is_token_request(req):
            return gw.token(req)
        refusal = gw.refusal(req)
        if refusal is not None:
            return refusal
        try:
            env = gw.opened(req.path, self._envelope(req))
            if isinstance(env, Response):
                return env
            infno = str(env.get("infno", ""))
        except (ValueError, AttributeError) as e:  # not JSON, or a malformed form
            return Response(400, envelope.dumps({"infcode": self.sim.ledger.infcode(-1), "err_msg": str(e) or "not JSON"}))
        wrong = self._wrong_form(req, env)
        if wrong:
            return Response(200, envelope.dumps({"infcode": self.sim.ledger.infcode(-1), "err_msg": wrong}))
        self.sim.remember(env, req.path)
        fault = self.sim.fault_for(infno)
        mode = fault.mode if fault else None
        if mode == "drop_before":
            await self._rest_of_latency(arrived)
            self.transport.abortConnection()
            return await defer.Deferred()  # never answered
        if mode == "error" and (fault.at_the_door or not self.sim.ledger.answered(env)):
            # Answered without processing, nothing stored for the msgid. A business refusal comes from the
            # bureau's own checks, which a msgid it already answered never reaches: that gets its first answer.
            failure = envelope.local_failure(fault.message, datetime.now())
            failure["infcode"] = self.sim.ledger.infcode(-1)
            return Response(200, envelope.dumps(failure))
        if mode == "slow":  # a busy bureau: the trade waits before it is processed (and then answered at once)
            await task.deferLater(self.sim.reactor, fault.seconds)
        result = self.sim.ledger.handle(env)
        if isinstance(result, FileAnswer):
            return Response(200, result.content, {"Content-Disposition": envelope.content_disposition(result.filename)},
                            content_type="application/octet-stream")
        answer = envelope.dumps(gw.sealed(result))
        if mode == "drop_after":
            await self._rest_of_latency(arrived)
            self.transport.abortConnection()
            return await defer.Deferred()
        if mode == "reset_mid":
            await self._rest_of_latency(arrived)
            raw = render_response(Response(200, answer), keep_alive=True)
            self.transport.write(raw[: len(raw) // 2])
            self.transport.abortConnection()
            return await defer.Deferred()
        if mode == "late":
            await task.deferLater(self.sim.reactor, fault.seconds)
        if mode == "garble":
            return garbled(fault.form, answer)
        return Response(200, answer)

    @staticmethod
    def _envelope(req: Request) -> Any:
        """The envelope, from the JSON body, or from a 9101 form's jsonStr and file parts (the file into
        fsUploadIn.in, as the JSON form carries it)."""
        mime, options = parse_options_header(req.headers.get("content-type", ""))
        if mime.lower() == "multipart/form-data":
            return envelope.parse_his_form(req.body, options.get("boundary")).envelope
        return envelope.loads(req.body)

    def _wrong_form(self, req: Request, env: Any) -> str | None:
        """A bureau that takes 9101 one way only refuses the other, as a real one does."""
        want = self.sim.cfg.file_upload
        if want == "any" or not isinstance(env, dict) or "fsUploadIn" not in (env.get("input") or {}):
            return None
        form = "multipart" if req.headers.get("content-type", "").lower().startswith("multipart/") else "json"
        if form == want:
            return None
        return ("文件上传须以multipart/form-data提交(jsonStr, file)" if want == "multipart"
                else "文件上传须以JSON提交(fsUploadIn.in)")


def garbled(form: str, answer: bytes) -> Response:
    """The unreadable answer of a `garble` fault, in place of the bureau's `answer` to a trade it processed."""
    if form == "html":
        page = b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>"
        return Response(200, page, content_type="text/html")
    if form == "no_infcode":
        return Response(200, envelope.dumps({"code": 500, "message": "服务网关内部错误", "data": None}))
    return Response(200, answer[: len(answer) // 2])


class Simulator:
    def __init__(self, reactor: Any, cfg: SimConfig) -> None:
        self.reactor = reactor
        self.cfg = cfg
        self.ledger = Ledger(cfg.ledger, cfg.persons, cfg.catalog, cfg.admdvs, cfg.clr_optins, cfg.infcode_type,
                             cfg.diagnoses, cfg.catalog_bulk, cfg.remote)
        self.faults = list(cfg.faults)
        self.latency_ms = cfg.latency_ms
        self.waiting = 0  # requests inside the bureau now: being worked out, or held back by the latency
        self.port: Any = None
        self.connections: set[BureauProtocol] = set()
        self._options = tls.server_options(cfg.tls, cfg.link_security == "mutual_tls") if cfg.tls else None
        self.gateway = SimGateway(cfg.profile, reactor.seconds)
        self._reopen: Any = None
        # the last envelopes received and the path each came to, by msgid
        self.requests: OrderedDict[str, tuple[bytes, str]] = OrderedDict()

    def remember(self, env: Any, path: str) -> None:
        """The envelope as the bureau read it, and its path (GET /requests/MSGID[/path]): tests see what
        arrived, after every decoding on the way, and where. Kept as JSON: as objects, a bench's big uploads
        were hundreds of megabytes for the collector to walk, and the simulator slowed upload by upload."""
        if isinstance(env, dict) and env.get("msgid"):
            self.requests[str(env["msgid"])] = (envelope.dumps(env), path)
            while len(self.requests) > 1 and (len(self.requests) > REMEMBERED or REMEMBERED_BYTES < sum(
                    len(raw) for raw, _ in self.requests.values())):
                self.requests.popitem(last=False)

    def fault_for(self, infno: str) -> Fault | None:
        for f in self.faults:
            if f.mode != "refuse" and f.fires(infno):
                return f
        return None

    async def start(self) -> None:
        await self._listen()
        control = Factory.forProtocol(lambda: HTTPServerProtocol(self._control, max_body=1 << 20))
        await endpoints.TCP4ServerEndpoint(self.reactor, self.cfg.control_port, interface="127.0.0.1").listen(control)
        for f in self.faults:
            if f.mode == "refuse":
                await self._refuse(f)
        log.info("bureau simulator on {host}:{port} (control 127.0.0.1:{c})", host=self.cfg.host,
                 port=self.cfg.port, c=self.cfg.control_port)
        collector.started()  # a real bureau's latency does not jump with its collector's passes

    async def _listen(self) -> None:
        if self.port is None:
            factory = Factory.forProtocol(lambda: BureauProtocol(self))
            host, port = self.cfg.host, self.cfg.port
            ep = (endpoints.SSL4ServerEndpoint(self.reactor, port, self._options, interface=host) if self._options
                  else endpoints.TCP4ServerEndpoint(self.reactor, port, interface=host))
            self.port = await ep.listen(factory)

    async def _refuse(self, fault: Fault) -> None:
        """Down: the listening socket is closed, so connections are refused, as with a dead bureau."""
        if self.port is not None:
            port, self.port = self.port, None
            await port.stopListening()
        for conn in list(self.connections):  # a dead bureau takes its open connections with it
            conn.transport.abortConnection()
        if fault.seconds:
            self._reopen = self.reactor.callLater(fault.seconds, lambda: defer.ensureDeferred(self._up(fault)))

    async def _up(self, fault: Fault | None = None) -> None:
        if fault in self.faults:
            self.faults.remove(fault)
        await self._listen()

    async def _control(self, req: Request) -> Response:
        if req.method == "GET" and req.path == "/ledger":
            return Response(200, envelope.dumps(self.ledger.settlements()))
        if req.method == "GET" and req.path.startswith("/requests/"):
            msgid, _, part = req.path.removeprefix("/requests/").partition("/")
            if msgid not in self.requests:
                return Response(404, envelope.dumps({"error": "no such msgid received"}))
            raw, path = self.requests[msgid]
            return Response(200, envelope.dumps({"path": path}) if part == "path" else raw)
        path, _, query = req.path.partition("?")
        if req.method == "DELETE" and path == "/faults":
            only = dict(p.partition("=")[::2] for p in query.split("&") if p).get("mode")
            self.faults[:] = [f for f in self.faults if only and f.mode != only]  # ?mode=refuse: only that mode
            if only in (None, "refuse"):
                if self._reopen is not None and self._reopen.active():
                    self._reopen.cancel()
                await self._up()
            return Response(200, envelope.dumps({"faults": [f.mode for f in self.faults]}))
        if req.method == "POST" and req.path in ("/ledger/adjust", "/ledger/forget"):
            doc = envelope.loads(req.body)
            if req.path == "/ledger/adjust":
                self.ledger.adjust(str(doc["setl_id"]), doc["medfee"])
            else:
                self.ledger.forget(str(doc["setl_id"]))
            return Response(200, envelope.dumps({"ok": True}))
        if req.method == "POST" and req.path == "/tokens/expire":  # as after a restart of the gateway
            return Response(200, envelope.dumps({"expired": self.gateway.expire_tokens()}))
        if req.method == "GET" and req.path == "/gateway":
            return Response(200, envelope.dumps({"style": self.gateway.profile.style, "refused": self.gateway.refused,
                                                 "link_security": self.cfg.link_security}))
        if req.method == "POST" and req.path == "/clearing/refuse":  # the audit refuses (拒付) part of a settlement
            doc = envelope.loads(req.body)
            self.ledger.refuse(str(doc["setl_id"]), Decimal(str(doc["amount"])), str(doc["reason"]))
            return Response(200, envelope.dumps({"ok": True}))
        if req.method == "POST" and req.path == "/sessions/expire":  # as after a restart of the bureau
            self.ledger.conn.execute("DELETE FROM signins")
            return Response(200, b'{"signins":[]}')
        if req.path == "/latency" and req.method in ("GET", "POST"):
            if req.method == "POST":
                try:
                    self.latency_ms = latency_ms(envelope.loads(req.body).get("ms"), "ms")
                except (ValueError, AttributeError) as e:
                    return Response(400, envelope.dumps({"error": str(e)}))
            return Response(200, envelope.dumps({"ms": self.latency_ms, "waiting": self.waiting}))
        if req.method == "POST" and req.path == "/faults":
            try:
                doc = envelope.loads(req.body)
                fault = Fault.parse(doc)
            except ValueError as e:
                return Response(400, envelope.dumps({"error": str(e)}))
            self.faults.append(fault)
            if fault.mode == "refuse":
                await self._refuse(fault)
            return Response(200, envelope.dumps({"faults": [f.mode for f in self.faults]}))
        return Response(404, b'{"error":"GET /ledger, POST /faults, DELETE /faults[?mode=MODE], POST /sessions/expire, '
                             b'GET|POST /latency"}')


def run(config_path: Path) -> int:
    logs.start()
    from twisted.internet import reactor

    try:
        cfg = load_config(config_path)
        sim = Simulator(reactor, cfg)
    except (OSError, KeyError, ValueError, tls.TLSConfigError) as e:
        print(f"fep sim: refusing to start: {e}", file=sys.stderr)
        return 2
    outcome = {"code": 0}

    def failed(f: Any) -> None:
        log.failure("simulator failed to start", f)
        outcome["code"] = 2
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(sim.start()).addErrback(failed))
    systemd.stop_on(reactor, signal.SIGTERM, signal.SIGINT)
    reactor.run(installSignalHandlers=False)
    return outcome["code"]
