"""Real-space electron density (X-ray) and Coulomb potential (cryo-EM) of a weighted ensemble, in pure JAX.

The forward model puts every atom on a fixed orthogonal grid as a sum of isotropic Gaussians (the closed-form Fourier
transform of a Gaussian-sum scattering factor), truncated at a cutoff radius, and adds the members of an ensemble into
one map with their weights.  The likelihood compares that map with an experimental map inside a fixed mask around the
reference model, after a closed-form least-squares fit of scale and offset, so the map's absolute scale never matters.

Conventions (see also ``observables/base.py``): coordinates in Angstrom, ``coords [E, N, 3]`` float32, member weights
``[E]``; grids are orthogonal boxes indexed ``[x, y, z]``; ``origin`` is the position of voxel ``(0, 0, 0)`` in A.

Sources
- X-ray scattering factors: International Tables for Crystallography Vol. C (1992), Table 6.1.1.4: four Gaussians and a
  constant, f(s) = sum_i a_i exp(-b_i s^2) + c with s = sin(theta)/lambda (1/A), b_i in A^2, a_i and c in electrons.
- Electron scattering factors: International Tables for Crystallography Vol. C, Table 4.3.2.2 (Peng et al. 1996,
  Acta Cryst. A52, 257): five Gaussians f_e(s) = sum_i a_i exp(-b_i s^2), a_i in A.
  The numbers of both tables are read from gemmi (``Element.it92``, ``Element.c4322``), not retyped here.
- Real space: the Fourier transform of a exp(-b s^2) is a (4 pi / b)^(3/2) exp(-4 pi^2 r^2 / b); an isotropic atomic
  displacement B (A^2) adds to every b_i.  The constant c of IT92 is a delta function in real space and becomes a
  Gaussian of width B alone (b = 0), as in gemmi's ``DensityCalculator``.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gemmi
import jax
import jax.numpy as jnp
import numpy as np

from observables.base import AtomInfo, Crystal, PlotSpec
from observables.errors import InputError
from observables.form_factors import KINDS, coefficients, normalise_element

__all__ = [
    "KINDS",
    "DensityKernel",
    "MapInfo",
    "DensityMap",
    "DensityObservable",
    "MapError",
    "atom_density",
    "form_factor_coefficients",
    "map_info",
    "read_map_and_info",
    "read_map",
    "resolution_blur",
    "synthetic_map",
    "write_ccp4",
]

# Smallest total Gaussian width b_i + B (A^2): keeps (4 pi / b)^1.5 finite for a zero B on the constant term.
MIN_GAUSSIAN_WIDTH = 0.1

# Map-coefficient column pairs tried in this order by ``mtz_columns="auto"`` (Refmac/Buster, Phenix, Phenix older).
MTZ_AUTO_COLUMNS = (
    ("FWT", "PHWT"),
    ("2FOFCWT", "PH2FOFCWT"),
    ("FWT", "PHFWT"),
    ("2FOFCWT_no_fill", "PH2FOFCWT_no_fill"),
)

_CCP4_SUFFIXES = (".ccp4", ".mrc", ".map")
RESOLUTION_LABEL = "ensemble-guide: resolution"  # how write_ccp4 records a map's resolution in a header label
_RESOLUTION_RE = re.compile(r"resolution[^0-9]{0,12}([0-9]+(?:\.[0-9]+)?)\s*(?:A|Angstrom|\u00c5)?", re.IGNORECASE)


class MapError(InputError):
    """A map could not be read, written or used (missing file, wrong format, missing columns, no coverage)."""


# ----------------------------------------------------------------------------------------------------------------
# Scattering factors and the resolution blur
# ----------------------------------------------------------------------------------------------------------------


# Gaussian-sum coefficients ``(a [5], b [5])`` of one element's scattering factor: the name this module has always
# exported for ``observables.form_factors.coefficients`` (the project's one table and lookup).
form_factor_coefficients = coefficients


def resolution_blur(resolution: float) -> float:
    """Extra isotropic B (A^2) that stands for the resolution limit ``resolution`` (A) of a map.

    Convention: a map at resolution d looks like the atoms convolved with a Gaussian of standard deviation
    sigma = d / (pi sqrt 2) (the default of UCSF Chimera's ``molmap``, sigmaFactor = 1/(pi sqrt 2)); a Gaussian of
    standard deviation sigma is a B-factor of 8 pi^2 sigma^2, so B_blur = 8 pi^2 d^2 / (2 pi^2) = 4 d^2.
    """
    if not resolution > 0:
        raise ValueError(f"resolution must be > 0 A, got {resolution}")
    return 4.0 * float(resolution) ** 2


def _gaussian_tables(elements: Sequence[str], b_iso: float | np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-atom real-space Gaussian tables ``amp [N, G]`` (units of a / A^3) and ``kexp [N, G]`` (1/A^2).

    rho_atom(r) = sum_g amp_g exp(-kexp_g r^2) with amp_g = a_g (4 pi / w_g)^1.5, kexp_g = 4 pi^2 / w_g and
    w_g = max(b_g + B, MIN_GAUSSIAN_WIDTH) (Fourier transform of a Gaussian; IT Vol. C as in the module docstring).
    """
    elements = [normalise_element(e) for e in np.asarray(elements).astype(str)]
    b_iso = np.broadcast_to(np.asarray(b_iso, dtype=np.float64), (len(elements),))
    if not np.all(np.isfinite(b_iso)):
        raise ValueError("B-factors must be finite")
    a = np.empty((len(elements), 5))
    b = np.empty((len(elements), 5))
    for i, el in enumerate(elements):
        try:
            a[i], b[i] = coefficients(el, kind)
        except ValueError as exc:
            raise ValueError(f"atom {i}: {exc}") from None
    width = np.maximum(b + b_iso[:, None], MIN_GAUSSIAN_WIDTH)
    amp = a * (4.0 * np.pi / width) ** 1.5
    kexp = 4.0 * np.pi**2 / width
    return amp, kexp


def atom_density(r: np.ndarray, element: str, b_iso: float, kind: str = "xray") -> np.ndarray:
    """Untruncated closed-form density of one atom at distances ``r`` (A): e/A^3 (xray) or A^-2 (em, ~ potential)."""
    amp, kexp = _gaussian_tables([element], b_iso, kind)
    r2 = np.asarray(r, dtype=np.float64)[..., None] ** 2
    return np.sum(amp[0] * np.exp(-kexp[0] * r2), axis=-1)


def _cutoff_radius(amp: np.ndarray, kexp: np.ndarray, cutoff: float) -> float:
    """Largest radius (A) at which any atom's density still exceeds ``cutoff`` times its own central density."""
    rows = np.unique(np.concatenate([amp, kexp], axis=1), axis=0)
    amp_u, k_u = rows[:, : amp.shape[1]], rows[:, amp.shape[1] :]
    target = cutoff * amp_u.sum(1)
    lo, hi = np.zeros(len(rows)), np.full(len(rows), 100.0)
    for _ in range(60):  # bisection: the density is monotone in r
        mid = 0.5 * (lo + hi)
        above = (amp_u * np.exp(-k_u * mid[:, None] ** 2)).sum(1) > target
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return float(hi.max())


# ----------------------------------------------------------------------------------------------------------------
# The kernel: truncated Gaussians splatted onto a grid
# ----------------------------------------------------------------------------------------------------------------


class DensityKernel:
    """Density of weighted atoms on one fixed orthogonal grid: ``kernel(coords [E, N, 3], weights [E] | [E, N])``.

    Built from ``elements [N]``, the grid (``shape``, ``origin`` [3] A, ``spacing`` scalar or [3] A), the total
    isotropic ``b_iso`` per atom (scalar, [N], or [K, N] for exactly K members, A^2: B-factor plus any resolution
    blur), ``kind`` and ``cutoff``.
    A weight is member weight x occupancy; ``at(coords, weights, voxel_index(...))`` gives selected voxels only.

    Each atom adds rho_atom(|X - x|) (see ``_gaussian_tables``) to the voxels X near it, never to the whole box:
    - reach: the cutoff radius R where the widest atom has fallen to ``cutoff`` times its central density (default
      1e-3: about 0.5 % of an atom's electrons lie beyond it); the window is centred on the atom's nearest grid
      point, so it extends R plus half a voxel (per axis, and half a voxel diagonal in the xy-plane);
    - window: the z-rows (all 2*hz+1 voxels along z) of the (x, y) columns within that reach in the xy-plane, i.e. a
      cylinder around the sphere (~2,400 voxels per atom at 0.5 A spacing and B = 36 A^2);
    - values: exp(-k r^2) = exp(-k (dx^2 + dy^2)) exp(-k dz^2), so only G * (rows + 2 hz + 1) exponentials per atom;
      the G = 5 Gaussians are then summed as outer products (row factor x z factor);
    - the E*N atoms' rows (contiguous in memory) are scatter-added into one padded grid, which is then cropped.
    The gradient (coordinates and weights) is a custom VJP: the backward pass gathers the grid cotangent on the same
    rows (the scatter's transpose) and contracts it with the analytic derivative; it recomputes the per-atom factors
    instead of storing [E*N, voxels] residuals, so memory stays O(E*N*G*rows).

    Atoms outside the box are exact too: the window is clamped to the box edge while the Gaussian values use the true
    positions, so an atom adds what its tails put inside the box (usually nothing).  Non-finite coordinates give
    non-finite values but never out-of-bounds writes.
    Atoms are processed in chunks of about ``CHUNK_VOXELS`` voxel updates (a ``lax.scan``), which keeps temporary
    buffers small (large per-call buffers cost more in page faults than the arithmetic on CPU; under ``jax.vmap`` a
    chunk grows by the batch size, hence the modest default).
    Units: e/A^3 for ``kind="xray"``; A^-2 for ``kind="em"`` (proportional to the Coulomb potential).
    """

    CHUNK_VOXELS = 250_000

    def __init__(
        self,
        elements: Sequence[str],
        shape: Sequence[int],
        origin: np.ndarray,
        spacing: np.ndarray,
        b_iso: float | np.ndarray,
        *,
        kind: str = "xray",
        cutoff: float = 1e-3,
    ):
        if not 0 < cutoff < 1:
            raise ValueError(f"cutoff is a fraction of an atom's central density, 0 < cutoff < 1; got {cutoff}")
        self.shape = tuple(int(s) for s in shape)
        self.origin = np.asarray(origin, dtype=np.float64).reshape(3)
        self.spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
        if len(self.shape) != 3 or min(self.shape) < 1 or not np.all(self.spacing > 0):
            raise ValueError(f"bad grid: shape {self.shape}, spacing {self.spacing}")
        self.kind = kind
        self.n_atoms = len(elements)
        b_arr = np.asarray(b_iso, dtype=np.float64)
        # b_iso [K, N]: one table per member (the K conformers of a structure at their own B); calls then need E = K
        self.members = int(b_arr.shape[0]) if b_arr.ndim == 2 else None
        if self.members is not None:
            if b_arr.shape[1] != self.n_atoms:
                raise ValueError(f"b_iso must be a scalar, [{self.n_atoms}] or [K, {self.n_atoms}], got {b_arr.shape}")
            amp, kexp = _gaussian_tables(np.tile(np.asarray(elements), self.members), b_arr.reshape(-1), kind)
        else:
            amp, kexp = _gaussian_tables(elements, b_arr, kind)
        self.radius = _cutoff_radius(amp, kexp, cutoff)  # A

        # the atom is within half a voxel of its window centre along each axis
        half = np.ceil(self.radius / self.spacing + 0.5).astype(np.int64)
        ix, iy = np.meshgrid(np.arange(-half[0], half[0] + 1), np.arange(-half[1], half[1] + 1), indexing="ij")
        ix, iy = ix.ravel(), iy.ravel()
        reach_xy = self.radius + 0.5 * float(np.hypot(self.spacing[0], self.spacing[1]))
        in_reach = np.hypot(ix * self.spacing[0], iy * self.spacing[1]) <= reach_xy
        ix, iy = ix[in_reach], iy[in_reach]
        self.half = tuple(int(h) for h in half)
        self.padded_shape = tuple(int(n + 2 * h) for n, h in zip(self.shape, half))
        if math.prod(self.padded_shape) >= 2**31:
            raise ValueError(f"grid {self.shape} is too large for 32-bit voxel indices")
        self.row_length = int(2 * half[2] + 1)
        self.voxels_per_atom = len(ix) * self.row_length
        py, pz = self.padded_shape[1], self.padded_shape[2]
        # flat index (padded grid) of the first voxel of row (i, j), relative to the atom's window corner
        self._row_offsets = (((ix + half[0]) * py + (iy + half[1])) * pz).astype(np.int32)
        self._row_xy = np.stack([ix * self.spacing[0], iy * self.spacing[1]], axis=-1).astype(np.float32)  # [R, 2] A
        self._row_z = (np.arange(-half[2], half[2] + 1) * self.spacing[2]).astype(np.float32)  # [L] A
        self._amp = amp.astype(np.float32)
        self._kexp = kexp.astype(np.float32)
        self._splat = self._make_splat()

    # -- the differentiable core -----------------------------------------------------------------------------------
    def _make_splat(self):
        shape, padded, length = self.shape, self.padded_shape, self.row_length
        origin = self.origin.astype(np.float32)
        spacing = self.spacing.astype(np.float32)
        upper = np.array(shape, dtype=np.float32) - 1
        stride_x, stride_y = int(padded[1] * padded[2]), int(padded[2])
        row_offsets, row_xy, row_z = self._row_offsets, self._row_xy, self._row_z
        amp0, kexp0, n_tables, n_gauss = self._amp, self._kexp, len(self._amp), self._amp.shape[1]
        chunk_target = max(1, self.CHUNK_VOXELS // self.voxels_per_atom)
        scatter_dims = jax.lax.ScatterDimensionNumbers(
            update_window_dims=(1,), inserted_window_dims=(), scatter_dims_to_operand_dims=(0,)
        )
        gather_dims = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(), start_index_map=(0,))
        in_bounds = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS  # guaranteed by the clamp in `windows`

        def add_rows(flat, start, rows):
            """flat[start[k] : start[k] + L] += rows[k] (contiguous rows of the flat padded grid)."""
            return jax.lax.scatter_add(flat, start[:, None], rows, scatter_dims, mode=in_bounds)

        def take_rows(flat, start):
            """The rows flat[start[k] : start[k] + L] -> [K, L] (the transpose of ``add_rows``)."""
            return jax.lax.gather(flat, start[:, None], gather_dims, (length,), mode=in_bounds)

        def chunks(x, w):
            """Atoms in chunks [C, chunk, ...] with their tables; padding atoms sit at the origin with weight 0."""
            n_total = x.shape[0]
            chunk = min(chunk_target, n_total)
            n_chunks = -(-n_total // chunk)
            pad = n_chunks * chunk - n_total
            # per-atom tables of the E members (traced ops on the [N, G] constants, not E*N-sized literals)
            amp = jnp.tile(jnp.asarray(amp0), (n_total // n_tables, 1))
            kexp = jnp.tile(jnp.asarray(kexp0), (n_total // n_tables, 1))
            if pad:
                x = jnp.concatenate([x, jnp.broadcast_to(jnp.asarray(origin), (pad, 3))])
                w = jnp.concatenate([w, jnp.zeros(pad, w.dtype)])
                amp = jnp.concatenate([amp, jnp.zeros((pad, n_gauss), jnp.float32)])
                kexp = jnp.concatenate([kexp, jnp.ones((pad, n_gauss), jnp.float32)])
            split = lambda a: a.reshape(n_chunks, chunk, *a.shape[1:])  # noqa: E731
            return split(x), split(w), split(amp), split(kexp)

        def windows(x):
            """Flat start index [a, R] of each atom's rows, and its window centre's offset from the atom d0 [a, 3]."""
            # nearest grid point, clamped into the box (NaN/inf too: indices always stay inside the padded grid)
            u = jnp.clip(jnp.nan_to_num(jnp.round((x - origin) / spacing)), 0.0, upper)
            d0 = u * spacing + origin - x  # A
            iu = u.astype(jnp.int32)
            corner = iu[:, 0] * stride_x + iu[:, 1] * stride_y + iu[:, 2]  # window corner (padded) = centre (box)
            return corner[:, None] + row_offsets[None, :], d0

        def factors(d0, amp, kexp):
            """amp_g exp(-k_g (dx^2 + dy^2)) per row [a, G, R] and exp(-k_g dz^2) along a row [a, G, L]."""
            dxy2 = jnp.square(d0[:, None, 0] + row_xy[None, :, 0]) + jnp.square(d0[:, None, 1] + row_xy[None, :, 1])
            dz2 = jnp.square(d0[:, None, 2] + row_z[None, :])
            fxy = amp[:, :, None] * jnp.exp(-kexp[:, :, None] * dxy2[:, None, :])
            fz = jnp.exp(-kexp[:, :, None] * dz2[:, None, :])
            return fxy, fz

        @jax.custom_vjp
        def splat(x, w):
            xs, ws, amps, kexps = chunks(x, w)

            def add_chunk(flat, chunk):
                xc, wc, amp, kexp = chunk
                idx, d0 = windows(xc)
                fxy, fz = factors(d0, amp * wc[:, None], kexp)
                # rho[a, r, l] = sum_g w_a amp_g exp(-k_g (dx^2 + dy^2)) exp(-k_g dz^2): an unrolled sum over the G
                # Gaussians fuses into one pass (a batched [R, G] x [G, L] matmul is slower on CPU)
                rows = sum(fxy[:, g, :, None] * fz[:, g, None, :] for g in range(n_gauss))
                flat = add_rows(flat, idx.reshape(-1), rows.reshape(-1, length))
                return flat, None

            flat, _ = jax.lax.scan(add_chunk, jnp.zeros(math.prod(padded), jnp.float32), (xs, ws, amps, kexps))
            return flat

        def splat_fwd(x, w):
            return splat(x, w), (x, w)

        def splat_bwd(res, flat_bar):
            x, w = res
            n_total = x.shape[0]
            xs, ws, amps, kexps = chunks(x, w)

            def chunk_grad(chunk):
                xc, wc, amp, kexp = chunk
                idx, d0 = windows(xc)
                fxy, fz = factors(d0, amp, kexp)
                # the cotangent on the atom's rows [a, R, L]: the scatter's transpose is a gather
                c = take_rows(flat_bar, idx.reshape(-1)).reshape(idx.shape[0], -1, length)
                # one pass over c, along the rows: p[a, r, g] = sum_l c[a, r, l] exp(-k_g dz_l^2) (and times dz_l)
                fz2 = jnp.concatenate([fz, fz * row_z], axis=1)  # [a, 2G, L]
                p = jax.lax.dot_general(c, fz2, (((2,), (2,)), ((0,), (0,))))  # [a, R, 2G]
                fxy_t = jnp.swapaxes(fxy, 1, 2)  # [a, R, G]
                cu = fxy_t * p[:, :, :n_gauss]  # sum over the row of cotangent * rho_g (unit weight)
                w_bar = jnp.sum(cu, axis=(1, 2))
                # d rho_g / d x = 2 k_g (X - x) rho_g, X - x = d0 + offset (derivative of exp(-k |X - x|^2))
                kcu = jnp.sum(kexp[:, None, :] * cu, axis=2)  # [a, R]
                s_xy = kcu @ row_xy  # [a, 2]
                s_z = jnp.sum(kexp[:, None, :] * fxy_t * p[:, :, n_gauss:], axis=(1, 2))
                s = d0 * jnp.sum(kcu, axis=1)[:, None] + jnp.concatenate([s_xy, s_z[:, None]], axis=-1)
                return 2.0 * wc[:, None] * s, w_bar

            x_bar, w_bar = jax.lax.map(chunk_grad, (xs, ws, amps, kexps))
            return x_bar.reshape(-1, 3)[:n_total], w_bar.reshape(-1)[:n_total]

        splat.defvjp(splat_fwd, splat_bwd)
        return splat

    def _flat(self, coords, weights) -> jnp.ndarray:
        """Density on the padded grid, flattened [prod(padded_shape)]: the differentiable core."""
        coords = jnp.asarray(coords, dtype=jnp.float32)
        if coords.ndim == 2:
            coords = coords[None]
        e, n = coords.shape[0], coords.shape[1]
        if n != self.n_atoms or coords.shape[2] != 3:
            raise ValueError(f"coords must be [E, {self.n_atoms}, 3], got {tuple(coords.shape)}")
        if self.members is not None and e != self.members:
            raise ValueError(f"this kernel has B-factors for {self.members} members, got {e}")
        weights = jnp.asarray(weights, dtype=jnp.float32)
        if weights.ndim <= 1:
            weights = jnp.broadcast_to(jnp.reshape(weights, (-1, 1)), (e, n))
        return self._splat(coords.reshape(e * n, 3), weights.reshape(e * n))

    def __call__(self, coords, weights) -> jnp.ndarray:
        """Weighted density on the grid [nx, ny, nz]: coords [E, N, 3] (or [N, 3]) in A; weights [E] or [E, N]."""
        h, n = self.half, self.shape
        grid = self._flat(coords, weights).reshape(self.padded_shape)
        return grid[h[0] : h[0] + n[0], h[1] : h[1] + n[1], h[2] : h[2] + n[2]]

    def voxel_index(self, voxels: np.ndarray) -> np.ndarray:
        """Indices for ``at``: integer voxels [K, 3] of the box -> int32 [K] positions in the padded flat grid."""
        v = np.asarray(voxels, dtype=np.int64).reshape(-1, 3)
        if np.any(v < 0) or np.any(v >= np.array(self.shape)):
            raise ValueError(f"voxel indices must lie in the box {self.shape}")
        p = v + np.array(self.half)
        return ((p[:, 0] * self.padded_shape[1] + p[:, 1]) * self.padded_shape[2] + p[:, 2]).astype(np.int32)

    def at(self, coords, weights, index: np.ndarray) -> jnp.ndarray:
        """Density at selected voxels (``index`` from ``voxel_index``) [K]: cheaper to differentiate than the grid."""
        return self._flat(coords, weights)[index]


# ----------------------------------------------------------------------------------------------------------------
# Maps: the box grid, reading, writing, synthetic maps
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DensityMap:
    """A map on an orthogonal box grid: ``values [nx, ny, nz]`` float32 (index order x, y, z).

    Voxel (i, j, k) sits at ``origin + (i, j, k) * spacing``; ``origin`` and ``spacing`` are float64 ``[3]``, in A.
    ``resolution`` (A) is the map's resolution where known (synthetic maps record theirs; ``write_ccp4`` keeps it in
    a header label).
    """

    values: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray
    resolution: float | None = None

    def __post_init__(self):
        values = np.ascontiguousarray(self.values, dtype=np.float32)
        origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        spacing = np.broadcast_to(np.asarray(self.spacing, dtype=np.float64), (3,)).copy()
        if values.ndim != 3:
            raise ValueError(f"DensityMap values must be 3-D [nx, ny, nz], got shape {values.shape}")
        if not np.all(spacing > 0):
            raise ValueError(f"DensityMap spacing must be > 0, got {spacing}")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "spacing", spacing)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.values.shape)

    @property
    def upper(self) -> np.ndarray:
        """Position (A) of the last voxel (nx-1, ny-1, nz-1)."""
        return self.origin + (np.array(self.shape) - 1) * self.spacing

    def axis_positions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The voxel positions (A) along x, y and z."""
        return tuple(self.origin[i] + np.arange(self.shape[i]) * self.spacing[i] for i in range(3))

    def covers(self, points: np.ndarray, tol: float = 1e-3) -> bool:
        """Whether all ``points [M, 3]`` lie inside the box spanned by the voxel centres."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return bool(np.all(points >= self.origin - tol) and np.all(points <= self.upper + tol))


def _box_geometry(
    points: np.ndarray, spacing: np.ndarray, padding: float, anchor: np.ndarray
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Origin and shape of the box around ``points`` plus ``padding`` (A) on the lattice anchor + i * spacing."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(points) == 0 or not np.all(np.isfinite(points)):
        raise ValueError("the box needs at least one point and finite coordinates")
    lo = points.min(0) - padding
    hi = points.max(0) + padding
    i0 = np.floor((lo - anchor) / spacing + 1e-6)
    i1 = np.ceil((hi - anchor) / spacing - 1e-6)
    return anchor + i0 * spacing, tuple(int(n) for n in (i1 - i0 + 1))


def _is_orthogonal(cell: gemmi.UnitCell) -> bool:
    return all(abs(angle - 90.0) < 1e-4 for angle in (cell.alpha, cell.beta, cell.gamma))


def _resample(
    grid: gemmi.FloatGrid,
    *,
    shift: np.ndarray,
    spacing: float | None,
    box_around: np.ndarray | None,
    padding: float,
    block: tuple[np.ndarray, np.ndarray] | None,
    source: Path,
) -> DensityMap:
    """Cut (orthogonal cell, native spacing) or interpolate (else) a full-cell gemmi grid onto an orthogonal box.

    ``shift`` (A) moves the whole grid (MRC ORIGIN); ``block`` = (first index, count) of the data in the file, used as
    the box when ``box_around`` is None.
    """
    cell = grid.unit_cell
    n_cell = np.array([grid.nu, grid.nv, grid.nw])
    orthogonal = _is_orthogonal(cell)
    if orthogonal:
        native = np.array([cell.a, cell.b, cell.c]) / n_cell
    else:
        native = np.full(3, min(grid.spacing))
    step = native if spacing is None else np.full(3, float(spacing))
    if box_around is not None:
        origin, shape = _box_geometry(box_around, step, padding, anchor=shift)
    else:
        if not orthogonal:
            raise MapError(f"{source}: without a model to box around, only maps with an orthogonal cell can be used")
        start, count = block if block is not None else (np.zeros(3, int), n_cell)
        origin = shift + start * native
        shape = tuple(int(round(c * native[i] / step[i])) for i, c in enumerate(count))
        step = np.array([count[i] * native[i] / shape[i] for i in range(3)])
    exact = orthogonal and np.allclose(step, native, rtol=1e-6, atol=0)
    if exact:
        start = np.round((origin - shift) / native).astype(np.int64)
        data = np.array(grid, copy=False)
        idx = [np.arange(start[i], start[i] + shape[i]) % n_cell[i] for i in range(3)]
        values = data[np.ix_(*idx)]
    else:
        values = np.zeros(shape, dtype=np.float32)
        tr = gemmi.Transform()
        tr.mat.fromlist(np.diag(step).tolist())
        tr.vec.fromlist((origin - shift).tolist())
        grid.interpolate_values(values, tr, 3)  # tricubic, periodic in the cell
    values = np.asarray(values, dtype=np.float32)
    missing = ~np.isfinite(values)
    if missing.any():  # box voxels outside a partial map's data: the mean of the map values inside
        finite = values[~missing]
        values = np.where(missing, finite.mean() if finite.size else 0.0, values).astype(np.float32)
    return DensityMap(values=values, origin=origin, spacing=step)


def _read_ccp4(
    ccp4: gemmi.Ccp4Map, path: Path, box_around: np.ndarray | None
) -> tuple[gemmi.FloatGrid, np.ndarray, tuple]:
    words = [ccp4.header_i32(i) for i in range(1, 20)]
    count_crs, start_crs, sampling_xyz, axis_crs = words[0:3], words[4:7], words[7:10], words[16:19]
    if sorted(axis_crs) != [1, 2, 3]:
        raise MapError(f"{path}: bad axis order MAPC/MAPR/MAPS = {axis_crs} in the header")
    count, start = np.zeros(3, int), np.zeros(3, int)
    for j, axis in enumerate(axis_crs):
        count[axis - 1], start[axis - 1] = count_crs[j], start_crs[j]
    full_cell = bool(np.all(count >= np.array(sampling_xyz)))
    # MRC2014 ORIGIN (words 50-52, A): honoured when the start indices are zero (the EM convention)
    shift = np.zeros(3)
    if not start.any():
        shift = np.array([ccp4.header_float(i) for i in (50, 51, 52)], dtype=np.float64)
        if not np.all(np.isfinite(shift)):
            shift = np.zeros(3)
    # A full cell of a crystallographic space group is periodic (the model may sit in any cell copy); a P1 / EM map
    # (ISPG 0 or 1, header word 23) is a box, which must contain the model like a partial map.
    periodic = full_cell and ccp4.header_i32(23) > 1
    if box_around is not None and not periodic:
        ext = ccp4.get_extent()
        frac_tr = ccp4.grid.unit_cell.frac
        frac = (box_around - shift) @ np.array(frac_tr.mat.tolist()).T + np.array(frac_tr.vec.tolist())
        lo, hi = np.array(ext.minimum.tolist()), np.array(ext.maximum.tolist())
        tol = 1e-6
        if np.any(frac < lo - tol) or np.any(frac > hi + tol):
            raise MapError(
                f"{path}: the map does not cover the model (model box {np.round(box_around.min(0), 1)} to "
                f"{np.round(box_around.max(0), 1)} A lies partly outside the map's data"
                f"{'; a P1 map is read as a box, not a periodic cell' if full_cell else ''})"
            )
    ccp4.setup(float("nan"))
    return ccp4.grid, shift, (start, np.minimum(count, sampling_xyz))


def _mtz_column_pair(mtz: gemmi.Mtz, mtz_columns: str, path: Path) -> tuple[str, str]:
    labels = [col.label for col in mtz.columns]
    if mtz_columns == "auto":
        for f, phi in MTZ_AUTO_COLUMNS:
            if f in labels and phi in labels:
                return f, phi
        tried = ", ".join(f"{f},{phi}" for f, phi in MTZ_AUTO_COLUMNS)
        raise MapError(f"{path}: no map coefficients found (tried {tried}); columns are {', '.join(labels)}")
    pair = [c.strip() for c in mtz_columns.split(",")]
    if len(pair) != 2 or not all(pair):
        raise MapError(f"mtz_columns must be 'auto' or 'F,PHI' (e.g. 'FWT,PHWT'), got {mtz_columns!r}")
    missing = [c for c in pair if c not in labels]
    if missing:
        raise MapError(f"{path}: column(s) {', '.join(missing)} not in the MTZ; columns are {', '.join(labels)}")
    return pair[0], pair[1]


@dataclass(frozen=True)
class MapInfo:
    """What a map file says about itself: ``resolution`` (A; MTZ d_min, or a CCP4/MRC header label), ``crystal``
    (cell and space group of an MTZ or of a crystallographic CCP4 map, None for EM/P1 boxes) and where the resolution
    came from (``resolution_source``)."""

    resolution: float | None
    crystal: Crystal | None
    resolution_source: str


def _mtz_info(mtz: gemmi.Mtz) -> MapInfo:
    crystal = Crystal(tuple(mtz.cell.parameters), mtz.spacegroup.xhm()) if mtz.spacegroup is not None else None
    return MapInfo(float(mtz.resolution_high()), crystal, "the MTZ's high-resolution limit")


def _ccp4_info(ccp4: gemmi.Ccp4Map) -> MapInfo:
    n_labels = max(0, min(10, ccp4.header_i32(56)))
    resolution, source = None, "none in the header"
    for k in range(n_labels):
        text = ccp4.header_str(57 + 20 * k, 80)
        hit = _RESOLUTION_RE.search(text)
        if hit:
            resolution, source = float(hit.group(1)), f"header label {k + 1}: {text.strip()!r}"
            break
    crystal = None
    ispg = ccp4.header_i32(23)
    if ispg > 1:
        sg = gemmi.find_spacegroup_by_number(ispg)
        if sg is not None:
            crystal = Crystal(tuple(ccp4.grid.unit_cell.parameters), sg.xhm())
    return MapInfo(resolution, crystal, source)


def map_info(path: str | Path) -> MapInfo:
    """Resolution and crystal of a map file (see ``MapInfo``); ``MapError`` when unreadable.  (``read_map_and_info``
    gives them with the map from one read of the file.)"""
    path = Path(path)
    if not path.is_file():
        raise MapError(f"map file not found: {path}")
    if path.name.lower().removesuffix(".gz").endswith(".mtz"):
        return _mtz_info(_read_mtz(path))
    return _ccp4_info(_read_ccp4_file(path))


def _read_mtz(path: Path) -> gemmi.Mtz:
    try:
        return gemmi.read_mtz_file(str(path))
    except Exception as exc:
        raise MapError(f"cannot read MTZ file {path}: {exc}") from None


def _read_ccp4_file(path: Path) -> gemmi.Ccp4Map:
    try:
        return gemmi.read_ccp4_map(str(path))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError/OSError with its own words
        raise MapError(f"cannot read CCP4/MRC map {path}: {exc}") from None


def read_map(
    path: str | Path,
    *,
    mtz_columns: str = "auto",
    spacing: float | None = None,
    box_around: np.ndarray | None = None,
    padding: float = 5.0,
) -> DensityMap:
    """The map of ``read_map_and_info``, without its ``MapInfo``."""
    return read_map_and_info(path, mtz_columns=mtz_columns, spacing=spacing, box_around=box_around,
                             padding=padding)[0]


def read_map_and_info(
    path: str | Path,
    *,
    mtz_columns: str = "auto",
    spacing: float | None = None,
    box_around: np.ndarray | None = None,
    padding: float = 5.0,
) -> tuple[DensityMap, MapInfo]:
    """Read a CCP4/MRC map (.ccp4/.mrc/.map, optionally .gz) or MTZ map coefficients onto an orthogonal box grid.

    ``box_around [M, 3]`` (A): the box spans these points plus ``padding`` (A) on each side; without it, the file's
    own data block (a CCP4 map) or the whole unit cell (MTZ), for orthogonal cells only.  ``spacing`` (A) None keeps
    the map's native grid (for an orthogonal cell the box is then cut out exactly, wrapping periodically); otherwise,
    and for non-orthogonal cells, values are interpolated (tricubic, gemmi).  MTZ coefficients are Fourier transformed
    by gemmi at a grid spacing of about d_min / 4 (finer when ``spacing`` asks for it).  A partial CCP4 map (not the
    full cell) must contain the model's bounding box; box voxels outside its data get the mean of those inside.
    Returns the map and what the file says of itself (``MapInfo``: resolution, crystal), from one read of the file.
    Errors: ``MapError`` for a missing/unreadable file, unknown format, missing MTZ columns or no coverage.
    """
    path = Path(path)
    if not path.is_file():
        raise MapError(f"map file not found: {path}")
    if box_around is not None:
        box_around = np.asarray(box_around, dtype=np.float64).reshape(-1, 3)
    if spacing is not None and not spacing > 0:
        raise MapError(f"spacing must be > 0 A, got {spacing}")
    suffixes = [s.lower() for s in path.suffixes]
    suffix = suffixes[-2] if suffixes and suffixes[-1] == ".gz" and len(suffixes) > 1 else (suffixes or [""])[-1]
    if suffix in _CCP4_SUFFIXES:
        ccp4 = _read_ccp4_file(path)
        info = _ccp4_info(ccp4)
        grid, shift, block = _read_ccp4(ccp4, path, box_around)
    elif suffix == ".mtz":
        mtz = _read_mtz(path)
        info = _mtz_info(mtz)
        f, phi = _mtz_column_pair(mtz, mtz_columns, path)
        rate = 4.0 if spacing is None else max(4.0, mtz.resolution_high() / float(spacing))
        try:
            grid = mtz.transform_f_phi_to_map(f, phi, sample_rate=rate)
        except Exception as exc:
            raise MapError(f"{path}: cannot compute a map from {f},{phi}: {exc}") from None
        shift, block = np.zeros(3), None
    else:
        raise MapError(f"unknown map format {path.name!r}: expected .ccp4, .mrc, .map (CCP4/MRC) or .mtz")
    density_map = _resample(
        grid, shift=shift, spacing=spacing, box_around=box_around, padding=padding, block=block, source=path
    )
    return density_map, info


def write_ccp4(path: str | Path, density_map: DensityMap) -> Path:
    """Write ``density_map`` as a CCP4 map (mode 2) with a P1 cell equal to the box; atomically (temp file + rename).

    When the origin is a whole number of voxels (always true for boxes built here) it goes into the start indices
    NCSTART/NRSTART/NSSTART, which every program reads; otherwise into the MRC2014 ORIGIN words (50-52, A).
    """
    path = Path(path)
    m = density_map
    size = np.array(m.shape) * m.spacing
    ccp4 = gemmi.Ccp4Map()
    ccp4.grid = gemmi.FloatGrid(
        np.ascontiguousarray(m.values, dtype=np.float32),
        gemmi.UnitCell(*size.tolist(), 90.0, 90.0, 90.0),
        gemmi.SpaceGroup("P 1"),
    )
    ccp4.update_ccp4_header(2, True)
    if m.resolution is not None:  # label 1 (header words 57-76) and NLABL (word 56)
        ccp4.set_header_i32(56, 1)
        ccp4.set_header_str(57, f"{RESOLUTION_LABEL} {m.resolution:.4f} A".ljust(80))
    start = m.origin / m.spacing
    if np.allclose(start, np.round(start), rtol=0, atol=1e-4):
        for word, s in zip((5, 6, 7), np.round(start).astype(int)):
            ccp4.set_header_i32(word, int(s))
    else:
        for word, o in zip((50, 51, 52), m.origin):
            ccp4.set_header_float(word, float(o))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        ccp4.write_ccp4_map(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def synthetic_map(
    atoms: AtomInfo,
    coords: np.ndarray,
    occupancies: Sequence[float],
    *,
    resolution: float = 2.0,
    b_factor: float = 20.0,
    spacing: float | None = None,
    padding: float = 5.0,
    kind: str = "xray",
    noise_snr: float | None = None,
    seed: int = 0,
    cutoff: float = 1e-3,
) -> DensityMap:
    """Map of K conformers ``coords [K, N, 3]`` (A) at ``occupancies [K]`` (altlocs at their occupancies).

    Made with this module's kernel: B = ``b_factor`` + ``resolution_blur(resolution)`` (A^2) on every atom, grid
    spacing ``resolution / 4`` by default, box = all conformers plus ``padding``.  ``noise_snr``: add Gaussian noise
    whose standard deviation is std(map over the box) / noise_snr, drawn with ``numpy.random.default_rng(seed)``.
    """
    coords = np.asarray(coords, dtype=np.float32)
    if coords.ndim == 2:
        coords = coords[None]
    occupancies = np.asarray(occupancies, dtype=np.float32).reshape(-1)
    if coords.shape[0] != len(occupancies) or coords.shape[1] != len(atoms):
        raise ValueError(
            f"coords {coords.shape} must be [K, {len(atoms)}, 3] with K = len(occupancies) = {len(occupancies)}"
        )
    step = np.full(3, resolution / 4.0 if spacing is None else float(spacing))
    origin, shape = _box_geometry(coords.reshape(-1, 3), step, padding, anchor=np.zeros(3))
    b_total = b_factor + resolution_blur(resolution)
    kernel = DensityKernel(atoms.element, shape, origin, step, b_total, kind=kind, cutoff=cutoff)
    values = np.asarray(jax.jit(kernel)(coords, occupancies))
    if noise_snr is not None:
        if not noise_snr > 0:
            raise ValueError(f"noise_snr must be > 0, got {noise_snr}")
        rng = np.random.default_rng(seed)
        values = values + rng.normal(0.0, values.std() / noise_snr, size=values.shape).astype(np.float32)
    return DensityMap(values=values, origin=origin, spacing=step, resolution=float(resolution))


def _crop(density_map: DensityMap, points: np.ndarray, padding: float) -> DensityMap:
    """The part of an in-memory map that spans ``points`` plus ``padding`` (its own grid); the map must cover them."""
    if not density_map.covers(points):
        lo, hi = np.round(points.min(0), 1), np.round(points.max(0), 1)
        raise MapError(
            f"the map (box {np.round(density_map.origin, 1)} to {np.round(density_map.upper, 1)} A) does not cover "
            f"the model (box {lo} to {hi} A)"
        )
    origin, shape = _box_geometry(points, density_map.spacing, padding, anchor=density_map.origin)
    i0 = np.maximum(np.round((origin - density_map.origin) / density_map.spacing).astype(int), 0)
    i1 = np.minimum(i0 + np.array(shape), np.array(density_map.shape))
    values = density_map.values[i0[0] : i1[0], i0[1] : i1[1], i0[2] : i1[2]]
    return DensityMap(values=values, origin=density_map.origin + i0 * density_map.spacing, spacing=density_map.spacing)


def _sphere_mask(density_map: DensityMap, points: np.ndarray, radius: float) -> np.ndarray:
    """Boolean [nx, ny, nz]: voxels within ``radius`` (A) of any of ``points [M, 3]``."""
    shape, spacing = np.array(density_map.shape), density_map.spacing
    half = np.ceil(radius / spacing).astype(int) + 1
    off = np.stack(np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij"), -1).reshape(-1, 3)
    mask = np.zeros(density_map.shape, dtype=bool)
    for chunk in np.array_split(points, max(1, len(points) // 2048)):
        center = np.round((chunk - density_map.origin) / spacing).astype(int)
        vox = center[:, None, :] + off[None]  # [m, O, 3]
        dist2 = np.sum(np.square(vox * spacing + density_map.origin - chunk[:, None, :]), axis=-1)
        keep = (dist2 <= radius**2) & np.all((vox >= 0) & (vox < shape), axis=-1)
        v = vox[keep]
        mask[v[:, 0], v[:, 1], v[:, 2]] = True
    return mask


# ----------------------------------------------------------------------------------------------------------------
# The observable
# ----------------------------------------------------------------------------------------------------------------


class DensityObservable:
    """Likelihood of an experimental map (X-ray or cryo-EM) given a weighted ensemble.

    Built once from the atoms (``atoms.coords`` [K, N, 3], the reference conformers, are required: they fix the box
    and the mask) and a map (a CCP4/MRC/MTZ path or an in-memory ``DensityMap``).  The model map is this module's
    kernel with B = B_atom + ``blur`` on every atom (``blur`` defaults to ``resolution_blur(resolution)`` = 4 d^2 A^2),
    the ensemble members added with their weights x occupancies, plus the fixed atoms of ``atoms.environment``
    (waters, ligands) inside the box.

    Defaults come from the data and the structure, as for a crystallographer's map-model correlation:
    - ``resolution`` None: the map's own (an in-memory map's ``resolution``, an MTZ's d_min, or a CCP4/MRC header
      label); a map that does not say needs ``resolution`` given.
    - ``b_factor`` None: the structure's per-atom B (``atoms.b_iso``; [K, N] per conformer in score mode), else 20;
      a number overrides every atom's B.  Occupancies: ``atoms.occupancy`` ([N], or [K, N] per conformer).
    - An MTZ (or crystallographic CCP4 map) whose cell or space group differ from the structure's is refused unless
      ``allow_other_crystal``; a report whose RSCC is near zero carries a ``warning``.

    Likelihood (Gaussian noise on the map voxels inside the fixed mask):
        logL = -1/2 * (n_ind / n_mask) * sum_mask (rho_obs - (a rho_model + b))^2 / s^2
    - a >= 0 and b are the least-squares fit of rho_obs on rho_model in the mask, in closed form (differentiable), so
      the map's absolute scale and offset drop out; a is kept >= 0 because a negative scale would reward an inverted
      model map.  With the fit, the sum equals n_mask var(rho_obs) (1 - max(CC, 0)^2), CC the Pearson correlation in
      the mask, which is how it is computed (no division by a vanishing model variance).
    - s = ``sigma`` * std(rho_obs in the mask): ``sigma`` is the noise level relative to the map's signal (0.3 means
      a perfect model reaches CC ~ 0.95).
    - n_ind / n_mask corrects for correlated voxels: a map at resolution d has about one independent value per
      (d/2)^3 A^3 (Nyquist), so n_ind = mask volume / (d/2)^3, capped at n_mask.
    Hence logL = -(n_ind / (2 sigma^2)) (1 - max(CC, 0)^2): finite everywhere, 0 at a perfect fit.

    Parameters: ``kind`` "xray" (IT92, e/A^3) or "em" (electron scattering factors, ~ Coulomb potential);
    ``mask_radius`` (A) around every reference atom; ``mtz_columns`` "auto" or "F,PHI"; ``spacing`` (A) of the box
    grid for map files (None: the map's own; an in-memory ``DensityMap`` always keeps its grid); ``sigma`` relative
    noise (above); ``padding`` (A) of the box around the reference atoms; ``blur`` (A^2, None: ``resolution_blur``);
    ``cutoff`` of the kernel; ``environment`` False leaves the fixed atoms out.
    Attributes: ``grid`` (the experimental map on the box, a ``DensityMap``), ``mask`` (bool [nx, ny, nz]),
    ``kernel`` (the ``DensityKernel``), ``n_mask``, ``n_independent``, ``resolution_source`` and ``notes``.
    """

    name = "density"
    NEAR_ZERO_CC = 0.2  # a report below this RSCC warns that model and map may not belong together
    data_key = "map"  # the option naming the data file
    headline = ("rscc", "cc_box")

    def describe(self) -> list[str]:
        return [f"resolution {self.resolution:.2f} A ({self.resolution_source}), B from {self.b_source}, "
                f"{self.n_environment} fixed atoms in the box"]

    def plots(self, coords, weights, report) -> list[PlotSpec]:
        """A slice of the map with the ensemble's model density as contours."""
        model = np.asarray(self.predict(coords, weights))
        return [PlotSpec("map_slice.png", "map_slice", {
            "map": self.grid.values, "model": model, "origin": self.grid.origin, "spacing": self.grid.spacing,
            "atoms_xyz": np.asarray(coords).reshape(-1, 3), "title": "map (grey) and ensemble density (contours)"})]

    @classmethod
    def synthetic_data(cls, atoms, states, occupancies, directory, *, seed: int = 0, resolution: float = 2.0,
                       **_) -> Path:
        """The demo's map: ``synthetic_map`` of the mixture at ``resolution`` A, written as CCP4 (noise-free)."""
        dmap = synthetic_map(atoms, states, occupancies, resolution=float(resolution))
        return write_ccp4(Path(directory) / f"two_state_{resolution}A.ccp4", dmap)

    def __init__(
        self,
        atoms: AtomInfo,
        map: str | Path | DensityMap | None = None,
        resolution: float | None = None,
        kind: str = "xray",
        b_factor: float | None = None,
        mask_radius: float = 2.0,
        mtz_columns: str = "auto",
        spacing: float | None = None,
        sigma: float = 0.3,
        padding: float = 5.0,
        blur: float | None = None,
        cutoff: float = 1e-3,
        allow_other_crystal: bool = False,
        environment: bool = True,
    ):
        if map is None:
            raise MapError(
                "the density observable needs a map: a CCP4/MRC/MTZ path or a DensityMap "
                "(for a test map of the reference conformers use observables.density.synthetic_map)"
            )
        if atoms.coords is None:
            raise ValueError(
                "the density observable needs reference coordinates (AtomInfo.coords) to fix its box and mask"
            )
        if kind not in KINDS:
            raise MapError(f"observables.density.kind={kind!r} is unknown; use one of {KINDS}")
        self.notes: list[str] = []
        for label, value in (("sigma", sigma), ("mask_radius", mask_radius)):
            if not value > 0:
                raise MapError(f"observables.density.{label} must be > 0, got {value}")
        reference = np.asarray(atoms.coords, dtype=np.float64)
        if reference.ndim == 2:
            reference = reference[None]
        if reference.shape[1:] != (len(atoms), 3):
            raise ValueError(f"AtomInfo.coords must be [K, {len(atoms)}, 3], got {reference.shape}")
        points = reference.reshape(-1, 3)
        if not np.all(np.isfinite(points)):
            raise ValueError("AtomInfo.coords contains non-finite values")
        for i, element in enumerate(atoms.element):
            try:
                coefficients(normalise_element(element), kind)
            except ValueError as exc:
                raise MapError(
                    f"atom {atoms.atom_name[i]} of {atoms.res_name[i]} {atoms.chain_id[i]}{atoms.res_seq[i]}: {exc}"
                ) from None

        if isinstance(map, DensityMap):
            if spacing is not None and not np.allclose(map.spacing, spacing, rtol=1e-6):
                raise MapError(
                    f"spacing={spacing} A was asked for, but the given DensityMap has spacing {map.spacing} A; "
                    "in-memory maps keep their grid (leave spacing=None)"
                )
            grid = _crop(map, points, padding)
            info = MapInfo(map.resolution, None, "the in-memory map" if map.resolution is not None else "none")
        else:
            grid, info = read_map_and_info(map, mtz_columns=mtz_columns, spacing=spacing, box_around=points,
                                           padding=padding)
        if resolution is None:
            if info.resolution is None:
                where = "the in-memory map" if isinstance(map, DensityMap) else str(map)
                raise MapError(f"{where} does not say its resolution; give it with observables.density.resolution=<A>")
            resolution = info.resolution
            self.resolution_source = info.resolution_source
        else:
            self.resolution_source = "given"
        if not resolution > 0:
            raise MapError(f"observables.density.resolution must be > 0 A, got {resolution}")
        if info.crystal is not None and atoms.crystal is not None:
            note = info.crystal.check_structure(atoms.crystal, "map", "observables.density.allow_other_crystal",
                                                allow_other_crystal, MapError)
            if note:
                self.notes.append(note)
        if not np.all(np.isfinite(grid.values)):
            raise MapError("the map has non-finite values (NaN/inf) in the box around the model")
        self.grid = grid
        self.mask = _sphere_mask(grid, points, mask_radius)
        n_mask = int(self.mask.sum())
        if n_mask < 2:
            raise MapError(f"the mask (voxels within {mask_radius} A of the model) has {n_mask} voxels; need >= 2")
        observed = grid.values[self.mask].astype(np.float64)
        if not observed.std() > 0:
            raise MapError("the map is constant inside the mask around the model: nothing to fit")

        self.resolution = float(resolution)
        self.kind = kind
        self.blur = resolution_blur(self.resolution) if blur is None else float(blur)
        if b_factor is not None:
            b_atoms = np.full(len(atoms), float(b_factor))
            self.b_source = f"b_factor={float(b_factor):g} on every atom"
        elif atoms.b_iso is not None:
            b_atoms = np.asarray(atoms.b_iso, dtype=np.float64)
            self.b_source = "the structure's per-atom B"
        else:
            b_atoms = np.full(len(atoms), 20.0)
            self.b_source = "20 A^2 on every atom (the structure gives none)"
        self.b_factor = b_atoms
        self.sigma = float(sigma)
        self.kernel = DensityKernel(
            atoms.element, grid.shape, grid.origin, grid.spacing, b_atoms + self.blur, kind=kind, cutoff=cutoff
        )
        occupancy = (np.ones(len(atoms), np.float32) if atoms.occupancy is None
                     else np.asarray(atoms.occupancy, np.float32))
        self.occupancy = occupancy
        voxel_volume = float(np.prod(grid.spacing))
        self.n_mask = n_mask
        self.n_independent = min(float(n_mask), n_mask * voxel_volume / (self.resolution / 2.0) ** 3)

        # fixed atoms (waters, ligands) whose density reaches into the box: a constant part of the model map
        env = atoms.environment if environment else None
        env_box = np.zeros(grid.shape, np.float32)
        self.n_environment = 0
        if env is not None and len(env):
            reach = self.kernel.radius
            near = np.all((env.xyz >= grid.origin - reach) & (env.xyz <= grid.upper + reach), axis=1)
            if near.any():
                b_env = np.asarray(env.b_iso, np.float64)[near] if b_factor is None else np.full(near.sum(), b_factor)
                env_kernel = DensityKernel(np.asarray(env.element)[near], grid.shape, grid.origin, grid.spacing,
                                           b_env + self.blur, kind=kind, cutoff=cutoff)
                env_box = np.asarray(jax.jit(env_kernel)(np.asarray(env.xyz, np.float32)[near][None],
                                                         np.asarray(env.occupancy, np.float32)[near][None]))
                self.n_environment = int(near.sum())
        self.environment_map = env_box

        mask_voxels = np.argwhere(self.mask)
        mask_index = self.kernel.voxel_index(mask_voxels)  # positions of the mask voxels in the kernel's flat grid
        env_mask = jnp.asarray(env_box[self.mask])
        env_flat = jnp.asarray(env_box.reshape(-1))
        obs_mean = float(observed.mean())
        obs_centered = (observed - obs_mean).astype(np.float32)
        obs_var = float(observed.var())
        box = grid.values.reshape(-1).astype(np.float64)
        box_centered = (box - box.mean()).astype(np.float32)
        box_var = float(box.var())
        kernel = self.kernel
        occ = jnp.asarray(occupancy)
        # model-variance floor ((e/A^3)^2) that keeps CC finite for a model with no density in the mask
        var_floor = 1e-20
        prefactor = self.n_independent / (2.0 * self.sigma**2)

        def atom_weights(coords, weights):
            w = jnp.asarray(weights, jnp.float32).reshape(-1)
            return w[:, None] * (occ if occ.ndim == 2 else occ[None, :])

        def correlation(model, centered, var_obs):
            m = model - jnp.mean(model)
            cov = jnp.mean(m * centered)
            var_m = jnp.mean(jnp.square(m))
            return cov / jnp.sqrt(var_obs * (var_m + var_floor)), cov, var_m

        def log_likelihood(coords, weights):
            rho = kernel.at(coords, atom_weights(coords, weights), mask_index) + env_mask
            cc, _, _ = correlation(rho, obs_centered, obs_var)
            return -prefactor * (1.0 - jnp.square(jnp.maximum(cc, 0.0)))

        def statistics(coords, weights):
            rho_box = kernel(coords, atom_weights(coords, weights))
            rho = rho_box[mask_voxels[:, 0], mask_voxels[:, 1], mask_voxels[:, 2]] + env_mask
            rho_box = rho_box.reshape(-1) + env_flat
            cc, cov, var_m = correlation(rho, obs_centered, obs_var)
            cc_box, _, _ = correlation(rho_box, box_centered, box_var)
            scale = jnp.maximum(cov, 0.0) / (var_m + var_floor)
            return {
                "rscc": cc,
                "cc_box": cc_box,
                "scale": scale,
                "offset": obs_mean - scale * jnp.mean(rho),
                "log_likelihood": -prefactor * (1.0 - jnp.square(jnp.maximum(cc, 0.0))),
            }

        if kernel.members is None:
            def member_predictions(coords):  # [E, M]: each member's density at the mask voxels
                one = jnp.ones((1,), coords.dtype)
                return jax.lax.map(lambda c: kernel.at(c[None], atom_weights(c[None], one), mask_index), coords)
        else:  # per-member B tables: every member through the whole kernel, the others at weight 0
            def member_predictions(coords):
                eye = jnp.eye(coords.shape[0], dtype=jnp.float32)
                return jax.lax.map(lambda onehot: kernel.at(coords, atom_weights(coords, onehot), mask_index), eye)

        def log_likelihood_from_predictions(predictions, weights):
            cc, _, _ = correlation(weights @ predictions + env_mask, obs_centered, obs_var)
            return -prefactor * (1.0 - jnp.square(jnp.maximum(cc, 0.0)))

        self._predict = jax.jit(lambda coords, weights: kernel(coords, atom_weights(coords, weights))
                                + env_flat.reshape(grid.shape))
        self._log_likelihood = jax.jit(log_likelihood)
        self._statistics = jax.jit(statistics)
        self._member_predictions = jax.jit(member_predictions)
        self._log_likelihood_from_predictions = log_likelihood_from_predictions

    def predict(self, coords, weights) -> jnp.ndarray:
        """Model map of the weighted ensemble on the box grid ``[nx, ny, nz]`` (e/A^3 for X-ray, A^-2 for EM)."""
        return self._predict(coords, weights)

    def log_likelihood(self, coords, weights) -> jnp.ndarray:
        """Scalar log-likelihood of the map given coords [E, N, 3] (A) and weights [E] (jit-, grad-, vmap-able)."""
        return self._log_likelihood(coords, weights)

    def member_predictions(self, coords) -> jnp.ndarray:
        """Each member's model density at the mask voxels ``[E, M]``; the ensemble's is ``weights @`` this (the map is
        linear in the member weights), which makes refining weights of a fixed ensemble cheap."""
        return self._member_predictions(coords)

    def log_likelihood_from_predictions(self, predictions, weights) -> jnp.ndarray:
        """``log_likelihood`` from ``member_predictions``: equal to ``log_likelihood(coords, weights)``."""
        return self._log_likelihood_from_predictions(predictions, weights)

    def report(self, coords, weights) -> dict:
        """RSCC (CC in the mask), CC over the whole box, fitted scale and offset, the log-likelihood, and what the
        model map was made with (resolution and its source, B); a ``warning`` when the RSCC is near zero."""
        out: dict = {k: float(v) for k, v in self._statistics(coords, weights).items()}
        out.update(resolution=self.resolution, resolution_source=self.resolution_source, b_factors=self.b_source,
                   environment_atoms=self.n_environment)
        if self.notes:
            out["notes"] = list(self.notes)
        if not out["rscc"] > self.NEAR_ZERO_CC:
            out["warning"] = (f"the model-map correlation in the mask is {out['rscc']:.3f}, near zero: is the structure "
                              "in this map's frame (same crystal, same origin)?")
        return out
