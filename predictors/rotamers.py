"""Side-chain rotamers for a single-conformer prior: the reference prior with a rotamer library on every side chain.

A Gaussian around one conformer (``ReferencePrior``) cannot express a side-chain flip: a rotamer change moves atoms
3-8 A along an arc, far beyond the isotropic width tau and the CA-level ANM modes, so the prior gives the other rotamer
no mass and guidance has no path to it (the sampler would have to cross a region the likelihood does not favour
either).  A trained predictor knows that side chains live in rotamers; this module gives the weight-free prior the
same knowledge without telling it the answer: every side chain of the *one* input conformer is expanded over the
Penultimate Rotamer Library (Lovell et al. 2000, Proteins 40:389, Table 1; ``predictors/data/lovell2000_rotamers.csv``)
by setting its chi angles, keeping the conformer's own bond geometry.

The prior factorises into the conformer's core (backbone, CB, residues without rotamers) and one block per side chain
(the atoms beyond CB, hydrogens included):

    p(x0) = p_core(x_core) * prod_r sum_j w_rj N(x_r; m_rj, tau^2 I),

where p_core is a ``ReferencePrior`` (Gaussian with ANM modes) on the core atoms, m_r0 is the conformer's own side
chain with weight ``self_weight`` and m_rj (j >= 1) the library rotamers, weighted by their observation counts and
sharing 1 - ``self_weight``.  With isotropic noise x = x0 + sigma eps the posterior factorises over the same blocks,
so the denoiser stays exact: the core's is ``ReferencePrior.denoise`` and each block's is the mixture posterior mean

    D_r(x, sigma) = sum_j r_j(x) [m_rj + tau^2 / (tau^2 + sigma^2) (x_r - m_rj)],
    r_j ∝ w_rj exp(-|x_r - m_rj|^2 / (2 (tau^2 + sigma^2))).

Approximation (deliberate): side-chain blocks do not follow the core's ANM modes; a side chain sits at its rotamer
positions in the conformer's frame, with the isotropic width tau.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from importlib.resources import files

import numpy as np
import torch

from predictors.base import AtomLayout, NoiseSchedule
from predictors.reference import ReferencePrior, batch_sigma

__all__ = ["CHI_ATOMS", "RotamerPrior", "SideChainBlock", "dihedral", "library", "set_chis", "side_chain_blocks"]

# IUPAC-IUB 1970 chi definitions (atoms of the dihedral; chi_k rotates the atoms beyond its third atom).
CHI_ATOMS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "ARG": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "NE"), ("CG", "CD", "NE", "CZ")),
    "LYS": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "CE"), ("CG", "CD", "CE", "NZ")),
    "MET": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "SD"), ("CB", "CG", "SD", "CE")),
    "GLU": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "OE1")),
    "GLN": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "OE1")),
    "ASP": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "OD1")),
    "ASN": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "OD1")),
    "ILE": (("N", "CA", "CB", "CG1"), ("CA", "CB", "CG1", "CD1")),
    "LEU": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD1")),
    "HIS": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "ND1")),
    "TRP": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD1")),
    "TYR": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD1")),
    "PHE": (("N", "CA", "CB", "CG"), ("CA", "CB", "CG", "CD1")),
    "THR": (("N", "CA", "CB", "OG1"),),
    "VAL": (("N", "CA", "CB", "CG1"),),
    "SER": (("N", "CA", "CB", "OG"),),
    "CYS": (("N", "CA", "CB", "SG"),),
}
# Residues whose last chi turns a symmetric group (ring or carboxylate): chi and chi + 180 are the same conformation
# with the equivalent atoms' names swapped.  Both namings become components.
SYMMETRIC_LAST_CHI = frozenset({"PHE", "TYR", "ASP", "GLU"})

# Distance from the atom's name to the residue's CA in bonds, from its remoteness letter (IUPAC): alpha .. eta.
_REMOTENESS = {"A": 0, "B": 1, "G": 2, "D": 3, "E": 4, "Z": 5, "H": 6}


def remoteness(atom_name: str) -> int:
    """Bonds from CA for a side-chain atom name (CG -> 2, HD21 -> 3, OH of Tyr -> 6); -1 for backbone/other atoms."""
    name = atom_name.strip().lstrip("0123456789")
    if len(name) < 2 or name[0] not in "CNOSH":
        return -1
    return _REMOTENESS.get(name[1], -1)


def library() -> dict[str, list[tuple[str, float, tuple[float, ...]]]]:
    """The rotamer table: residue -> [(name, count, chis in degrees)]."""
    rows: dict[str, list] = {}
    text = files("predictors").joinpath("data/lovell2000_rotamers.csv").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    for row in csv.DictReader(lines):
        chis = tuple(float(row[f"chi{k}"]) for k in range(1, 5) if row[f"chi{k}"])
        rows.setdefault(row["residue"], []).append((row["rotamer"], float(row["count"]), chis))
    return rows


def dihedral(p0, p1, p2, p3) -> float:
    """Dihedral angle p0-p1-p2-p3 in degrees (IUPAC sign convention), float64."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1n = b1 / np.linalg.norm(b1)
    v = b0 - np.dot(b0, b1n) * b1n
    w = b2 - np.dot(b2, b1n) * b1n
    return float(np.degrees(np.arctan2(np.dot(np.cross(b1n, v), w), np.dot(v, w))))


