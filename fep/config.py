"""fep.yaml: the daemon's configuration. Every error names the key and what is wrong with it."""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from fep.trades import TradeBook, TradesError, read_yaml


class ConfigError(ValueError):
    def __init__(self, message: str, at: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.at = at  # the key's place in the file, for its line: ("bureau", "endpoints", 0, "url")


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
    cert: Path | None  # None: the link authenticates only the bureau (server_tls)
    key: Path | None
    min_version: str = "1.2"
    ciphers: str | None = None


# How the link to the bureau is secured. Mutual TLS is the default; the others only when set explicitly.
LINK_SECURITY = ("mutual_tls", "server_tls", "plain_http")
# Region profiles (README, "Region profiles"): the gateway scheme in front of the bureau. jiangsu is hunan's.
STYLES = ("baseline", "guangdong", "hunan", "jiangsu", "jilin")
URL_LAYOUTS = ("dispatcher", "infno_path", "per_trade")
# The secret files each style needs: read when the link is (re)built, never from the YAML itself.
SECRETS = {"baseline": (), "guangdong": ("secret_key",), "hunan": ("access_key", "secret_key"),
           "jiangsu": ("access_key", "secret_key"),
           "jilin": ("client_id", "client_secret", "password", "sm2_private_key")}
# The settings (not secret) each style needs; the value None means required.
SETTINGS: dict[str, dict[str, str | None]] = {
    "baseline": {},
    "guangdong": {"paasid": None},
    "hunan": {"api_version": "1.0.0"},
    "jiangsu": {"api_version": "1.0.0"},
    "jilin": {"username": None, "token_path": "/auth/oauth/token", "scope": "server", "refresh_before": "60",
              "sm2_uid": "1234567812345678"},
}
LAYOUT_OF = {"guangdong": "infno_path"}  # a style's URL layout unless set; the others use dispatcher


@dataclass(frozen=True)
class Profile:
    """The region's gateway: URL layout, headers and signature, token flow, payload encryption."""

    style: str = "baseline"
    url_layout: str = "dispatcher"  # dispatcher | infno_path | per_trade
    content_type: str = "application/json"
    settings: tuple[tuple[str, str], ...] = ()
    secrets: tuple[tuple[str, Path], ...] = ()  # name -> file

    def setting(self, name: str) -> str:
        return dict(self.settings)[name]


@dataclass(frozen=True)
class BureauSide:
    endpoints: tuple[Endpoint, ...]
    tls: TLSFiles | None  # None with plain_http
    profile: Profile
    concurrency: int
    connect_timeout: float
    source_address: str | None
    signin: dict[str, str]
    not_signed_in: tuple[str, ...]  # err_msg fragments meaning "sign in again"
    reversal_not_found: tuple[str, ...]  # err_msg fragments of a 2601 answer meaning "original not there"
    transient: tuple[str, ...]  # err_msg fragments of a refusal that says "not now", never "no"
    file_upload: str = "json"  # 9101 to the bureau: json (fsUploadIn.in in Base64) or multipart (jsonStr + file)
    late_grace: float = 30.0  # after a timeout, how long a late answer is still read (and kept)
    link_security: str = "mutual_tls"

    @property
    def url_style(self) -> str:
        return self.profile.url_layout

    @property
    def content_type(self) -> str:
        return self.profile.content_type


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
class ConsoleSide:
    """The office's read-only web console (fep.console): its own listener, never the HIS port."""
    port: int | None = None  # None: no console
    host: str = "127.0.0.1"
    # peers besides loopback that may open it (the insurance office's and finance's networks)
    office_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    users: Path = Path("/etc/fep/console-users")  # kept by `fep user`
    session_minutes: float = 30.0  # a session unused this long is ended: sign in again


@dataclass(frozen=True)
class BackupPlan:
    """The daily backup of the journal (fep.backup)."""
    dir: Path | None = None  # where the daily copies go; None: no daily backup
    keep: int = 7  # copies kept: the newest
    daily_at: str | None = None  # "HH:MM"


@dataclass(frozen=True)
class LeasePlan:
    """Leadership among the nodes sharing a PostgreSQL journal (fep.leader)."""
    node: str  # this node's name in the journal's leader row and in a standby's refusals
    check: float = 1.0  # seconds between a standby's tries for the lease (and the leader's checks of it)
    timeout: float = 3.0  # seconds without a sign of its lease's session after which a leader gives it up


@dataclass(frozen=True)
class RemoteRoute:
    """Where a region routes 异地 trades (insuplc_admdvs of another city than `home`) elsewhere: to this
    endpoint only (a bureau.endpoints name), and/or at this path in place of the endpoint's own."""

    home: str = ""  # the hospital's city: the first four digits of institution.mdtrtarea_admvs
    endpoint: str | None = None
    path: str | None = None

    def of(self, insuplc_admdvs: str) -> tuple[str | None, str | None]:
        """(endpoint, base path) for a trade of this insured region; (None, None): as every trade."""
        place = insuplc_admdvs.strip()
        if (self.endpoint is None and self.path is None) or not place or place[:4] == self.home:
            return None, None
        return self.endpoint, self.path


@dataclass(frozen=True)
class Config:
    institution: Institution
    his: HisSide
    bureau: BureauSide
    # SQLite's journal. With journal_url no journal: where an earlier release kept this node's code book (the
    # file) and monthly archive files (beside it), taken into PostgreSQL at start and at the first archive run
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
    remote_route: RemoteRoute = RemoteRoute()
    # Month-end clearing: the region's trade that tells what the bureau approved and refused of an application
    # (None: the region has none); and names of clearing types (清算类别) besides the national ones
    clearing_status_trade: str | None = "3205A"
    clr_type_names: tuple[tuple[str, str], ...] = ()
    allow_root: bool = False
    source: Path | None = None
    journal_keep_days: int | None = None  # finished trades older than this go to monthly archive files; None: never
    archive_at: str | None = None  # "HH:MM": the daily move to the archive files
    backup: BackupPlan = BackupPlan()
    console: ConsoleSide = ConsoleSide()
    journal_url: str | None = None  # PostgreSQL's; None: the journal is SQLite at journal_path
    lease: LeasePlan | None = None  # with journal_url: this node's part in choosing the leader


@dataclass(frozen=True)
class Value:
    """What a key's value must be, in the words of the error that refuses it: its type (`fits`), then its
    bounds (`within`, said as `bounds`), so a wrong type and a value out of range are told apart."""
    expected: str
    fits: Callable[[Any], bool]
    within: Callable[[Any], bool] = lambda v: True
    bounds: str = ""


def _scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float)) and not isinstance(v, bool)


