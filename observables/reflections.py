"""Measured X-ray amplitudes as archives and data-processing programs write them: MTZ and mmCIF structure-factor files.

``read_reflections(path)`` returns a :class:`Reflections`: Miller indices, |F_obs| with sigmas, the free-set flags,
the crystal (cell, space group) and what was chosen and why (``notes``, for the log and metrics.json).  Everything
goes through gemmi (``read_mtz_file``, ``cif.read`` + ``as_refln_blocks``).

Column choice (``columns="auto"``):
- MTZ: amplitudes by name (FP/SIGFP, FOBS/SIGFOBS, F-obs/SIGF-obs, F/SIGF, FMEAN/SIGFMEAN, F-obs-filtered, ...),
  else by type: the first F-type column followed by its Q-type sigma (an F followed by a P-type phase is a map
  coefficient, never data); else intensities (I/SIGI, IMEAN/SIGIMEAN, I-obs/SIGI-obs, IOBS/SIGIOBS, or a J column
  with its Q); else Friedel pairs F(+)/SIGF(+)/F(-)/SIGF(-) (or I(+)...), averaged.  ``columns="FP,SIGFP"`` names them.
- mmCIF: ``_refln.F_meas_au`` / ``F_meas_sigma_au`` (or ``F_meas`` / ``F_meas_sigma``), else
  ``intensity_meas`` / ``intensity_sigma``, else ``pdbx_F_plus`` / ``pdbx_F_minus``, averaged.
- A file with map coefficients and no measured data is refused with a message pointing to the ``density`` observable.

Intensities become amplitudes by French & Wilson (1978, Acta Cryst. A34, 517): the posterior mean and standard
deviation of F = sqrt(J) given the measured I ~ N(J, sigma_I^2) and a Wilson prior on J (acentric: exponential;
centric: chi-square with one degree of freedom) whose mean is the mean intensity of the reflection's resolution shell
(times its multiplicity epsilon), integrated numerically over F.  Reflections with I / sigma_I < -4 are dropped (as
French & Wilson and ctruncate do).  ``intensities="sqrt"`` instead uses F = sqrt(max(I, 0)), sigma_F = sigma_I /
(2 F) (stated in the notes; only for strong data).

Free set (``free_flag_value=None``: detected).
- mmCIF ``_refln.status``: 'o' work, 'f' free, anything else ('x', '-', '<', 'h', 'l') is not a measurement.
- A flag column (FreeR_flag, FREE, R-free-flags, FreeRflag, RFREE, ``_refln.pdbx_r_free_flag``, or any integer
  column whose name contains "free"): with two values, the smaller class is free (Phenix writes free = 1, CCP4 with
  two values free = 0, both the minority); with more than two values (CCP4's 0..19), free = 0.
- No flags: ``generate_free`` (default 0.05) of the reflections become a free set, chosen by a seeded hash of the
  index so the same file always gives the same set; the notes say so (such an R-free is only honest for a model that
  was not refined against those reflections).
Reflections with missing F or sigma, F <= 0, sigma <= 0 or systematically absent are dropped and counted in the notes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gemmi
import numpy as np

from observables.errors import InputError

__all__ = ["ReflectionError", "Reflections", "french_wilson", "read_reflections"]


class ReflectionError(InputError):
    """A reflection file cannot be used as measured X-ray data; the message names the file and what to do."""


AMPLITUDE_NAMES = (("FP", "SIGFP"), ("FOBS", "SIGFOBS"), ("F-obs", "SIGF-obs"), ("F-obs-filtered", "SIGF-obs-filtered"),
                   ("FMEAN", "SIGFMEAN"), ("F", "SIGF"), ("F_meas", "SIGF_meas"), ("FO", "SIGFO"))
INTENSITY_NAMES = (("I", "SIGI"), ("IMEAN", "SIGIMEAN"), ("I-obs", "SIGI-obs"), ("IOBS", "SIGIOBS"),
                   ("I-obs-filtered", "SIGI-obs-filtered"))
FREE_NAMES = ("FreeR_flag", "FREE", "R-free-flags", "FreeRflag", "RFREE", "FreeR", "FREER", "R-free-flags-1")
CIF_AMPLITUDES = (("F_meas_au", "F_meas_sigma_au"), ("F_meas", "F_meas_sigma"))
CIF_INTENSITIES = (("intensity_meas", "intensity_sigma"), ("pdbx_I_meas", "pdbx_I_meas_sigma"))
CIF_FRIEDEL = (("pdbx_F_plus", "pdbx_F_plus_sigma", "pdbx_F_minus", "pdbx_F_minus_sigma"),
               ("pdbx_I_plus", "pdbx_I_plus_sigma", "pdbx_I_minus", "pdbx_I_minus_sigma"))
MAP_COEFFICIENTS = ("FWT", "2FOFCWT", "DELFWT", "FOFCWT", "pdbx_FWT", "pdbx_DELFWT", "FC", "F_calc_au", "F_calc")


@dataclass
class Reflections:
    """Measured amplitudes of one crystal.  Arrays are [M]; ``hkl`` [M, 3] int."""

    hkl: np.ndarray
    f_obs: np.ndarray  # |F| (the file's units)
    sigma: np.ndarray
    free: np.ndarray  # bool: True for the free (test) set
    cell: gemmi.UnitCell
    space_group: gemmi.SpaceGroup
    path: Path
    columns: list[str]
    free_rule: str
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hkl)

    @property
    def d_spacing(self) -> np.ndarray:
        return 1.0 / np.sqrt(self.cell.calculate_1_d2_array(self.hkl.astype(np.float64)))

    @property
    def d_min(self) -> float:
        return float(self.d_spacing.min())

    @property
    def d_max(self) -> float:
        return float(self.d_spacing.max())

    def select(self, keep: np.ndarray) -> "Reflections":
        return Reflections(self.hkl[keep], self.f_obs[keep], self.sigma[keep], self.free[keep], self.cell,
                           self.space_group, self.path, self.columns, self.free_rule, list(self.notes))

    def summary(self) -> dict:
        return {"file": str(self.path), "columns": self.columns, "free_rule": self.free_rule,
                "n_reflections": len(self), "n_work": int((~self.free).sum()), "n_free": int(self.free.sum()),
                "d_min": self.d_min, "d_max": self.d_max, "cell": list(self.cell.parameters),
                "space_group": self.space_group.hm, "notes": list(self.notes)}


# ----------------------------------------------------------------------------------------------------------------
# French & Wilson


def french_wilson(i_obs, sig_i, mean_i, centric, n_points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and standard deviation of F = sqrt(J) given I ~ N(J, sig_i^2) and the Wilson prior on J with mean
    ``mean_i`` (epsilon <I> of the shell): acentric p(F) = (2F / S) exp(-F^2 / S), centric
    p(F) = sqrt(2 / (pi S)) exp(-F^2 / (2 S)) (French & Wilson 1978, eqs. 9-10 written for F), integrated by the
    trapezoid rule on ``n_points`` values of F spanning where the posterior is not negligible.  Arrays [M] ->
    (F, sigma_F) [M].

    The posterior on J is (up to the centric J^(-1/2)) a normal of mean J* = I - k sig_i^2 (k = 1/S acentric,
    1/(2S) centric) and width sig_i, cut at J = 0; the grid covers the J where its log falls by less than ``_FW_SPAN``
    from the top: J* -+ sqrt(2 span) sig_i when J* > 0, else [0, J* + sqrt(J*^2 + 2 span sig_i^2)].  A fixed grid
    from 0 to sqrt(I + 8 sig_i) would leave a strong reflection's posterior (width sig_i / 2F in F) between two grid
    points (sigma_F = 0 at I / sig_i = 1e4), and equal weights miscount the endpoint F = 0 where a centric
    posterior is largest."""
    i_obs, sig_i = np.atleast_1d(np.asarray(i_obs, np.float64)), np.atleast_1d(np.asarray(sig_i, np.float64))
    s = np.broadcast_to(np.maximum(np.asarray(mean_i, np.float64), 1e-12), i_obs.shape)
    centric = np.broadcast_to(np.asarray(centric, bool), i_obs.shape)
    k = np.where(centric, 0.5, 1.0) / s
    j_star = i_obs - k * sig_i**2
    half = np.sqrt(2.0 * _FW_SPAN) * sig_i
    j_lo = np.maximum(j_star - half, 0.0)
    j_hi = np.where(j_star > 0, j_star + half, j_star + np.sqrt(j_star**2 + (2.0 * _FW_SPAN) * sig_i**2))
    f_lo, f_hi = np.sqrt(j_lo), np.sqrt(np.maximum(j_hi, j_lo + 1e-300))
    w = np.ones(n_points)
    w[0] = w[-1] = 0.5  # trapezoid weights (the common step cancels in the ratios)
    out_f, out_s = np.empty_like(i_obs), np.empty_like(i_obs)
    for lo in range(0, len(i_obs), 20_000):
        sl = slice(lo, lo + 20_000)
        x = f_lo[sl, None] + np.linspace(0.0, 1.0, n_points)[None, :] * (f_hi[sl] - f_lo[sl])[:, None]  # [m, P]
        j = x * x
        log_like = -0.5 * ((i_obs[sl, None] - j) / sig_i[sl, None]) ** 2
        with np.errstate(divide="ignore"):
            log_prior = np.where(centric[sl, None], -j / (2.0 * s[sl, None]), np.log(x) - j / s[sl, None])
        lp = log_like + log_prior
        lp -= lp.max(axis=1, keepdims=True)
        p = np.exp(lp) * w
        z = p.sum(1)
        mean = (p * x).sum(1) / z
        out_f[sl] = mean
        out_s[sl] = np.sqrt(np.maximum((p * (x - mean[:, None]) ** 2).sum(1) / z, 0.0))
    return out_f, out_s


