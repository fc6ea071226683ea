"""X-ray diffraction amplitudes: the likelihood of measured |F_obs| given a weighted ensemble, with bulk solvent,
scaling, R-work and R-free, in pure JAX.

The model of the data (the crystallographer's, e.g. Afonine et al. 2013, Acta Cryst. D69, 625):

    F_model(h) = k exp(-s^T B_aniso s / 4) (F_calc(h) + k_sol exp(-B_sol s^2 / 4) F_mask(h))

- F_calc = sum over members e of w_e F_calc(member e) + F_fixed: an ensemble is one multiconformer crystal, so the
  complex structure factors of its members add with their weights (never a mean of |F|).  F_fixed holds the atoms
  the sampler does not move (waters, ligands: ``AtomInfo.environment``).  ``observables.sfcalc`` computes F_calc.
- F_mask: the flat bulk-solvent model (Jiang & Brunger 1994, J. Mol. Biol. 243, 100): 1 in the solvent, 0 within
  r_vdW + r_probe of any atom (symmetry copies included), the boundary then shrunk by r_shrink; cctbx's van der Waals
  radii, r_probe = 1.1 A, r_shrink = 0.9 A (the Phenix defaults), on a grid of spacing d_min / 4 (gemmi's
  ``SolventMasker`` with ``AtomicRadiiSet.Cctbx``), Fourier transformed here.
- s is the reciprocal vector of h (1/A), s^2 = 1/d^2; B_aniso (A^2) is constrained by the Laue symmetry.
- k, B_aniso, k_sol and B_sol are fitted to the WORKING reflections only: a grid search over (k_sol, B_sol), with
  k and B_aniso in closed form (linear least squares on ln(F_obs / |F|)) at each point, then all of them together by
  L-BFGS-B on sum_work (F_obs - |F_model|)^2.  (cctbx adds a per-resolution-bin isotropic scale; this model does
  not, which is what the README's comparison with cctbx measures.)

Targets (``target``), over the working reflections only -- the free set never enters the likelihood:
- ``ml`` (default): the maximum-likelihood amplitude target (Read 1986, Acta Cryst. A42, 140; Lunin & Skovoroda
  1995; Pannu & Read 1996, Acta Cryst. A52, 659), with D and Sigma per resolution bin from sigma_A:
      acentric  p(Fo) = (2 Fo / S) exp(-(Fo^2 + D^2 Fm^2) / S) I0(2 Fo D Fm / S),        S = eps Sd + 2 sigma_Fo^2
      centric   p(Fo) = sqrt(2 / (pi S)) exp(-(Fo^2 + D^2 Fm^2) / (2 S)) cosh(Fo D Fm / S),   S = eps Sd + sigma_Fo^2
  Fm = |F_model|, eps the reflection's multiplicity (epsilon), D = sigma_A sqrt(<Fo^2/eps> / <Fm^2/eps>) and
  Sd = (1 - sigma_A^2) <Fo^2/eps> per bin; the measurement error enters as the variance inflation above (the
  "MLF" approximation).  sigma_A is estimated per bin by maximising this likelihood on the WORKING set (Read's
  cross-validated estimate uses the free set; here the free set stays out of everything guidance sees, at the cost
  of a slightly optimistic sigma_A).  The value is a true log-likelihood (nats): its scale needs no tuning.
- ``ls``: least squares on |F|, log L = -1/2 sum_work (Fo - k Fm)^2 / v_bin, k fitted in closed form at every call
  and v_bin the mean squared residual of the bin at the last refit.

Refits (``refit``): the mask, the scales and sigma_A depend on the model.  They are fitted once to the reference
conformers (``AtomInfo.coords`` at ``AtomInfo.weights``: the input structure) when the observable is built, and again
whenever ``refit(coords, weights)`` is called -- guidance does so every ``refit_every`` steps once the noise level is
below ``refit_below_sigma`` (guidance/objective.py), and every ``report`` refits for the ensemble it reports on.
Between refits they are constants of the likelihood (``state``, passed into the jitted objective as an argument, so
a refit costs no recompilation).

R = sum | Fo - k |F_model| | / sum Fo over the working (R-work) or free (R-free) reflections, k the least-squares
scale of that set (cctbx's convention, so the numbers compare with Phenix's); ``r_free_work_scale`` is R-free with
the working set's scale alone (k = 1: no free-set number enters it at all).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from observables.base import AtomInfo, Crystal, FixedAtoms, PlotSpec
from observables.form_factors import normalise_element
from observables.reflections import ReflectionError, Reflections, read_reflections
from observables.sfcalc import StructureFactorModel, b_range, displacements, miller_stol2, symmetry_ops

__all__ = ["MASK_PROBE", "MASK_SHRINK", "XrayAtoms", "XrayObservable", "XrayState", "atoms_structure",
           "bulk_solvent_mask", "r_factor"]

log = logging.getLogger(__name__)

MASK_PROBE = 1.1  # A, solvent probe radius (Phenix mmtbx.masks default)
MASK_SHRINK = 0.9  # A, shrink-truncation radius (Phenix default)
MASK_STEP_FACTOR = 4.0  # mask grid spacing = d_min / 4
K_SOL_GRID = np.arange(0.0, 0.61, 0.05)  # e/A^3
B_SOL_GRID = np.arange(10.0, 121.0, 10.0)  # A^2
SIGMAA_GRID = np.linspace(0.01, 0.99, 99)


def r_factor(f_obs, f_model_abs, scale: bool = False) -> float:
    """R = sum |Fo - k Fm| / sum Fo, with k = 1 or (``scale``) the least-squares k = sum Fo Fm / sum Fm^2 of these
    reflections -- the convention of cctbx's ``r1_factor`` and so of the R values Phenix reports."""
    f_obs = np.asarray(f_obs, np.float64)
    fm = np.asarray(f_model_abs, np.float64)
    k = float(np.sum(f_obs * fm) / np.sum(fm * fm)) if scale else 1.0
    return float(np.sum(np.abs(f_obs - k * fm)) / np.sum(f_obs))


