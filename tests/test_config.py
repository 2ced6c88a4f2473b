"""fep.yaml as an operator writes it: a typo or a wrong type is refused naming the key, the nearest known key
and the type expected, before fep starts (or a reload changes anything). No processes: the config alone."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fep import config
from fep.sim.world import ROOT, World
from tests.test_units import write


def refused(tmp: Path, change: dict[str, Any]) -> str:
    with pytest.raises(config.ConfigError) as e:
        config.load(write(tmp, change))
    return str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"his.tcp_prot": 8097}, "his.tcp_prot is not a known key; did you mean his.tcp_port?"),
    ({"tcp_port": 8097}, "tcp_port is not a known key; did you mean his.tcp_port?"),  # written outside its section
    ({"journl": {"path": "x.db"}}, "journl is not a known key; did you mean journal?"),
    ({"bureau.tls.certfile": "h.pem"}, "bureau.tls.certfile is not a known key; did you mean bureau.tls.cert?"),
    ({"bureau.endpoints": [{"url": "https://b:443/", "sever_name": "b"}]},
     "bureau.endpoints[0].sever_name is not a known key; did you mean bureau.endpoints[0].server_name?"),
    ({"schedule.reconcile_at": "02:30"},
     "schedule.reconcile_at is not a known key; did you mean schedule.reconcile_daily_at?"),
    ({"trade_overrides": {"2207": {"timout": 5}}},
     "trade_overrides.2207.timout is not a known key; did you mean trade_overrides.2207.timeout?"),
])
def test_a_typo_is_refused_naming_it_and_the_nearest_known_key(tmp_path: Path, change: dict, message: str) -> None:
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'fep.yaml'))}(:\d+)?: {re.escape(message)}",
                        refused(tmp_path, change))


def test_the_error_names_the_line_the_key_is_on(tmp_path: Path) -> None:
    """As nginx -t does: the operator's own file, comments and all, and the line to go to."""
    lines = (ROOT / "conf" / "fep.yaml").read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if line.startswith("  tcp_port:"))
    lines[n] = lines[n].replace("tcp_port", "tcp_prot")
    lines = [f"trades: {ROOT / 'conf' / 'trades.yaml'}" if line.startswith("trades:") else line for line in lines]
    (tmp_path / "fep.yaml").write_text("\n".join(lines))
    with pytest.raises(config.ConfigError, match=rf":{n + 1}: his.tcp_prot is not a known key"):
        config.load(tmp_path / "fep.yaml")


def test_a_key_like_no_other_is_refused_with_the_keys_of_its_section(tmp_path: Path) -> None:
    message = refused(tmp_path, {"admin.colour": "blue"})
    assert "admin.colour is not a known key; the keys of admin are unix, metrics_host, metrics_port" in message


@pytest.mark.parametrize("change, message", [
    ({"his.tcp_port": "eighty"}, "his.tcp_port must be a whole number, got 'eighty'"),
    ({"his.max_connections": 20.5}, "his.max_connections must be a whole number, got 20.5"),
    ({"his.answer_within": "soon"}, "his.answer_within must be a number, got 'soon'"),
    ({"security.allow_root": "yes please"}, "security.allow_root must be true or false, got 'yes please'"),
    ({"his.allowed_networks": "10.0.0.0/8"}, "his.allowed_networks must be a list of text, got '10.0.0.0/8'"),
    ({"resolution.backoff": [0, "later"]}, "resolution.backoff must be a list of numbers, got [0, 'later']"),
    ({"bureau.tls": "var/pki"}, "bureau.tls must be a mapping (keys ca, cert, key, min_version, ciphers)"),
    ({"reconcile_groups": {"insutype": "310"}}, "reconcile_groups must be a list of mappings"),
    ({"bureau.signin": ["FEP01"]}, "bureau.signin must be a mapping of names to text"),
])
def test_a_wrong_type_is_refused_naming_the_key_and_the_type_expected(tmp_path: Path, change: dict,
                                                                      message: str) -> None:
    assert message in refused(tmp_path, change)


