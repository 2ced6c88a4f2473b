"""fep.yaml: the daemon's configuration. Every error names the key and what is wrong with it."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from fep.trades import TradeBook, TradesError, read_yaml


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Institution:
    fixmedins_code: str
    fixmedins_name: str
    mdtrtarea_admvs: str
    infver: str = "V1.0"
    recer_sys_code: str = "FEP"
    # The operator on the envelopes the HIS leaves without one, and on fep's own trades (sign-in, reversals,
    # reconciliation): the bureau records who did it, so it is the institution's, never a made-up name.
    opter_type: str = "1"
    opter: str = ""
    opter_name: str = ""


@dataclass(frozen=True)
class HisSide:
    tcp_host: str
    tcp_port: int
    unix: Path | None
    max_body: int
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    # fep answers every HIS request within this many seconds (HIS programs give up after 10-30 s): it caps
    # every wait for the bureau on the HIS's behalf; a money trade not answered by then is resolved.
    answer_within: float
    # How fep writes infcode on its own envelopes (queued, not sent, refused): as the bureau does.
    infcode_type: str = "number"
    # A successful download (9102) reaches the HIS as the file itself ("file", as the baseline and most HIS
    # programs read it), or as the JSON envelope with the file in Base64 ("json", for an HIS that reads only JSON).
    file_answers: str = "file"
    # What one HIS connection, and all of them, may cost (README, "Limits of the HIS side").
    max_url: int = 8192
    max_header_bytes: int = 32768
    max_headers: int = 100
    max_pipelined: int = 16
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    idle_timeout: float = 120.0
    max_connections: int = 2048
    max_connections_per_peer: int = 512
    # The group the HIS Unix socket is given (fep.sockets): not the admin socket's.
    unix_group: str = "fep-his"


@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str
    host: str
    port: int
    path: str
    server_name: str


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path
    min_version: str = "1.2"
    ciphers: str | None = None


@dataclass(frozen=True)
class BureauSide:
    endpoints: tuple[Endpoint, ...]
    tls: TLSFiles
    url_style: str  # dispatcher | infno_path | per_trade
    concurrency: int
    connect_timeout: float
    source_address: str | None
    signin: dict[str, str]
    not_signed_in: tuple[str, ...]  # err_msg fragments meaning "sign in again"
    reversal_not_found: tuple[str, ...]  # err_msg fragments of a 2601 answer meaning "original not there"
    transient: tuple[str, ...]  # err_msg fragments of a refusal that says "not now", never "no"
    content_type: str = "application/json"
    late_grace: float = 30.0  # after a timeout, how long a late answer is still read (and kept)


@dataclass(frozen=True)
class Resolution:
    max_tries: int
    backoff: tuple[float, ...]  # seconds between tries; the last repeats


@dataclass(frozen=True)
class AdminSide:
    unix: Path
    metrics_host: str
    metrics_port: int
    unix_group: str = "fep"  # the group the admin socket is given (fep.sockets): only root and it may open it


@dataclass(frozen=True)
class Config:
    institution: Institution
    his: HisSide
    bureau: BureauSide
    journal_path: Path
    journal_max_batch: int
    resolution: Resolution
    trades: TradeBook
    admin: AdminSide
    reconcile_at: str | None = None  # "HH:MM": reconcile yesterday every day at this time
    catalog_sync_at: str | None = None  # "HH:MM": download what is new in the bureau's catalog
    # (insutype, setl_optins, clr_type) reconciled every day even when the journal has nothing in them,
    # so that a settlement made at the bureau behind fep's back is found there too
    reconcile_groups: tuple[tuple[str, str, str], ...] = ()
    # A trade whose insuplc_admdvs is to be filled (trades.yaml `insuplc: fill`) for a person fep has seen no
    # 1101 of: "refuse" it (the HIS is told to call 1101 first), or "forward" it as the HIS sent it
    remote_without_1101: str = "refuse"
    # Month-end clearing: the region's trade that tells what the bureau approved and refused of an application
    # (None: the region has none); and names of clearing types (清算类别) besides the national ones
    clearing_status_trade: str | None = "3205A"
    clr_type_names: tuple[tuple[str, str], ...] = ()
    allow_root: bool = False
    source: Path | None = None


def _need(doc: dict[str, Any], key: str, where: str) -> Any:
    if not isinstance(doc, dict) or key not in doc or doc[key] in (None, ""):
        raise ConfigError(f"{where}{key} is required")
    return doc[key]


def _path(base: Path, value: Any) -> Path:
    p = Path(str(value))
    return p if p.is_absolute() else base / p


def load(path: Path, base: Path | None = None) -> Config:
    """Relative paths in the file are taken from `base` (default: the current directory)."""
    base = base or Path.cwd()
    doc = read_yaml(path, "config", ConfigError)
    if not isinstance(doc, dict):
        raise ConfigError(f"config {path} must be a YAML mapping")
    try:
        return _build(doc, path, base)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _build(doc: dict[str, Any], path: Path, base: Path) -> Config:
    inst = _need(doc, "institution", "")
    code = str(_need(inst, "fixmedins_code", "institution."))
    if not re.fullmatch(r"[0-9A-Z]{12}", code):
        raise ConfigError(f"institution.fixmedins_code must be 12 upper-case letters or digits, got {code!r}")
    institution = Institution(
        fixmedins_code=code,
        fixmedins_name=str(_need(inst, "fixmedins_name", "institution.")),
        mdtrtarea_admvs=str(_need(inst, "mdtrtarea_admvs", "institution.")),
        infver=str(inst.get("infver", "V1.0")),
        recer_sys_code=str(inst.get("recer_sys_code", "FEP")),
        opter_type=str(inst.get("opter_type", "1")),
        opter=str(inst.get("opter") or code),
        opter_name=str(inst.get("opter_name") or _need(inst, "fixmedins_name", "institution.")),
    )
    his_doc = _need(doc, "his", "")
    try:
        nets = tuple(ipaddress.ip_network(n) for n in his_doc.get("allowed_networks", ["127.0.0.0/8", "::1/128"]))
    except ValueError as e:
        raise ConfigError(f"his.allowed_networks: {e}") from None
    his = HisSide(
        tcp_host=str(his_doc.get("tcp_host", "127.0.0.1")),
        tcp_port=int(his_doc.get("tcp_port", 8097)),
        unix=_path(base, his_doc["unix"]) if his_doc.get("unix") else None,
        max_body=int(his_doc.get("max_body", 32 << 20)),
        allowed_networks=nets,
        # answer_budget: the name before 0.2; it still works.
        answer_within=float(his_doc.get("answer_within", his_doc.get("answer_budget", 8))),
        infcode_type=str(his_doc.get("infcode_type", "number")),
        file_answers=str(his_doc.get("file_answers", "file")),
        **{key: _positive(his_doc, key, kind, default) for key, kind, default in HIS_LIMITS},
        unix_group=str(his_doc.get("unix_group", "fep-his")),
    )
    if his.max_connections_per_peer > his.max_connections:
        raise ConfigError(f"his.max_connections_per_peer ({his.max_connections_per_peer}) must not be over "
                          f"his.max_connections ({his.max_connections})")
    if his.answer_within < 1:
        raise ConfigError(f"his.answer_within must be at least 1 s, got {his.answer_within:g}")
    if his.unix_group == str((doc.get("admin") or {}).get("unix_group", "fep")):
        raise ConfigError(f"his.unix_group and admin.unix_group are both {his.unix_group!r}: any HIS program could "
                          f"then use the admin socket; give them different groups")
    if his.file_answers not in ("file", "json"):
        raise ConfigError(f"his.file_answers must be file or json, got {his.file_answers!r}")
    if his.infcode_type not in ("number", "string"):
        raise ConfigError(f"his.infcode_type must be number or string, got {his.infcode_type!r}")
    bureau = _bureau(_need(doc, "bureau", ""), base)
    jr = _need(doc, "journal", "")
    res = doc.get("resolution") or {}
    trades_path = _path(path.parent, doc.get("trades", "trades.yaml"))
    try:
        trades = TradeBook.load(trades_path, doc.get("trade_overrides"))
    except TradesError as e:
        raise ConfigError(str(e)) from None
    return Config(
        institution=institution,
        his=his,
        bureau=bureau,
        journal_path=_path(base, _need(jr, "path", "journal.")),
        journal_max_batch=int(jr.get("max_batch", 512)),
        resolution=Resolution(
            max_tries=int(res.get("max_tries", 10)),
            backoff=tuple(float(x) for x in res.get("backoff", [0, 2, 10, 30, 60, 300])),
        ),
        trades=trades,
        admin=AdminSide(unix=_path(base, (doc.get("admin") or {}).get("unix", "/run/fep/admin.sock")),
                        metrics_host=str((doc.get("admin") or {}).get("metrics_host", "127.0.0.1")),
                        metrics_port=int((doc.get("admin") or {}).get("metrics_port", 9464)),
                        unix_group=str((doc.get("admin") or {}).get("unix_group", "fep"))),
        reconcile_at=_hhmm((doc.get("schedule") or {}).get("reconcile_daily_at"), "schedule.reconcile_daily_at"),
        catalog_sync_at=_hhmm((doc.get("schedule") or {}).get("catalog_sync_daily_at"),
                              "schedule.catalog_sync_daily_at"),
        reconcile_groups=tuple(_group(g, i) for i, g in enumerate(doc.get("reconcile_groups") or [])),
        allow_root=bool((doc.get("security") or {}).get("allow_root", False)),
        source=path,
        **_month_end(doc, trades),
    )


HIS_LIMITS = (("max_url", int, 8192), ("max_header_bytes", int, 32768), ("max_headers", int, 100),
              ("max_pipelined", int, 16), ("header_timeout", float, 10.0), ("body_timeout", float, 60.0),
              ("idle_timeout", float, 120.0), ("max_connections", int, 2048),
              ("max_connections_per_peer", int, 512))


def _positive(doc: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = doc.get(key, default)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"his.{key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or number <= 0:
        raise ConfigError(f"his.{key} must be more than 0, got {value!r}")
    return number


def _month_end(doc: dict[str, Any], trades: TradeBook) -> dict[str, Any]:
    """`remote:` (异地 patients) and `clearing:` (清算)."""
    remote, clearing = doc.get("remote") or {}, doc.get("clearing") or {}
    without = str(remote.get("without_1101", "refuse"))
    if without not in ("refuse", "forward"):
        raise ConfigError(f"remote.without_1101 must be refuse or forward, got {without!r}")
    status = clearing.get("status_trade", "3205A")
    if status is not None and str(status) not in trades.defs:
        raise ConfigError(f"clearing.status_trade {status} is not in the trade catalog")
    names = clearing.get("clr_type_names") or {}
    if not isinstance(names, dict):
        raise ConfigError("clearing.clr_type_names must map a clearing type (清算类别) to its name")
    return {"remote_without_1101": without, "clearing_status_trade": None if status is None else str(status),
            "clr_type_names": tuple((str(k), str(v)) for k, v in names.items())}


def _group(doc: Any, i: int) -> tuple[str, str, str]:
    return tuple(str(_need(doc, k, f"reconcile_groups[{i}].")) for k in ("insutype", "setl_optins", "clr_type"))  # type: ignore[return-value]


def _hhmm(value: Any, key: str) -> str | None:
    if value in (None, ""):
        return None
    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", str(value)):
        raise ConfigError(f"{key} must be a time of day HH:MM, got {value!r}")
    return str(value)


def _bureau(doc: dict[str, Any], base: Path) -> BureauSide:
    eps = _need(doc, "endpoints", "bureau.")
    if not isinstance(eps, list) or not eps:
        raise ConfigError("bureau.endpoints must be a non-empty list")
    endpoints = []
    for i, ep in enumerate(eps):
        url = str(_need(ep, "url", f"bureau.endpoints[{i}]."))
        m = re.fullmatch(r"https://([^/:]+|\[[0-9a-fA-F:]+\]):(\d+)(/.*)?", url)
        if not m:
            raise ConfigError(f"bureau.endpoints[{i}].url must be https://host:port/path, got {url!r}")
        endpoints.append(Endpoint(
            name=str(ep.get("name", m.group(1))), url=url, host=m.group(1).strip("[]"), port=int(m.group(2)),
            path=m.group(3) or "/", server_name=str(ep.get("server_name", m.group(1))),
        ))
    tls = _need(doc, "tls", "bureau.")
    style = str(doc.get("url_style", "dispatcher"))
    if style not in ("dispatcher", "infno_path", "per_trade"):
        raise ConfigError(f"bureau.url_style must be dispatcher, infno_path or per_trade, got {style!r}")
    min_version = str(tls.get("min_version", "1.2"))
    if min_version not in ("1.2", "1.3"):
        raise ConfigError(f"bureau.tls.min_version must be 1.2 or 1.3, got {min_version!r}")
    return BureauSide(
        endpoints=tuple(endpoints),
        tls=TLSFiles(ca=_path(base, _need(tls, "ca", "bureau.tls.")),
                     cert=_path(base, _need(tls, "cert", "bureau.tls.")),
                     key=_path(base, _need(tls, "key", "bureau.tls.")),
                     min_version=min_version, ciphers=tls.get("ciphers")),
        url_style=style,
        concurrency=int(doc.get("concurrency", 16)),
        connect_timeout=float(doc.get("connect_timeout", 3)),
        source_address=doc.get("source_address"),
        signin={k: str(v) for k, v in (_need(doc, "signin", "bureau.")).items()},
        not_signed_in=tuple(doc.get("not_signed_in", ["未签到", "签到信息不存在", "not signed in"])),
        reversal_not_found=tuple(doc.get("reversal_not_found", ["原交易不存在", "not found"])),
        transient=tuple(doc.get("transient", ["系统繁忙", "数据库连接超时", "超时", "请稍后", "busy"])),
        content_type=str(doc.get("content_type", "application/json")),
        late_grace=float(doc.get("late_grace", 30)),
    )
