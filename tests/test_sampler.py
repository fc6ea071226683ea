"""The AF3/EDM sampler: its noise schedule, its churn plan, its rigid-body helpers, and that with an exact denoiser and
noise_scale = step_scale = 1 it draws from the prior (the reference Gaussian-mixture prior supplies the exact
denoiser, so every deviation is the sampler's).

Statistical tolerances are 4 to 5 standard errors of the sample size used; the deterministic discretisation bias of
the sampler at the chosen step counts is measured (in the comments) and kept well inside them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from guidance.sampler import Sampling, initial_noise, kabsch_align, karras_sigmas, plan, random_rotations, sample
from predictors.base import AtomLayout, NoiseSchedule
from predictors.reference import ReferencePrior

# The settings under which the EDM sampler targets the prior: no sharpening (noise_scale = step_scale = 1), a moderate
# churn at every noise level, second-order steps (as in scripts/validate_posterior.py).
UNBIASED = NoiseSchedule(gamma_0=0.3, gamma_min=0.0, noise_scale=1.0, step_scale=1.0)


def layout(n: int) -> AtomLayout:
    return AtomLayout(["A"] * n, np.arange(1, n + 1), ["GLY"] * n, ["CA"] * n, ["C"] * n)


def draw(prior: ReferencePrior, n: int, steps: int, seed: int = 0, solver: str = "heun") -> torch.Tensor:
    sched = prior.schedule
    pl = plan(sched, steps)
    gen = torch.Generator().manual_seed(seed)
    x = initial_noise((n, len(prior.layout), 3), pl[0].sigma, gen)
    return sample(prior.denoise, x, pl, sched, gen, sampling=Sampling(solver=solver))


# ------------------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize("n_steps", [2, 7, 200])
def test_karras_sigmas_follow_the_rho_schedule(n_steps):
    """sigma_i^(1/rho) is linear in i from (sigma_data sigma_max)^(1/rho) to (sigma_data sigma_min)^(1/rho), the levels
    decrease strictly, and a final 0 is appended."""
    s = NoiseSchedule()
    sig = karras_sigmas(s, n_steps)
    assert sig.shape == (n_steps + 1,) and sig.dtype == torch.float64
    assert sig[-1].item() == 0.0
    assert sig[0].item() == pytest.approx(s.sigma_data * s.sigma_max, rel=1e-12)
    assert sig[-2].item() == pytest.approx(s.sigma_data * s.sigma_min, rel=1e-10)
    assert bool((sig[1:] < sig[:-1]).all())
    root = (sig[:-1] / s.sigma_data) ** (1.0 / s.rho)
    expected = np.linspace(s.sigma_max ** (1.0 / s.rho), s.sigma_min ** (1.0 / s.rho), n_steps)
    np.testing.assert_allclose(root.numpy(), expected, rtol=1e-12)


def test_karras_sigmas_need_two_steps():
    with pytest.raises(ValueError, match="at least 2 steps"):
        karras_sigmas(NoiseSchedule(), 1)


def test_plan_churns_while_the_next_level_is_above_gamma_min():
    """gamma = gamma_0 exactly on the steps whose *next* noise level exceeds gamma_min (AF3/Boltz), t_hat =
    sigma (1 + gamma) and the churn noise has std noise_scale sqrt(t_hat^2 - sigma^2); the last step (to 0) never
    churns."""
    s = NoiseSchedule()  # AF3 defaults: gamma_0 = 0.8, gamma_min = 1 A, noise_scale = 1.003
    n = 50
    sig = karras_sigmas(s, n).tolist()
    steps = plan(s, n)
    assert [st.index for st in steps] == list(range(n))
    churned = [st.gamma > 0 for st in steps]
    assert churned == [sig[i + 1] > s.gamma_min for i in range(n)]
    assert any(churned) and not all(churned)  # the schedule crosses gamma_min, so both cases are exercised
    # a step whose own level is above gamma_min but whose next level is not: no churn (the "next level" convention)
    crossing = next(st for st in steps if st.sigma > s.gamma_min >= st.sigma_next)
    assert crossing.gamma == 0.0
    for st in steps:
        assert st.sigma == sig[st.index] and st.sigma_next == sig[st.index + 1]
        assert st.gamma in (0.0, s.gamma_0)
        assert st.t_hat == pytest.approx(st.sigma * (1 + st.gamma), rel=1e-12)
        assert st.noise_std == pytest.approx(s.noise_scale * math.sqrt(st.t_hat**2 - st.sigma**2), rel=1e-12, abs=0)
    assert steps[-1].sigma_next == 0.0 and steps[-1].gamma == 0.0 and steps[-1].noise_std == 0.0


def test_plan_start_step_is_the_tail_of_the_full_plan():
    """Partial diffusion from step k runs exactly the last n - k steps of the full run."""
    s = NoiseSchedule()
    full = plan(s, 30)
    assert plan(s, 30, start_step=12) == full[12:]
    assert plan(s, 30, start_step=29) == full[29:]
    for bad in (-1, 30):
        with pytest.raises(ValueError, match="start_step"):
            plan(s, 30, start_step=bad)


# ------------------------------------------------------------------------------------------------ rigid motions


def test_random_rotations_are_proper_rotations():
    """R R^T = I and det R = +1 for every draw (no reflections)."""
    rot = random_rotations(1000, torch.Generator().manual_seed(0), dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand(1000, 3, 3)
    assert torch.allclose(rot @ rot.transpose(-1, -2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(1000, dtype=torch.float64), atol=1e-12)


def test_random_rotations_are_uniform_on_so3():
    """For Haar-uniform rotations every matrix entry has mean 0 and variance 1/3, and a rotated unit vector is uniform
    on the sphere (second moment I/3).  With n = 20000 draws the standard error of an entry's mean is
    sqrt(1/3 / n) = 0.0041 and that of E[v v^T] entries is at most sqrt(1/5 / n) = 0.0032 (E[v_i^4] = 1/5); a bound of
    5 standard errors (0.021, 0.016) would still catch e.g. the non-uniform 'normalised Gaussian Euler angles'."""
    n = 20000
    rot = random_rotations(n, torch.Generator().manual_seed(1), dtype=torch.float64)
    assert rot.mean(0).abs().max().item() < 5 * math.sqrt(1 / 3 / n)
    assert ((rot**2).mean(0) - 1 / 3).abs().max().item() < 5 * math.sqrt(4 / 45 / n)  # Var(R_ij^2) = 1/5 - 1/9
    v = rot[:, :, 2]  # R e_z
    second = torch.einsum("ni,nj->ij", v, v) / n
    assert (second - torch.eye(3, dtype=torch.float64) / 3).abs().max().item() < 5 * math.sqrt(1 / 5 / n)


def test_kabsch_align_recovers_a_rigid_motion():
    """A structure moved by a random rotation and translation is superposed back onto the original exactly, for each
    member of a batch, with and without per-atom weights."""
    gen = torch.Generator().manual_seed(2)
    target = torch.randn(5, 12, 3, generator=gen, dtype=torch.float64) * 4.0
    rot = random_rotations(5, gen, dtype=torch.float64)
    shift = 10.0 * torch.randn(5, 1, 3, generator=gen, dtype=torch.float64)
    mobile = torch.einsum("bij,bnj->bni", rot, target) + shift
    assert (mobile - target).abs().max() > 1.0
    np.testing.assert_allclose(kabsch_align(mobile, target).numpy(), target.numpy(), atol=1e-9)
    weights = torch.rand(12, generator=gen, dtype=torch.float64) + 0.1
    np.testing.assert_allclose(kabsch_align(mobile, target, weights).numpy(), target.numpy(), atol=1e-9)


def test_kabsch_align_never_reflects():
    """Superposing a structure onto its mirror image gives a proper rotation: the result keeps the mobile's internal
    distances and handedness (it cannot reach the mirror image exactly)."""
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(1, 8, 3, generator=gen, dtype=torch.float64)
    mirror = target * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    out = kabsch_align(mirror, target)
    np.testing.assert_allclose(torch.cdist(out, out).numpy(), torch.cdist(mirror, mirror).numpy(), atol=1e-9)

    def handedness(x):
        c = x[0] - x[0].mean(0)
        return torch.sign(torch.linalg.det(c[:3]))

    assert handedness(out) == handedness(mirror)
    assert (out - target).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ sampling the prior


def test_unguided_sampler_reproduces_a_gaussian_prior():
    """With the exact denoiser of N(mu, tau^2 I) (2 atoms, 6 coordinates), Heun steps, churn gamma_0 = 0.3 at every
    level and noise_scale = step_scale = 1, samples have mean mu and variance tau^2.

    n = 4096 samples: the standard error of a coordinate mean is tau / sqrt(n) = 0.016 A, of a coordinate's variance
    ratio sqrt(2 / n) = 0.022, of the ratio averaged over 6 coordinates 0.009.  Tolerances: 4 standard errors (0.0625 A
    per coordinate mean; 0.09 per-coordinate and 0.036 averaged variance ratio).  The sampler's own discretisation bias
    in the variance at 400 steps is +0.005 (measured with 10^5 samples; it shrinks ~3/n_steps), well inside."""
    tau, n = 1.0, 4096
    mu = np.array([[1.0, 2.0, 3.0], [4.0, -1.0, 0.5]])
    prior = ReferencePrior(layout(2), mu, tau=tau, schedule=UNBIASED, dtype=torch.float32)
    x = draw(prior, n, steps=400).reshape(n, -1).double().numpy()
    assert np.isfinite(x).all()
    se_mean = tau / math.sqrt(n)
    assert np.abs(x.mean(0) - mu.ravel()).max() < 4 * se_mean
    ratio = x.var(0, ddof=1) / tau**2
    assert np.abs(ratio - 1).max() < 4 * math.sqrt(2 / n)
    assert abs(ratio.mean() - 1) < 4 * math.sqrt(2 / n) / math.sqrt(6)


def test_unguided_sampler_reproduces_mixture_weights():
    """With two components of weights 0.7 / 0.3 (6 A apart, tau = 1 A) the fraction of samples nearest each component
    is its weight.  Misassignment by distance is P(N(0,1) > 3) = 0.0013 per sample, a bias below 0.001.  n = 4096: the
    binomial standard error is sqrt(0.7 * 0.3 / n) = 0.0072; tolerance 4 standard errors (0.029)."""
    n, w0 = 4096, 0.7
    mu = np.array([[[0.0, 0.0, 0.0]], [[6.0, 0.0, 0.0]]])
    prior = ReferencePrior(layout(1), mu, weights=[w0, 1 - w0], tau=1.0, schedule=UNBIASED, dtype=torch.float32)
    x = draw(prior, n, steps=200, seed=1)
    d2 = ((x[:, None] - torch.as_tensor(mu, dtype=x.dtype)[None]) ** 2).sum((-1, -2))  # [n, K]
    frac0 = (d2.argmin(1) == 0).double().mean().item()
    assert abs(frac0 - w0) < 4 * math.sqrt(w0 * (1 - w0) / n)


def test_sampling_is_reproducible_from_the_seed():
    """The same seed gives bit-identical samples (also with the AF3 defaults and Euler steps); another seed does not."""
    mu = np.array([[[0.0, 0.0, 0.0], [3.8, 0.0, 0.0]], [[0.0, 0.0, 0.0], [0.0, 3.8, 0.0]]])
    for sched, solver in ((UNBIASED, "heun"), (NoiseSchedule(), "euler")):
        prior = ReferencePrior(layout(2), mu, tau=0.5, schedule=sched, dtype=torch.float32)
        a = draw(prior, 64, steps=20, seed=7, solver=solver)
        b = draw(prior, 64, steps=20, seed=7, solver=solver)
        c = draw(prior, 64, steps=20, seed=8, solver=solver)
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


def test_callback_sees_every_step():
    """The callback receives {x, i, sigma, t_hat, denoised} once per step, in order, with x the returned state."""
    prior = ReferencePrior(layout(1), np.zeros((1, 1, 3)), tau=1.0, schedule=UNBIASED)
    pl = plan(prior.schedule, 10)
    gen = torch.Generator().manual_seed(0)
    seen = []
    out = sample(prior.denoise, initial_noise((3, 1, 3), pl[0].sigma, gen), pl, prior.schedule, gen,
                 callback=seen.append)
    assert [row["i"] for row in seen] == list(range(10))
    assert [row["sigma"] for row in seen] == [st.sigma for st in pl]
    assert set(seen[0]) >= {"x", "i", "sigma", "t_hat", "denoised"}
    assert torch.equal(seen[-1]["x"], out)