def test_numbers_written_as_text_and_empty_values_are_read_as_an_operator_means_them(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, {"his.tcp_port": "8098", "his.max_body": None, "admin": None}))
    assert cfg.his.tcp_port == 8098
    assert cfg.his.max_body == 32 << 20  # empty: the default, as if the line were not there
    assert cfg.admin.unix == Path.cwd() / "/run/fep/admin.sock"


def test_the_old_name_answer_budget_still_works_and_is_not_given_with_the_new_one(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, {"his.answer_within": None, "his.answer_budget": 5})).his.answer_within == 5
    assert "his.answer_budget is the old name of his.answer_within: give only his.answer_within" in refused(
        tmp_path, {"his.answer_budget": 5})


def test_a_typo_in_the_trade_catalog_is_refused_naming_the_trade_and_the_nearest_key(tmp_path: Path) -> None:
    catalog = yaml.safe_load((ROOT / "conf" / "trades.yaml").read_text())
    catalog["trades"]["2207"]["on_unknwon"] = "reverse"
    (tmp_path / "trades.yaml").write_text(yaml.safe_dump(catalog, allow_unicode=True))
    message = refused(tmp_path, {"trades": str(tmp_path / "trades.yaml")})
    assert "trades.2207.on_unknwon is not a known key; did you mean trades.2207.on_unknown?" in message


def test_the_shipped_configs_and_the_test_world_s_load(world: World) -> None:
    """A key fep reads but config.KEYS does not list makes these fail: the list is the one to extend."""
    production = yaml.safe_load((ROOT / "conf" / "fep.production.yaml").read_text())
    production["trades"] = str(ROOT / "conf" / "trades.yaml")  # /etc/fep/trades.yaml on the host
    (world.dir / "production.yaml").write_text(yaml.safe_dump(production, allow_unicode=True))
    for path in (ROOT / "conf" / "fep.yaml", world.dir / "production.yaml", world.fep_config):
        assert config.load(path).institution.fixmedins_code


class Reads(dict):  # type: ignore[type-arg]
    """A section of the config that notes every key fep asks it for, known or not."""

    def __init__(self, doc: dict[str, Any], keys: dict[str, Any], where: str, seen: set[str]) -> None:
        super().__init__({k: _sections(v, keys.get(k), f"{where}{k}.", seen) for k, v in doc.items()})
        for k, spec in keys.items():  # a section the file leaves out is asked about too
            if isinstance(spec, dict) and k not in doc:
                self[k] = Reads({}, spec, f"{where}{k}.", seen)
        self.where, self.seen = where, seen

    def __bool__(self) -> bool:  # `doc.get("admin") or {}` keeps an empty section, so its reads are noted
        return True

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(self.where + key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.seen.add(self.where + key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.seen.add(f"{self.where}{key}")
        return super().__contains__(key)


def _sections(value: Any, spec: Any, where: str, seen: set[str]) -> Any:
    if isinstance(spec, dict) and isinstance(value, dict):
        return Reads(value, spec, where, seen)
    if isinstance(spec, list) and isinstance(value, list):
        return [Reads(v, spec[0], where, seen) for v in value]
    return value


def test_every_key_fep_reads_is_in_the_one_list_of_known_keys_and_every_listed_key_is_read() -> None:
    path = ROOT / "conf" / "fep.yaml"
    seen: set[str] = set()
    config._build(Reads(config.check(yaml.safe_load(path.read_text())), config.KEYS, "", seen), path, ROOT)
    for style in config.STYLES:  # each region profile reads its own settings and secrets
        doc = yaml.safe_load(path.read_text())
        doc["bureau"]["profile"] = {"style": style, **{k: v or "x" for k, v in config.SETTINGS[style].items()},
                                    "secrets": {name: f"secrets/{name}" for name in config.SECRETS[style]}}
        config._build(Reads(config.check(doc), config.KEYS, "", seen), path, ROOT)
    known = set(config.known_keys())
    assert seen - known == set(), "read by fep.config but not in config.KEYS (add them there)"
    assert known - seen == set(), "in config.KEYS but never read (a key that does nothing)"


def test_the_known_keys_are_named_as_an_operator_writes_them() -> None:
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*", k) for k in config.known_keys())
    assert {"his.tcp_port", "bureau.endpoints.url", "bureau.tls.ca", "reconcile_groups.insutype"} <= set(
        config.known_keys())
