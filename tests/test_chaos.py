"""A short chaos run is part of the suite; scripts/chaos runs long ones (README)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_a_short_chaos_run_loses_nothing_and_charges_nobody_twice(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "fep.sim.chaos", "--trades", "250", "--kills", "2", "--seed", "11",
                          "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "lost: 0" in run.stdout and "kills: 2" in run.stdout
