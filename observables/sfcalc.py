"""X-ray structure factors of atoms in a crystal by FFT, in pure JAX: differentiable in coordinates, per-atom B-factors
and occupancies (weights).

    F(h) = sum_j  w_j f_j(s) exp(-B_j s^2) exp(2 pi i h . x_j)        (summed over every symmetry copy of every atom)

h = (h, k, l) Miller indices, x_j fractional coordinates, s^2 = (sin(theta)/lambda)^2 = 1/(4 d^2) (1/A^2), f_j the
IT92 form factor (``observables.form_factors``), B_j the isotropic displacement parameter (A^2), w_j = member weight x
occupancy.  How it is computed (the route of Ten Eyck 1977, Acta Cryst. A33, 486, as in cctbx and gemmi, with one
change: form factors are applied in reciprocal space, per element):

1. Every atom of one element g is put on a grid over the whole unit cell (P1, periodic) as ONE normalised Gaussian of
   width B_j + b_blur:  rho(r) = w_j (4 pi / b)^(3/2) exp(-4 pi^2 |r - r_j|^2 / b), whose Fourier transform is
   w_j exp(-b s^2).  The common extra width ``blur`` makes the Gaussian smooth enough for the grid (below).
2. One real FFT per element grid gives G_g(k) = (V / n_grid) sum_u rho_g(u) exp(2 pi i k . u / n) ~ the transform of
   rho_g at every index k.
3. Symmetry in reciprocal space (no symmetry copies are put on the grid): with operators x -> R_s x + t_s,
   F_g(h) = sum_s exp(2 pi i h . t_s) G_g(h R_s), the P1 transform read at the rotated index.
4. F(h) = sum_g f_g(s) exp(+blur s^2) F_g(h): the element's form factor, and the blur removed exactly.

Accuracy (stated, and tested against gemmi's direct summation): a grid of n_i points along axis i with
n_i >= 2 rate a_i / d_min aliases each reflection with images at least q - s_max away in reciprocal space (q: the
shortest non-zero vector of the grid's reciprocal lattice, s_max = 1/d_min); a Gaussian of width b damps the image by
exp(-b (|q - s_max|^2 - s_max^2) / 4) relative to the reflection, so b_min = 4 ln(1/alias) / ((q - s_max)^2 - s_max^2)
keeps the aliasing below ``alias`` (default 1e-5); blur = max(0, b_min - B_min).  Each Gaussian is truncated where it
has fallen to ``cutoff`` (default 1e-5) of its centre value, which leaves about 1e-5 of its weight out.  In float32 the
deblur exp(blur s^2) also amplifies rounding at high resolution (x100-600 at s = 1/d_min for the default rate 1.3):
measured against gemmi's direct summation, |F - F_ref| / |F_ref| = 5e-6 to 2.2e-5 (tests/test_xray.py).  A finer grid
(``rate``) needs less blur and is more accurate, at the cost of larger FFTs: rate 1.3 was the fastest in
scripts/bench_xray.py.

Why one Gaussian per atom instead of the 5-Gaussian IT92 density on one grid (gemmi's DensityCalculator): the widest
IT92 term (b ~ 50 A^2 for C) sets every atom's window there; here the window only has to hold B + blur, about 20 times
fewer exponentials per atom, at the price of one FFT per element (C, N, O, S, ...), which is cheap by comparison.
An ensemble's F is the weighted sum of its members' F: all members go onto the same grids with their weights, so the
FFT cost does not grow with the ensemble.

The gradient is a custom VJP: the backward pass gathers the cotangent grid on each atom's window (the transpose of
the scatter) and contracts it with the analytic derivatives in x, w and B, recomputing the window values instead of
storing them.  Units: F in electrons; coordinates in A; B in A^2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import gemmi
import jax
import jax.numpy as jnp
import numpy as np

from observables.form_factors import form_factor, normalise_element

__all__ = ["CellGrid", "StructureFactorModel", "b_range", "displacements", "fft_size", "miller_stol2", "symmetry_ops"]

# the smallest total Gaussian width (A^2): keeps k = 4 pi^2 / b finite for atoms with B + blur ~ 0
MIN_WIDTH = 1.0


def fft_size(n_min: int) -> int:
    """The smallest even integer >= n_min whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    n = max(2, int(math.ceil(n_min)))
    while True:
        if n % 2 == 0:
            m = n
            for p in (2, 3, 5):
                while m % p == 0:
                    m //= p
            if m == 1:
                return n
        n += 1


def miller_stol2(cell: gemmi.UnitCell, hkl: np.ndarray) -> np.ndarray:
    """(sin(theta)/lambda)^2 = 1/(4 d^2) (1/A^2) of Miller indices ``hkl [M, 3]``."""
    frac = np.array(cell.frac.mat.tolist())  # rows: the reciprocal axes a*, b*, c* in Cartesian components
    s = np.asarray(hkl, dtype=np.float64) @ frac  # [M, 3] reciprocal vectors (1/A)
    return 0.25 * np.sum(s * s, axis=-1)


