from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest

from fep import pki
from fep.sim.postgres import Postgres, Unavailable
from fep.sim.world import World


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.generate(d)
    pki.generate(d, prefix="foreign-")  # a second CA the bureau does not trust
    return d


@pytest.fixture
def world(tmp_path: Path, pki_dir: Path) -> Iterator[World]:
    """Configured but not started: a test may change the configuration first."""
    w = World(tmp_path, pki_dir)
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture
def running(world: World) -> World:
    return world.start()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One throwaway PostgreSQL server for the whole run (its binaries installed when missing, as root);
    each test takes a database of its own from it."""
    try:
        server = Postgres().start()
    except Unavailable as e:
        pytest.skip(f"no PostgreSQL to test against: {e}")
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    """A fresh, empty database on the test server."""
    return postgres.new_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", "postgresql"])
def journal_url(request: pytest.FixtureRequest) -> str | None:
    """The journal's backend: None for SQLite (journal.path), a PostgreSQL URL (journal.url) otherwise.
    A test that takes it runs on both."""
    return None if request.param == "sqlite" else request.getfixturevalue("pg_url")