@jax.tree_util.register_pytree_node_class
@dataclass
class XrayState:
    """What the likelihood holds fixed between refits (arrays over the M reflections unless noted)."""

    f_fixed: jnp.ndarray  # complex [M]: atoms that do not move
    f_mask: jnp.ndarray  # complex [M]: the bulk-solvent mask
    k_sol: jnp.ndarray  # scalar e/A^3
    b_sol: jnp.ndarray  # scalar A^2
    scale: jnp.ndarray  # [M] k exp(-s^T B s / 4)
    ml_d: jnp.ndarray  # [M] D
    ml_var: jnp.ndarray  # [M] S (variance of the ML target, incl. sigma_Fo)
    ls_var: jnp.ndarray  # [M] v_bin of the LS target

    def tree_flatten(self):
        return (self.f_fixed, self.f_mask, self.k_sol, self.b_sol, self.scale, self.ml_d, self.ml_var, self.ls_var), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


# ----------------------------------------------------------------------------------------------------------------
# bulk solvent


def atoms_structure(elements, xyz, occupancy=None, b_iso=None, *, cell: gemmi.UnitCell | None = None,
                    space_group: gemmi.SpaceGroup | None = None) -> gemmi.Structure:
    """Atoms ``xyz [A, 3]`` (A) with ``elements`` as a one-model gemmi Structure (one residue), for gemmi's own
    calculators: ``occupancy`` [A] (default 1; atoms at occupancy <= 0 are left out), ``b_iso`` [A] or a scalar
    (A^2, default gemmi's), and the crystal (``cell``, ``space_group``) with its symmetry images set up when given."""
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    occupancy = np.ones(len(xyz)) if occupancy is None else np.asarray(occupancy, np.float64)
    st = gemmi.Structure()
    model, chain, res = gemmi.Model("1"), gemmi.Chain("A"), gemmi.Residue()
    res.name, res.seqid = "UNL", gemmi.SeqId(1, " ")
    b = None if b_iso is None else np.broadcast_to(np.asarray(b_iso, np.float64), (len(xyz),))
    for i, (el, p, occ) in enumerate(zip(elements, xyz, occupancy)):
        if occ <= 0:
            continue
        atom = gemmi.Atom()
        atom.name = normalise_element(el).upper()
        atom.element = gemmi.Element(normalise_element(el))
        atom.pos = gemmi.Position(*p)
        atom.occ = float(occ)
        if b is not None:
            atom.b_iso = float(b[i])
        res.add_atom(atom)
    chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    if cell is not None:
        st.cell = cell
        st.spacegroup_hm = (space_group or gemmi.SpaceGroup("P 1")).xhm()
        st.setup_cell_images()
    return st


def bulk_solvent_mask(cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup, elements, xyz, d_min: float,
                      probe: float = MASK_PROBE, shrink: float = MASK_SHRINK) -> tuple[np.ndarray, gemmi.FloatGrid]:
    """The flat solvent mask (1 solvent, 0 macromolecule) of atoms ``xyz [A, 3]`` (A) and all their symmetry copies
    on a symmetry-compatible grid of spacing ~d_min / 4: (values [nu, nv, nw] float32, the gemmi grid)."""
    st = atoms_structure(elements, xyz, cell=cell, space_group=space_group)
    grid = gemmi.FloatGrid()
    grid.setup_from(st, d_min / MASK_STEP_FACTOR)
    masker = gemmi.SolventMasker(gemmi.AtomicRadiiSet.Cctbx)
    masker.rprobe, masker.rshrink = probe, shrink
    masker.put_mask_on_float_grid(grid, st[0])
    return np.array(grid, copy=True), grid