def _converts(kind: type) -> Callable[[Any], bool]:
    def fits(v: Any) -> bool:
        if not _scalar(v):
            return False
        try:
            kind(v)  # "8097" is a port as 8097 is; "eighty" is not
        except ValueError:
            return False
        return kind is float or not isinstance(v, float) or v.is_integer()
    return fits


TEXT = Value("text", _scalar)
WHOLE = Value("a whole number", _converts(int))
NUMBER = Value("a number", _converts(float))
BOOL = Value("true or false", lambda v: isinstance(v, bool))
TEXTS = Value("a list of text", lambda v: isinstance(v, list) and all(_scalar(x) for x in v))
# err_msg fragments fep matches: an empty one is in every err_msg, so every refusal would match it
FRAGMENTS = Value(TEXTS.expected, TEXTS.fits, lambda v: all(str(x).strip() for x in v),
                  "a list of text, none of it empty")
NUMBERS = Value("a list of numbers", lambda v: isinstance(v, list) and all(_converts(float)(x) for x in v))


def _whole_in(low: int, high: int | None = None) -> Value:
    """A whole number within bounds: a port past 65535, a concurrency of 0 are refused naming the key."""
    bounds = f"a whole number from {low} to {high}" if high is not None else f"a whole number of at least {low}"
    return Value(WHOLE.expected, WHOLE.fits, lambda v: int(v) >= low and (high is None or int(v) <= high), bounds)


