"""Slow check (python -m pytest -q -m slow): the demo's recovery of the minor state is not a lucky seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo_seeds.py"


@pytest.mark.slow
def test_fk_recovers_the_minor_state_for_most_seeds(tmp_path):
    """Over seeds 0-4, guided FK puts >= 0.25 of the ensemble weight on state B in at least 4 runs; unguided
    sampling (whose sharpened prior gives B < 1 %) does so in at most 1."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "0", "1", "2", "3", "4", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["fk"]["runs"] == 5 and summary["none"]["runs"] == 5
    assert summary["fk"]["b_fraction_ge_0.25"] >= 4
    assert summary["none"]["b_fraction_ge_0.25"] <= 1
    assert summary["fk"]["mean_rscc"] > summary["none"]["mean_rscc"]