_FW_SPAN = 40.0  # how far (in log posterior) below its top the French & Wilson grid reaches: exp(-40) ~ 4e-18


def _shell_mean(values, d2inv, epsilon, n_shells: int = 20) -> np.ndarray:
    """<I / epsilon> per resolution shell (equal counts in 1/d^2), times each reflection's epsilon; clipped > 0."""
    order = np.argsort(d2inv)
    shells = np.array_split(order, max(1, min(n_shells, len(order) // 50)))
    out = np.empty(len(values))
    floor = max(np.mean(np.abs(values / epsilon)), 1e-6) * 1e-3
    for idx in shells:
        out[idx] = max(float(np.mean(values[idx] / epsilon[idx])), floor)
    return out * epsilon


# ----------------------------------------------------------------------------------------------------------------
# reading


def _mtz_choose(mtz: gemmi.Mtz, columns: str, path: Path) -> tuple[str, list[str]]:
    """-> (kind, labels): 'F' [F, SIGF], 'I' [I, SIGI], 'F+-' / 'I+-' [X(+), SIG(+), X(-), SIG(-)]."""
    labels = [c.label for c in mtz.columns]
    types = {c.label: c.type for c in mtz.columns}
    if columns != "auto":
        given = [c.strip() for c in str(columns).split(",") if c.strip()]
        missing = [c for c in given if c not in labels]
        if missing:
            raise ReflectionError(f"{path}: column(s) {', '.join(missing)} not in the MTZ; columns are {', '.join(labels)}")
        if len(given) == 2:
            kind = "I" if types[given[0]] in "JK" else "F"
            if types[given[0]] == "P" or types[given[1]] == "P":
                raise ReflectionError(f"{path}: {','.join(given)} are map coefficients (amplitude and phase), not "
                                      "measured data; use observables=[density] for a map")
            return kind, given
        if len(given) == 4:
            return ("I+-" if types[given[0]] in "JK" else "F+-"), given
        raise ReflectionError(f"columns must be 'auto', 'F,SIGF', 'I,SIGI' or 'F(+),SIGF(+),F(-),SIGF(-)'; got {columns!r}")
    for f, s in AMPLITUDE_NAMES:
        if f in labels and s in labels and types[f] == "F":
            return "F", [f, s]
    for a, b in zip(labels, labels[1:]):  # by type: F followed by its Q sigma
        if types[a] == "F" and types[b] == "Q":
            return "F", [a, b]
    for i, s in INTENSITY_NAMES:
        if i in labels and s in labels and types[i] == "J":
            return "I", [i, s]
    for a, b in zip(labels, labels[1:]):
        if types[a] == "J" and types[b] == "Q":
            return "I", [a, b]
    for kind, t in (("F+-", "G"), ("I+-", "K")):
        seq = [c for c in mtz.columns if c.type in (t, "L", "M")]
        quads = [(seq[k].label, seq[k + 1].label, seq[k + 2].label, seq[k + 3].label) for k in range(len(seq) - 3)
                 if (seq[k].type, seq[k + 1].type, seq[k + 2].type, seq[k + 3].type) in ((t, "L", t, "L"), (t, "M", t, "M"))]
        if quads:
            return kind, list(quads[0])
    coefficients = [c for c in MAP_COEFFICIENTS if c in labels]
    if coefficients or any(types[c] == "P" for c in labels):
        raise ReflectionError(f"{path}: has map coefficients ({', '.join(coefficients) or 'F/PHI columns'}) but no "
                              "measured amplitudes or intensities; score a map with observables=[density] "
                              f"observables.density.map={path}")
    raise ReflectionError(f"{path}: no measured amplitudes (F + SIGF) or intensities (I + SIGI) found; columns are "
                          f"{', '.join(f'{l} ({types[l]})' for l in labels)}; name them with observables.xray.columns")


def _free_column_mtz(mtz: gemmi.Mtz) -> str | None:
    labels = [c.label for c in mtz.columns]
    for name in FREE_NAMES:
        if name in labels:
            return name
    for c in mtz.columns:
        if c.type == "I" and "free" in c.label.lower():
            return c.label
    return None


def _free_from_flags(flags: np.ndarray, value, label: str) -> tuple[np.ndarray, str]:
    """Free-set mask from integer flags (NaN = no flag): the rule in the module docstring."""
    valid = np.isfinite(flags)
    vals, counts = np.unique(flags[valid].astype(np.int64), return_counts=True)
    if value is not None:
        value = int(value)
        if value not in vals:
            raise ReflectionError(f"observables.xray.free_flag_value={value} is not a value of column {label} (its "
                                  f"values are {vals.tolist()}); give one of them, or null to detect the free set")
        rule = f"{label} == {value} (given)"
    elif len(vals) == 0:
        raise ReflectionError(f"free-set column {label} has no values")
    elif len(vals) == 1:
        raise ReflectionError(f"free-set column {label} has one value only ({vals[0]}): no free set; remove it or "
                              "let a free set be generated (observables.xray.free_column=none)")
    elif len(vals) == 2:
        value = int(vals[np.argmin(counts)])
        rule = (f"{label} == {value} (the smaller of two classes: {dict(zip(vals.tolist(), counts.tolist()))}; "
                f"{'Phenix' if value == 1 else 'CCP4'} convention)")
    else:
        value = 0
        if 0 not in vals:
            raise ReflectionError(f"free-set column {label} has {len(vals)} values but no 0 (CCP4 free = 0); give "
                                  "observables.xray.free_flag_value")
        rule = f"{label} == 0 (CCP4 convention: {len(vals)} flag values {vals.min()}..{vals.max()})"
    free = np.zeros(len(flags), bool)
    free[valid] = flags[valid].astype(np.int64) == value
    return free, rule


def _generated_free(hkl: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A reproducible free set: reflections whose seeded hash of (h, k, l) falls below ``fraction``."""
    if not 0 < fraction < 0.5:
        raise ReflectionError(f"generate_free must be a fraction in (0, 0.5), got {fraction}")
    keys = (hkl.astype(np.int64) + 1024) @ np.array([1, 2048, 2048 * 2048], dtype=np.int64)
    return _hash01(keys, seed) < fraction


def _hash01(keys: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) for every integer key (splitmix64 of key + seed)."""
    # the seed's offset in Python integers, modulo 2^64: np.uint64(seed) * constant warns of overflow for seed >= 2
    # and a negative seed does not convert at all
    offset = np.uint64((int(seed) * 0x9E3779B97F4A7C15) % 2**64)
    with np.errstate(over="ignore"):
        z = keys.astype(np.int64).view(np.uint64) + offset
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def _combine_friedel(fp, sp, fm, sm) -> tuple[np.ndarray, np.ndarray]:
    """Mean of F(+) and F(-) where both are measured (sigma of the mean), else the one that is."""
    both = np.isfinite(fp) & np.isfinite(fm)
    f = np.where(both, 0.5 * (fp + fm), np.where(np.isfinite(fp), fp, fm))
    s = np.where(both, 0.5 * np.sqrt(sp**2 + sm**2), np.where(np.isfinite(fp), sp, sm))
    return f, s


def read_reflections(
    path,
    *,
    columns: str = "auto",
    free_column: str = "auto",
    free_flag_value: int | None = None,
    intensities: str = "french_wilson",
    generate_free: float = 0.05,
    seed: int = 0,
) -> Reflections:
    """Read measured amplitudes (or intensities, converted) with sigmas and free flags from an MTZ or mmCIF
    structure-factor file (``*-sf.cif``, ``r????sf.ent``); see the module docstring for every rule."""
    path = Path(path)
    if not path.is_file():
        raise ReflectionError(f"reflection file not found: {path}")
    if intensities not in ("french_wilson", "sqrt"):
        raise ReflectionError(f"intensities must be french_wilson or sqrt, got {intensities!r}")
    name = path.name.lower().removesuffix(".gz")
    notes: list[str] = []
    if name.endswith(".mtz"):
        try:
            mtz = gemmi.read_mtz_file(str(path))
        except Exception as exc:
            raise ReflectionError(f"cannot read MTZ file {path}: {exc}") from None
        kind, labels = _mtz_choose(mtz, columns, path)
        hkl = np.array(mtz.make_miller_array(), dtype=np.int64)
        data = [np.array(mtz.column_with_label(l), dtype=np.float64) for l in labels]
        flag_label = None if free_column == "none" else (_free_column_mtz(mtz) if free_column == "auto" else free_column)
        if flag_label is not None and flag_label not in [c.label for c in mtz.columns]:
            raise ReflectionError(f"{path}: free-set column {flag_label} not in the MTZ")
        flags = np.array(mtz.column_with_label(flag_label), dtype=np.float64) if flag_label else None
        status = None
        cell, sg = mtz.cell, mtz.spacegroup
    elif name.endswith((".cif", ".ent", ".mmcif")):
        try:
            blocks = gemmi.as_refln_blocks(gemmi.cif.read(str(path)))
        except Exception as exc:
            raise ReflectionError(f"cannot read mmCIF structure factors {path}: {exc}") from None
        blocks = [b for b in blocks if b.default_loop is not None and not b.is_unmerged()]
        if not blocks:
            raise ReflectionError(f"{path}: no merged _refln loop (is this a coordinate file, or unmerged data?)")
        rb = blocks[0]
        if len(blocks) > 1:
            notes.append(f"{len(blocks)} reflection blocks; using the first ({rb.block.name})")
        tags = rb.column_labels()
        kind, labels = None, []
        if columns != "auto":
            labels = [c.strip().removeprefix("_refln.") for c in str(columns).split(",")]
            missing = [c for c in labels if c not in tags]
            if missing:
                raise ReflectionError(f"{path}: _refln.{missing[0]} not in the file; it has {', '.join(tags)}")
            kind = ("I" if "intensity" in labels[0] or "_I_" in labels[0] else "F") + ("+-" if len(labels) == 4 else "")
        else:
            for group, k in ((CIF_AMPLITUDES, "F"), (CIF_INTENSITIES, "I"), (CIF_FRIEDEL[:1], "F+-"), (CIF_FRIEDEL[1:], "I+-")):
                found = next((g for g in group if all(t in tags for t in g)), None)
                if found:
                    kind, labels = k, list(found)
                    break
        if kind is None:
            coefficients = [c for c in MAP_COEFFICIENTS if c in tags]
            if coefficients:
                raise ReflectionError(f"{path}: has map coefficients ({', '.join(coefficients)}) but no measured "
                                      "amplitudes; score a map with observables=[density]")
            raise ReflectionError(f"{path}: no _refln.F_meas_au / intensity_meas columns; it has {', '.join(tags)}")
        hkl = np.array(rb.make_miller_array(), dtype=np.int64)
        data = [np.asarray(rb.make_float_array(l), dtype=np.float64) for l in labels]
        status = np.array(list(rb.block.find_loop("_refln.status")), dtype=object) if "status" in tags else None
        flag_label = None
        flags = None
        if free_column not in ("none", "auto"):
            flag_label = free_column.removeprefix("_refln.")
        elif free_column == "auto" and "pdbx_r_free_flag" in tags:
            flag_label = "pdbx_r_free_flag"
        if flag_label is not None:
            if flag_label not in tags:
                raise ReflectionError(f"{path}: _refln.{flag_label} not in the file")
            flags = np.asarray(rb.make_float_array(flag_label), dtype=np.float64)
        cell, sg = rb.cell, rb.spacegroup
        labels = [f"_refln.{l}" for l in labels]
    else:
        raise ReflectionError(f"unknown reflection file {path.name!r}: expected .mtz or an mmCIF structure-factor file "
                              "(.cif, -sf.cif, .ent)")
    if sg is None:
        raise ReflectionError(f"{path}: no space group in the file")

    n_read = len(hkl)
    measured = np.ones(n_read, bool)
    if status is not None:
        measured = np.isin(status, ["o", "f"])
        if (~measured).any():
            notes.append(f"{int((~measured).sum())} reflections with _refln.status other than o/f (unobserved, "
                         "absent, outliers) left out")
    if kind in ("F+-", "I+-"):
        x, s = _combine_friedel(*data)
        notes.append(f"Friedel pairs {labels[0]}/{labels[2]} averaged")
    else:
        x, s = data
    ok = measured & np.isfinite(x) & np.isfinite(s)
    if (measured & ~ok).any():
        notes.append(f"{int((measured & ~ok).sum())} reflections without a value or sigma left out")

    ops = sg.operations()
    absent = np.asarray(ops.systematic_absences(hkl.astype(np.int32)), bool)
    if (ok & absent).any():
        notes.append(f"{int((ok & absent).sum())} systematically absent reflections left out")
    ok &= ~absent

    # free set (from the full arrays, before anything is dropped)
    if status is not None and np.any(status == "f"):
        free = status == "f"
        free_rule = "_refln.status == 'f'"
    elif flags is not None:
        try:
            free, free_rule = _free_from_flags(flags, free_flag_value, flag_label)
        except ReflectionError as exc:
            raise ReflectionError(f"{path}: {exc}") from None
    else:
        free = _generated_free(hkl, generate_free, seed)
        free_rule = f"generated: {generate_free:.0%} of the reflections by a seeded hash of h, k, l (seed {seed})"
        notes.append("the file has no free-set flags; a free set was generated. R-free from it is only honest for a "
                     "model never refined against those reflections")

    if kind.startswith("I"):
        i_obs, sig_i = x[ok], s[ok]
        keep = sig_i > 0
        if intensities == "sqrt":
            f = np.sqrt(np.maximum(i_obs, 0.0))
            sig = np.where(f > 0, sig_i / (2.0 * np.maximum(f, 1e-12)), np.sqrt(sig_i))
            rule = "F = sqrt(max(I, 0)), sigma_F = sigma_I / (2F)"
        else:
            keep &= i_obs / np.where(sig_i > 0, sig_i, 1.0) >= -4.0
            sub = hkl[ok]
            d2 = cell.calculate_1_d2_array(sub.astype(np.float64))
            eps = np.asarray(ops.epsilon_factor_array(sub.astype(np.int32)), dtype=np.float64)
            centric = np.asarray(ops.centric_flag_array(sub.astype(np.int32)), bool)
            # the Wilson mean of each shell from the intensities that are kept (a dropped one is not a zero)
            mean = np.ones(len(i_obs))
            if keep.any():
                mean[keep] = _shell_mean(i_obs[keep], d2[keep], eps[keep])
            f, sig = french_wilson(i_obs, np.where(sig_i > 0, sig_i, 1.0), mean, centric)
            rule = "French & Wilson (1978) posterior F with a Wilson prior per resolution shell"
        notes.append(f"amplitudes from intensities {labels[0]}/{labels[1]}: {rule}")
        if (~keep).any():
            notes.append(f"{int((~keep).sum())} intensities with sigma <= 0 or I/sigma < -4 left out")
        idx = np.flatnonzero(ok)
        f_all, s_all = np.full(n_read, np.nan), np.full(n_read, np.nan)
        f_all[idx[keep]], s_all[idx[keep]] = f[keep], sig[keep]
        x, s = f_all, s_all
        ok = np.isfinite(x)
    bad = ok & ((x <= 0) | (s <= 0))
    if bad.any():
        notes.append(f"{int(bad.sum())} reflections with F <= 0 or sigma <= 0 left out")
    ok &= ~bad
    if not ok.any():
        raise ReflectionError(f"{path}: no usable reflections in {', '.join(labels)}")
    out = Reflections(hkl[ok], x[ok], s[ok], free[ok], cell, sg, path, labels, free_rule, notes)
    if out.free.sum() == 0:
        raise ReflectionError(f"{path}: the free set ({free_rule}) holds none of the usable reflections")
    if (~out.free).sum() < 10:
        raise ReflectionError(f"{path}: only {int((~out.free).sum())} working reflections")
    return out
