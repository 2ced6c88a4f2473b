"""The trade definitions: what fep knows of each trade number, read from conf/trades.yaml.

Everything the engine decides per trade (is it money, may it wait, how an unknown outcome is
resolved) is looked up here, so a new trade or a province's different rule is a YAML change.

A province's letter-suffixed variant of a trade (2207A, 3203A: the base number and one capital letter)
takes its base's definition unless the catalog or `trade_overrides` says otherwise. Variants the config
names are materialised into `defs` at load, like any other trade; a variant nobody named is derived on
first use, except where its base moves money: refund order and reconciliation find money trades by
iterating `defs`, so a money trade number must be known from the start, never discovered later.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml


class Kind(StrEnum):
    MONEY = "money"
    UNDO_MONEY = "undo_money"
    STATE = "state"
    COMPUTE = "compute"
    QUERY = "query"
    FILE = "file"
    SESSION = "session"
    REVERSAL = "reversal"


class FromHis(StrEnum):
    """What fep does with this trade number when the HIS sends it."""
    TRADE = "trade"        # forward it
    REVERSAL = "reversal"  # reverse the named trade, with the checks and transitions of `fep reverse`
    # fep's own session (sign-in, sign-out): answered by fep with the session it holds, never forwarded, so an
    # HIS that signs in before it trades works unchanged and the bureau sees one session, fep's.
    SESSION = "session"


class OnUnknown(StrEnum):
    REVERSE = "reverse"
    RESEND = "resend"
    CANCEL = "cancel"
    PERSON = "person"


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loading, but a number written with leading zeros stays the text as written: YAML 1.1 reads
    `opter: 0001` as 1 and `opter_no: 0017` as octal 15, and the bureau would record another operator. A key
    that is text (operator codes) then has the code as written; one that is a number reads 0017 as 17."""


def _int_as_written(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    if re.fullmatch(r"[-+]?0[0-9_]+", node.value):
        return node.value
    return loader.construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _int_as_written)


def read_yaml(path: Path, what: str, error: type[Exception]) -> Any:
    """A YAML file of fep's; `error` names the file and what is wrong with it."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # a SafeLoader: no Python objects
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {e}") from None


class TradesError(ValueError):
    pass


class UnknownTrade(LookupError):
    pass


class InvalidInput(ValueError):
    """The trade's input misses fields its definition requires; the message names them."""


@dataclass(frozen=True)
class CancelSpec:
    infno: str
    # output node -> field -> "node.field" path in the original input, or a literal
    input: dict[str, dict[str, str]]


@dataclass(frozen=True)
class TradeDef:
    infno: str
    name: str
    kind: Kind
    timeout: float
    deferrable: bool
    on_unknown: OnUnknown
    cancel: CancelSpec | None = None
    required: tuple[str, ...] = ()
    confirm_within: float | None = None  # seconds the HIS has to confirm a success; None: no window
    path: str | None = None  # per-trade bureau URL path, when the province uses them
    map_codes: str | None = None  # the node of fee lines to map from hospital to national codes
    check_diagnoses: str | None = None  # the node of diagnosis lines checked against the diagnosis catalogs
    from_his: FromHis = FromHis.TRADE
    output: str = "data"  # the output node of its answer ("result[]": a list), on fep's own envelopes too
    # The envelope's insuplc_admdvs (参保地): "remember" (1101) keeps the person's from the answer; "fill" fills an
    # empty one from the person's last 1101, or refuses the trade (the bureau routes 异地 trades by it)
    insuplc: str | None = None

    @property
    def moves_money(self) -> bool:
        return self.kind in (Kind.MONEY, Kind.UNDO_MONEY)

    @property
    def person_ordered(self) -> bool:
        """Money, its reversals and deferred work of one person reach the bureau one at a time, in arrival order."""
        return self.moves_money or self.deferrable or self.kind is Kind.REVERSAL

    def validate(self, input_: dict[str, Any]) -> None:
        missing = [p for p in self.required if not _present(input_, p)]
        if missing:
            raise InvalidInput(f"{self.infno} {self.name}: input is missing {', '.join(missing)}")

    def cancel_input(self, original: dict[str, Any]) -> dict[str, Any]:
        assert self.cancel is not None
        return {node: {k: _lookup(original, v) for k, v in fields.items()}
                for node, fields in self.cancel.input.items()}


def _nodes(input_: dict[str, Any], node: str) -> list[Any]:
    value = input_.get(node)
    if isinstance(value, list):
        return value
    return [value]


def _present(input_: dict[str, Any], path: str) -> bool:
    """Every node of `node` (one, or each of a list) has `name`, neither null nor empty. At C speed: a
    5,000-line upload is checked field by field."""
    node, _, name = path.partition(".")
    items = _nodes(input_, node)
    if not items:
        return False
    try:
        values = [i[name] for i in items]
    except (KeyError, TypeError):  # a node without it, or not an object (null, a number, text, a list)
        return False
    # told by the values' types first: `None in values` compares each value with None (two failed dispatches)
    kinds = set(map(type, values))
    if type(None) in kinds:
        return False
    if kinds == {str}:
        return "" not in values
    return str not in kinds or "" not in [v for v in values if v.__class__ is str]


