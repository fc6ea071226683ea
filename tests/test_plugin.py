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
