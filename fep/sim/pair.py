"""`scripts/run --ha`: the development pair on one machine, as on two. A PostgreSQL server under var/pg (kept
between runs, started with the distribution's binaries), node a and node b of fep sharing its journal, and
the bureau simulator. Node a listens for the HIS on 8097, node b on 8098; each has its own sockets and files
under var/a and var/b. Ctrl-C stops everything."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from fep.sim.postgres import Postgres
from fep.sim.world import ROOT

PORTS = {"a": (8097, 9464), "b": (8098, 9465)}  # HIS TCP, metrics
DB = "fep"


def node_config(base: dict[str, Any], name: str, url: str, var: Path) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    his, metrics = PORTS[name]
    doc["his"].update(tcp_port=his, unix=str(var / name / "run" / "his.sock"))
    doc["admin"] = {**(doc.get("admin") or {}), "unix": str(var / name / "run" / "admin.sock"), "metrics_port": metrics}
    doc["journal"].update(url=url, node=f"{name} 127.0.0.1:{his}", path=str(var / name / "lib" / "local.db"))
    doc.pop("backup", None)  # the journal is PostgreSQL's to back up (README, "Two boxes (PostgreSQL)")
    doc["trades"] = str(ROOT / "conf" / "trades.yaml")
    return doc


def main() -> int:
    var = ROOT / "var"
    server = Postgres(var / "pg", port=5439).start()
    try:
        url = server.url(DB)
        if not _exists(server):
            server.new_database(DB)
        base = yaml.safe_load((ROOT / "conf" / "fep.yaml").read_text())
        procs = [subprocess.Popen([sys.executable, "-m", "fep.cli", "sim", "--config", str(ROOT / "conf" / "sim.yaml")],
                                  cwd=ROOT)]
        time.sleep(1.0)
        for name in PORTS:
            path = var / name / "fep.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(node_config(base, name, url, var), allow_unicode=True))
            procs.append(subprocess.Popen([sys.executable, "-m", "fep.cli", "run", "--config", str(path)], cwd=ROOT))
        print(f"""fep pair starting: journal {url}
  node a: HIS http://127.0.0.1:8097, admin var/a/run/admin.sock
  node b: HIS http://127.0.0.1:8098, admin var/b/run/admin.sock
Which leads:   .venv/bin/fep status --check --role leader --admin var/a/run/admin.sock
Fail over:     kill -9 the leader's process; the other node leads within seconds.""", flush=True)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:
            while not stop and all(p.poll() is None for p in procs[:1]):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        return 0
    finally:
        server.stop()


def _exists(server: Postgres) -> bool:
    import psycopg

    with psycopg.connect(server.url(), autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB,)).fetchone() is not None


if __name__ == "__main__":
    sys.exit(main())
