"""A weight-free prior whose denoiser is exact: a Gaussian mixture over reference conformers.

The prior over the flattened 3N coordinates (Angstrom) is

    p(x0) = sum_k pi_k N(mu_k, Sigma_k),    Sigma_k = tau^2 I + V_k V_k^T,

where mu_k is a reference conformer and V_k [3N, m] an optional low-rank factor built from the softest modes of an
anisotropic network model (ANM) of mu_k, so that the flexibility follows the structure.  For x = x0 + sigma eps the
posterior mean (Tweedie's formula) is available in closed form,

    D(x, sigma) = sum_k r_k(x) [mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k)],
    r_k(x) ∝ pi_k N(x; mu_k, Sigma_k + sigma^2 I),

which makes this prior the yardstick for samplers and guidance: with an exact denoiser every error is the sampler's.

Linear algebra.  At construction V_k is rotated onto orthonormal columns, V_k V_k^T = U_k diag(g_k) U_k^T.  Then
A = Sigma_k + sigma^2 I = c I + U diag(g) U^T with c = tau^2 + sigma^2 acts as c on the complement of span(U) and as
c + g_j along u_j, which is the Woodbury identity and the matrix determinant lemma in the eigenbasis:

    A^-1 d     = d_perp / c + U diag(1 / (c + g)) U^T d,       d_perp = d - U U^T d
    log det A  = (3N - m) log c + sum_j log(c + g_j)
    Sigma A^-1 = tau^2 / c on the complement, (tau^2 + g_j) / (c + g_j) along u_j.

Writing the component means as mu + Sigma A^-1 d (rather than x - sigma^2 A^-1 d) avoids cancellation at both ends of
the noise schedule; responsibilities are normalised in log space (logsumexp).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg
import scipy.spatial
import torch

from predictors.base import AtomLayout, NoiseSchedule

__all__ = ["ReferencePrior", "anm_hessian", "anm_modes"]

# Above this many degrees of freedom the ANM eigenproblem is solved sparsely (shift-invert Lanczos) instead of densely.
_DENSE_EIGH_LIMIT = 3000
# An ANM eigenvalue below this fraction of the mean eigenvalue is a zero (rigid-body) mode.
_ZERO_MODE_RTOL = 1e-8


# ---------------------------------------------------------------------------------------------------------------------
# Anisotropic network model
# ---------------------------------------------------------------------------------------------------------------------


def anm_hessian(coords: np.ndarray, cutoff: float, gamma: float = 1.0) -> scipy.sparse.csr_matrix:
    """ANM Hessian [3n, 3n] of nodes at ``coords`` [n, 3] (A), as a sparse matrix.

    Atilgan et al. 2001, Biophys J 80:505: every pair of nodes closer than ``cutoff`` (A, inclusive) is joined by a
    Hookean spring of constant ``gamma`` at its rest length.  The off-diagonal 3x3 super-element is
    H_ij = -gamma r_ij r_ij^T / |r_ij|^2 and the diagonal one H_ii = -sum_{j != i} H_ij (units gamma / A^0: the
    springs' direction cosines only).
    """
    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    pairs = scipy.spatial.cKDTree(coords).query_pairs(cutoff, output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    r = coords[j] - coords[i]
    r2 = (r**2).sum(-1)
    if np.any(r2 == 0.0):
        k = int(np.flatnonzero(r2 == 0.0)[0])
        raise ValueError(f"ANM: nodes {i[k]} and {j[k]} sit on the same position; the network is undefined there")
    block = -gamma * r[:, :, None] * r[:, None, :] / r2[:, None, None]  # [P, 3, 3]

    ab = np.arange(3)
    rows, cols, vals = [], [], []

    def put(node_a, node_b, blocks):
        rows.append((3 * node_a[:, None, None] + ab[None, :, None]).repeat(3, axis=2).ravel())
        cols.append((3 * node_b[:, None, None] + ab[None, None, :]).repeat(3, axis=1).ravel())
        vals.append(blocks.ravel())

    put(i, j, block)
    put(j, i, block)  # r r^T is symmetric, so H_ji = H_ij
    put(i, i, -block)
    put(j, j, -block)
    rows_, cols_, vals_ = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    return scipy.sparse.coo_matrix((vals_, (rows_, cols_)), shape=(3 * n, 3 * n)).tocsr()  # duplicates are summed


def _lowest_eigenpairs(hessian: scipy.sparse.csr_matrix, count: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    dim = hessian.shape[0]
    if dim <= _DENSE_EIGH_LIMIT or count >= dim - 1:
        return scipy.linalg.eigh(hessian.toarray(), subset_by_index=[0, count - 1])
    # Shift-invert about a small negative shift: H - shift I is positive definite, and the lowest modes of H become the
    # largest of (H - shift I)^-1.
    vals, vecs = scipy.sparse.linalg.eigsh(hessian.tocsc(), k=count, sigma=-1e-3 * scale, which="LM")
    order = np.argsort(vals)
    return vals[order], vecs[:, order]


def anm_modes(coords: np.ndarray, n_modes: int, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_modes`` softest non-trivial ANM modes of ``coords`` [n, 3]: eigenvalues [m] and unit vectors [3n, m].

    The trivial modes (eigenvalue zero: the 6 rigid-body motions, more if the network falls apart into pieces at this
    cutoff) are skipped.  Eigenvalues ascend.
    """
    hessian = anm_hessian(coords, cutoff)
    dim = hessian.shape[0]
    scale = float(hessian.diagonal().sum()) / dim  # mean eigenvalue
    if scale <= 0.0:
        raise ValueError(f"ANM: no two nodes are within anm_cutoff={cutoff} A of each other; raise anm_cutoff")
    want = min(dim, 6 + n_modes)
    while True:
        vals, vecs = _lowest_eigenpairs(hessian, want, scale)
        n_zero = int(np.sum(vals < _ZERO_MODE_RTOL * scale))
        if want - n_zero >= n_modes:
            break
        if want == dim:
            raise ValueError(
                f"ANM: asked for n_modes={n_modes} but the network of {dim // 3} nodes has only {dim - n_zero} "
                "non-trivial modes; lower n_modes"
            )
        want = min(dim, 2 * want)
    if n_zero > 6:
        warnings.warn(
            f"ANM: the elastic network at anm_cutoff={cutoff} A falls apart into pieces ({n_zero} zero modes instead "
            "of 6); their relative rigid-body motions are left to the isotropic term. Raise anm_cutoff to couple them.",
            stacklevel=3,
        )
    return vals[n_zero : n_zero + n_modes], vecs[:, n_zero : n_zero + n_modes]


def _anm_nodes(layout: AtomLayout, coords: np.ndarray, n_modes: int) -> tuple[np.ndarray, np.ndarray]:
    """Network nodes (atom indices) and the node every atom moves with.

    One node per residue (matched by (chain_id, res_seq)): its CA, or for a residue without one (ligand, nucleotide)
    the atom nearest the residue's centroid.  If the layout has no CA at all, or too few residues to supply
    ``n_modes`` non-trivial modes, every atom is its own node.
    """
    n_atoms = len(layout)
    atom_residue = layout.residue_index()
    n_res = len(layout.residues())
    is_ca = layout.atom_name == "CA"
    if is_ca.any() and 3 * n_res - 6 >= n_modes:
        node_atom = np.full(n_res, -1, dtype=np.int64)
        ca = np.flatnonzero(is_ca)
        node_atom[atom_residue[ca]] = ca
        for r in np.flatnonzero(node_atom < 0):  # residues without a CA: one bead at the atom nearest the centroid
            members = np.flatnonzero(atom_residue == r)
            centre = coords[members].mean(axis=0)
            node_atom[r] = members[np.argmin(((coords[members] - centre) ** 2).sum(-1))]
        return node_atom, atom_residue
    return np.arange(n_atoms), np.arange(n_atoms)


def _anm_factor(
    layout: AtomLayout, coords: np.ndarray, n_modes: int, mode_rms: float, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    """V [N, 3, m] (A) and the ANM eigenvalues [m] for one conformer.

    Each node-level mode e_j is copied onto every atom of its residue, then scaled thermally: the variance along mode j
    is proportional to kT / lambda_j, with the overall factor chosen so that the RMS fluctuation over all N atoms,
    sqrt(trace(V V^T) / N), equals ``mode_rms``.
    """
    node_atom, atom_node = _anm_nodes(layout, coords, n_modes)
    eigvals, eigvecs = anm_modes(coords[node_atom], n_modes, cutoff)
    extended = eigvecs.reshape(len(node_atom), 3, n_modes)[atom_node]  # [N, 3, m]
    weight = 1.0 / np.sqrt(eigvals)  # thermal amplitude, std ∝ (kT / lambda)^(1/2)
    unscaled = extended * weight
    total_msf = (unscaled**2).sum() / len(layout)  # mean square fluctuation per atom
    return unscaled * (mode_rms / math.sqrt(total_msf)), eigvals


def _orthonormal_factor(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rewrite V V^T = U diag(g) U^T with orthonormal U [D, m] (columns for g = 0 are zero)."""
    gram = v.T @ v
    g, q = np.linalg.eigh(gram)
    g = np.clip(g, 0.0, None)
    keep = g > 1e-12 * max(float(g.max(initial=0.0)), 1e-300)
    u = np.zeros_like(v)
    u[:, keep] = (v @ q[:, keep]) / np.sqrt(g[keep])
    return u, np.where(keep, g, 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# The prior
# ---------------------------------------------------------------------------------------------------------------------


class ReferencePrior:
    """Gaussian mixture over K reference conformers, with its exact denoiser.

    p(x0) = sum_k pi_k N(mu_k, tau^2 I + V_k V_k^T) over the flattened coordinates (A).  V_k holds the ``n_modes``
    softest ANM modes of mu_k (CA network, ``anm_cutoff`` A, uniform springs; every atom moves with its residue's CA),
    scaled thermally (variance ∝ 1 / eigenvalue) to an RMS fluctuation of ``mode_rms`` A per atom; ``n_modes=0``
    leaves the isotropic term only.  The eigen-decomposition runs once, here, in float64.

    It lives in the input structure's frame: no random augmentation (rotation/translation) is needed or wanted, and
    none should be applied by a sampler: the conformers are not rotation-averaged, so the denoiser is exact only in
    the frame the conformers were given in.

    ``denoise``, ``log_marginal`` and ``log_prob`` take x [B, N, 3] (and sigma [B], or a scalar) of any float dtype;
    they compute in this prior's ``dtype``/``device`` and return in x's dtype.  All are differentiable in x.
    """

    layout: AtomLayout
    schedule: NoiseSchedule
    means: torch.Tensor  # [K, N, 3]
    weights: torch.Tensor  # [K], sums to 1
    modes: torch.Tensor  # [K, N, 3, m]: the ANM factor V_k (A)
    mode_eigenvalues: torch.Tensor  # [K, m]: ANM eigenvalues of the modes (spring constant 1)

    def __init__(
        self,
        layout: AtomLayout,
        conformers,
        weights=None,
        *,
        tau: float = 0.3,
        n_modes: int = 0,
        mode_rms: float = 1.0,
        anm_cutoff: float = 15.0,
        schedule: NoiseSchedule | None = None,
        dtype=torch.float32,
        device="cpu",
    ):
        mu = _as_float64(conformers)
        if mu.ndim == 2:
            mu = mu[None]
        n_atoms = len(layout)
        if mu.ndim != 3 or mu.shape[1:] != (n_atoms, 3):
            raise ValueError(
                f"conformers must have shape [K, {n_atoms}, 3] to match the layout of {n_atoms} atoms, got {mu.shape}"
            )
        if mu.shape[0] == 0:
            raise ValueError("conformers is empty: give at least one reference conformer")
        if not np.isfinite(mu).all():
            k, atom = np.argwhere(~np.isfinite(mu).all(-1))[0]
            chain, res, name = layout.keys()[atom]
            raise ValueError(f"conformer {k} has a non-finite coordinate at atom {name} of residue {chain}{res}")
        n_conf = mu.shape[0]
        w = np.full(n_conf, 1.0 / n_conf) if weights is None else _as_float64(weights).reshape(-1)
        if w.shape != (n_conf,):
            raise ValueError(f"weights must have one entry per conformer ({n_conf}), got shape {w.shape}")
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
        w = w / w.sum()
        if not tau > 0:
            raise ValueError(f"tau must be positive (A): it keeps every covariance full rank; got {tau}")
        if int(n_modes) != n_modes or n_modes < 0:
            raise ValueError(f"n_modes must be a non-negative integer, got {n_modes}")
        n_modes = int(n_modes)
        if n_modes > 0 and not mode_rms > 0:
            raise ValueError(f"mode_rms must be positive (A) when n_modes > 0, got {mode_rms}")
        if n_modes > 0 and not anm_cutoff > 0:
            raise ValueError(f"anm_cutoff must be positive (A), got {anm_cutoff}")

        self.layout = layout
        self.schedule = NoiseSchedule() if schedule is None else schedule
        self.tau = float(tau)
        self.dtype = dtype
        self.device = torch.device(device)

        v = np.zeros((n_conf, n_atoms, 3, n_modes))
        lam = np.zeros((n_conf, n_modes))
        for k in range(n_conf):
            if n_modes:
                v[k], lam[k] = _anm_factor(layout, mu[k], n_modes, mode_rms, anm_cutoff)
        basis = np.zeros((n_conf, 3 * n_atoms, n_modes))
        gains = np.zeros((n_conf, n_modes))
        for k in range(n_conf):
            basis[k], gains[k] = _orthonormal_factor(v[k].reshape(3 * n_atoms, n_modes))

        def put(a):
            return torch.as_tensor(a, dtype=dtype, device=self.device)

        self.means = put(mu)
        self.weights = put(w)
        self.modes = put(v)
        self.mode_eigenvalues = put(lam)
        with np.errstate(divide="ignore"):
            self._log_weights = put(np.log(w))  # -inf for a zero weight: that component never gets responsibility
        self._basis = put(basis)  # [K, 3N, m] orthonormal columns U_k
        self._gains = put(gains)  # [K, m]: V_k V_k^T = U_k diag(g_k) U_k^T

    # -- public --------------------------------------------------------------------------------------------------------

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Exact posterior mean E[x0 | x] for x = x0 + sigma eps: [B, N, 3]."""
        log_joint, comp_means = self._components(x, sigma, with_means=True)
        r = torch.softmax(log_joint, dim=-1)  # [B, K]
        out = torch.einsum("bk,bkd->bd", r, comp_means)
        return out.reshape(x.shape).to(x.dtype)

    def responsibilities(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Posterior component probabilities r_k(x) [B, K] at noise level sigma."""
        log_joint, _ = self._components(x, sigma)
        return torch.softmax(log_joint, dim=-1).to(x.dtype)

    def log_marginal(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """log p_sigma(x) [B] of the noised prior sum_k pi_k N(mu_k, Sigma_k + sigma^2 I).

        Its gradient is the score: grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (Tweedie).
        """
        log_joint, _ = self._components(x, sigma)
        return torch.logsumexp(log_joint, dim=-1).to(x.dtype)

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """Exact log density [B] of the prior at x0 [B, N, 3] (A^-3N)."""
        return self.log_marginal(x0, 0.0)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact draws from the prior [n, N, 3]: pick k ~ pi, then mu_k + tau eps + V_k z with eps, z ~ N(0, I)."""
        n_atoms, n_modes = len(self.layout), self.modes.shape[-1]
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[comp] + self.tau * torch.randn(
            (n, n_atoms, 3), generator=generator, dtype=self.dtype, device=self.device
        )
        z = torch.randn((n, n_modes), generator=generator, dtype=self.dtype, device=self.device)
        for k in range(len(self.weights)):
            sel = comp == k
            if n_modes and sel.any():
                x[sel] += torch.einsum("nam,bm->bna", self.modes[k], z[sel])
        return x

    def covariance(self, k: int) -> torch.Tensor:
        """Dense Sigma_k = tau^2 I + V_k V_k^T [3N, 3N] (for tests on small N)."""
        v = self.modes[k].reshape(3 * len(self.layout), -1)
        eye = torch.eye(v.shape[0], dtype=self.dtype, device=self.device)
        return self.tau**2 * eye + v @ v.T

    # -- internals -----------------------------------------------------------------------------------------------------

    def _components(self, x: torch.Tensor, sigma, with_means: bool = False):
        """log pi_k + log N(x; mu_k, Sigma_k + sigma^2 I) [B, K] and, if asked, the component posterior means
        [B, K, 3N]."""
        n_atoms = len(self.layout)
        if x.ndim != 3 or x.shape[1:] != (n_atoms, 3):
            raise ValueError(
                f"x must have shape [B, {n_atoms}, 3] for this prior's {n_atoms} atoms, got {tuple(x.shape)}"
            )
        batch, dim = x.shape[0], 3 * n_atoms
        xf = x.to(dtype=self.dtype, device=self.device).reshape(batch, 1, dim)
        s = batch_sigma(sigma, batch, self.dtype, self.device)

        tau2 = self.tau**2
        c = (tau2 + s**2)[:, None]  # [B, 1]
        cg = c[:, :, None] + self._gains  # [B, K, m]
        d = xf - self.means.reshape(1, -1, dim)  # [B, K, 3N]
        p = torch.einsum("bkd,kdm->bkm", d, self._basis)  # coordinates along the modes
        d_perp = d - torch.einsum("bkm,kdm->bkd", p, self._basis)
        quad = (d_perp**2).sum(-1) / c + (p**2 / cg).sum(-1)  # d^T A^-1 d
        n_modes = self._gains.shape[-1]
        logdet = (dim - n_modes) * torch.log(c) + torch.log(cg).sum(-1)  # matrix determinant lemma
        log_joint = self._log_weights - 0.5 * (quad + logdet + dim * math.log(2.0 * math.pi))
        if not with_means:
            return log_joint, None
        # mu_k + Sigma_k A^-1 d: shrink the off-mode part by tau^2 / c and mode j by (tau^2 + g_j) / (c + g_j).
        shrink_modes = (tau2 + self._gains) / cg
        comp_means = (
            self.means.reshape(1, -1, dim)
            + (tau2 / c)[:, :, None] * d_perp
            + torch.einsum("bkm,kdm->bkd", shrink_modes * p, self._basis)
        )
        return log_joint, comp_means


def batch_sigma(sigma, batch: int, dtype, device) -> torch.Tensor:
    """Noise levels [batch] from a scalar or one value per sample (A)."""
    s = torch.as_tensor(sigma, dtype=dtype, device=device).reshape(-1)
    if s.numel() == 1:
        return s.expand(batch)
    if s.numel() != batch:
        raise ValueError(f"sigma must be a scalar or have one entry per sample ({batch}), got shape {tuple(s.shape)}")
    return s


def _as_float64(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)