def _lookup(input_: dict[str, Any], path: str) -> Any:
    """"node.field" names a value in the original input; anything else is a literal."""
    node, dot, name = path.partition(".")
    if not dot or node not in input_:
        return path
    first = _nodes(input_, node)[0]
    return first.get(name) if isinstance(first, dict) else None


VARIANT = re.compile(r"([0-9]{4,6})([A-Z])")  # 2207A, 3203A: a province's variant of the base trade


def variant_base(infno: str) -> str | None:
    m = VARIANT.fullmatch(infno)
    return m.group(1) if m else None


def _refused(infno: str, why: str = "") -> UnknownTrade:
    return UnknownTrade(f"trade {infno} is not in the trade catalog (conf/trades.yaml); not forwarded{why}")


@dataclass
class TradeBook:
    defs: dict[str, TradeDef] = field(default_factory=dict)
    # variants nobody named, derived from their base on first use (never money: see the module's docstring)
    _derived: dict[str, TradeDef] = field(default_factory=dict, repr=False, compare=False)

    def get(self, infno: str) -> TradeDef:
        t = self.defs.get(infno) or self._derived.get(infno)
        if t is not None:
            return t
        base = self.defs.get(variant_base(infno) or "")
        if base is None:
            raise _refused(infno)
        if base.moves_money:
            raise _refused(infno, f": a variant of {base.infno} {base.name} would move money, and fep must know "
                                  f"every money trade from the start (refund order, reconciliation); define "
                                  f"{infno} in conf/trades.yaml")
        t = self._derived[infno] = replace(base, infno=infno, name=_variant_name(base.name, infno))
        return t

    @classmethod
    def load(cls, path: Path, overrides: dict[str, dict[str, Any]] | None = None) -> TradeBook:
        doc = read_yaml(path, "trade catalog", TradesError)
        if not isinstance(doc, dict) or not isinstance(doc.get("trades"), dict):
            raise TradesError(f"trade catalog {path} must have a `trades:` mapping")
        where = f"{path}: "
        _known(doc, CATALOG_KEYS, where)
        defaults = doc.get("defaults") or {}
        raw = {str(k): v or {} for k, v in doc["trades"].items()}
        overrides = {str(k): v or {} for k, v in (overrides or {}).items()}
        _known(defaults, trade_keys(), where, "defaults.")
        _typed(defaults, where, "defaults.")
        for infno, spec in raw.items():
            _known(spec, trade_keys(), where, f"trades.{infno}.")
            _typed(spec, where, f"trades.{infno}.")
            _known(spec.get("cancel") if isinstance(spec, dict) else None, CANCEL_KEYS, where,
                   f"trades.{infno}.cancel.")
        for infno, spec in overrides.items():
            _known(spec, trade_keys(), "", f"trade_overrides.{infno}.")
            _typed(spec, "", f"trade_overrides.{infno}.")
            _known(spec.get("cancel") if isinstance(spec, dict) else None, CANCEL_KEYS, "",
                   f"trade_overrides.{infno}.cancel.")
        for infno in overrides:  # an override may name a variant the catalog does not list: it is known from now
            if infno not in raw:
                if variant_base(infno) not in raw:
                    raise TradesError(f"trade_overrides names trade {infno}, which is not in the trade catalog {path}")
                raw[infno] = {}
        trades = {}
        for infno, own in raw.items():
            base = variant_base(infno) or ""
            # a variant: its base as configured (with the base's overrides), then what is said of the variant itself
            inherited = {**raw[base], **overrides.get(base, {})} if base in raw else {}
            spec = {**defaults, **inherited, **own, **overrides.get(infno, {})}
            if inherited and "name" not in own and "name" not in overrides.get(infno, {}):
                spec["name"] = _variant_name(str(inherited.get("name", "")), infno)
            trades[infno] = _trade(infno, spec, path)
        for t in trades.values():
            if t.cancel and t.cancel.infno not in trades:
                raise TradesError(f"{path}: trade {t.infno} is cancelled by {t.cancel.infno}, which is not defined")
        if any(t.on_unknown is OnUnknown.REVERSE for t in trades.values()) and "2601" not in trades:
            raise TradesError(f"{path}: trades are resolved by 2601 reversal but 2601 is not defined")
        return cls(trades)


CATALOG_KEYS = ("defaults", "trades")
CANCEL_KEYS = ("infno", "input")


def trade_keys() -> list[str]:
    """What may be said of a trade (in the catalog, its defaults or trade_overrides): TradeDef's fields."""
    return [f.name for f in fields(TradeDef) if f.name != "infno"]


def _known(doc: Any, known: list[str] | tuple[str, ...], where: str, prefix: str = "") -> None:
    """Refuse a key not in `known`, naming the nearest that is (a typo like `timout:` was silently ignored).
    `where` names the file, `prefix` the key's place in it (trades.2207.)."""
    if not isinstance(doc, dict):
        return
    for key in doc:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{near[0]}?" if near else f"the keys are {', '.join(known)}"
            raise TradesError(f"{where}{prefix}{key} is not a known key; {hint}")