def _rotate(points: np.ndarray, origin: np.ndarray, axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate ``points`` [n, 3] about the line through ``origin`` along ``axis`` (Rodrigues), right-handed."""
    k = axis / np.linalg.norm(axis)
    a = math.radians(angle_deg)
    p = points - origin
    rotated = p * math.cos(a) + np.cross(k, p) * math.sin(a) + np.outer(p @ k, k) * (1.0 - math.cos(a))
    return rotated + origin


def set_chis(names: list[str], coords: np.ndarray, res_name: str, chis) -> np.ndarray:
    """One residue's coordinates [n, 3] (atom ``names``) with its chi angles set to ``chis`` (degrees, chi1 first;
    fewer values leave the later chis as they are).  Bond lengths and angles are kept: only rotations about the chi
    bonds are applied, each to the atoms beyond that bond."""
    index = {n: i for i, n in enumerate(names)}
    level = np.array([remoteness(n) for n in names])
    out = np.array(coords, dtype=np.float64)
    for k, (target, atoms) in enumerate(zip(chis, CHI_ATOMS[res_name])):
        p = [out[index[a]] for a in atoms]
        current = dihedral(*p)
        moving = level >= k + 2  # chi_k turns about the bond from remoteness k to k + 1 (chi1: CA-CB)
        # A right-handed rotation by delta about p1 -> p2 increases the dihedral by delta.
        out[moving] = _rotate(out[moving], p[2], p[2] - p[1], target - current)
    return out


def _angle_close(a: float, b: float, tol: float, period: float = 360.0) -> bool:
    d = (a - b) % period
    return min(d, period - d) <= tol


@dataclass(frozen=True)
class SideChainBlock:
    """One residue's side chain: atom indices [n] into the layout, alternative positions [J, n, 3] (component 0 is the
    conformer's own) and prior weights [J] (sum 1); ``names`` labels the components."""

    chain_id: str
    res_seq: int
    res_name: str
    atoms: np.ndarray
    positions: np.ndarray
    weights: np.ndarray
    names: tuple[str, ...]