def _grid_transform(values: np.ndarray, volume: float, hkl: np.ndarray) -> np.ndarray:
    """(V / n) sum_u rho(u) exp(+2 pi i h . u / n) at ``hkl`` of a map on the whole cell (complex [M])."""
    dft = np.fft.fftn(values.astype(np.float64))
    n = np.array(values.shape)
    idx = np.mod(hkl, n)
    return np.conj(dft[idx[:, 0], idx[:, 1], idx[:, 2]]) * (volume / values.size)


# ----------------------------------------------------------------------------------------------------------------
# scaling


def _aniso_basis(space_group: gemmi.SpaceGroup, cell: gemmi.UnitCell) -> np.ndarray:
    """A basis [n, 3, 3] of the symmetric Cartesian tensors B with R B R^T = B for every rotation R of the point
    group (n = 6 triclinic, 4 monoclinic, 3 orthorhombic, 2 tetragonal/hexagonal/trigonal, 1 cubic)."""
    orth = np.array(cell.orth.mat.tolist())
    frac = np.array(cell.frac.mat.tolist())
    rots, _ = symmetry_ops(space_group)
    cart = [orth @ r @ frac for r in rots]
    sym = []
    for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)):
        e = np.zeros((3, 3))
        e[i, j] = e[j, i] = 1.0
        sym.append(e)
    proj = np.array([[np.sum(np.mean([r @ a @ r.T for r in cart], axis=0) * b) for a in sym] for b in sym])
    u, s, _ = np.linalg.svd(proj)
    basis = [sum(c * e for c, e in zip(u[:, k], sym)) for k in range(6) if s[k] > 0.5]
    return np.array(basis)


@dataclass
class _Scales:
    log_k: float
    aniso: np.ndarray  # coefficients on the basis
    k_sol: float
    b_sol: float


class _Scaler:
    """Fits k, B_aniso, k_sol, B_sol to the working reflections (module docstring)."""

    def __init__(self, reflections: Reflections, stol2: np.ndarray):
        self.f_obs = reflections.f_obs.astype(np.float64)
        self.work = ~reflections.free
        frac = np.array(reflections.cell.frac.mat.tolist())
        s = reflections.hkl.astype(np.float64) @ frac  # Cartesian reciprocal vectors
        self.basis = _aniso_basis(reflections.space_group, reflections.cell)
        # s^T E_k s / 4 per basis tensor [M, n]
        self.quad = 0.25 * np.einsum("mi,kij,mj->mk", s, self.basis, s)
        self.stol2 = stol2  # = s^2 / 4

    def scale(self, sc: _Scales) -> np.ndarray:
        return np.exp(sc.log_k - self.quad @ sc.aniso)

    def model(self, f_calc, f_mask, sc: _Scales) -> np.ndarray:
        return self.scale(sc) * (f_calc + sc.k_sol * np.exp(-sc.b_sol * self.stol2) * f_mask)

    def _closed_form(self, f_abs) -> tuple[float, np.ndarray]:
        """ln Fo = ln k - quad . c + ln |F| by least squares (work, weights Fo^2 to favour strong reflections)."""
        w = self.work & (f_abs > 0)
        y = np.log(self.f_obs[w]) - np.log(f_abs[w])
        x = np.concatenate([np.ones((w.sum(), 1)), -self.quad[w]], axis=1)
        wt = np.sqrt(self.f_obs[w] ** 2 / np.mean(self.f_obs[w] ** 2))
        coef, *_ = np.linalg.lstsq(x * wt[:, None], y * wt, rcond=None)
        return float(coef[0]), coef[1:]

    def _rw(self, f_model) -> float:
        return r_factor(self.f_obs[self.work], np.abs(f_model[self.work]))

    def fit(self, f_calc: np.ndarray, f_mask: np.ndarray, starts: int = 6) -> _Scales:
        """Grid search over (k_sol, B_sol) with the closed-form scales at each point, then L-BFGS-B from the ``starts``
        best grid points; the lowest working R wins.  One polish from the single best grid point is not enough: for
        a poor model R(k_sol, B_sol) has several shallow minima whose grid values nearly tie, and which one a single
        polish falls into then flips with a 1e-8 change of the member weights."""
        grid = []
        for k_sol in K_SOL_GRID:
            for b_sol in B_SOL_GRID:
                f = f_calc + k_sol * np.exp(-b_sol * self.stol2) * f_mask
                log_k, aniso = self._closed_form(np.abs(f))
                sc = _Scales(log_k, aniso, float(k_sol), float(b_sol))
                grid.append((self._rw(self.model(f_calc, f_mask, sc)), len(grid), sc))
                if k_sol == 0.0:
                    break  # B_sol does not matter without solvent
        grid.sort(key=lambda t: (t[0], t[1]))
        polished = [self._polish(f_calc, f_mask, sc) for _, _, sc in grid[:starts]]
        scores = [self._rw(self.model(f_calc, f_mask, sc)) for sc in polished]
        return polished[int(np.argmin(scores))]

    def _polish(self, f_calc, f_mask, start: _Scales) -> _Scales:
        from scipy.optimize import minimize

        fo, w = self.f_obs[self.work], self.work
        fc, fm, quad, stol2 = f_calc[w], f_mask[w], self.quad[w], self.stol2[w]
        n_aniso = len(start.aniso)
        norm = float(np.sum(fo**2))

        def unpack(p):
            return p[0], p[1:1 + n_aniso], p[1 + n_aniso], p[2 + n_aniso]

        def fun(p):
            log_k, c, k_sol, b_sol = unpack(p)
            sol = np.exp(-b_sol * stol2)
            inner = fc + k_sol * sol * fm
            scale = np.exp(log_k - quad @ c)
            a = np.abs(inner)
            fmod = scale * a
            r = fmod - fo
            g_fmod = 2.0 * r / norm
            d_ksol = np.real(np.conj(inner) * sol * fm) / np.maximum(a, 1e-12)
            d_bsol = np.real(np.conj(inner) * (-stol2) * k_sol * sol * fm) / np.maximum(a, 1e-12)
            grad = np.concatenate([[np.sum(g_fmod * fmod)], -(g_fmod * fmod) @ quad,
                                   [np.sum(g_fmod * scale * d_ksol)], [np.sum(g_fmod * scale * d_bsol)]])
            return float(np.sum(r * r) / norm), grad

        p0 = np.concatenate([[start.log_k], start.aniso, [start.k_sol, start.b_sol]])
        bounds = [(None, None)] * (1 + n_aniso) + [(0.0, 1.0), (0.0, 300.0)]
        res = minimize(fun, p0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 200})
        log_k, c, k_sol, b_sol = unpack(res.x)
        polished = _Scales(float(log_k), np.asarray(c), float(k_sol), float(b_sol))
        if self._rw(self.model(f_calc, f_mask, polished)) > self._rw(self.model(f_calc, f_mask, start)):
            return start
        return polished

    def b_cart(self, sc: _Scales) -> np.ndarray:
        return np.einsum("k,kij->ij", sc.aniso, self.basis)