def _number(v: Any) -> bool:
    """A number, or text that is one ("30"), as the config's keys take it; never true/false (yes is not 1 s)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return False
    try:
        float(v)
    except ValueError:
        return False
    return True


def _text(v: Any) -> bool:
    return isinstance(v, (str, int)) and not isinstance(v, bool)


def _one_of(kind: type[StrEnum]) -> tuple[str, Any]:
    return f"one of {', '.join(kind)}", lambda v: v in set(kind)


# What each setting of a trade must be (in the catalog, its defaults, trade_overrides): the type named in the
# error, as the config's keys are (fep.config.KEYS). A setting left empty is as if it were not given.
SETTING_TYPES: dict[str, tuple[str, Any]] = {
    "name": ("text", _text), "kind": _one_of(Kind), "timeout": ("a number of seconds", _number),
    "deferrable": ("true or false", lambda v: isinstance(v, bool)), "on_unknown": _one_of(OnUnknown),
    "cancel": ("a mapping (infno, input)", lambda v: isinstance(v, dict)),
    "required": ("a list of node.field paths", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "confirm_within": ("a number of seconds", _number), "path": ("text", _text), "map_codes": ("text", _text),
    "check_diagnoses": ("text", _text), "from_his": _one_of(FromHis), "output": ("text", _text),
    "insuplc": ("text", _text),
}


def _typed(doc: Any, where: str, prefix: str) -> None:
    """Refuse a setting of the wrong type, naming it and the type expected (`timeout: thirty` was Python's
    "could not convert string to float", and `timeout: true` a one-second timeout)."""
    if not isinstance(doc, dict):
        return
    for key, value in doc.items():
        expected, fits = SETTING_TYPES[key]
        if value is not None and not fits(value):
            raise TradesError(f"{where}{prefix}{key} must be {expected}, got {value!r}")


def _variant_name(base_name: str, infno: str) -> str:
    return f"{base_name}({infno})"


def _paths(required: tuple[str, ...], field_name: str) -> bool:
    return any(p.partition(".")[2] == field_name for p in required)


PATH = re.compile(r"[A-Za-z_]+\.[A-Za-z_]+")  # "node.field" in a cancel's input; anything else is a literal


def _trade(infno: str, spec: dict[str, Any], path: Path) -> TradeDef:
    where = f"{path}: trade {infno}"
    try:
        cancel = spec.get("cancel")
        t = TradeDef(
            infno=infno,
            name=str(spec["name"]),
            kind=Kind(spec["kind"]),
            timeout=float(spec["timeout"]),
            deferrable=bool(spec["deferrable"]),
            on_unknown=OnUnknown(spec["on_unknown"]),
            cancel=CancelSpec(str(cancel["infno"]), cancel["input"]) if cancel else None,
            required=tuple(spec.get("required") or ()),
            confirm_within=float(spec["confirm_within"]) if spec.get("confirm_within") else None,
            path=spec.get("path"),
            map_codes=spec.get("map_codes"),
            check_diagnoses=spec.get("check_diagnoses") or None,
            from_his=FromHis(spec.get("from_his", "trade")),
            output=str(spec.get("output", "data")),
            insuplc=spec.get("insuplc"),
        )
    except KeyError as e:
        raise TradesError(f"{where}: missing {e.args[0]}") from None
    except (ValueError, TypeError) as e:
        raise TradesError(f"{where}: {e}") from None
    if t.insuplc not in (None, "remember", "fill"):
        raise TradesError(f"{where}: insuplc must be remember or fill, got {t.insuplc!r}")
    if t.on_unknown is OnUnknown.CANCEL and t.cancel is None:
        raise TradesError(f"{where}: on_unknown is cancel but no `cancel:` is given")
    if t.timeout <= 0:
        raise TradesError(f"{where}: timeout must be positive")
    if t.deferrable and t.kind in (Kind.QUERY, Kind.MONEY, Kind.UNDO_MONEY, Kind.COMPUTE, Kind.FILE, Kind.SESSION,
                                   Kind.REVERSAL):
        raise TradesError(f"{where}: a {t.kind} trade cannot be deferred (its answer is needed now)")
    if t.deferrable and not _paths(t.required, "psn_no"):
        raise TradesError(f"{where}: deferred work waits in its insured person's queue, so a deferrable trade "
                          f"must require the person's psn_no")
    if t.kind is Kind.MONEY and t.on_unknown is OnUnknown.RESEND:
        raise TradesError(f"{where}: the unknown outcome of a money trade is never resolved by sending it again; "
                          f"use reverse, cancel or person")
    if t.on_unknown is OnUnknown.REVERSE and not _paths(t.required, "psn_no"):
        raise TradesError(f"{where}: its 2601 reversal carries the original's psn_no, so it must require psn_no")
    if t.cancel is not None:
        loose = sorted(v for fields in t.cancel.input.values() for v in fields.values()
                       if isinstance(v, str) and PATH.fullmatch(v) and v not in t.required)
        if loose:
            raise TradesError(f"{where}: its cancel {t.cancel.infno} is built from {', '.join(loose)}, which the "
                              f"trade does not require")
    return t
