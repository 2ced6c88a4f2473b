"""A throwaway PostgreSQL server for tests, scripts/run --ha and scripts/chaos --ha.

A cluster of its own (initdb) in a directory of its own, on a free loopback port, started and stopped with
the distribution's binaries (pg_ctl). PostgreSQL refuses to run as root: as root, the cluster belongs to
`nobody` and its commands run through runuser. Durability is as in production (fsync, synchronous_commit).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

USER = "fep"  # the cluster's superuser, trusted on loopback: a throwaway server holds nothing secret
RUN_AS = "nobody"


class Unavailable(Exception):
    """The PostgreSQL server binaries are not here and cannot be installed; the message says why."""


def bindir() -> Path | None:
    """Where initdb and pg_ctl are: Debian's /usr/lib/postgresql/N/bin (the newest N), else the PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def install() -> Path:
    """The binaries, installed from Debian's packages when missing (as root, with apt-get)."""
    where = bindir()
    if where is not None:
        return where
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable("the PostgreSQL server binaries (initdb, pg_ctl) are not installed, and installing "
                          "them needs root and apt-get: apt-get install postgresql")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                                  "postgresql"]):
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            break
    where = bindir()
    if where is None:
        raise Unavailable("apt-get install postgresql did not bring initdb and pg_ctl")
    return where


class Postgres:
    """One cluster: `start`, `url(db)` for a new database, `restart` (chaos), `stop`."""

    def __init__(self, where: Path | None = None, port: int | None = None) -> None:
        """`where`: the cluster's directory, kept between runs (scripts/run --ha); None: a new temporary one."""
        from fep.sim.world import free_port

        self.bin = install()
        # A directory the server's user can reach (a test's tmp dir is root's, 0700).
        self.dir = where or Path(tempfile.mkdtemp(prefix="fep-pg-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.data = self.dir / "data"
        self.port = port or free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.dir, RUN_AS)
        if not (self.data / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-instructions")
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write("include_if_exists = 'fep.conf'\n")
        # Written at each start: the port is chosen anew. fep.conf belongs to root; the server only reads it.
        (self.data / "fep.conf").write_text(
            f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.dir}'\n"
            "fsync = on\nsynchronous_commit = on\nmax_connections = 200\n")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self._as_root:
            cmd = ["runuser", "-u", RUN_AS, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.dir)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stderr or done.stdout}")

    def start(self) -> Postgres:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-t", "60", "start")
        return self

    def restart(self) -> None:
        """As after a crash of the server: every session ends at once (immediate), then it recovers from WAL."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self.start()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{db}"

    def new_database(self, name: str) -> str:
        """A fresh, empty database; its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
