from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from fep import pki
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
