"""fep installed on a hospital's box as an operator would: every import declared, the distribution's Python,
and a start as the service user the way systemd runs it."""

from __future__ import annotations

import ast
import configparser
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import packages_distributions, version
from pathlib import Path
from typing import Any, Iterator

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from fep import pki
from fep.sim.world import ROOT, ZHANG, Visit, World
from tests.test_operations import NotifySocket

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


SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # what systemd gives a service


def _cannot_install() -> str:
    if os.geteuid() != 0:
        return "installing needs root (the fep user, setpriv)"
    with tempfile.TemporaryDirectory() as d:
        if subprocess.run(["/usr/bin/python3", "-m", "venv", f"{d}/v"], capture_output=True).returncode:
            return "/usr/bin/python3 cannot make a venv: apt-get install python3-venv (.ci/run does)"
    return ""


CANNOT_INSTALL = _cannot_install()


def sh(*cmd: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert run.returncode == 0, f"{' '.join(map(str, cmd))}:\n{run.stdout}\n{run.stderr}"
    return run


def service_settings(unit: Path) -> dict[str, list[str]]:
    """The [Service] settings of a unit file, each with every value given (Environment= may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in unit.read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def as_service_user(settings: dict[str, list[str]], *cmd: str) -> list[str]:
    """`cmd` as systemd starts it: the unit's user and group, the user's groups, no new privileges, and with
    ProtectHome=yes, /root, /home and /run/user empty and closed (in a mount namespace of its own). (Its other
    sandboxing is systemd's alone; PrivateTmp would hide this test's /var/tmp.)"""
    run = ["setpriv", f"--reuid={settings['User'][-1]}", f"--regid={settings['Group'][-1]}", "--init-groups",
           "--no-new-privs", "--", *cmd]
    if settings.get("ProtectHome") != ["yes"]:
        return run
    hide = "for d in /root /home /run/user; do [ ! -d $d ] || mount -t tmpfs -o mode=000 tmpfs $d; done"
    return ["unshare", "--mount", "sh", "-c", f'{hide} && exec "$@"', "sh", *run]


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    """scripts/wheelhouse into a directory kept between runs: only its first build needs the network."""
    path = Path(os.environ.get("FEP_TEST_WHEELHOUSE", "/var/tmp/fep-test-wheelhouse"))
    sh(ROOT / "scripts" / "wheelhouse", path)
    return path


@pytest.fixture
def box() -> Iterator[Path]:
    """A directory the fep user may enter (a pytest tmp_path under /tmp/pytest-of-root is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="fep-install-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.skipif(bool(CANNOT_INSTALL), reason=CANNOT_INSTALL)
def test_installed_offline_from_the_distribution_s_python_fep_starts_as_its_service_user(
        wheelhouse: Path, box: Path) -> None:
    places = {"PREFIX": box / "opt" / "fep", "CONFDIR": box / "etc" / "fep", "BINDIR": box / "bin",
              "UNITDIR": box / "systemd", "RULESDIR": box / "rules"}
    # root's first python3 is a private build the fep user cannot run (here: one that cannot run at all).
    (box / "pyenv").mkdir()
    (box / "pyenv" / "python3").write_text("#!/bin/sh\necho 'not the distribution python' >&2; exit 1\n")
    (box / "pyenv" / "python3").chmod(0o755)
    env = {**os.environ, **{k: str(v) for k, v in places.items()}, "PATH": f"{box / 'pyenv'}:{os.environ['PATH']}"}
    # No network at all: a network namespace of its own, with only a loopback that is down.
    offline = ["unshare", "--net"] if subprocess.run(["unshare", "--net", "true"]).returncode == 0 else []
    sh(*offline, ROOT / "scripts" / "install", "--offline", wheelhouse, env=env)

    prefix, confdir = places["PREFIX"], places["CONFDIR"]
    assert "home = /usr/bin" in (prefix / "pyvenv.cfg").read_text()
    assert sh(places["BINDIR"] / "fep", "--version").stdout.strip() == f"fep {version('fep')}"
    assert f"trades: {confdir}/trades.yaml" in (confdir / "fep.yaml").read_text()
    unit = service_settings(places["UNITDIR"] / "fep.service")
    assert unit["ExecStart"] == [f"{prefix}/bin/fep run --config {confdir}/fep.yaml"]

    # The operator's config: the simulator as the bureau; the key the fep user's own, as the README says.
    pki.generate(box / "pki")
    fep_user = pwd.getpwnam(unit["User"][-1])
    for name in ("hospital.key", "hospital.pem"):
        os.chown(box / "pki" / name, fep_user.pw_uid, fep_user.pw_gid)
    (box / "pki").chmod(0o755)
    (box / "world").mkdir(mode=0o755)
    world = World(box / "world", box / "pki")
    world.configure(fep={"trades": str(confdir / "trades.yaml")})
    shutil.copy(world.fep_config, confdir / "fep.yaml")
    # What StateDirectory= and RuntimeDirectory= give the service.
    for d in ("lib", "run"):
        (world.dir / d).mkdir()
        os.chown(world.dir / d, fep_user.pw_uid, fep_user.pw_gid)

    notify = NotifySocket(box / "notify.sock")
    (box / "notify.sock").chmod(0o666)
    service_env = {"PATH": SERVICE_PATH, "HOME": fep_user.pw_dir, "USER": fep_user.pw_name,
                   "LOGNAME": fep_user.pw_name, "SHELL": fep_user.pw_shell, "NOTIFY_SOCKET": str(box / "notify.sock"),
                   **dict(e.split("=", 1) for e in unit["Environment"])}
    try:
        world.start_sim()
        with open(world.dir / "run.log", "ab") as log:
            world.fep = subprocess.Popen(as_service_user(unit, *shlex.split(unit["ExecStart"][-1])), env=service_env,
                                         cwd=world.dir / "lib", umask=int(unit["UMask"][-1], 8), stdout=log,
                                         stderr=subprocess.STDOUT)
        notify.wait_for("READY=1", timeout=60)
        assert Visit(world.his, ZHANG).identify()["infcode"] == 0
        assert f"Uid:\t{fep_user.pw_uid}" in Path(f"/proc/{world.fep.pid}/status").read_text()

        # An operator in group fep (here the fep user itself) asks through the admin socket.
        status = sh(*as_service_user(unit, str(places["BINDIR"] / "fep"), "status", "--config",
                                     str(confdir / "fep.yaml")), env={"PATH": SERVICE_PATH})
        assert "signed in: yes" in status.stdout
        check = sh(places["BINDIR"] / "fep", "status", "--check", "--config", confdir / "fep.yaml")
        assert check.stdout.startswith("FEP OK"), check.stdout
    finally:
        world.stop()
        print(world.log("run"))


def test_an_environment_the_service_could_not_see_is_refused(tmp_path: Path) -> None:
    """A Python under /root (pyenv's) is hidden from the service by the unit's ProtectHome=yes."""
    refused = subprocess.run([ROOT / "scripts" / "install", "--offline", tmp_path], capture_output=True,
                             text=True, env={**os.environ, "PYTHON": "/root/.pyenv/versions/3.11.7/bin/python3"})
    assert refused.returncode == 1
    assert "ProtectHome=yes hides from the service" in refused.stderr and "/usr/bin/python3" in refused.stderr