# ----------------------------------------------------------------------------------------------------------------
# the ML target


def _ml_terms(f_obs, f_model_abs, d, var, centric, xp=jnp):
    """Per-reflection log p(Fo | Fm) of the module docstring (nats); ``xp`` = jax.numpy (guidance, float32) or numpy
    (fitting sigma_A, float64).  log I0(y) = y + log(i0e(y)) and log cosh(x) = |x| + log1p(exp(-2|x|)) - log 2 stay
    finite for large arguments."""
    i0e = jax.scipy.special.i0e if xp is jnp else scipy.special.i0e
    x = f_obs * d * f_model_abs / var
    acentric = xp.log(2.0 * f_obs / var) - (f_obs**2 + (d * f_model_abs) ** 2) / var + 2.0 * x + xp.log(i0e(2.0 * x))
    a = xp.abs(x)
    centric_t = (0.5 * xp.log(2.0 / (math.pi * var)) - (f_obs**2 + (d * f_model_abs) ** 2) / (2.0 * var)
                 + a + xp.log1p(xp.exp(-2.0 * a)) - math.log(2.0))
    return xp.where(centric, centric_t, acentric)


def _bins(stol2: np.ndarray, mask: np.ndarray, per_bin: int = 100, max_bins: int = 20) -> np.ndarray:
    """Resolution bin [M] of every reflection: equal counts of ``mask`` reflections in s^2, at least ``per_bin``."""
    n_bins = int(np.clip(mask.sum() // per_bin, 1, max_bins))
    edges = np.quantile(stol2[mask], np.linspace(0, 1, n_bins + 1)[1:-1]) if n_bins > 1 else np.array([])
    return np.searchsorted(edges, stol2, side="right")


# ----------------------------------------------------------------------------------------------------------------
# the observable


class XrayObservable:
    """Likelihood of measured X-ray amplitudes given a weighted ensemble (module docstring).

    Built from the atoms (``AtomInfo``: elements, reference conformers ``coords`` with ``weights``, and where known
    ``b_iso``, ``u_aniso``, ``occupancy``, ``crystal`` and the fixed ``environment``) and ``data``, an MTZ or mmCIF
    structure-factor file (``observables.reflections``: ``columns``, ``free_column``, ``free_flag_value``,
    ``intensities``, ``generate_free``).  Options: ``target`` ml | ls; ``d_min`` / ``d_max`` (A) cut the data;
    ``b_factor`` (A^2): one B for every model atom instead of the structure's (None: the structure's, 20 if it has
    none); ``allow_other_crystal``: accept a structure whose cell or space group differ from the data's;
    ``refit_every`` / ``refit_below_sigma``: how guidance refits (module docstring); ``rate``: grid oversampling.
    """

    name = "xray"
    headline = ("r_work", "r_free")

    def describe(self) -> list[str]:
        refl, fit = self.reflections, self.fit
        return [f"{refl.path}, columns {','.join(refl.columns)}, {len(refl)} reflections ({self.n_work} work, "
                f"{len(refl) - self.n_work} free: {refl.free_rule}), {refl.d_max:.2f}-{refl.d_min:.2f} A; "
                f"{self.crystal_data.describe()}; F_calc grid {list(self.sf.grid.shape)}, blur {self.sf.blur:.1f} A^2",
                f"first fit to the input structure: k_sol {fit['k_sol']:.3f} e/A^3, B_sol {fit['b_sol']:.1f} A^2, "
                f"solvent {100 * fit['solvent_fraction']:.0f} % of the cell, sigma_A {fit['sigmaa_bins']}"]

    def plots(self, coords, weights, report) -> list[PlotSpec]:
        """R-work and R-free by resolution, from the report's bins."""
        if not report.get("bins"):
            return []
        return [PlotSpec("r_by_resolution.png", "r_by_resolution", {
            "bins": report["bins"], "title": f"R-work {report['r_work']:.3f}, R-free {report['r_free']:.3f}"})]

    def __init__(
        self,
        atoms: AtomInfo,
        data: str | Path | Reflections | None = None,
        target: str = "ml",
        columns: str = "auto",
        free_column: str = "auto",
        free_flag_value: int | None = None,
        intensities: str = "french_wilson",
        generate_free: float = 0.05,
        d_min: float | None = None,
        d_max: float | None = None,
        b_factor: float | None = None,
        allow_other_crystal: bool = False,
        refit_every: int = 10,
        refit_below_sigma: float = 2.0,
        rate: float = 1.3,
        seed: int = 0,
    ):
        if data is None:
            raise ReflectionError("the xray observable needs measured amplitudes: observables.xray.data=<file.mtz or "
                                  "-sf.cif>")
        if target not in ("ml", "ls"):
            raise ReflectionError(f"observables.xray.target must be ml or ls, got {target!r}")
        if atoms.coords is None:
            raise ValueError("the xray observable needs reference coordinates (AtomInfo.coords) for its first "
                             "bulk-solvent and scale fit")
        refl = data if isinstance(data, Reflections) else read_reflections(
            data, columns=columns, free_column=free_column, free_flag_value=free_flag_value,
            intensities=intensities, generate_free=generate_free, seed=seed)
        d = refl.d_spacing
        keep = np.ones(len(refl), bool)
        if d_min is not None:
            keep &= d >= float(d_min) - 1e-6
        if d_max is not None:
            keep &= d <= float(d_max) + 1e-6
        if not keep.all():
            refl = refl.select(keep)
        self.reflections = refl
        self.target = target
        self.refit_every = int(refit_every)
        self.refit_below_sigma = float(refit_below_sigma)
        self.crystal_data = Crystal(tuple(refl.cell.parameters), refl.space_group.xhm())
        self.notes = list(refl.notes)
        self._check_crystal(atoms, allow_other_crystal)

        n = len(atoms)
        reference = np.asarray(atoms.coords, np.float32)
        if reference.ndim == 2:
            reference = reference[None]
        k_ref = reference.shape[0]
        ref_weights = (np.full(k_ref, 1.0 / k_ref) if atoms.weights is None
                       else np.asarray(atoms.weights, np.float64) / np.sum(atoms.weights))
        self._reference, self._reference_weights = reference, ref_weights.astype(np.float32)

        # per-atom parameters of the model atoms
        if b_factor is not None:
            b_iso, u_aniso = np.full(n, float(b_factor), np.float32), None
        elif atoms.b_iso is not None:
            b_iso = np.asarray(atoms.b_iso, np.float32)
            u_aniso = None if atoms.u_aniso is None else np.asarray(atoms.u_aniso, np.float32)
        else:
            b_iso, u_aniso = np.full(n, 20.0, np.float32), None
            self.notes.append("the structure gives no B-factors: every model atom has B = 20 A^2")
        b_iso, u_aniso = displacements(b_iso, u_aniso)
        occupancy = np.ones(n, np.float32) if atoms.occupancy is None else np.asarray(atoms.occupancy, np.float32)
        self.b_iso, self.u_aniso, self.occupancy = b_iso, u_aniso, occupancy
        b_lo, b_hi = b_range(b_iso, u_aniso)
        cell, sg = refl.cell, refl.space_group
        self.sf = StructureFactorModel(cell, sg, refl.hkl, atoms.element, b_min=max(b_lo, 0.0), b_max=b_hi, rate=rate,
                                       anisotropic=u_aniso is not None)
        self.stol2 = miller_stol2(cell, refl.hkl)
        self.d_min = refl.d_min
        ops = sg.operations()
        self.epsilon = np.asarray(ops.epsilon_factor_array(refl.hkl.astype(np.int32)), np.float64)
        self.centric = np.asarray(ops.centric_flag_array(refl.hkl.astype(np.int32)), bool)
        self.work = ~refl.free
        self.bins = _bins(self.stol2, self.work)
        self._scaler = _Scaler(refl, self.stol2)
        self._env = atoms.environment
        self._elements = np.asarray(atoms.element).astype(str)
        self.f_fixed = self._fixed_f(atoms.environment, rate)

        f_obs = jnp.asarray(refl.f_obs, jnp.float32)
        work = jnp.asarray(self.work)
        centric = jnp.asarray(self.centric)
        n_work = float(self.work.sum())
        sf = self.sf
        b_arg = jnp.asarray(b_iso)
        u_arg = None if u_aniso is None else jnp.asarray(u_aniso)
        occ_arg = jnp.asarray(occupancy)

        def f_calc(coords, weights):
            coords = jnp.asarray(coords, jnp.float32)
            if coords.ndim == 2:
                coords = coords[None]
            w = jnp.asarray(weights, jnp.float32)
            if occ_arg.ndim == 2:
                if coords.shape[0] != occ_arg.shape[0]:
                    raise ValueError(f"per-conformer occupancies are for {occ_arg.shape[0]} members, got "
                                     f"{coords.shape[0]}")
                w_atoms = w[:, None] * occ_arg
            else:
                w_atoms = w[:, None] * occ_arg[None, :]
            return sf.ensemble(coords, w_atoms, b_arg, u_arg)

        def f_model_abs(state: XrayState, f_c):
            sol = state.k_sol * jnp.exp(-state.b_sol * jnp.asarray(self.stol2, jnp.float32))
            return state.scale * jnp.abs(f_c + state.f_fixed + sol * state.f_mask)

        def target_value(state: XrayState, f_c):
            fm = f_model_abs(state, f_c)
            if target == "ml":
                terms = _ml_terms(f_obs, fm, state.ml_d, state.ml_var, centric)
                return jnp.sum(jnp.where(work, terms, 0.0))
            k = jnp.sum(jnp.where(work, f_obs * fm, 0.0)) / jnp.maximum(jnp.sum(jnp.where(work, fm * fm, 0.0)), 1e-20)
            r2 = jnp.square(f_obs - k * fm) / state.ls_var
            return -0.5 * jnp.sum(jnp.where(work, r2, 0.0))

        self._f_calc = jax.jit(f_calc)
        self._target = target_value
        self._rate = float(rate)
        self._f_model_abs = jax.jit(f_model_abs)
        self._ll = jax.jit(lambda state, coords, weights: target_value(state, f_calc(coords, weights)))
        def weighted(preds, weights):  # real and imaginary parts apart: the weights' gradient stays real
            return jax.lax.complex(weights @ jnp.real(preds), weights @ jnp.imag(preds))

        self._ll_pred = jax.jit(lambda state, preds, weights: target_value(state, weighted(preds, weights)))
        self._member = jax.jit(lambda coords: jax.lax.map(
            lambda c: f_calc(c[None], jnp.ones((1,), jnp.float32)), coords))
        self.n_work = int(n_work)
        self.state, self.fit = self._fit_state(self._reference, self._reference_weights)

    # -- set-up -----------------------------------------------------------------------------------------------------
    def _check_crystal(self, atoms: AtomInfo, allow: bool) -> None:
        mine = atoms.crystal
        if mine is None:
            self.notes.append(f"the structure has no unit cell; assuming the data's {self.crystal_data.describe()}")
            return
        note = self.crystal_data.check_structure(mine, "data", "observables.xray.allow_other_crystal", allow,
                                                 ReflectionError)
        if note:
            self.notes.append(note)

    def _fixed_f(self, env: FixedAtoms | None, rate: float) -> np.ndarray:
        if env is None or len(env) == 0:
            return np.zeros(len(self.reflections), np.complex64)
        b, u = displacements(env.b_iso, env.u_aniso)
        lo, hi = b_range(b, u)
        model = StructureFactorModel(self.reflections.cell, self.reflections.space_group, self.reflections.hkl,
                                     env.element, b_min=max(lo, 0.0), b_max=hi, rate=rate, anisotropic=u is not None)
        return np.asarray(model(env.xyz, env.occupancy, b, u))

    # -- fitting ------------------------------------------------------------------------------------------------------
    def _mask_f(self, xyz: np.ndarray, elements: np.ndarray) -> tuple[np.ndarray, float]:
        """F_mask of atoms ``xyz [A, 3]`` with ``elements [A]`` and the fixed atoms, and the solvent fraction."""
        xyz, elements = [np.asarray(xyz, np.float64).reshape(-1, 3)], [np.asarray(elements).astype(str)]
        if self._env is not None and len(self._env):
            xyz.append(np.asarray(self._env.xyz, np.float64))
            elements.append(np.asarray(self._env.element).astype(str))
        values, grid = bulk_solvent_mask(self.reflections.cell, self.reflections.space_group,
                                         np.concatenate(elements), np.concatenate(xyz), self.d_min)
        return _grid_transform(values, self.reflections.cell.volume, self.reflections.hkl), float(values.mean())

    def _fit_state(self, coords, weights) -> tuple[XrayState, dict]:
        """Mask, scales and sigma_A fitted to ensemble ``coords`` at ``weights`` -> (state, what was fitted).  The
        mask is made of the members with weight > 1 %."""
        coords = np.asarray(coords, np.float32)
        weights = np.asarray(weights, np.float32)
        members = np.asarray(coords, np.float64)[weights > 0.01]
        return self._fit_to(np.asarray(self._f_calc(coords, weights)), members.reshape(-1, 3),
                            np.tile(self._elements, len(members)))

    def _fit_to(self, f_calc, mask_xyz, mask_elements) -> tuple[XrayState, dict]:
        """Mask (of atoms ``mask_xyz`` and the fixed atoms), scales and sigma_A for the moving atoms' ``f_calc``."""
        f_c = np.asarray(f_calc).astype(np.complex128) + self.f_fixed
        f_mask, solvent = self._mask_f(mask_xyz, mask_elements)
        sc = self._scaler.fit(f_c, f_mask)
        f_model = self._scaler.model(f_c, f_mask, sc)
        fm = np.abs(f_model)
        d, var, ls_var, sigmaa = self._ml_parameters(fm)
        info = {"k_sol": sc.k_sol, "b_sol": sc.b_sol, "k_overall": float(np.exp(sc.log_k)),
                "b_cart": np.round(self._scaler.b_cart(sc), 4).tolist(), "sigmaa_bins": np.round(sigmaa, 3).tolist(),
                "solvent_fraction": solvent}
        c64 = lambda a: jnp.asarray(np.asarray(a, np.complex64))  # noqa: E731
        f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
        state = XrayState(f_fixed=c64(self.f_fixed), f_mask=c64(f_mask), k_sol=f32(sc.k_sol), b_sol=f32(sc.b_sol),
                          scale=f32(self._scaler.scale(sc)), ml_d=f32(d), ml_var=f32(var), ls_var=f32(ls_var))
        return state, info

    def _ml_parameters(self, fm: np.ndarray):
        """sigma_A per bin (work set) -> per-reflection D, S of the ML target, and v of the LS target."""
        fo, sig, eps, cen = self.reflections.f_obs, self.reflections.sigma, self.epsilon, self.centric
        d = np.empty(len(fo))
        var = np.empty(len(fo))
        ls_var = np.empty(len(fo))
        sigmaa = []
        for b in range(self.bins.max() + 1):
            in_bin = self.bins == b
            w = in_bin & self.work
            so = np.mean(fo[w] ** 2 / eps[w])
            sc = max(np.mean(fm[w] ** 2 / eps[w]), 1e-20)
            eo, ec = fo[w] / np.sqrt(eps[w] * so), fm[w] / np.sqrt(eps[w] * sc)
            se = sig[w] / np.sqrt(eps[w] * so)
            sa = SIGMAA_GRID[:, None]
            v = 1.0 - sa**2 + np.where(cen[w], se**2, 2.0 * se**2)[None, :]
            ll = np.sum(_ml_terms(eo[None, :], ec[None, :], sa, v, cen[w][None, :], xp=np), axis=1)
            best = float(SIGMAA_GRID[int(np.argmax(ll))])
            sigmaa.append(best)
            d[in_bin] = best * np.sqrt(so / sc)
            var[in_bin] = eps[in_bin] * (1.0 - best**2) * so + np.where(cen[in_bin], 1.0, 2.0) * sig[in_bin] ** 2
            k = np.sum(fo[w] * fm[w]) / max(np.sum(fm[w] ** 2), 1e-20)
            ls_var[in_bin] = max(np.mean((fo[w] - k * fm[w]) ** 2), 1e-12)
        return d, var, ls_var, np.array(sigmaa)

    def refit(self, coords, weights) -> None:
        """Refit the mask, scales and sigma_A to ensemble ``coords [E, N, 3]`` at ``weights [E]``; updates ``state``."""
        self.state, self.fit = self._fit_state(coords, weights)

    # -- the observable -----------------------------------------------------------------------------------------------
    def f_calc(self, coords, weights) -> jnp.ndarray:
        """F_calc [M] (complex, electrons) of the moving atoms of the weighted ensemble (without fixed atoms)."""
        return self._f_calc(coords, weights)

    def predict(self, coords, weights) -> jnp.ndarray:
        """|F_model| [M] of the weighted ensemble with the current scales and bulk solvent."""
        return self._f_model_abs(self.state, self._f_calc(coords, weights))

    def log_likelihood_with(self, state: XrayState, coords, weights) -> jnp.ndarray:
        """The target at ``state`` (a pytree: jit it as an argument)."""
        return self._ll(state, coords, weights)

    def log_likelihood(self, coords, weights) -> jnp.ndarray:
        return self._ll(self.state, coords, weights)

    def member_predictions(self, coords) -> jnp.ndarray:
        """Each member's F_calc [E, M] (complex): the ensemble's is ``weights @`` this."""
        return self._member(jnp.asarray(coords, jnp.float32))

    def log_likelihood_from_predictions(self, predictions, weights) -> jnp.ndarray:
        return self._ll_pred(self.state, predictions, jnp.asarray(weights, jnp.float32))

    def report(self, coords, weights) -> dict:
        """R-work, R-free and the target for ``coords`` at ``weights`` after a full refit of mask, scales and sigma_A
        to them (as a crystallographer computes R for a model); ``state`` is left unchanged."""
        state, fit = self._fit_state(np.asarray(coords, np.float32), np.asarray(weights, np.float32))
        return self._report(state, fit, self._f_calc(coords, weights))

    def atoms(self, elements, b_iso) -> "XrayAtoms":
        """The same likelihood for a flat list of atoms with their own occupancies and B (``XrayAtoms``)."""
        return XrayAtoms(self, elements, b_iso)

    def _report(self, state: XrayState, fit: dict, f_c) -> dict:
        fm = np.asarray(self._f_model_abs(state, f_c), np.float64)
        fo, work = self.reflections.f_obs, self.work
        value = float(self._target(state, f_c))
        free_ml = float(np.sum(np.where(~work, np.asarray(
            _ml_terms(jnp.asarray(fo, jnp.float32), jnp.asarray(fm, jnp.float32), state.ml_d, state.ml_var,
                      jnp.asarray(self.centric))), 0.0)))
        d = 1.0 / np.sqrt(4.0 * self.stol2)
        bins = []
        for b in range(int(self.bins.max()) + 1):
            sel = self.bins == b
            w_b, f_b = sel & work, sel & ~work
            bins.append({"d_max": float(d[sel].max()), "d_min": float(d[sel].min()), "n_work": int(w_b.sum()),
                         "n_free": int(f_b.sum()), "r_work": r_factor(fo[w_b], fm[w_b]),
                         "r_free": r_factor(fo[f_b], fm[f_b]) if f_b.any() else None})
        return {
            "r_work": r_factor(fo[work], fm[work], scale=True), "r_free": r_factor(fo[~work], fm[~work], scale=True),
            "r_free_work_scale": r_factor(fo[~work], fm[~work]),
            "n_work": int(work.sum()), "n_free": int((~work).sum()), "d_min": self.d_min,
            "d_max": self.reflections.d_max, **fit, "target": self.target, "target_work": value,
            "ml_free": free_ml, "free_rule": self.reflections.free_rule, "columns": self.reflections.columns,
            "log_likelihood": value, "bins": bins, "notes": self.notes,
        }


class XrayAtoms:
    """An ``XrayObservable``'s likelihood for a flat list of atoms, each with its own occupancy and B: what
    restrained refinement moves (a multiconformer model's records: an atom listed under altlocs A and B is two atoms
    here).  ``elements [A]``; ``b_iso [A]`` (A^2) sets the range the structure-factor model is built for (B may move
    well beyond it: refinement widens it by 50 %, and atoms outside stay correct with some loss of accuracy).

    ``log_likelihood(state, x [A, 3], q [A], b [A])`` is the observable's target (jitted, differentiable in all
    three) at ``state`` (an ``XrayState``); ``fit(x, q, b)`` refits mask, scales and sigma_A to these atoms (the mask
    from the atoms with q > 1 %, as the ensemble's from members with weight > 1 %) and returns the state;
    ``report(x, q, b)`` is ``XrayObservable.report`` for them.  Fixed atoms (waters, ligands) are the observable's.
    """

    def __init__(self, obs: XrayObservable, elements, b_iso):
        b = np.asarray(b_iso, np.float64).reshape(-1)
        self.obs = obs
        self.elements = np.asarray(elements).astype(str)
        if len(b) != len(self.elements):
            raise ValueError(f"b_iso has {len(b)} values for {len(self.elements)} atoms")
        refl = obs.reflections
        self.sf = StructureFactorModel(refl.cell, refl.space_group, refl.hkl, self.elements,
                                       b_min=max(0.0, float(b.min()) - 5.0),
                                       b_max=max(1.5 * float(b.max()), float(b.max()) + 30.0), rate=obs._rate)
        sf, target = self.sf, obs._target
        self._f_calc = jax.jit(lambda x, q, bb: sf(x, q, bb))
        self.log_likelihood = jax.jit(lambda state, x, q, bb: target(state, sf(x, q, bb)))

    def _args(self, x, q, b):
        return (jnp.asarray(x, jnp.float32), jnp.asarray(q, jnp.float32), jnp.asarray(b, jnp.float32))

    def _fit(self, x, q, b) -> tuple[XrayState, dict, jnp.ndarray]:
        f_c = self._f_calc(*self._args(x, q, b))
        keep = np.asarray(q) > 0.01
        state, info = self.obs._fit_to(np.asarray(f_c), np.asarray(x, np.float64)[keep], self.elements[keep])
        return state, info, f_c

    def fit(self, x, q, b) -> XrayState:
        return self._fit(x, q, b)[0]

    def report(self, x, q, b) -> dict:
        state, info, f_c = self._fit(x, q, b)
        return self.obs._report(state, info, f_c)