PORT = _whole_in(1, 65535)
COUNT = _whole_in(1)  # connections, bytes, tries, days, copies: 0 of them and fep cannot work as meant
TEXT_MAP = Value("a mapping of names to text", lambda v: isinstance(v, dict) and all(_scalar(x) for x in v.values()))
# its keys are trade numbers, and what may be said of each is the trade catalog's to check (fep.trades)
TRADE_MAP = Value("a mapping of trade numbers to their settings", lambda v: isinstance(v, dict))

HIS_LIMITS = (("max_url", int, 8192), ("max_header_bytes", int, 32768), ("max_headers", int, 100),
              ("max_pipelined", int, 16), ("header_timeout", float, 10.0), ("body_timeout", float, 60.0),
              ("idle_timeout", float, 120.0), ("max_connections", int, 2048),
              ("max_connections_per_peer", int, 512))

# Every key fep.yaml may hold: a dict is a section, a one-item list a list of such sections, a Value a
# value. A key not here is refused, naming the nearest one that is; a key `_build` reads goes here too
# (tests/test_config.py fails for one that is read but not listed, or listed but not read).
KEYS: dict[str, Any] = {
    "institution": {"fixmedins_code": TEXT, "fixmedins_name": TEXT, "mdtrtarea_admvs": TEXT, "infver": TEXT,
                    "recer_sys_code": TEXT, "opter_type": TEXT, "opter": TEXT, "opter_name": TEXT},
    "his": {"tcp_host": TEXT, "tcp_port": PORT, "unix": TEXT, "max_body": COUNT, "allowed_networks": TEXTS,
            "answer_within": NUMBER, "answer_budget": NUMBER, "infcode_type": TEXT, "file_answers": TEXT,
            "unix_group": TEXT, **{key: COUNT if kind is int else NUMBER for key, kind, _ in HIS_LIMITS}},
    "bureau": {"endpoints": [{"name": TEXT, "url": TEXT, "server_name": TEXT}],
               "tls": {"ca": TEXT, "cert": TEXT, "key": TEXT, "min_version": TEXT, "ciphers": TEXT},
               "url_style": TEXT, "concurrency": COUNT, "connect_timeout": NUMBER, "source_address": TEXT,
               "signin": TEXT_MAP, "not_signed_in": FRAGMENTS, "reversal_not_found": FRAGMENTS, "transient": FRAGMENTS,
               "content_type": TEXT, "late_grace": NUMBER, "link_security": TEXT, "file_upload": TEXT,
               # each style's own settings and secrets are checked against its style by _profile
               "profile": {"style": TEXT, "url_layout": TEXT, "content_type": TEXT,
                           **{name: TEXT for style in SETTINGS.values() for name in style},
                           "secrets": {name: TEXT for style in SECRETS.values() for name in style}}},
    "journal": {"path": TEXT, "max_batch": COUNT, "keep_days": COUNT, "archive_daily_at": TEXT, "url": TEXT,
                "node": TEXT, "lease_check": NUMBER, "lease_timeout": NUMBER},
    "backup": {"dir": TEXT, "keep": COUNT, "daily_at": TEXT},
    "remote": {"without_1101": TEXT, "endpoint": TEXT, "path": TEXT},
    "clearing": {"status_trade": TEXT, "clr_type_names": TEXT_MAP},
    "resolution": {"max_tries": COUNT, "backoff": NUMBERS},
    "trades": TEXT,
    "trade_overrides": TRADE_MAP,
    "schedule": {"reconcile_daily_at": TEXT, "catalog_sync_daily_at": TEXT},
    "reconcile_groups": [{"insutype": TEXT, "setl_optins": TEXT, "clr_type": TEXT}],
    "admin": {"unix": TEXT, "metrics_host": TEXT, "metrics_port": PORT, "unix_group": TEXT},
    "security": {"allow_root": BOOL},
    "console": {"port": PORT, "host": TEXT, "office_networks": TEXTS, "users": TEXT, "session_minutes": NUMBER},
}
# Old names that still work (and are never suggested for a typo): old -> new.
RENAMED = {"his.answer_budget": "his.answer_within"}