def side_chain_blocks(
    layout: AtomLayout,
    coords: np.ndarray,
    *,
    self_weight: float = 0.8,
    merge_deg: float = 30.0,
    clash_distance: float = 2.5,
) -> list[SideChainBlock]:
    """Rotamer blocks for every residue of ``layout`` with library rotamers and a complete chi atom set.

    A library rotamer is left out when every chi is within ``merge_deg`` of the conformer's own (the conformer's own
    side chain stands for it), or when one of its heavy atoms comes closer than ``clash_distance`` A to a backbone or
    CB atom of another residue (sterically impossible whatever the other side chains do).
    """
    if not 0.0 < self_weight <= 1.0:
        raise ValueError(f"rotamer self_weight must be in (0, 1], got {self_weight}")
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    lib = library()
    names = layout.atom_name.tolist()
    residue_of = layout.residue_keys()
    heavy = layout.element != "H"
    frame = np.isin(layout.atom_name, ["N", "CA", "C", "O", "CB"]) & heavy
    frame_tree = cKDTree(coords[frame])
    frame_residue = [residue_of[i] for i in np.flatnonzero(frame)]
    blocks = []
    for key, members in layout.residue_atoms().items():
        res_name = str(layout.res_name[members[0]])
        if res_name not in CHI_ATOMS or res_name not in lib:
            continue
        res_names = [names[i] for i in members]
        needed = {a for chi in CHI_ATOMS[res_name] for a in chi}
        if not needed <= set(res_names):
            continue  # incomplete side chain: nothing to turn
        local = coords[members]
        side = np.array([remoteness(n) >= 2 for n in res_names])
        own = [dihedral(*(local[res_names.index(a)] for a in chi)) for chi in CHI_ATOMS[res_name]]
        last = len(own) - 1
        positions, weights, labels = [local[side]], [], ["self"]
        for rot_name, count, chis in lib[res_name]:
            variants = [chis]
            if res_name in SYMMETRIC_LAST_CHI:
                variants.append(chis[:last] + (chis[last] + 180.0,))
            for v, chi_v in enumerate(variants):
                period = 180.0 if res_name in SYMMETRIC_LAST_CHI else 360.0
                same = all(_angle_close(a, b, merge_deg, period if k == last else 360.0)
                           for k, (a, b) in enumerate(zip(chi_v, own)))
                if same:
                    continue
                built = set_chis(res_names, local, res_name, chi_v)[side]
                hits = frame_tree.query_ball_point(built[heavy[members][side]], r=clash_distance)
                if any(frame_residue[j] != key for h in hits for j in h):
                    continue
                positions.append(built)
                weights.append(count / len(variants))
                labels.append(rot_name + ("'" if v else ""))
        w = np.array(weights, dtype=np.float64)
        w = np.concatenate([[self_weight], (1.0 - self_weight) * w / w.sum()]) if len(w) else np.array([1.0])
        if len(w) == 1:
            continue  # no alternative left: the side chain stays in the core
        blocks.append(SideChainBlock(key[0], int(key[1]), res_name, members[side], np.stack(positions), w / w.sum(),
                                     tuple(labels)))
    return blocks


