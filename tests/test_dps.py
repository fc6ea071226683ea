"""DPS: strength schedules, the drift's direction and caps, through-the-network gradients and the inner optax
refinement of x0_hat."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from guidance.dps import DPS, Strength, cap_per_atom, drift, refine_x0
from guidance.objective import Objective, Term
from guidance.sampler import Step
from observables.base import AtomInfo
from observables.linear import LinearGaussian
from predictors.base import AtomLayout, NoiseSchedule


def linear_objective(n_atoms=2, seed=0):
    rng = np.random.default_rng(seed)
    layout = AtomLayout(["A"] * n_atoms, np.arange(1, n_atoms + 1), ["GLY"] * n_atoms, ["CA"] * n_atoms, ["C"] * n_atoms)
    a = rng.normal(size=(4, 3 * n_atoms))
    y = rng.normal(size=4)
    obs = LinearGaussian(AtomInfo.from_layout(layout), a, y, noise=1.0)
    return Objective([Term("linear_gaussian", obs)], n_members=1), a, y


def test_strength_schedules_are_zero_outside_the_window_and_ramp_inside():
    n = 11
    const = Strength(2.0, "constant", 0.2, 0.8)
    assert const(0, n) == 0.0 and const(10, n) == 0.0 and const(5, n) == 2.0
    lin = Strength(2.0, "linear", 0.0, 1.0)
    assert lin(0, n) == 0.0 and lin(10, n) == pytest.approx(2.0) and lin(5, n) == pytest.approx(1.0)
    cos = Strength(2.0, "cosine", 0.0, 1.0)
    assert cos(5, n) == pytest.approx(1.0) and cos(2, n) < lin(2, n)
    with pytest.raises(ValueError):
        Strength(1.0, "exponential")
    with pytest.raises(ValueError):
        Strength(1.0, "constant", 0.9, 0.1)


def test_drift_climbs_the_likelihood_and_respects_both_caps():
    """The drift is along the log-likelihood gradient; no atom moves more than max_step nor more than the noise
    level falls in the step."""
    objective, _, _ = linear_objective()
    x0 = torch.zeros(1, 2, 3)
    total, grad, _ = objective(x0)
    step = Step(index=5, sigma=2.0, sigma_next=1.7, gamma=0.0, t_hat=2.0, noise_std=0.0)
    sched = NoiseSchedule()
    d = drift(DPS(Strength(100.0), max_step=10.0), step, 10, sched, x0, x0, grad)
    assert float((d * grad).sum()) > 0
    assert float(d.norm(dim=-1).max()) <= 0.3 + 1e-6  # t_hat - sigma_next
    d = drift(DPS(Strength(100.0), max_step=0.1), step, 10, sched, x0, x0, grad)
    assert float(d.norm(dim=-1).max()) <= 0.1 + 1e-6
    small = drift(DPS(Strength(1e-4), max_step=10.0), step, 10, sched, x0, x0, grad)
    jac = sched.sigma_data**2 / (sched.sigma_data**2 + 4.0)
    expected = 1e-4 * sched.step_scale * 0.3 * 2.0 * jac * grad  # s (t_hat - sigma_next) t_hat J lambda grad
    assert torch.allclose(small, expected, rtol=1e-5, atol=1e-12)


def test_cap_per_atom_shortens_only_long_displacements():
    d = torch.tensor([[[3.0, 4.0, 0.0], [0.1, 0.0, 0.0]]])
    capped = cap_per_atom(d, 1.0)
    assert capped[0, 0].norm().item() == pytest.approx(1.0)
    assert torch.equal(capped[0, 1], d[0, 1])


def test_inner_optax_steps_raise_the_likelihood_of_x0_hat():
    objective, a, y = linear_objective()
    x0 = torch.zeros(3, 2, 3)
    before, _ = objective.value(x0)
    after, _ = objective.value(refine_x0(x0, objective, steps=20, lr=0.1))
    assert bool((after > before).all())


@pytest.mark.parametrize("gradient", ["tweedie", "network"])
def test_guided_samples_fit_the_data_better_than_unguided_ones(gradient):
    """DPS with either gradient (at x0_hat, or back-propagated through the exact denoiser) moves samples of a
    Gaussian prior towards the data: higher mean log-likelihood than unguided samples drawn with the same seed."""
    from guidance import fk as fk_mod
    from guidance.sampler import initial_noise, plan
    from predictors.reference import ReferencePrior

    objective, _, _ = linear_objective()
    layout = AtomLayout(["A"] * 2, [1, 2], ["GLY"] * 2, ["CA"] * 2, ["C"] * 2)
    prior = ReferencePrior(layout, np.zeros((1, 2, 3)), tau=1.0,
                           schedule=NoiseSchedule(gamma_min=0.0, gamma_0=0.3, noise_scale=1.0, step_scale=1.0))
    steps = plan(prior.schedule, 30)
    means = {}
    for name, dps in (("none", None), ("dps", DPS(Strength(1.0), gradient=gradient, max_step=10.0))):
        gen = torch.Generator().manual_seed(0)
        x = initial_noise((256, 2, 3), steps[0].sigma, gen)
        res = fk_mod.steer(prior.denoise, x, steps, prior.schedule, gen, n_particles=256, n_members=1,
                           objective=objective if dps else None, dps=dps)
        total, _ = objective.value(res.particles.reshape(256, 2, 3))
        means[name] = float(total.mean())
    assert means["dps"] > means["none"] + 1.0