def known_keys(keys: dict[str, Any] = KEYS, where: str = "") -> list[str]:
    """Every key as it is written in an error: his.tcp_port, bureau.endpoints.url."""
    out = []
    for key, spec in keys.items():
        name = where + key
        out.append(name)
        if isinstance(spec, list):
            spec = spec[0]
        if isinstance(spec, dict):
            out += known_keys(spec, name + ".")
    return out


def check(doc: dict[str, Any], keys: dict[str, Any] = KEYS, where: str = "",
          at: tuple[str | int, ...] = ()) -> dict[str, Any]:
    """`doc` with its empty values left out (an empty value is as if the key were not given), or a
    ConfigError naming the first key that is not known or whose value is of the wrong type."""
    out = {}
    for key, value in doc.items():
        name, here = f"{where}{key}", at + (key,)
        if key not in keys:
            raise ConfigError(_unknown(str(key), name, keys, where), here)
        spec = keys[key]
        if value is None:
            continue
        if isinstance(spec, list):
            if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
                raise ConfigError(f"{name} must be a list of mappings (keys {', '.join(spec[0])}), got {value!r}",
                                  here)
            value = [check(item, spec[0], f"{name}[{i}].", here + (i,)) for i, item in enumerate(value)]
        elif isinstance(spec, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a mapping (keys {', '.join(spec)}), got {value!r}", here)
            value = check(value, spec, name + ".", here)
        elif not spec.fits(value):
            raise ConfigError(f"{name} must be {spec.expected}, got {value!r}", here)
        elif not spec.within(value):
            raise ConfigError(f"{name} must be {spec.bounds}, got {value!r}", here)
        out[key] = value
    for old, new in RENAMED.items():
        if old.startswith(where) and {old, new} <= {where + k for k in out}:
            raise ConfigError(f"{old} is the old name of {new}: give only {new}", at + (old.rpartition(".")[2],))
    return out


def line_of(text: str, at: tuple[str | int, ...]) -> int | None:
    """The line (from 1) where the key at `at` is written, as an editor shows it; None if it is not found."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for step in at:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if k.value == str(step)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
            found = (node.value[step], node.value[step])
        else:
            found = None
        if found is None:
            return line
        line, node = found[0].start_mark.line + 1, found[1]
    return line


def _unknown(key: str, name: str, keys: dict[str, Any], where: str) -> str:
    """The nearest known key: in the same section, else anywhere (tcp_port at the top: his.tcp_port)."""
    old = set(RENAMED)
    here = [k for k in keys if where + k not in old]
    near = difflib.get_close_matches(key, here, n=1, cutoff=0.6)
    if near:
        return f"{name} is not a known key; did you mean {where}{near[0]}?"
    everywhere = [k for k in known_keys() if k not in old]
    leaves = {k.rpartition(".")[2]: k for k in reversed(everywhere)}  # the first section's, for a leaf in two
    near = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.8)
    if near:
        return f"{name} is not a known key; did you mean {leaves[near[0]]}?"
    return f"{name} is not a known key; the keys {'of ' + where.rstrip('.') if where else 'at the top'} are " \
           f"{', '.join(here)}"


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
        return _build(check(doc), path, base)
    except ConfigError as e:
        line = line_of(path.read_text(encoding="utf-8"), e.at) if e.at else None
        raise ConfigError(f"{path}{f':{line}' if line else ''}: {e}") from None


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
        journal_keep_days=_count(jr, "keep_days", "journal.", None),
        archive_at=_archive_at(jr),
        backup=_backup(doc.get("backup") or {}, base),
        console=_console(doc.get("console") or {}, base, his, doc.get("admin") or {}),
        **_shared_journal(jr, his),
        **_month_end(doc, trades, bureau),
    )


def _shared_journal(jr: dict[str, Any], his: HisSide) -> dict[str, Any]:
    """journal.url: the journal on PostgreSQL, shared by the nodes that name it, one of them leading."""
    url = jr.get("url")
    if url is None:
        for key in ("node", "lease_check", "lease_timeout"):
            if key in jr:
                raise ConfigError(f"journal.{key} is set but journal.url is not: leadership is among nodes that "
                                  f"share a PostgreSQL journal")
        return {}
    if not str(url).startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"journal.url must be a PostgreSQL URL (postgresql://user@host:port/database), got "
                          f"{str(url).split('@')[-1]!r}")
    check, timeout = float(jr.get("lease_check", 1.0)), float(jr.get("lease_timeout", 3.0))
    if not 0 < check < timeout:
        raise ConfigError(f"journal.lease_check ({check:g} s) must be more than 0 and less than journal.lease_timeout "
                          f"({timeout:g} s): a leader checks its lease several times before giving it up")
    node = str(jr.get("node") or f"{socket.gethostname()}:{his.tcp_port}")
    return {"journal_url": str(url), "lease": LeasePlan(node, check, timeout)}


def _count(doc: dict[str, Any], key: str, where: str, default: int | None) -> int | None:
    """A whole number of at least 1 (days, copies), or `default` when not given."""
    value = doc.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}{key} must be a whole number of at least 1, got {value!r}")
    return value


def _archive_at(jr: dict[str, Any]) -> str | None:
    if jr.get("keep_days") is None:
        if jr.get("archive_daily_at"):
            raise ConfigError("journal.archive_daily_at is set but journal.keep_days is not: say how many days "
                              "finished trades stay in the journal")
        return None
    return _hhmm(jr.get("archive_daily_at", "04:00"), "journal.archive_daily_at")


def _backup(doc: dict[str, Any], base: Path) -> BackupPlan:
    if not isinstance(doc, dict):
        raise ConfigError("backup must be a mapping: dir, keep, daily_at")
    directory = _path(base, doc["dir"]) if doc.get("dir") else None
    if directory is None and doc.get("daily_at"):
        raise ConfigError("backup.daily_at is set but backup.dir is not: say where the daily copies go")
    return BackupPlan(dir=directory, keep=_count(doc, "keep", "backup.", 7),  # type: ignore[arg-type]
                      daily_at=_hhmm(doc.get("daily_at", "01:30"), "backup.daily_at") if directory else None)


def _console(doc: dict[str, Any], base: Path, his: HisSide, admin: dict[str, Any]) -> ConsoleSide:
    """console: off unless a port is given; on loopback unless office networks are named (then on every address,
    and only those networks and loopback may connect)."""
    port, host, networks, users, minutes = (doc.get(k) for k in ("port", "host", "office_networks", "users",
                                                                   "session_minutes"))
    if port is None:
        given = [k for k, v in (("host", host), ("office_networks", networks), ("users", users),
                                ("session_minutes", minutes)) if v is not None]
        if given:
            raise ConfigError(f"console.{given[0]} is set but console.port is not: say which port the office's "
                              f"console listens on")
        return ConsoleSide()
    taken = {his.tcp_port: "his.tcp_port", int(admin.get("metrics_port", 9464)): "admin.metrics_port"}
    if int(port) in taken:
        raise ConfigError(f"console.port {port} is {taken[int(port)]}'s: the console has a port of its own, never "
                          f"the HIS side's")
    try:
        nets = tuple(ipaddress.ip_network(n) for n in networks or [])
    except ValueError as e:
        raise ConfigError(f"console.office_networks: {e}") from None
    if minutes is not None and float(minutes) <= 0:
        raise ConfigError(f"console.session_minutes must be more than 0, got {minutes!r}")
    _reachable(host, nets)
    return ConsoleSide(port=int(port), host=str(host or ("0.0.0.0" if nets else "127.0.0.1")), office_networks=nets,
                       users=_path(base, users or "/etc/fep/console-users"),
                       session_minutes=float(minutes if minutes is not None else 30))


def _reachable(host: Any, nets: tuple[Any, ...]) -> None:
    """A console the office can reach as configured: office networks need an address they can connect to, and
    an address beyond loopback is for office networks, the only peers besides loopback let in."""
    if host is None:
        return
    try:
        loopback = ipaddress.ip_address(str(host)).is_loopback
    except ValueError:
        loopback = str(host) == "localhost"
    if nets and loopback:
        raise ConfigError(f"console.host {host} is loopback: console.office_networks could never connect; leave "
                          f"console.host out (every address) or give the address the office reaches")
    if not nets and not loopback:
        raise ConfigError(f"console.host {host} is not loopback but console.office_networks is empty: every peer "
                          f"would be closed on; name the office networks that may connect")


def _positive(doc: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = doc.get(key, default)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"his.{key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or number <= 0:
        raise ConfigError(f"his.{key} must be more than 0, got {value!r}")
    return number


def _month_end(doc: dict[str, Any], trades: TradeBook, bureau: BureauSide) -> dict[str, Any]:
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
    endpoint, path = remote.get("endpoint"), remote.get("path")
    names_of = [e.name for e in bureau.endpoints]
    inst_city = str((doc.get("institution") or {}).get("mdtrtarea_admvs", ""))[:4]
    if endpoint is not None and str(endpoint) not in names_of:
        raise ConfigError(f"remote.endpoint {endpoint!r} is not a name of bureau.endpoints ({', '.join(names_of)})")
    if path is not None and not str(path).startswith("/"):
        raise ConfigError(f"remote.path must be a path beginning with /, got {path!r}")
    return {"remote_without_1101": without, "clearing_status_trade": None if status is None else str(status),
            "clr_type_names": tuple((str(k), str(v)) for k, v in names.items()),
            "remote_route": RemoteRoute(home=str(inst_city), endpoint=None if endpoint is None else str(endpoint),
                                        path=None if path is None else str(path))}


def _group(doc: Any, i: int) -> tuple[str, str, str]:
    return tuple(str(_need(doc, k, f"reconcile_groups[{i}].")) for k in ("insutype", "setl_optins", "clr_type"))  # type: ignore[return-value]


def _hhmm(value: Any, key: str) -> str | None:
    if value in (None, ""):
        return None
    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", str(value)):
        raise ConfigError(f"{key} must be a time of day HH:MM, got {value!r}")
    return str(value)


FILE_UPLOADS = ("json", "multipart")  # how a bureau takes 9101 (HN 附录A posts the baseline's multipart form)


def _bureau(doc: dict[str, Any], base: Path) -> BureauSide:
    security = str(doc.get("link_security", "mutual_tls"))
    if security not in LINK_SECURITY:
        raise ConfigError(f"bureau.link_security must be {', '.join(LINK_SECURITY)}, got {security!r}")
    scheme = "http" if security == "plain_http" else "https"
    eps = _need(doc, "endpoints", "bureau.")
    if not isinstance(eps, list) or not eps:
        raise ConfigError("bureau.endpoints must be a non-empty list")
    endpoints = []
    for i, ep in enumerate(eps):
        url = str(_need(ep, "url", f"bureau.endpoints[{i}]."))
        m = re.fullmatch(r"(https?)://([^/:]+|\[[0-9a-fA-F:]+\]):(\d+)(/.*)?", url)
        if not m:
            raise ConfigError(f"bureau.endpoints[{i}].url must be {scheme}://host:port/path, got {url!r}")
        if m.group(1) != scheme:
            raise ConfigError(f"bureau.endpoints[{i}].url is {m.group(1)}:// but bureau.link_security is {security}: "
                              + ("use https://" if scheme == "https" else "use http://") +
                              (", or set bureau.link_security: plain_http to send in the clear over the private line"
                               if scheme == "https" else ""))
        endpoints.append(Endpoint(
            name=str(ep.get("name", m.group(2))), url=url, host=m.group(2).strip("[]"), port=int(m.group(3)),
            path=m.group(4) or "/", server_name=str(ep.get("server_name", m.group(2))),
        ))
    file_upload = str(doc.get("file_upload", "json"))
    if file_upload not in FILE_UPLOADS:
        raise ConfigError(f"bureau.file_upload must be {' or '.join(FILE_UPLOADS)}, got {file_upload!r}")
    return BureauSide(
        endpoints=tuple(endpoints),
        tls=None if security == "plain_http" else _tls(_need(doc, "tls", "bureau."), base, security),
        profile=_profile(doc, base),
        concurrency=int(doc.get("concurrency", 16)),
        connect_timeout=float(doc.get("connect_timeout", 3)),
        source_address=doc.get("source_address"),
        signin={k: str(v) for k, v in (_need(doc, "signin", "bureau.")).items()},
        not_signed_in=tuple(doc.get("not_signed_in", ["未签到", "签到信息不存在", "not signed in"])),
        reversal_not_found=tuple(doc.get("reversal_not_found", ["原交易不存在", "not found"])),
        transient=tuple(doc.get("transient", ["系统繁忙", "数据库连接超时", "超时", "请稍后", "busy"])),
        file_upload=file_upload,
        late_grace=float(doc.get("late_grace", 30)),
        link_security=security,
    )


def _tls(tls: dict[str, Any], base: Path, security: str) -> TLSFiles:
    min_version = str(tls.get("min_version", "1.2"))
    if min_version not in ("1.2", "1.3"):
        raise ConfigError(f"bureau.tls.min_version must be 1.2 or 1.3, got {min_version!r}")
    mutual = security == "mutual_tls"
    return TLSFiles(ca=_path(base, _need(tls, "ca", "bureau.tls.")),
                    cert=_path(base, _need(tls, "cert", "bureau.tls.")) if mutual else None,
                    key=_path(base, _need(tls, "key", "bureau.tls.")) if mutual else None,
                    min_version=min_version, ciphers=tls.get("ciphers"))


def _profile(doc: dict[str, Any], base: Path) -> Profile:
    """bureau.profile; bureau.url_style and bureau.content_type, the keys before it, still work."""
    prof = doc.get("profile") or {}
    if not isinstance(prof, dict):
        raise ConfigError("bureau.profile must be a mapping (README, \"Region profiles\")")
    style = str(prof.get("style", "baseline"))
    if style not in STYLES:
        raise ConfigError(f"bureau.profile.style must be one of {', '.join(STYLES)}, got {style!r}")
    for key, value in (("bureau.url_style", doc.get("url_style")),
                       ("bureau.profile.url_layout", prof.get("url_layout"))):
        if value is not None and value not in URL_LAYOUTS:
            raise ConfigError(f"{key} must be dispatcher, infno_path or per_trade, got {value!r}")
    if "url_style" in doc and "url_layout" in prof:
        raise ConfigError("bureau.url_style is the old name of bureau.profile.url_layout: keep only the new one")
    layout = str(prof.get("url_layout", doc.get("url_style", LAYOUT_OF.get(style, "dispatcher"))))
    unknown = set(prof) - {"style", "url_layout", "content_type", "secrets", *SETTINGS[style]}
    if unknown:
        raise ConfigError(f"bureau.profile: {', '.join(sorted(unknown))} is not a setting of the {style} style "
                          f"(it has {', '.join(['url_layout', 'content_type', 'secrets', *SETTINGS[style]])}); "
                          f"secrets go under bureau.profile.secrets as file names")
    settings = []
    for name, default in SETTINGS[style].items():
        value = prof.get(name, default)
        if value in (None, ""):
            raise ConfigError(f"bureau.profile.{name} is required by the {style} style")
        settings.append((name, str(value)))
    return Profile(style=style, url_layout=layout,
                   content_type=str(prof.get("content_type", doc.get("content_type", "application/json"))),
                   settings=tuple(settings), secrets=_secret_files(prof.get("secrets") or {}, style, base))


def _secret_files(doc: Any, style: str, base: Path) -> tuple[tuple[str, Path], ...]:
    if not isinstance(doc, dict):
        raise ConfigError("bureau.profile.secrets must map each secret's name to the file that holds it")
    extra = set(doc) - set(SECRETS[style])
    if extra:
        raise ConfigError(f"bureau.profile.secrets: the {style} style has no secret {', '.join(sorted(extra))} "
                          f"(it needs {', '.join(SECRETS[style]) or 'none'})")
    out = []
    for name in SECRETS[style]:
        path = _need(doc, name, "bureau.profile.secrets.")
        # A path has a directory in it (/etc/fep/secrets/x, var/secrets/x): a bare word may be the secret
        # itself pasted in, which must not reach a log line naming the file.
        if not isinstance(path, str) or "/" not in path or "\n" in path:
            raise ConfigError(f"bureau.profile.secrets.{name} must be the path of the file holding it (with its "
                              f"directory), never the secret itself")
        out.append((name, _path(base, path)))
    return tuple(out)
