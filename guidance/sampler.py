"""The AlphaFold-3 / EDM sampler as small functions (Karras et al. 2022, "Elucidating the design space of
diffusion-based generative models", Alg. 2; AF3 supplement Alg. 18), driven by a predictor's ``NoiseSchedule``.

One step from noise level sigma_i to sigma_{i+1}:

    t_hat   = sigma_i (1 + gamma_i)                               churn: raise the noise level ...
    x_hat   = x_i + noise_scale sqrt(t_hat^2 - sigma_i^2) eps     ... by adding fresh Gaussian noise
    x0_hat  = D(x_hat, t_hat)                                     denoise
    x_{i+1} = x_hat + step_scale (sigma_{i+1} - t_hat) (x_hat - x0_hat) / t_hat     Euler step of the probability-flow ODE

gamma_i = gamma_0 while the *next* level sigma_{i+1} > gamma_min, else 0 (the convention of AF3 and Boltz).
With noise_scale = step_scale = 1 and an exact denoiser this samples the prior; the AF3 defaults (1.003, 1.5) sharpen it.
Coordinates are Angstrom; x has shape [B, N, 3] with B = P * E (particles x ensemble members).
The sampler knows nothing about the network: ``denoise(x, sigma[B]) -> x0_hat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from predictors.base import NoiseSchedule

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def karras_sigmas(schedule: NoiseSchedule, n_steps: int, *, dtype=torch.float64) -> torch.Tensor:
    """[n_steps + 1] noise levels (A): Karras' rho-schedule between sigma_data*sigma_max and sigma_data*sigma_min,
    followed by 0.  sigma_i = sigma_data (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    if n_steps < 2:
        raise ValueError(f"the sampler needs at least 2 steps, got {n_steps}")
    inv_rho = 1.0 / schedule.rho
    i = torch.arange(n_steps, dtype=dtype)
    ramp = schedule.sigma_max**inv_rho + i / (n_steps - 1) * (schedule.sigma_min**inv_rho - schedule.sigma_max**inv_rho)
    sigmas = schedule.sigma_data * ramp**schedule.rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@dataclass(frozen=True)
class Step:
    """One planned step: from ``sigma`` to ``sigma_next`` through the churned level ``t_hat``."""

    index: int
    sigma: float
    sigma_next: float
    gamma: float
    t_hat: float
    noise_std: float  # std of the churn noise added to x_i to reach t_hat


@dataclass(frozen=True)
class Sampling:
    """How a run steps, the same at every step: the ODE ``solver`` ("euler" as AF3/Boltz, or "heun"), a random
    rigid ``augmentation`` of each structure before each step (for predictors trained with it), ``align`` (superpose
    x_hat onto x0_hat before the step, Boltz's alignment_reverse_diff) and ``n_steps_total``, the length of the full
    schedule (a partial-diffusion run starts part-way; None: the last planned step's index + 1)."""

    solver: str = "euler"
    augmentation: bool = False
    align: bool = False
    n_steps_total: int | None = None

    def __post_init__(self):
        if self.solver not in ("euler", "heun"):
            raise ValueError(f"unknown solver {self.solver!r}; use 'euler' or 'heun'")


def plan(schedule: NoiseSchedule, n_steps: int, *, start_step: int = 0) -> list[Step]:
    """The steps of one sampling run; ``start_step > 0`` starts part-way (partial diffusion from a structure)."""
    sigmas = karras_sigmas(schedule, n_steps).tolist()
    if not 0 <= start_step < n_steps:
        raise ValueError(f"start_step must be in [0, {n_steps - 1}], got {start_step}")
    steps = []
    for i in range(start_step, n_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = schedule.gamma_0 if sigma_next > schedule.gamma_min else 0.0
        t_hat = sigma * (1.0 + gamma)
        noise_std = schedule.noise_scale * math.sqrt(max(t_hat**2 - sigma**2, 0.0))
        steps.append(Step(i, sigma, sigma_next, gamma, t_hat, noise_std))
    return steps


def initial_noise(shape, sigma: float, generator: torch.Generator, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return sigma * torch.randn(shape, generator=generator, dtype=dtype, device=device)


def churn(x: torch.Tensor, step: Step, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x_hat = x + noise_std * eps; returns (x_hat, eps)."""
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + step.noise_std * eps, eps


def euler_step(x_hat: torch.Tensor, x0_hat: torch.Tensor, step: Step, step_scale: float) -> torch.Tensor:
    """x_{i+1} = x_hat + step_scale (sigma_{i+1} - t_hat) (x_hat - x0_hat) / t_hat."""
    return x_hat + step_scale * (step.sigma_next - step.t_hat) * (x_hat - x0_hat) / step.t_hat


def heun_step(x_hat: torch.Tensor, x0_hat: torch.Tensor, step: Step, step_scale: float, denoise: DenoiseFn) -> torch.Tensor:
    """Second-order (Heun) step of Karras et al. Alg. 2: an Euler step, then the average of the slopes at both ends
    (plain Euler on the last step, where sigma_{i+1} = 0).  Costs a second denoiser call."""
    x_euler = euler_step(x_hat, x0_hat, step, step_scale)
    if step.sigma_next <= 0:
        return x_euler
    d = (x_hat - x0_hat) / step.t_hat
    sig = torch.full(x_hat.shape[:1], step.sigma_next, dtype=x_hat.dtype, device=x_hat.device)
    with torch.no_grad():
        d_next = (x_euler - denoise(x_euler, sig)) / step.sigma_next
    return x_hat + step_scale * (step.sigma_next - step.t_hat) * 0.5 * (d + d_next)


def advance(x_hat, x0_hat, step: Step, schedule: NoiseSchedule, denoise: DenoiseFn, solver: str = "euler") -> torch.Tensor:
    """The deterministic part of a step with the chosen solver ("euler" as AF3/Boltz, or "heun")."""
    if solver == "euler":
        return euler_step(x_hat, x0_hat, step, schedule.step_scale)
    if solver == "heun":
        return heun_step(x_hat, x0_hat, step, schedule.step_scale, denoise)
    raise ValueError(f"unknown solver {solver!r}; use 'euler' or 'heun'")


def random_rotations(n: int, generator: torch.Generator, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """[n, 3, 3] rotations uniform on SO(3) (normalised Gaussian quaternions)."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(n, 3, 3)
    return rot.to(dtype=dtype, device=device)


def augment(x: torch.Tensor, generator: torch.Generator, *, translation_std: float = 1.0,
            return_rotation: bool = False):
    """Centre each structure, rotate it uniformly at random and translate by N(0, translation_std^2) (AF3 Alg. 19).
    With ``return_rotation`` also return the rotations [B, 3, 3] (so that displacements can be rotated alike)."""
    x = x - x.mean(dim=-2, keepdim=True)
    rot = random_rotations(x.shape[0], generator, dtype=x.dtype, device=x.device)
    shift = translation_std * torch.randn(x.shape[0], 1, 3, generator=generator, dtype=x.dtype, device=x.device)
    out = torch.einsum("bij,bnj->bni", rot, x) + shift
    return (out, rot) if return_rotation else out


def proper_rotation(cov: torch.Tensor) -> torch.Tensor:
    """The Kabsch step (Kabsch 1976): for covariances ``cov`` [B, 3, 3] = sum_i w_i m_i t_i^T of centred mobile and
    target points, the proper rotations R [B, 3, 3] (det +1) with ``m @ R`` best fitting ``t``; where the best
    orthogonal fit would be a reflection the axis of the smallest singular value is flipped.  The one copy of this
    step: guidance.structures.metrics.kabsch (numpy) calls it too."""
    u, _, vt = torch.linalg.svd(cov)
    d = torch.sign(torch.linalg.det(u @ vt))
    diag = torch.ones_like(cov[..., 0])
    diag[:, -1] = torch.where(d == 0, torch.ones_like(d), d)
    return (u * diag[:, None, :]) @ vt


def kabsch_align(mobile: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None, *,
                 return_rotation: bool = False):
    """Rigidly superpose each ``mobile[b]`` onto ``target[b]`` (weighted Kabsch, proper rotations), no gradient
    through the fit.  Shapes [B, N, 3]; ``weights`` [N] or [B, N].  With ``return_rotation`` also return the
    rotations R [B, 3, 3] (aligned = (mobile - centre) @ R + target centre), e.g. to rotate gradients back."""
    with torch.no_grad():
        if weights is None:
            weights = torch.ones(mobile.shape[:2], dtype=mobile.dtype, device=mobile.device)
        w = (weights.expand(mobile.shape[:2]) / weights.expand(mobile.shape[:2]).sum(-1, keepdim=True))[..., None]
        mu_m = (w * mobile).sum(1, keepdim=True)
        mu_t = (w * target).sum(1, keepdim=True)
        cov = torch.einsum("bni,bnj->bij", w * (mobile - mu_m), target - mu_t).double()
        rot = proper_rotation(cov).to(mobile.dtype)  # maps mobile -> target as x @ rot
    aligned = (mobile - mu_m) @ rot + mu_t
    return (aligned, rot) if return_rotation else aligned


def sample(
    denoise: DenoiseFn,
    x: torch.Tensor,
    steps: list[Step],
    schedule: NoiseSchedule,
    generator: torch.Generator,
    *,
    sampling: Sampling = Sampling(),
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Unguided sampling (guided sampling lives in guidance/fk.py, which reuses these steps).  ``x`` is the state at
    ``steps[0].sigma``; the callback receives ``{x, i, sigma, t_hat, denoised}`` after each step."""
    for step in steps:
        if sampling.augmentation:
            x = augment(x, generator)
        x_hat, _ = churn(x, step, generator)
        with torch.no_grad():
            x0_hat = denoise(x_hat, torch.full(x.shape[:1], step.t_hat, dtype=x.dtype, device=x.device))
        if sampling.align:
            x_hat = kabsch_align(x_hat, x0_hat)
        x = advance(x_hat, x0_hat, step, schedule, denoise, sampling.solver)
        if callback is not None:
            callback({"x": x, "i": step.index, "sigma": step.sigma, "t_hat": step.t_hat, "denoised": x0_hat})
    return x
