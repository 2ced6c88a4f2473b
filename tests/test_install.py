"""fep installed on a hospital's box as an operator would: every import declared, the distribution's Python,
and a start as the service user the way systemd runs it."""

from __future__ import annotations

import ast
import configparser
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from fep.sim.world import ROOT

# The test harness (World) is shipped in fep/sim for scripts/chaos and the tests; it alone may use the test extra.
HARNESS = {ROOT / "fep" / "sim" / "world.py"}


def _declared(option: str) -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [l.strip() for l in cfg["options" if option == "install_requires" else "options.extras_require"][
        option].splitlines()]
    return {canonicalize_name(Requirement(l).name) for l in lines if l and not l.startswith("#")}


def _imports(path: Path) -> set[str]:
    """Top-level modules a file imports (absolute imports only: relative ones are fep's own)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names - {"fep", "__future__"} - set(sys.stdlib_module_names)


def test_every_package_fep_imports_is_declared_in_setup_cfg() -> None:
    runtime, test_extra = _declared("install_requires"), _declared("test")
    providers = packages_distributions()
    missing = []
    for path in sorted((ROOT / "fep").rglob("*.py")):
        allowed = runtime | (test_extra if path in HARNESS else set())
        for module in sorted(_imports(path)):
            dists = {canonicalize_name(d) for d in providers.get(module, [module])}
            if not dists & allowed:
                missing.append(f"{path.relative_to(ROOT)} imports {module} ({', '.join(sorted(dists))})")
    assert not missing, "undeclared in setup.cfg install_requires:\n" + "\n".join(missing)
