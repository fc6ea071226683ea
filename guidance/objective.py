"""The ensemble log-likelihood that guidance climbs: a weighted sum of observables, evaluated for many FK particles
in one batch (``jax.vmap`` over particles), handed to torch through the dlpack bridge.

    log L(particle p) = sum_o  w_o * observable_o.log_likelihood(coords[p] [E, N, 3], member_weights [E])
                        - sum_k  w_k * sum_members E_k(coords[p, m], t)

The second sum is optional prior-side potentials (``PotentialTerm``): torch energies of single structures, such as
Boltz's physical steering potentials, that tilt every member by exp(-w E).  They may depend on the steering time
``t`` (1 at the first step, 0 at the final sample, as Boltz's own schedules use it) and are evaluated in the
predictor's frame (they are invariant under rigid motions), with their gradients from torch autograd.

Predictors that do not live in the data's frame (trained with random rotations) are first superposed onto the
input structure (``reference``): each member is rigidly fitted, evaluated there, and its gradient rotated back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

from guidance.bridge import jax_to_torch, torch_to_jax, value_and_grad
from guidance.sampler import kabsch_align


@dataclass(frozen=True)
class Term:
    name: str
    observable: object  # observables.base.Observable
    weight: float = 1.0


@dataclass(frozen=True)
class PotentialTerm:
    """A prior-side energy on single structures: ``energy_and_grad(x [B, N, 3], t) -> (E [B], dE/dx [B, N, 3],
    {part: E_part [B]})`` (torch).  It enters the log-likelihood as -weight * E summed over the members."""

    name: str
    energy_and_grad: Callable
    weight: float = 1.0


def _plain(value):
    """A report value as JSON-ready Python: numbers as float, arrays as lists; text, flags, lists and dicts as given."""
    if value is None or isinstance(value, (str, bool, int, dict, list, tuple)):
        return value
    if np.ndim(value) == 0:
        return float(value)
    return np.asarray(value).tolist()


class Objective:
    """Callable on torch coordinates ``[P*E, N, 3]`` (and the steering time ``t``) ->
    ``(total [P], grad [P*E, N, 3], terms {name: [P]})``."""

    def __init__(
        self,
        terms: Sequence[Term],
        n_members: int,
        member_weights: np.ndarray | None = None,
        *,
        reference: torch.Tensor | None = None,
        align: bool = False,
        potentials: Sequence[PotentialTerm] = (),
        reference_weights: torch.Tensor | None = None,
    ):
        if not terms:
            raise ValueError("an objective needs at least one observable")
        self.terms = list(terms)
        self.potentials = list(potentials)
        self.names = [t.name for t in self.terms]
        clash = set(self.names) & {p.name for p in self.potentials}
        if clash:
            raise ValueError(f"potential name(s) {sorted(clash)} also used by an observable")
        self.n_members = n_members
        w = np.full(n_members, 1.0 / n_members) if member_weights is None else np.asarray(member_weights, float)
        self.member_weights = jnp.asarray(w / w.sum(), dtype=jnp.float32)
        self.align = align
        self.reference = reference
        # [N] weights of the rigid fit onto the reference (0 for atoms the reference does not have, e.g. a terminal
        # OXT the predictor models but the input structure lacks); None = every atom alike
        self.reference_weights = reference_weights
        if align and reference is None:
            raise ValueError("alignment to the input frame needs a reference structure")

        observables = [(t.observable, float(t.weight)) for t in self.terms]
        # Observables with nuisance parameters that are refitted while sampling (X-ray bulk solvent and scales) keep
        # them in ``state`` and expose ``log_likelihood_with(state, coords, weights)``: the states travel into the
        # jitted function as arguments, so a refit changes numbers, not the compiled graph.
        self._stateful = [hasattr(obs, "log_likelihood_with") and hasattr(obs, "state") for obs, _ in observables]

        def per_particle(coords, weights, states):  # coords [E, N, 3]
            values = jnp.stack([obs.log_likelihood_with(st, coords, weights) if st is not None
                                else obs.log_likelihood(coords, weights) for (obs, _), st in zip(observables, states)])
            total = sum(wt * values[k] for k, (_, wt) in enumerate(observables))
            return total, values

        # All particles go through one jitted call.  On CPU, XLA's vmapped scatter of the density kernel grows faster
        # than the batch (scripts/bench_fk.py: 19x the time for 16x the particles), so particles run as an in-graph
        # loop (lax.map: 11.7x); accelerators get the vectorised form.
        vectorise = jax.default_backend() != "cpu"

        def batched(coords, weights, states):  # coords [P, E, N, 3]
            if vectorise:
                return jax.vmap(per_particle, in_axes=(0, None, None))(coords, weights, states)
            return jax.lax.map(lambda c: per_particle(c, weights, states), coords)

        self._batched = jax.jit(batched)
        self._vg = value_and_grad(batched)

    def _frame(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.align:
            return x, None
        ref = self.reference.to(x).expand_as(x)
        w = None if self.reference_weights is None else self.reference_weights.to(x)
        return kabsch_align(x, ref, w, return_rotation=True)  # aligned = (x - mean) @ R + ref mean

    def __call__(self, x: torch.Tensor, t: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        x = x.detach()
        b, n, _ = x.shape
        p = b // self.n_members
        xf, rot = self._frame(x)
        coords = xf.reshape(p, self.n_members, n, 3).contiguous()
        total, grad, values = self._vg(coords, self.member_weights, self.states())
        grad = grad.reshape(b, n, 3)
        if rot is not None:
            grad = grad @ rot.transpose(-1, -2)
        terms = {name: values[:, k] for k, name in enumerate(self.names)}
        for pot in self.potentials:
            energy, d_energy, _ = pot.energy_and_grad(x, t)
            log_factor = -pot.weight * energy.to(total.dtype).reshape(p, self.n_members).sum(1)
            total = total + log_factor
            grad = grad - pot.weight * d_energy.to(grad.dtype)
            terms[pot.name] = log_factor
        return total, grad, terms

    def value(self, x: torch.Tensor, t: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Log-likelihood without the gradient."""
        x = x.detach()
        b, n, _ = x.shape
        p = b // self.n_members
        xf, _ = self._frame(x)
        total, values = self._batched(torch_to_jax(xf.reshape(p, self.n_members, n, 3).contiguous()),
                                      self.member_weights, self.states())
        values = jax_to_torch(values)
        total = jax_to_torch(total)
        terms = {name: values[:, k] for k, name in enumerate(self.names)}
        for pot in self.potentials:
            with torch.no_grad():
                energy, _, _ = pot.energy_and_grad(x, t)
            terms[pot.name] = -pot.weight * energy.to(total.dtype).reshape(p, self.n_members).sum(1)
            total = total + terms[pot.name]
        return total, terms

    def data_frame(self, coords: np.ndarray) -> np.ndarray:
        """Structures [B, N, 3] in the frame the observables see: superposed onto the input structure when the
        predictor does not live in the data's frame, else unchanged."""
        x = np.asarray(coords, np.float32)
        if not self.align:
            return x
        xf, _ = self._frame(torch.as_tensor(x))
        return xf.detach().cpu().numpy()

    def states(self) -> tuple:
        """The current nuisance-parameter state of each observable (None for those without)."""
        return tuple(t.observable.state if st else None for t, st in zip(self.terms, self._stateful))

    def refit(self, coords: np.ndarray, weights: np.ndarray | None = None) -> list[str]:
        """Refit every observable with nuisance parameters (``refit(coords, weights)``) to the ensemble ``coords
        [E, N, 3]`` (in the data's frame) at ``weights`` (default: the objective's member weights); their names."""
        w = np.asarray(self.member_weights) if weights is None else np.asarray(weights, np.float32)
        done = []
        for t in self.terms:
            if callable(getattr(t.observable, "refit", None)):
                t.observable.refit(np.asarray(coords, np.float32), w)
                done.append(t.name)
        return done

    def refit_during_sampling(self, step_index: int, sigma: float, x0_hat: torch.Tensor,
                              scores: torch.Tensor | None) -> list[str]:
        """Refit the observables whose schedule asks for it at this step (``refit_every`` steps, once the noise level
        is at most ``refit_below_sigma``) to the denoised ensemble of the best-scoring particle (``scores [P]``, e.g.
        this step's log-likelihoods), superposed onto the input frame as the likelihood sees it; their names."""
        due = [t for t in self.terms if callable(getattr(t.observable, "refit", None))
               and int(getattr(t.observable, "refit_every", 0)) > 0
               and step_index % int(t.observable.refit_every) == 0
               and sigma <= float(getattr(t.observable, "refit_below_sigma", math.inf))]
        if not due:
            return []
        x = x0_hat.detach()
        b, n, _ = x.shape
        p = b // self.n_members
        xf, _ = self._frame(x)
        best = 0 if scores is None else int(torch.argmax(torch.nan_to_num(scores.double(), nan=-math.inf)))
        members = xf.reshape(p, self.n_members, n, 3)[best].cpu().numpy()
        for t in due:
            t.observable.refit(members, np.asarray(self.member_weights))
        return [t.name for t in due]

    def potential_reports(self, coords: np.ndarray, t: float = 0.0) -> dict[str, dict[str, float]]:
        """Each potential's energy for one ensemble ``coords [E, N, 3]``: mean over members of the total and of each
        part, and the log-factor it contributes (-weight * sum over members)."""
        x = torch.as_tensor(np.asarray(coords, dtype=np.float32))
        out = {}
        for pot in self.potentials:
            energy, _, parts = pot.energy_and_grad(x, t)
            out[pot.name] = {"energy_mean": float(energy.mean()), "weight": pot.weight,
                             "log_factor": float(-pot.weight * energy.sum()),
                             **{f"{k}_mean": float(v.mean()) for k, v in parts.items()}}
        return out

    def reports(self, coords: np.ndarray, weights: np.ndarray) -> dict[str, dict[str, float]]:
        """Each observable's report for one ensemble ``coords [E, N, 3]`` with member ``weights [E]``."""
        c = jnp.asarray(coords, dtype=jnp.float32)
        w = jnp.asarray(weights, dtype=jnp.float32)
        out = {}
        for t in self.terms:
            rep = t.observable.report(c, w)
            out[t.name] = {k: _plain(v) for k, v in rep.items()}
            ll = float(t.observable.log_likelihood(c, w))
            out[t.name].setdefault("log_likelihood", ll if math.isfinite(ll) else None)
        return out

    def ensemble_log_likelihood(self, coords: np.ndarray | None = None):
        """A JAX function ``f(coords [E,N,3], weights [E]) -> scalar`` for member-weight refinement.

        Given the ensemble ``coords`` whose weights will be refined, observables that are linear in the member
        weights (``member_predictions``) compute their members once; ``f`` then ignores its ``coords`` argument for
        them (it must be called with that same ensemble)."""
        fixed = jnp.asarray(coords, dtype=jnp.float32) if coords is not None else None
        parts = []
        for t in self.terms:
            obs, wt = t.observable, float(t.weight)
            if fixed is not None and hasattr(obs, "member_predictions"):
                preds = obs.member_predictions(fixed)
                parts.append(lambda c, w, obs=obs, wt=wt, preds=preds: wt * obs.log_likelihood_from_predictions(preds, w))
            else:
                parts.append(lambda c, w, obs=obs, wt=wt: wt * obs.log_likelihood(c, w))

        def f(c, w):
            return sum(part(c, w) for part in parts)

        return f
