"""A new observable plugs in through the registry with no torch and no change to this repository (the README's
example), and guidance can climb it: batched over particles, differentiable through the bridge."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

import observables
from guidance.objective import Objective, Term
from observables.base import AtomInfo


def _readme_example() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Add your own observable.*?```python\n(.*?)```", text, re.S)
    assert block, "README lost its observable example"
    return block.group(1)


def test_readme_observable_registers_builds_and_guides():
    namespace: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), namespace)  # the README's code, verbatim
    assert "radius_of_gyration" in observables.available()

    n = 5
    atoms = AtomInfo(np.array(["C"] * n), np.array(["CA"] * n), np.array(["GLY"] * n), np.arange(n), np.array(["A"] * n))
    obs = observables.build("radius_of_gyration", atoms, target=3.0, sigma=0.5)
    objective = Objective([Term("radius_of_gyration", obs)], n_members=2)

    x = torch.randn(3 * 2, n, 3, generator=torch.Generator().manual_seed(0)) * 5.0  # 3 particles x 2 members
    total, grad, terms = objective(x)
    assert total.shape == (3,) and grad.shape == x.shape and torch.isfinite(grad).all()
    # one gradient-ascent step raises every particle's log-likelihood
    after, _ = objective.value(x + 1e-3 * grad)
    assert bool((after > total).all())
    rep = objective.reports(x[:2].numpy(), np.array([0.5, 0.5]))
    assert float(rep["radius_of_gyration"]["rg"]) > 0


PLUGIN_MODULE = '''
import jax.numpy as jnp


class RadiusOfGyration:
    """Radius of gyration of the weighted ensemble against a target (A), Gaussian with width sigma (A)."""

    name = "rg"
    headline = ("rg",)

    def __init__(self, atoms, target: float, sigma: float = 0.5):
        self.target, self.sigma = target, sigma

    def predict(self, coords, weights):
        rg2 = ((coords - coords.mean(1, keepdims=True)) ** 2).sum(-1).mean(-1)
        return jnp.sqrt(weights @ rg2)

    def log_likelihood(self, coords, weights):
        return -0.5 * ((self.predict(coords, weights) - self.target) / self.sigma) ** 2

    def report(self, coords, weights):
        return {"rg": self.predict(coords, weights)}
'''

PLUGIN_PYPROJECT = '''
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "eg-rg-plugin"
version = "0.1"

[tool.setuptools]
packages = ["rgplugin"]

[project.entry-points."ensemble_guide.observables"]
rg = "rgplugin.rg:RadiusOfGyration"
'''


def test_an_observable_from_another_package_runs_in_the_app_with_no_file_added_here(tmp_path):
    """A separate package (built and installed here into its own folder) registers an observable by entry point
    only: the app lists its options with their defaults, takes overrides on the command line and scores a structure
    with it; this repository's config tree is unchanged."""
    import json
    import os
    import subprocess
    import sys

    from guidance.app.job import config_dir
    from structures import TRIPEPTIDE_P1_PDB  # tests/structures.py

    repo = Path(__file__).resolve().parents[1]
    before = sorted(p.relative_to(config_dir()) for p in Path(config_dir()).rglob("*"))
    pkg = tmp_path / "pkg"
    (pkg / "rgplugin").mkdir(parents=True)
    (pkg / "rgplugin" / "__init__.py").write_text("")
    (pkg / "rgplugin" / "rg.py").write_text(PLUGIN_MODULE)
    (pkg / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(pkg)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}

    shown = subprocess.run([sys.executable, "-m", "guidance.app", "--cfg", "job", "observables=[rg]"],
                           capture_output=True, text=True, timeout=300, env=env, cwd=repo)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "rg:" in shown.stdout and "target: ???" in shown.stdout and "sigma: 0.5" in shown.stdout

    structure = tmp_path / "tripeptide.pdb"
    structure.write_text(TRIPEPTIDE_P1_PDB)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "guidance.app", "mode=score", f"structure={structure}",
                           "observables=[rg]", "observables.rg.target=3.0", "observables.rg.sigma=0.25",
                           f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=300, env=env, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rg = metrics["observables"]["rg"]
    assert 1.0 < rg["rg"] < 10.0 and metrics["config"]["observables"]["rg"]["sigma"] == 0.25
    assert "'rg': {'rg':" in proc.stderr  # its headline in the final log line
    assert sorted(p.relative_to(config_dir()) for p in Path(config_dir()).rglob("*")) == before
