"""Prior-side potentials of the library: torch energies of single structures, ``energy_and_grad(x [B, N, 3], t) ->
(E [B], dE/dx [B, N, 3], {part: E_part [B]})``, that tilt every member by exp(-weight E) (guidance.objective
.PotentialTerm).  Boltz's own steering energies come with its predictor (predictors/boltz.py)."""

from __future__ import annotations

import numpy as np
import torch

from guidance.structures.geometry import REPULSION_DISTANCE, REPULSION_SD, Restraints, build_restraints, clash_pairs



class GeometryPotential:
    """Covalent geometry and steric repulsion as an energy of single structures, for guidance (``PotentialTerm``).

        E(x) = bond_weight  * 0.5 * sum_bonds  z^2         z = (length - ideal) / sd        (Engh & Huber 1991)
             + angle_weight * 0.5 * sum_angles z^2         z = (angle - ideal) / sd
             + clash_weight * 0.5 * sum_pairs ((d0 - d) / s)^2   over clash-eligible pairs with d < d0

    with d0 = ``clash_distance`` (A) and s = ``clash_sd`` (A); the pairs are those of :func:`clash_pairs`
    (heavy atoms more than three bonds apart, no S-S, no metal ions), found without gradient at every call.
    Dimensionless: 0.5 z^2 is the negative log of a Gaussian restraint, so E is in units of kT of the restraint
    ensemble.  ``reference`` (input coordinates, optional) lets covalent bonds of ligands and modified residues be
    found, so that they are not pushed apart (:func:`build_restraints`).  ``energy_and_grad(x [B, N, 3], t) -> (E [B], dE/dx [B, N, 3], {"bonds", "angles", "clashes": [B]})``
    where the parts are weighted and sum to E.

    ``onset`` (steering time t: 1 at the first sampling step, 0 at the final sample) delays the term: E is scaled by
    clip((onset + ramp - t) / ramp, 0, 1), off above onset + ramp and whole from t = onset on (onset = 1: always on;
    default 0.1: the ramp starts at t = 0.2, where sigma has fallen to ~0.6 A with 30 steps of the AF3 schedule).
    Early denoised estimates are blends of the prior's modes (e.g. two rotamers averaged): no covalent geometry holds
    there, and a geometry term would pull every member back into the dominant mode before the data have chosen.
    """

    def __init__(self, layout, bond_weight: float = 1.0, angle_weight: float = 1.0, clash_weight: float = 1.0,
                 clash_distance: float = REPULSION_DISTANCE, clash_sd: float = REPULSION_SD,
                 reference=None, restraints: Restraints | None = None, onset: float = 0.1, ramp: float = 0.1):
        if not 0.0 <= onset <= 1.0 or ramp <= 0:
            raise ValueError(f"onset must be in [0, 1] (steering time) and ramp > 0, got onset={onset}, ramp={ramp}")
        self.onset, self.ramp = float(onset), float(ramp)
        if clash_distance <= 0 or clash_sd <= 0:
            raise ValueError(f"clash_distance ({clash_distance}) and clash_sd ({clash_sd}) must be positive (A)")
        self.restraints = restraints or build_restraints(layout, reference)
        self.n_atoms = len(layout)
        self.bond_weight, self.angle_weight, self.clash_weight = float(bond_weight), float(angle_weight), float(
            clash_weight)
        self.clash_distance, self.clash_sd = float(clash_distance), float(clash_sd)
        r = self.restraints
        self._host = {
            "bonds": torch.as_tensor(r.bonds), "bond_ideal": torch.as_tensor(r.bond_ideal),
            "bond_sd": torch.as_tensor(r.bond_sd), "angles": torch.as_tensor(r.angles),
            "angle_ideal": torch.as_tensor(np.radians(r.angle_ideal)),
            "angle_sd": torch.as_tensor(np.radians(r.angle_sd)),
        }
        self._cache: dict = {}

    def _tensors(self, x: torch.Tensor) -> dict:
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = {k: (v.to(x.device) if v.dtype == torch.int64 else v.to(x.device, x.dtype))
                                for k, v in self._host.items()}
        return self._cache[key]

    def pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clash-eligible pairs closer than ``clash_distance`` in each structure (no gradient): (batch, i, j)."""
        xyz = x.detach().to("cpu", torch.float64).numpy()
        found = [clash_pairs(self.restraints, xyz[b], self.clash_distance) for b in range(len(xyz))]
        batch = np.concatenate([np.full(len(p), b, dtype=np.int64) for b, p in enumerate(found)]) if found else []
        ij = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
        def as_t(a):
            return torch.as_tensor(np.asarray(a, dtype=np.int64), device=x.device)

        return as_t(batch), as_t(ij[:, 0]), as_t(ij[:, 1])

    def energy_parts(self, x: torch.Tensor, pairs=None) -> dict[str, torch.Tensor]:
        """Weighted energy parts ``{"bonds", "angles", "clashes": [B]}``, differentiable in ``x [B, N, 3]``.
        ``pairs`` (from :meth:`pairs`) fixes the clash pairs; by default they are searched in ``x``."""
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"x must have shape [B, {self.n_atoms}, 3]; got {tuple(x.shape)}")
        p = self._tensors(x)
        tiny = torch.finfo(x.dtype).tiny ** 0.5  # keeps sqrt differentiable at zero length
        bond = x[:, p["bonds"][:, 1]] - x[:, p["bonds"][:, 0]]
        length = torch.sqrt((bond * bond).sum(-1) + tiny)
        z_b = (length - p["bond_ideal"]) / p["bond_sd"]
        u = x[:, p["angles"][:, 0]] - x[:, p["angles"][:, 1]]
        v = x[:, p["angles"][:, 2]] - x[:, p["angles"][:, 1]]
        cross = torch.linalg.cross(u, v, dim=-1)
        theta = torch.atan2(torch.sqrt((cross * cross).sum(-1) + tiny), (u * v).sum(-1))
        z_a = (theta - p["angle_ideal"]) / p["angle_sd"]

        b, i, j = self.pairs(x) if pairs is None else pairs
        diff = x[b, j] - x[b, i]
        d = torch.sqrt((diff * diff).sum(-1) + tiny)
        z_c = torch.clamp(self.clash_distance - d, min=0.0) / self.clash_sd
        clashes = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device).index_add(0, b, 0.5 * z_c * z_c)
        return {"bonds": self.bond_weight * 0.5 * (z_b * z_b).sum(-1),
                "angles": self.angle_weight * 0.5 * (z_a * z_a).sum(-1),
                "clashes": self.clash_weight * clashes}

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """E [B], differentiable in ``x``."""
        return sum(self.energy_parts(x).values())

    def scale(self, t: float) -> float:
        """The factor on E at steering time ``t`` (see ``onset``)."""
        return float(min(max((self.onset + self.ramp - t) / self.ramp, 0.0), 1.0))

    def energy_and_grad(self, x: torch.Tensor, t: float = 0.0):
        """(E [B], dE/dx [B, N, 3], weighted parts {name: [B]}) at steering time ``t`` (scaled by ``scale(t)``);
        gradients by autograd, ``x`` is not modified."""
        k = self.scale(t)
        if k == 0.0:
            zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            return zero, torch.zeros_like(x), {"bonds": zero, "angles": zero, "clashes": zero}
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            parts = {name: k * v for name, v in self.energy_parts(xg).items()}
            energy = sum(parts.values())
            (grad,) = torch.autograd.grad(energy.sum(), xg)
        return energy.detach(), grad.detach(), {k: v.detach() for k, v in parts.items()}

    __call__ = energy_and_grad