def symmetry_ops(space_group: gemmi.SpaceGroup) -> tuple[np.ndarray, np.ndarray]:
    """All operators (centring included) as integer rotations ``R [S, 3, 3]`` and fractional translations
    ``t [S, 3]``: a symmetry copy of fractional x is R x + t."""
    rots, trans = [], []
    for op in space_group.operations():
        rots.append(np.array(op.rot, dtype=np.int64) // op.DEN)
        trans.append(np.array(op.tran, dtype=np.float64) / op.DEN)
    return np.stack(rots), np.stack(trans)


@dataclass(frozen=True)
class CellGrid:
    """A grid of ``shape`` points over the unit cell, sized for structure factors to ``d_min`` at ``rate`` (grid
    spacing <= d_min / (2 rate) along every cell axis)."""

    cell: gemmi.UnitCell
    shape: tuple[int, int, int]

    @classmethod
    def for_resolution(cls, cell: gemmi.UnitCell, d_min: float, rate: float = 1.3) -> "CellGrid":
        if not d_min > 0 or not rate >= 1.0:
            raise ValueError(f"d_min must be > 0 and rate >= 1, got d_min={d_min}, rate={rate}")
        lengths = (cell.a, cell.b, cell.c)
        return cls(cell, tuple(fft_size(2.0 * rate * a / d_min) for a in lengths))

    @property
    def orth(self) -> np.ndarray:
        return np.array(self.cell.orth.mat.tolist())

    @property
    def frac(self) -> np.ndarray:
        return np.array(self.cell.frac.mat.tolist())

    def shortest_alias(self) -> float:
        """Length (1/A) of the shortest non-zero vector sum_i m_i n_i a*_i (m integer): how far in reciprocal space
        the grid's first alias of a reflection lies."""
        basis = np.array(self.shape)[:, None] * self.frac  # rows n_i a*_i
        m = np.stack(np.meshgrid(*[np.arange(-2, 3)] * 3, indexing="ij"), -1).reshape(-1, 3)
        m = m[np.any(m != 0, axis=1)]
        return float(np.min(np.linalg.norm(m @ basis, axis=1)))


# ----------------------------------------------------------------------------------------------------------------
# Gaussians on a periodic, possibly oblique grid
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    """Window rows that share one length: ``du`` / ``dv`` [R] index offsets along the first two (permuted) axes,
    ``d`` [R, 3] their Cartesian offset (A), ``t`` the positions along the row axis ([L] shared by every row, or [R, L]
    per row) and ``t_first`` [R] the first of them (int)."""

    du: np.ndarray
    dv: np.ndarray
    d: np.ndarray
    t: np.ndarray
    t_first: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.du), self.t.shape[-1]