class RotamerPrior:
    """A single-conformer ``ReferencePrior`` on the core atoms times a rotamer mixture on every side chain (module
    docstring), with its exact denoiser.  Same interface as ``ReferencePrior`` (``layout``, ``schedule``,
    ``denoise``, ``responsibilities`` per block, ``log_marginal``, ``log_prob``, ``sample``)."""

    def __init__(
        self,
        layout: AtomLayout,
        conformer,
        *,
        tau: float = 0.3,
        n_modes: int = 0,
        mode_rms: float = 1.0,
        anm_cutoff: float = 15.0,
        self_weight: float = 0.8,
        merge_deg: float = 30.0,
        clash_distance: float = 2.5,
        schedule: NoiseSchedule | None = None,
        dtype=torch.float32,
        device="cpu",
    ):
        mu = np.asarray(conformer.detach().cpu() if isinstance(conformer, torch.Tensor) else conformer, np.float64)
        if mu.ndim == 3:
            if mu.shape[0] != 1:
                raise ValueError(f"the rotamer prior builds on one conformer, got {mu.shape[0]}: pick one (e.g. [A])")
            mu = mu[0]
        if mu.shape != (len(layout), 3):
            raise ValueError(f"conformer must have shape [{len(layout)}, 3] to match the layout, got {mu.shape}")
        self.layout = layout
        self.tau = float(tau)
        self.dtype = dtype
        self.device = torch.device(device)
        self.blocks = side_chain_blocks(layout, mu, self_weight=self_weight, merge_deg=merge_deg,
                                        clash_distance=clash_distance)
        in_block = np.zeros(len(layout), bool)
        for b in self.blocks:
            in_block[b.atoms] = True
        self.core_atoms = np.flatnonzero(~in_block)
        self.core = ReferencePrior(layout.select(self.core_atoms), mu[self.core_atoms], tau=tau, n_modes=n_modes,
                                   mode_rms=mode_rms, anm_cutoff=anm_cutoff, schedule=schedule, dtype=dtype,
                                   device=device)
        self.schedule = self.core.schedule

        n_blocks = len(self.blocks)
        n_max = max((len(b.atoms) for b in self.blocks), default=0)
        j_max = max((len(b.weights) for b in self.blocks), default=0)
        atoms = np.zeros((n_blocks, n_max), np.int64)
        atom_mask = np.zeros((n_blocks, n_max), bool)
        means = np.zeros((n_blocks, j_max, n_max, 3))
        log_w = np.full((n_blocks, j_max), -np.inf)
        for r, b in enumerate(self.blocks):
            n, j = len(b.atoms), len(b.weights)
            atoms[r, :n], atom_mask[r, :n] = b.atoms, True
            means[r, :j, :n] = b.positions
            log_w[r, :j] = np.log(b.weights)
        def put(a):
            return torch.as_tensor(a, dtype=dtype, device=self.device)

        self._atoms = torch.as_tensor(atoms, device=self.device)
        self._atom_mask = torch.as_tensor(atom_mask, device=self.device)
        self._flat_atoms = self._atoms[self._atom_mask]  # [M]: the block atoms, block-major
        self._means = put(means)  # [R, J, n, 3]
        self._log_w = put(log_w)  # [R, J]
        self._n_atoms = put(atom_mask.sum(1))  # [R]
        self._core_index = torch.as_tensor(self.core_atoms, device=self.device)

    @property
    def n_components(self) -> int:
        """Number of rotamer alternatives over all blocks (the conformer's own counted once per block)."""
        return int(sum(len(b.weights) for b in self.blocks))

    # -- public --------------------------------------------------------------------------------------------------------

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Exact posterior mean E[x0 | x] for x = x0 + sigma eps: [B, N, 3]."""
        xf, s = self._prepare(x, sigma)
        out = torch.empty_like(xf)
        out[:, self._core_index] = self.core.denoise(xf[:, self._core_index], s).to(self.dtype)
        if self.blocks:
            logit, xb, c = self._block_terms(xf, s)
            r = torch.softmax(logit, dim=-1)  # [B, R, J]
            shrink = (self.tau**2 / c)[:, None, None, None]
            mean = torch.einsum("brj,rjna->brna", r, self._means)
            post = mean + shrink * (xb - mean)  # sum_j r_j [m_j + k (x - m_j)] = m_bar + k (x - m_bar)
            out[:, self._flat_atoms] = post[:, self._atom_mask]
        return out.to(x.dtype)

    def responsibilities(self, x: torch.Tensor, sigma) -> list[torch.Tensor]:
        """Per block, the posterior rotamer probabilities [B, J_r] at noise level sigma (component 0: the conformer's)."""
        xf, s = self._prepare(x, sigma)
        if not self.blocks:
            return []
        r = torch.softmax(self._block_terms(xf, s)[0], dim=-1)
        return [r[:, k, : len(b.weights)].to(x.dtype) for k, b in enumerate(self.blocks)]

    def log_marginal(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """log p_sigma(x) [B]; its gradient is the score (D(x, sigma) - x) / sigma^2."""
        xf, s = self._prepare(x, sigma)
        total = self.core.log_marginal(xf[:, self._core_index], s).to(self.dtype)
        if self.blocks:
            logit, _, c = self._block_terms(xf, s)
            norm = 1.5 * self._n_atoms[None] * torch.log(2.0 * math.pi * c)[:, None]  # [B, R]
            total = total + (torch.logsumexp(logit, dim=-1) - norm).sum(-1)
        return total.to(x.dtype)

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        return self.log_marginal(x0, 0.0)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact draws: the core from its Gaussian, each side chain from its rotamer mixture plus tau noise."""
        x = torch.empty((n, len(self.layout), 3), dtype=self.dtype, device=self.device)
        x[:, self._core_index] = self.core.sample(n, generator=generator)
        for k, b in enumerate(self.blocks):
            j = torch.multinomial(self._log_w[k, : len(b.weights)].exp(), n, replacement=True, generator=generator)
            noise = torch.randn((n, len(b.atoms), 3), generator=generator, dtype=self.dtype, device=self.device)
            x[:, torch.as_tensor(b.atoms, device=self.device)] = self._means[k, j, : len(b.atoms)] + self.tau * noise
        return x

    # -- internals -----------------------------------------------------------------------------------------------------

    def _prepare(self, x: torch.Tensor, sigma):
        if x.ndim != 3 or x.shape[1:] != (len(self.layout), 3):
            raise ValueError(f"x must have shape [B, {len(self.layout)}, 3], got {tuple(x.shape)}")
        return x.to(dtype=self.dtype, device=self.device), batch_sigma(sigma, x.shape[0], self.dtype, self.device)

    def _block_terms(self, xf: torch.Tensor, s: torch.Tensor):
        """Per block and component: log w_j - |x_r - m_j|^2 / (2c) [B, R, J], the block coordinates x_r [B, R, n, 3],
        and c = tau^2 + sigma^2 [B]."""
        c = self.tau**2 + s**2
        xb = xf[:, self._atoms]  # [B, R, n, 3]
        diff = xb[:, :, None] - self._means[None]  # [B, R, J, n, 3]
        sq = (diff.square().sum(-1) * self._atom_mask[None, :, None]).sum(-1)  # [B, R, J]
        return self._log_w[None] - sq / (2.0 * c[:, None, None]), xb, c