class _Spreader:
    """Scatter weighted normalised Gaussians onto ``n_groups`` periodic cell grids: ``spread(x, w, beta, u, group)``.

    Atom j is the Gaussian of covariance Sigma_j = U_j + beta_j I (A^2): x [A, 3] Cartesian centres (A), w [A]
    weights, beta [A] isotropic variances (A^2; B / (8 pi^2) with the blur included), u [A, 6] anisotropic U
    (U11, U22, U33, U12, U13, U23, Cartesian A^2; zeros for isotropic atoms), group [A] int -> flat grids;
    ``fold`` wraps them into [n_groups, n1, n2, n3] cell grids (cell axes in the order ``perm``).
    rho_j(r) = w_j (2 pi)^(-3/2) det(Sigma_j)^(-1/2) exp(-d^T Q_j d), Q_j = Sigma_j^-1 / 2, d = r - x_j; its Fourier
    transform is w_j exp(-2 pi^2 s^T Sigma_j s).

    An atom's window is the grid points around its nearest grid point that can come within ``radius`` of it, as rows
    along one cell axis (the last of ``perm``), each row just as long as the sphere is there.  Rows wrap periodically
    in the other two axes by index arithmetic; along the row axis the grid is padded so each row is one contiguous
    run, and ``fold`` adds the padding back.  Along a row d = d_r + t e_w, so d^T Q d = A_r + t B_r + t^2 C.
    When the row axis is perpendicular to the other two (it is chosen so where the cell allows: all but triclinic
    cells and odd settings) and the atoms are isotropic (``anisotropic`` False), the Gaussian separates,
    exp(-kappa |d|^2) = exp(-kappa |d_r + d0_perp|^2) exp(-kappa (d0_par + t |e_w|)^2): one exponential per row and
    one per point of the axis, the window values being their outer product.  Otherwise every point takes its own
    exponential, on rows cut into ``segment``-long pieces that follow the sphere.
    """

    CHUNK_VALUES = 300_000  # window values per scan step (keeps temporaries in cache)

    def __init__(self, grid: CellGrid, radius: float, n_groups: int, *, anisotropic: bool = True, segment: int = 8):
        n_cell = np.array(grid.shape)
        step_cell = grid.orth / n_cell[None, :]  # columns: Cartesian displacement of one index step per cell axis
        unit = step_cell / np.linalg.norm(step_cell, axis=0)
        row_axis, perpendicular = 2, False
        for axis in (2, 1, 0):  # a cell axis perpendicular to the other two, preferring the last (no permutation)
            if all(abs(unit[:, axis] @ unit[:, i]) < 1e-9 for i in range(3) if i != axis):
                row_axis, perpendicular = axis, True
                break
        self.perm = tuple(i for i in range(3) if i != row_axis) + (row_axis,)
        n = n_cell[list(self.perm)]
        step = step_cell[:, list(self.perm)]
        frac = grid.frac[list(self.perm), :]
        self.separable = perpendicular and not anisotropic
        # extent of a sphere of `radius` along (permuted) fractional axis i is radius * |a*_i|; +1 for the nearest
        # grid point
        half = np.ceil(radius * np.linalg.norm(frac, axis=1) * n + 1.0).astype(np.int64)
        e_w = step[:, 2]
        w_len = float(np.linalg.norm(e_w))
        w_hat = e_w / w_len
        # the atom is within half a step of its window centre along each axis: at most `slack` from it, and at most
        # `slack_perp` from it across the row axis
        signs = np.array([[1, 1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]], dtype=np.float64)
        slack = 0.5 * float(np.max(np.linalg.norm(signs @ step.T, axis=1)))
        slack_perp = 0.5 * float(np.max(np.linalg.norm(signs[:2, :2] @ step[:, :2].T, axis=1)))
        du, dv = np.meshgrid(np.arange(-half[0], half[0] + 1), np.arange(-half[1], half[1] + 1), indexing="ij")
        du, dv = du.ravel(), dv.ravel()
        rows_d = du[:, None] * step[:, 0] + dv[:, None] * step[:, 1]
        par = rows_d @ w_hat
        perp = np.sqrt(np.maximum(np.sum(rows_d**2, axis=1) - par**2, 0.0))
        blocks = []
        if self.separable:  # rows are centred on the atom along the row axis (D_r . e_w = 0): symmetric lengths
            near = np.maximum(perp - slack_perp, 0.0)
            keep = near <= radius
            chord = np.sqrt(np.maximum(radius**2 - near**2, 0.0))
            h_row = np.minimum(np.ceil(chord / w_len + 0.5).astype(np.int64), half[2])
            for h in np.unique(h_row[keep]):
                sel = keep & (h_row == h)
                t = np.arange(-h, h + 1, dtype=np.float32)
                blocks.append(_Block(du[sel], dv[sel], rows_d[sel].astype(np.float32), t,
                                     np.full(sel.sum(), -h, np.int64)))
            pad_hi = int(half[2])
        else:
            reach = radius + slack
            seg_rows, seg_t0 = [], []
            for r in range(len(du)):
                if perp[r] > reach:
                    continue
                chord = math.sqrt(reach**2 - perp[r] ** 2)
                lo = max(int(math.floor((-par[r] - chord) / w_len)), -int(half[2]))
                hi = min(int(math.ceil((-par[r] + chord) / w_len)), int(half[2]))
                for t0 in range(lo, hi + 1, segment):
                    seg_rows.append(r)
                    seg_t0.append(t0)
            seg_rows, seg_t0 = np.array(seg_rows), np.array(seg_t0)
            t = (seg_t0[:, None] + np.arange(segment)[None, :]).astype(np.float32)
            blocks.append(_Block(du[seg_rows], dv[seg_rows], rows_d[seg_rows].astype(np.float32), t, seg_t0))
            pad_hi = int(half[2]) + segment  # a segment that starts near the window's end runs past it
        self.blocks = blocks
        self.shape = tuple(int(v) for v in n)
        self.half = tuple(int(h) for h in half)
        self.pad_w = (int(half[2]), pad_hi + 1)  # padding before / after the cell along the row axis
        self.padded = (self.shape[0], self.shape[1], self.shape[2] + sum(self.pad_w))
        self.n_groups = int(n_groups)
        self.radius = float(radius)
        self.p_total = int(np.prod(self.padded))
        if self.p_total * n_groups >= 2**31:
            raise ValueError(f"cell grid {self.shape} x {n_groups} groups is too large for 32-bit indices")
        self._e_w = e_w.astype(np.float32)
        self._w_hat = w_hat.astype(np.float32)
        self._w_len = np.float32(w_len)
        self._frac = frac.astype(np.float32)
        self._orth = (step * n[None, :]).astype(np.float32)  # permuted orthogonalisation matrix
        self.spread = self._make_spread()

    def values_per_atom(self) -> int:
        return int(sum(b.shape[0] * b.shape[1] for b in self.blocks))

    def _make_spread(self):
        n_f = np.array(self.shape, dtype=np.float32)
        n_i = np.array(self.shape, dtype=np.int32)
        frac, orth, e_w = self._frac, self._orth, self._e_w
        w_hat, w_len, separable = self._w_hat, self._w_len, self.separable
        p_total = self.p_total
        stride_u, stride_v, lead_w = int(self.padded[1] * self.padded[2]), int(self.padded[2]), self.pad_w[0]
        chunk_target = max(1, self.CHUNK_VALUES // self.values_per_atom())
        scatter_dims = jax.lax.ScatterDimensionNumbers(
            update_window_dims=(1,), inserted_window_dims=(), scatter_dims_to_operand_dims=(0,)
        )
        gather_dims = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(), start_index_map=(0,))
        in_bounds = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS  # guaranteed by the wrap and the row-axis padding
        size = p_total * self.n_groups
        eye = np.eye(3, dtype=np.float32)
        blocks = [(b, b.t.ndim == 1, b.t.shape[-1]) for b in self.blocks]

        def chunks(x, w, beta, u, group):
            """Atoms in chunks [C, chunk, ...]; padding atoms have weight 0 (at the origin, variance 1, group 0)."""
            n_atoms = x.shape[0]
            chunk = min(chunk_target, n_atoms)
            n_chunks = -(-n_atoms // chunk)
            pad = n_chunks * chunk - n_atoms
            out = []
            for a, fill in ((x, 0.0), (w, 0.0), (beta, 1.0), (u, 0.0), (group, 0)):
                if pad:
                    a = jnp.concatenate([a, jnp.full((pad, *a.shape[1:]), fill, a.dtype)])
                out.append(a.reshape(n_chunks, chunk, *a.shape[1:]))
            return out

        def precision(beta, u):
            """Q = Sigma^-1 / 2 [a, 3, 3] and the amplitude (2 pi)^-3/2 det(Sigma)^-1/2 [a]."""
            sigma = jnp.stack([
                jnp.stack([u[:, 0], u[:, 3], u[:, 4]], -1),
                jnp.stack([u[:, 3], u[:, 1], u[:, 5]], -1),
                jnp.stack([u[:, 4], u[:, 5], u[:, 2]], -1),
            ], -2) + beta[:, None, None] * eye
            return 0.5 * jnp.linalg.inv(sigma), jnp.power(2.0 * np.pi, -1.5) * jax.lax.rsqrt(jnp.linalg.det(sigma))

        def centre(x):
            """Nearest grid point [a, 3] (int, in [0, n)) and its offset from the atom d0 [a, 3] (A)."""
            f = jnp.nan_to_num(x @ frac.T)  # fractional, in the permuted axis order
            f = f - jnp.floor(f)
            g = jnp.round(f * n_f)
            d0 = (g / n_f - f) @ orth.T
            return jnp.mod(g.astype(jnp.int32), n_i), d0

        def starts(g, group, block):
            """Flat index of each row's first point [a, R]: wrapped along the first two axes, padded along the row."""
            iu = jnp.mod(g[:, 0:1] + block.du[None, :], n_i[0])
            iv = jnp.mod(g[:, 1:2] + block.dv[None, :], n_i[1])
            iw = g[:, 2:3] + (block.t_first + lead_w)[None, :]
            return iu * stride_u + iv * stride_v + iw + (group * p_total)[:, None]

        def values(d0, q, beta, block, shared):
            """exp(-d^T Q d) on the block's rows [a, R, L], and the rows' offsets from the atom d_r [a, R, 3]."""
            dr = d0[:, None, :] + block.d[None]
            if separable:  # Q = kappa I; D_r is perpendicular to the row axis
                kappa = 0.5 / beta
                par = d0 @ w_hat  # [a]
                perp = dr - par[:, None, None] * w_hat
                f_row = jnp.exp(-kappa[:, None] * jnp.sum(perp * perp, -1))  # [a, R]
                f_t = jnp.exp(-kappa[:, None] * jnp.square(par[:, None] + block.t[None, :] * w_len))  # [a, L]
                return f_row[:, :, None] * f_t[:, None, :], dr
            t = block.t if not shared else block.t[None, :]
            qe = jnp.einsum("aij,j->ai", q, e_w)
            a_r = jnp.einsum("ari,aij,arj->ar", dr, q, dr)
            b_r = 2.0 * jnp.einsum("ari,ai->ar", dr, qe)
            c = qe @ e_w
            return jnp.exp(-(a_r[:, :, None] + b_r[:, :, None] * t[None] + c[:, None, None] * jnp.square(t)[None])), dr

        @jax.custom_vjp
        def spread(x, w, beta, u, group):
            def add(flat, chunk):
                xc, wc, bc, uc, gc = chunk
                q, amp = precision(bc, uc)
                g, d0 = centre(xc)
                for block, shared, length in blocks:
                    vals, _ = values(d0, q, bc, block, shared)
                    rows = (wc * amp)[:, None, None] * vals
                    flat = jax.lax.scatter_add(flat, starts(g, gc, block).reshape(-1, 1), rows.reshape(-1, length),
                                               scatter_dims, mode=in_bounds)
                return flat, None

            flat, _ = jax.lax.scan(add, jnp.zeros(size, jnp.float32), tuple(chunks(x, w, beta, u, group)))
            return flat

        def spread_fwd(x, w, beta, u, group):
            return spread(x, w, beta, u, group), (x, w, beta, u, group)

        def spread_bwd(res, flat_bar):
            x, w, beta, u, group = res
            n_atoms = x.shape[0]

            def grads(chunk):
                xc, wc, bc, uc, gc = chunk
                q, amp = precision(bc, uc)
                g, d0 = centre(xc)
                qe = jnp.einsum("aij,j->ai", q, e_w)
                w_bar = jnp.zeros_like(wc)
                sd = jnp.zeros_like(xc)
                quad = jnp.zeros_like(wc)
                if separable:  # Q = kappa I: the same formulas without 3 x 3 products
                    kappa = 0.5 / bc
                    par = d0 @ w_hat
                    s0 = jnp.zeros_like(wc)
                    s_d = jnp.zeros_like(xc)
                    s_q = jnp.zeros_like(wc)
                    for block, shared, length in blocks:
                        cb = jax.lax.gather(flat_bar, starts(g, gc, block).reshape(-1, 1), gather_dims, (length,),
                                            mode=in_bounds).reshape(xc.shape[0], -1, length)  # cotangent [a, R, L]
                        dr = d0[:, None, :] + block.d[None]
                        perp = dr - par[:, None, None] * w_hat
                        f_row = amp[:, None] * jnp.exp(-kappa[:, None] * jnp.sum(perp * perp, -1))  # [a, R]
                        tt = block.t[None, :]
                        f_t = jnp.exp(-kappa[:, None] * jnp.square(par[:, None] + tt * w_len))  # [a, L]
                        # one pass over the cotangent: its moments along the row with f_t, t f_t, t^2 f_t
                        m0 = (cb * f_t[:, None, :]).sum(-1) * f_row
                        m1 = (cb * (f_t * tt)[:, None, :]).sum(-1) * f_row
                        m2 = (cb * (f_t * tt * tt)[:, None, :]).sum(-1) * f_row
                        s0 = s0 + m0.sum(-1)
                        s_d = s_d + jnp.einsum("ar,ard->ad", m0, dr) + m1.sum(-1)[:, None] * e_w[None, :]
                        # |d|^2 = |d_r|^2 + 2 t d_r . e_w + t^2 |e_w|^2
                        s_q = s_q + (m0 * jnp.sum(dr * dr, -1)).sum(-1) + 2.0 * (m1 * (dr @ e_w)).sum(-1) \
                            + m2.sum(-1) * (e_w @ e_w)
                    x_bar = 2.0 * (wc * kappa)[:, None] * s_d
                    # rho = w (kappa / pi)^1.5 exp(-kappa |d|^2), kappa = 1 / (2 beta): d rho / d beta
                    beta_bar = wc * (2.0 * kappa**2 * s_q - 3.0 * kappa * s0)
                    return x_bar, s0, beta_bar
                for block, shared, length in blocks:
                    cb = jax.lax.gather(flat_bar, starts(g, gc, block).reshape(-1, 1), gather_dims, (length,),
                                        mode=in_bounds).reshape(xc.shape[0], -1, length)  # cotangent [a, R, L]
                    if separable:  # rho = amp f_row f_t: contract the cotangent with f_t, t f_t, t^2 f_t in one pass
                        kappa = 0.5 / bc
                        par = d0 @ w_hat
                        dr = d0[:, None, :] + block.d[None]
                        perp = dr - par[:, None, None] * w_hat
                        f_row = amp[:, None] * jnp.exp(-kappa[:, None] * jnp.sum(perp * perp, -1))
                        f_t = jnp.exp(-kappa[:, None] * jnp.square(par[:, None] + block.t[None, :] * w_len))
                        moments = jnp.stack([f_t, f_t * block.t, f_t * jnp.square(block.t)], axis=-1)  # [a, L, 3]
                        proj = jnp.einsum("arl,alk->ark", cb, moments) * f_row[:, :, None]
                        s_row, s_t, s_tt = proj[..., 0], proj[..., 1], proj[..., 2]
                    else:
                        vals, dr = values(d0, q, bc, block, shared)
                        cv = cb * vals * amp[:, None, None]  # cotangent x rho / w   [a, R, L]
                        t = block.t[None, None, :] if shared else block.t[None]
                        s_row = cv.sum(-1)  # [a, R]
                        s_t = (cv * t).sum(-1)
                        s_tt = (cv * t * t).sum(-1)
                    w_bar = w_bar + s_row.sum(-1)
                    # d rho / d x = 2 Q d rho, d = d_r + t e_w
                    sd = sd + jnp.einsum("ar,ard->ad", s_row, dr) + s_t.sum(-1)[:, None] * e_w[None, :]
                    # d rho / d beta = rho (2 |Q d|^2 - tr Q), |Q d|^2 = |Q d_r|^2 + 2 t (Q d_r).(Q e_w) + t^2 |Q e_w|^2
                    qd = jnp.einsum("aij,arj->ari", q, dr)
                    quad = quad + ((s_row * jnp.sum(qd * qd, -1)).sum(-1)
                                   + 2.0 * (s_t * jnp.einsum("ari,ai->ar", qd, qe)).sum(-1)
                                   + s_tt.sum(-1) * jnp.sum(qe * qe, -1))
                x_bar = 2.0 * wc[:, None] * jnp.einsum("aij,aj->ai", q, sd)
                beta_bar = wc * (2.0 * quad - jnp.trace(q, axis1=1, axis2=2) * w_bar)
                return x_bar, w_bar, beta_bar

            x_bar, w_bar, beta_bar = jax.lax.map(grads, tuple(chunks(x, w, beta, u, group)))
            return (x_bar.reshape(-1, 3)[:n_atoms], w_bar.reshape(-1)[:n_atoms], beta_bar.reshape(-1)[:n_atoms],
                    jnp.zeros_like(u), np.zeros(group.shape, dtype=jax.dtypes.float0))

        spread.defvjp(spread_fwd, spread_bwd)
        return spread

    def fold(self, flat: jnp.ndarray) -> jnp.ndarray:
        """Flat grids -> [n_groups, n1, n2, n3] cell grids (axes in ``perm`` order): the row-axis padding is added back
        periodically (padded index p is cell index (p - lead) mod n)."""
        g = flat.reshape(self.n_groups, *self.padded)
        n, (lead, tail) = self.shape[2], self.pad_w
        p = self.padded[2]
        if lead <= n and tail <= n:
            low = jax.lax.slice_in_dim(g, 0, lead, axis=3)
            high = jax.lax.slice_in_dim(g, lead + n, p, axis=3)
            main = jax.lax.slice_in_dim(g, lead, lead + n, axis=3)
            return (main + jnp.pad(low, ((0, 0), (0, 0), (0, 0), (n - lead, 0)))
                    + jnp.pad(high, ((0, 0), (0, 0), (0, 0), (0, n - tail))))
        idx = jnp.asarray((np.arange(p) - lead) % n)  # a window wider than the cell (tiny cells)
        return jnp.zeros((*g.shape[:3], n), g.dtype).at[:, :, :, idx].add(g)


# ----------------------------------------------------------------------------------------------------------------
# Structure factors
# ----------------------------------------------------------------------------------------------------------------


def _rfft3(shape: tuple[int, int, int]):
    """rfftn over the last three axes of real grids [..., n1, n2, n3], with its transpose written out: for a complex
    cotangent c of the half spectrum, JAX's convention gives x_bar = (n / 2) irfftn(conj(c) w), w = 2 on the k3 = 0
    (and Nyquist) planes that the half spectrum holds once and 1 elsewhere (checked against jax.vjp of rfftn in
    tests/test_xray.py).  JAX's own transpose of rfftn costs several full complex FFTs; this is one inverse real FFT."""
    n_total = float(np.prod(shape))
    wgt = np.ones(shape[2] // 2 + 1, np.float32)
    wgt[0] = 2.0
    if shape[2] % 2 == 0:
        wgt[-1] = 2.0

    @jax.custom_vjp
    def rfft3(x):
        return jnp.fft.rfftn(x, axes=(-3, -2, -1))

    def fwd(x):
        return rfft3(x), None

    def bwd(_, c):
        return (0.5 * n_total * jnp.fft.irfftn(jnp.conj(c) * wgt, s=shape, axes=(-3, -2, -1)).astype(jnp.float32),)

    rfft3.defvjp(fwd, bwd)
    return rfft3


class StructureFactorModel:
    """F_calc at fixed reflections for atoms of fixed elements: ``model(coords [A, 3], weights [A], b_iso [A])``.

    Built from the ``cell`` and ``space_group`` (gemmi objects or their names), the reflections ``hkl [M, 3]``, the
    atoms' ``elements [A]`` and the range of B the atoms will have (``b_min``, ``b_max``, A^2: they set the blur and
    the window size; atoms outside that range stay correct but lose some accuracy).  ``anisotropic`` True allows
    ``u_aniso`` in the calls (otherwise it must be None or zeros: isotropic atoms take a faster, separable window).  ``d_min`` defaults to the
    reflections' highest resolution; ``rate`` is the grid oversampling (spacing <= d_min / (2 rate)).
    ``coords`` are Cartesian (A) in the crystal's frame; ``weights`` = member weight x occupancy.
    ``ensemble(coords [E, N, 3], weights [E] or [E, N], b_iso [N] or [E, N])`` is the weighted sum over members.
    Returns complex64 F [M] (electrons).
    """

    def __init__(
        self,
        cell,
        space_group,
        hkl: np.ndarray,
        elements: Sequence[str],
        *,
        b_min: float = 5.0,
        b_max: float = 80.0,
        d_min: float | None = None,
        rate: float = 1.3,
        alias: float = 1e-5,
        cutoff: float = 1e-5,
        anisotropic: bool = False,
    ):
        self.cell = cell if isinstance(cell, gemmi.UnitCell) else gemmi.UnitCell(*cell)
        self.space_group = (space_group if isinstance(space_group, gemmi.SpaceGroup)
                            else gemmi.SpaceGroup(str(space_group)))
        hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
        if len(hkl) == 0:
            raise ValueError("no reflections")
        self.hkl = hkl
        self.stol2 = miller_stol2(self.cell, hkl)
        d_data = float(1.0 / np.sqrt(4.0 * self.stol2.max()))
        self.d_min = d_data if d_min is None else min(float(d_min), d_data)
        self.grid = CellGrid.for_resolution(self.cell, self.d_min, rate)
        s_max = 1.0 / self.d_min
        q = self.grid.shortest_alias()
        if not q > 2.0 * s_max:
            raise ValueError(f"grid {self.grid.shape} too coarse for d_min {self.d_min:.3g} A")
        b_needed = 4.0 * math.log(1.0 / alias) / ((q - s_max) ** 2 - s_max**2)
        self.blur = max(0.0, b_needed - float(b_min))
        b_top = max(float(b_max), float(b_min)) + self.blur
        self.radius = math.sqrt(b_top * math.log(1.0 / cutoff)) / (2.0 * math.pi)  # exp(-4 pi^2 r^2 / b) = cutoff

        names = [normalise_element(e) for e in np.asarray(elements).astype(str)]
        self.groups = sorted(set(names))
        self.group_of = np.array([self.groups.index(e) for e in names], dtype=np.int32)
        self.n_atoms = len(names)
        self.spreader = _Spreader(self.grid, self.radius, len(self.groups), anisotropic=anisotropic)

        # reciprocal-space factors per group and reflection: f_g(s) exp(blur s^2) V / n_grid
        n_grid = float(np.prod(self.grid.shape))
        factor = np.stack([form_factor(g, self.stol2) for g in self.groups])
        factor *= np.exp(self.blur * self.stol2)[None, :] * (self.cell.volume / n_grid)
        self._factor = jnp.asarray(factor.astype(np.float32))

        # symmetry: index h R_s of the P1 transform and phase 2 pi h . t_s, for every operator
        rot, tran = symmetry_ops(self.space_group)
        k = np.einsum("mi,sij->msj", hkl, rot)  # [M, S, 3] row vector h R_s
        phase = 2.0 * np.pi * np.einsum("mi,si->ms", hkl, tran)
        k = k[..., list(self.spreader.perm)]  # the spreader's grids have their cell axes in this order
        nu, nv, nw = self.spreader.shape
        flip = k[..., 2] < 0  # rfftn holds only k_w >= 0: use F(-k) = conj(F(k)) for the others
        kk = np.where(flip[..., None], -k, k)
        flat = ((kk[..., 0] % nu) * nv + (kk[..., 1] % nv)) * (nw // 2 + 1) + kk[..., 2]
        self._gather = jnp.asarray(flat.astype(np.int32))
        self._flip = jnp.asarray(flip)
        self._phase = jnp.asarray(np.exp(1j * phase).astype(np.complex64))
        self._group = jnp.asarray(self.group_of)
        self._rfft = _rfft3(self.spreader.shape)
        self.n_ops = len(rot)

    def describe(self) -> dict:
        return {"grid": list(self.grid.shape), "blur": self.blur, "radius": self.radius, "elements": self.groups,
                "window_values": self.spreader.values_per_atom(), "operators": self.n_ops,
                "separable": self.spreader.separable}

    def _from_atoms(self, x, w, b, u, group):
        beta = jnp.maximum(b + self.blur, MIN_WIDTH) / (8.0 * np.pi**2)  # isotropic variance (A^2) incl. the blur
        flat = self.spreader.spread(x, w, beta, u, group)
        grids = self.spreader.fold(flat)
        dft = self._rfft(grids).reshape(len(self.groups), -1)  # sum_u rho(u) exp(-2 pi i k . u / n)
        d = dft[:, self._gather]  # [G, M, S]
        p1 = jnp.where(self._flip[None], d, jnp.conj(d))  # sum_u rho(u) exp(+2 pi i k . u / n)
        f_sym = jnp.sum(p1 * self._phase[None], axis=-1)  # [G, M]
        return jnp.sum(self._factor * f_sym, axis=0)

    def _check_aniso(self, u_aniso) -> None:
        if u_aniso is not None and self.spreader.separable:
            raise ValueError("this model was built for isotropic atoms; build it with anisotropic=True to pass u_aniso")

    def __call__(self, coords, weights, b_iso, u_aniso=None) -> jnp.ndarray:
        """F_calc [M] of atoms ``coords [A, 3]`` with ``weights [A]``, ``b_iso [A]`` (A^2) and optionally
        anisotropic ``u_aniso [A, 6]`` (U11, U22, U33, U12, U13, U23, Cartesian A^2; the atom's displacement is then
        U + b_iso / (8 pi^2) I, so give b_iso = 0 for a purely anisotropic atom)."""
        x = jnp.asarray(coords, jnp.float32).reshape(-1, 3)
        if x.shape[0] != self.n_atoms:
            raise ValueError(f"coords must be [{self.n_atoms}, 3], got {tuple(jnp.shape(coords))}")
        w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), (self.n_atoms,))
        b = jnp.broadcast_to(jnp.asarray(b_iso, jnp.float32), (self.n_atoms,))
        self._check_aniso(u_aniso)
        u = jnp.zeros((self.n_atoms, 6), jnp.float32) if u_aniso is None else jnp.asarray(u_aniso, jnp.float32)
        return self._from_atoms(x, w, b, u.reshape(self.n_atoms, 6), self._group)

    def ensemble(self, coords, weights, b_iso, u_aniso=None) -> jnp.ndarray:
        """F_calc [M] of the weighted ensemble: sum_e weights[e] F(member e) (one pass: all members on one grid).
        ``coords [E, N, 3]``, ``weights [E]`` or ``[E, N]`` (member weight x occupancy), ``b_iso [N]`` or ``[E, N]``,
        ``u_aniso`` None, ``[N, 6]`` or ``[E, N, 6]``."""
        x = jnp.asarray(coords, jnp.float32)
        if x.ndim == 2:
            x = x[None]
        e, n = x.shape[0], x.shape[1]
        if n != self.n_atoms:
            raise ValueError(f"coords must be [E, {self.n_atoms}, 3], got {tuple(x.shape)}")
        w = jnp.asarray(weights, jnp.float32)
        w = jnp.broadcast_to(w[:, None] if w.ndim == 1 else w, (e, n))
        b = jnp.broadcast_to(jnp.asarray(b_iso, jnp.float32), (e, n))
        self._check_aniso(u_aniso)
        u = (jnp.zeros((e, n, 6), jnp.float32) if u_aniso is None
             else jnp.broadcast_to(jnp.asarray(u_aniso, jnp.float32), (e, n, 6)))
        group = jnp.tile(self._group, e)
        return self._from_atoms(x.reshape(-1, 3), w.reshape(-1), b.reshape(-1), u.reshape(-1, 6), group)


def displacements(b_iso, u_aniso=None) -> tuple[np.ndarray, np.ndarray | None]:
    """A structure file's B (A^2) and ANISOU U as this module takes them: (b, u) where u is None when no atom is
    anisotropic, and b is 0 for the anisotropic atoms (their U is the whole displacement; B_iso, its isotropic
    equivalent, would count it twice)."""
    b = np.asarray(b_iso, np.float32)
    if u_aniso is None or not np.any(u_aniso):
        return b, None
    u = np.asarray(u_aniso, np.float32)
    return np.where(np.any(u != 0, axis=-1), 0.0, b).astype(np.float32), u


def b_range(b_iso, u_aniso=None) -> tuple[float, float]:
    """The smallest and largest B (A^2) along any direction of atoms with ``b_iso [A]`` and optional anisotropic
    ``u_aniso [A, 6]`` (added to b_iso / 8 pi^2 as in ``StructureFactorModel``): the range to build the model for."""
    b = np.asarray(b_iso, dtype=np.float64).reshape(-1)
    if u_aniso is None:
        return float(b.min()), float(b.max())
    u = np.asarray(u_aniso, dtype=np.float64).reshape(-1, 6)
    mats = np.stack([u[:, [0, 3, 4]], u[:, [3, 1, 5]], u[:, [4, 5, 2]]], axis=1)
    eig = np.linalg.eigvalsh(mats) * 8.0 * np.pi**2  # [A, 3] B along the principal axes
    return float((b + eig[:, 0]).min()), float((b + eig[:, 2]).max())
