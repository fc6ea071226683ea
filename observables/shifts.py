"""Backbone chemical shifts (CA, CB, C', N, HN, HA) of a weighted ensemble, in pure JAX.

The observable compares measured shifts with a *shift predictor*: any function of one structure's coordinates that
returns per-residue shifts (``ShiftPredictor``, below).  Predictors are chosen by name (``predictor: builtin``), by
import path (``"package.module:factory"``) or passed in directly, so a better model (a SPARTA+-like network, a
lookup table) plugs in without touching the framework.  The ensemble's shift is the weighted mean of the members'
shifts (fast exchange).

Builtin predictor (``builtin``): random coil + a smooth secondary shift in the residue's own (phi, psi):
    delta_k(i) = RC_k(aa_i) + DSS_helix,k * w_helix(phi_i, psi_i) + DSS_strand,k * w_strand(phi_i, psi_i)    (ppm)
- RC: random-coil shifts of residue X in Ac-GGXAGG peptides, referenced to DSS: Wishart, Bigam, Holm, Hodges &
  Sykes (1995) J. Biomol. NMR 5, 67-81 (``RANDOM_COIL_WISHART_1995``; reduced and oxidised Cys are separate entries;
  Pro has no N/HN).  The numbers were checked against two independent public transcriptions of that table; where
  those disagreed (the 15N column, Cys, Arg HA) the GGXAGG (not GGXPGG) values are used.
- DSS: average secondary shifts (observed - random coil) of residues in alpha helices and beta strands, one number
  per nucleus for all residue types (``SECONDARY_SHIFTS``), as tabulated by the Northwestern IMSERC NMR guide
  ("Chemical shifts of proteins: secondary structure", imserc.northwestern.edu/guide/eNMR/proteins/chempro2.html),
  which collects them from Spera & Bax (1991) J. Am. Chem. Soc. 113, 5490 and Wishart & Sykes (1994) Methods
  Enzymol. 239, 363:  HA -0.38 / +0.38, HN -0.19 / +0.29, CA +2.6 / -1.4, CB -0.4 / +2.2, C' +1.7 / -1.4,
  N -1.7 / +1.2 ppm (helix / strand).
- w: von Mises basins on the torus, w = exp(k_phi (cos(phi - phi0) - 1) + k_psi (cos(psi - psi0) - 1)) with
  k = 1 / width^2 (width in radians), centred on the right-handed alpha helix (-63, -43) deg and the beta strand
  (-120, +130) deg, widths 25 and 35 deg (``BASINS``; these centres and widths are this model's choice, not a
  literature fit).  w is 1 at the centre and falls smoothly to 0 elsewhere, so residues in loops (and the
  left-handed region) keep their random-coil value; residues without phi or psi (chain ends, breaks) too.
No neighbour corrections (e.g. the -2 ppm CA of a residue before a proline), no ring currents, no hydrogen bonds and
no side-chain terms: expect errors well above SPARTA+'s (Shen & Bax (2010) J. Biomol. NMR 48, 13: RMSE CA 0.94,
CB 1.14, C' 1.09, N 2.45, HN 0.49, HA 0.25 ppm).

Data (``read_shifts``): the ``_Atom_chem_shift`` loop of an NMR-STAR 3 (BMRB) file.  Residues are matched by
``Auth_seq_ID`` (the authors' numbering, used by the PDB model of the same entry; ``numbering="auth"``, default) or by
``Seq_ID`` (BMRB's own 1-based numbering of the sequence, ``numbering="seq"``); ``residue_offset`` is added to the
file's numbers.  Every residue the file and the model share must have the same residue type, else the data are
refused (the message says which residues differ and whether the other numbering would fit).  Atom names: ``H`` or
``HN`` (amide proton), ``C`` (carbonyl C'), ``CA``, ``CB``, ``N``, ``HA``; for glycine the mean of ``HA2`` and ``HA3``.
Shifts are taken as referenced in the file (BMRB: DSS for 1H and 13C, indirect for 15N) — no offset is fitted; the
report gives each nucleus's mean error (``bias_*``) so that a referencing problem shows.

Likelihood (Gaussian): logL = -1/2 sum_i (delta_obs,i - <delta>_i)^2 / sigma_k(i)^2, sigma per nucleus (ppm).
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from observables.base import AtomInfo
from observables.nmr import (
    MAX_PEPTIDE_BOND,
    NmrDataError,
    backbone,
    phi_psi_cos_sin,
    read_star_loops,
    residue_numbers,
    select_chain,
    unmapped_report,
    unmapped_warning,
)

__all__ = [
    "BASINS",
    "DEFAULT_SIGMA",
    "NUCLEI",
    "RANDOM_COIL_WISHART_1995",
    "SECONDARY_SHIFTS",
    "BuiltinShiftPredictor",
    "ShiftData",
    "ShiftPredictor",
    "ShiftsObservable",
    "read_shifts",
    "register_shift_predictor",
    "shift_predictor",
]

NUCLEI = ("CA", "CB", "C", "N", "H", "HA")

nan = math.nan
# Wishart et al. (1995) J. Biomol. NMR 5, 67-81: random-coil shifts (ppm, DSS) of X in GGXAGG.
# Columns: CA, CB, C', N, HN, HA.  "CYX" is oxidised (disulfide-bonded) cysteine.
RANDOM_COIL_WISHART_1995: dict[str, tuple[float, float, float, float, float, float]] = {
    "ALA": (52.5, 19.1, 177.8, 123.8, 8.24, 4.32),
    "ARG": (56.0, 30.9, 176.3, 120.5, 8.23, 4.34),
    "ASN": (53.1, 38.9, 175.2, 118.7, 8.40, 4.74),
    "ASP": (54.2, 41.1, 176.3, 120.4, 8.34, 4.64),
    "CYS": (58.2, 28.0, 174.6, 118.8, 8.32, 4.55),
    "CYX": (55.4, 41.1, 174.6, 118.6, 8.43, 4.71),
    "GLN": (55.7, 29.4, 176.0, 119.8, 8.32, 4.34),
    "GLU": (56.6, 29.9, 176.6, 120.2, 8.42, 4.35),
    "GLY": (45.1, nan, 174.9, 108.8, 8.33, 3.96),
    "HIS": (55.0, 29.0, 174.1, 118.2, 8.42, 4.73),
    "ILE": (61.1, 38.8, 176.4, 119.9, 8.00, 4.17),
    "LEU": (55.1, 42.4, 177.6, 121.8, 8.16, 4.34),
    "LYS": (56.2, 33.1, 176.6, 120.4, 8.29, 4.32),
    "MET": (55.4, 32.9, 176.3, 119.6, 8.28, 4.48),
    "PHE": (57.7, 39.6, 175.8, 120.3, 8.30, 4.62),
    "PRO": (63.3, 32.1, 177.3, nan, nan, 4.42),
    "SER": (58.3, 63.8, 174.6, 115.7, 8.31, 4.47),
    "THR": (61.8, 69.8, 174.7, 113.6, 8.15, 4.35),
    "TRP": (57.5, 29.6, 176.1, 121.3, 8.25, 4.66),
    "TYR": (57.9, 38.8, 175.9, 120.3, 8.12, 4.55),
    "VAL": (62.2, 32.9, 176.3, 119.2, 8.03, 4.12),
}

# Residue names of force fields / modified residues read as a standard one (protonation states, selenomethionine).
_ALIASES = {"HID": "HIS", "HIE": "HIS", "HIP": "HIS", "HSD": "HIS", "HSE": "HIS", "HSP": "HIS", "MSE": "MET"}

# Average secondary shifts (ppm), (helix, strand) per nucleus: Spera & Bax (1991); Wishart & Sykes (1994), as
# tabulated by the IMSERC NMR guide (module docstring).
SECONDARY_SHIFTS: dict[str, tuple[float, float]] = {
    "CA": (2.6, -1.4),
    "CB": (-0.4, 2.2),
    "C": (1.7, -1.4),
    "N": (-1.7, 1.2),
    "H": (-0.19, 0.29),
    "HA": (-0.38, 0.38),
}

# (phi0, psi0, width) in degrees of the two basins of the builtin predictor (this model's choice).
BASINS = {"helix": (-63.0, -43.0, 25.0), "strand": (-120.0, 130.0, 35.0)}

# Default per-nucleus sigma (ppm) of the likelihood: the builtin predictor's RMSE on 2KJR model 1 (heavy atoms)
# against BMRB 16338 (CA 1.09, CB 1.39, C' 1.29, N 4.41, HN 0.67, HA 0.37; tests/test_shifts.py), rounded up to 0.1
# ppm — one protein, so a rough guide; pass sigma={...} with another predictor.
DEFAULT_SIGMA = {"CA": 1.1, "CB": 1.4, "C": 1.3, "N": 4.5, "H": 0.7, "HA": 0.4}

# Sulfur-sulfur distance (A) below which two cysteines count as a disulfide (2.05 A bond) for the random coil.
DISULFIDE_MAX_SS = 2.5


# ----------------------------------------------------------------------------------------------------------------
# Predictors
# ----------------------------------------------------------------------------------------------------------------


@runtime_checkable
class ShiftPredictor(Protocol):
    """Built once from the model's atoms by a factory ``factory(atoms: AtomInfo, **options)``; then a pure JAX
    function of one structure.

    ``nuclei``: the prediction's columns (names from ``NUCLEI``).  ``residue_ids``: ``(chain_id, res_seq)`` of its
    rows.  ``res_names``: ``[R]`` residue names (for the sequence check against the data).  ``defined``: ``[R, K]``
    bool, which entries are predictions (others are ignored; they must still be finite).
    ``__call__(coords [N, 3]) -> [R, K]`` shifts in ppm; jit-, grad- and vmap-able.
    """

    nuclei: tuple[str, ...]
    residue_ids: list[tuple[str, int]]
    res_names: np.ndarray
    defined: np.ndarray

    def __call__(self, coords) -> jnp.ndarray: ...


_PREDICTORS: dict[str, Callable[..., ShiftPredictor]] = {}


def register_shift_predictor(name: str):
    """Decorator: make ``factory(atoms, **options) -> ShiftPredictor`` available as ``predictor: name``."""

    def deco(factory):
        _PREDICTORS[name] = factory
        return factory

    return deco


def shift_predictor(spec, atoms: AtomInfo, **options) -> ShiftPredictor:
    """Build the predictor named by ``spec``: a registered name, ``"module:attribute"`` (a factory), a factory, or an
    already built ``ShiftPredictor`` (returned as is; ``options`` must then be empty)."""
    if isinstance(spec, str):
        if spec in _PREDICTORS:
            factory = _PREDICTORS[spec]
        elif ":" in spec:
            module, _, attr = spec.partition(":")
            try:
                factory = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise NmrDataError(f"shift predictor {spec!r} cannot be imported: {exc}") from None
        else:
            raise NmrDataError(
                f"unknown shift predictor {spec!r}; registered: {sorted(_PREDICTORS)}, or give 'module:factory'"
            )
    elif isinstance(spec, ShiftPredictor) and not isinstance(spec, type):
        if options:
            raise ValueError("predictor options were given for an already built shift predictor")
        return spec
    elif callable(spec):
        factory = spec
    else:
        raise TypeError(f"predictor must be a name, 'module:factory', a factory or a ShiftPredictor; got {spec!r}")
    predictor = factory(atoms, **options)
    if not isinstance(predictor, ShiftPredictor):
        raise TypeError(f"{spec!r} did not build a ShiftPredictor (nuclei, residue_ids, res_names, defined, call)")
    return predictor


def _standard_name(name: str) -> str:
    name = str(name).strip().upper()
    return _ALIASES.get(name, name)


def _disulfide_cysteines(atoms: AtomInfo, bb) -> np.ndarray:
    """[R] bool: cysteines whose SG is within ``DISULFIDE_MAX_SS`` of another SG in the reference coordinates."""
    out = np.zeros(len(bb), dtype=bool)
    if atoms.coords is None:
        return out
    names = np.char.strip(np.asarray(atoms.atom_name).astype(str))
    sg = np.flatnonzero(names == "SG")
    if len(sg) < 2:
        return out
    ref = np.asarray(atoms.coords, dtype=np.float64)
    ref = ref[0] if ref.ndim == 3 else ref
    d = np.linalg.norm(ref[sg][:, None] - ref[sg][None], axis=-1)
    np.fill_diagonal(d, np.inf)
    bonded = sg[np.any(d <= DISULFIDE_MAX_SS, axis=1)]
    index = bb.index()
    for k in bonded:
        r = index.get((str(atoms.chain_id[k]), int(atoms.res_seq[k])))
        if r is not None:
            out[r] = True
    return out


@register_shift_predictor("builtin")
class BuiltinShiftPredictor:
    """Random coil (Wishart et al. 1995) + smooth helix/strand secondary shifts in (phi, psi) (module docstring).

    Options: ``basins`` (dict like ``BASINS``: name -> (phi0, psi0, width) degrees, for "helix" and "strand"),
    ``secondary_shifts`` (dict like ``SECONDARY_SHIFTS``), ``max_peptide_bond`` (A).
    """

    nuclei = NUCLEI

    def __init__(
        self,
        atoms: AtomInfo,
        basins: Mapping[str, Sequence[float]] | None = None,
        secondary_shifts: Mapping[str, Sequence[float]] | None = None,
        max_peptide_bond: float = MAX_PEPTIDE_BOND,
    ):
        basins = {**BASINS, **(basins or {})}
        secondary = {**SECONDARY_SHIFTS, **(secondary_shifts or {})}
        self.backbone = bb = backbone(atoms, max_peptide_bond)
        self.residue_ids = [(str(c), int(s)) for c, s in zip(bb.chain_id, bb.res_seq)]
        self.res_names = np.array([_standard_name(n) for n in bb.res_name])
        oxidised = _disulfide_cysteines(atoms, bb)
        table = np.full((len(bb), len(NUCLEI)), np.nan)
        for r, name in enumerate(self.res_names):
            key = "CYX" if name == "CYS" and oxidised[r] else name
            if key in RANDOM_COIL_WISHART_1995:
                table[r] = RANDOM_COIL_WISHART_1995[key]
        self.defined = np.isfinite(table) & bb.complete[:, None]
        self.random_coil = np.nan_to_num(table).astype(np.float32)  # [R, K]
        self.secondary = np.array([secondary[k] for k in NUCLEI], dtype=np.float32).T  # [2, K]: helix, strand
        centres = np.radians([[basins[b][0], basins[b][1]] for b in ("helix", "strand")])  # [2, 2]
        kappa = 1.0 / np.radians([basins[b][2] for b in ("helix", "strand")]) ** 2  # [2]
        self._cos0, self._sin0 = np.cos(centres).astype(np.float32), np.sin(centres).astype(np.float32)
        self._kappa = kappa.astype(np.float32)
        self._has_both = (bb.has_phi & bb.has_psi).astype(np.float32)

    def basin_weights(self, coords):
        """``[..., R, 2]``: helix and strand weights of every residue (0 where phi or psi is undefined)."""
        cphi, sphi, cpsi, spsi = phi_psi_cos_sin(coords, self.backbone)
        c0, s0, kappa = self._cos0, self._sin0, self._kappa
        # cos(phi - phi0) = cos phi cos phi0 + sin phi sin phi0 (same for psi); von Mises exponent per basin.
        dphi = cphi[..., None] * c0[:, 0] + sphi[..., None] * s0[:, 0] - 1.0
        dpsi = cpsi[..., None] * c0[:, 1] + spsi[..., None] * s0[:, 1] - 1.0
        return jnp.exp(kappa * (dphi + dpsi)) * self._has_both[:, None]

    def __call__(self, coords):
        """Shifts ``[..., R, 6]`` (ppm; columns ``NUCLEI``) from ``coords [..., N, 3]`` (A)."""
        return self.random_coil + self.basin_weights(coords) @ self.secondary


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShiftData:
    """Measured backbone shifts: per row the residue number (after numbering/offset), residue name, nucleus (one of
    ``NUCLEI``), value (ppm), and the file it came from (for messages)."""

    res_seq: np.ndarray
    res_name: np.ndarray
    nucleus: np.ndarray
    value: np.ndarray
    source: str = "<data>"
    numbering: str = "auth"

    def __len__(self) -> int:
        return len(self.value)


_ATOM_TO_NUCLEUS = {"H": "H", "HN": "H", "C": "C", "CO": "C", "CA": "CA", "CB": "CB", "N": "N", "HA": "HA"}


def read_shifts(
    path: str | Path,
    numbering: str = "auth",
    residue_offset: int = 0,
    shift_list: str | None = None,
    entity_assembly: str | None = None,
) -> ShiftData:
    """Backbone shifts from the ``_Atom_chem_shift`` loop of an NMR-STAR 3 file (see the module docstring).

    ``shift_list``: the save-frame name to use when the file has several assigned-shift lists.
    ``entity_assembly``: the ``Entity_assembly_ID`` to use when the list covers several molecules.
    """
    path = Path(path)
    if not path.exists():
        raise NmrDataError(f"chemical shift file not found: {path}")
    loops = read_star_loops(path, "_Atom_chem_shift.")
    if not loops:
        text = path.read_text(encoding="utf-8", errors="replace")
        if "_Chem_shift_value" in text or "_Residue_seq_code" in text:
            raise NmrDataError(f"{path} is NMR-STAR 2.1; only NMR-STAR 3 (_Atom_chem_shift loop) is supported")
        raise NmrDataError(f"{path}: no _Atom_chem_shift loop found (is it a BMRB NMR-STAR 3 file?)")
    if shift_list is not None:
        loops = [lp for lp in loops if lp.frame == shift_list]
        if not loops:
            raise NmrDataError(f"{path}: no shift list in save frame {shift_list!r}")
    if len(loops) > 1:
        frames = [lp.frame for lp in loops]
        raise NmrDataError(f"{path} has {len(loops)} shift lists {frames}; choose one with shift_list=...")
    loop = loops[0]
    numbers, _ = residue_numbers(loop, "", numbering, path)
    n = len(loop)
    cols = loop.columns
    for tag in ("Comp_ID", "Atom_ID", "Val"):
        if tag not in cols:
            raise NmrDataError(f"{path}: the _Atom_chem_shift loop has no {tag} column")
    assembly = cols.get("Entity_assembly_ID", [None] * n)
    assemblies = sorted({a for a in assembly if a is not None})
    if entity_assembly is None and len(assemblies) > 1:
        raise NmrDataError(
            f"{path}: the shift list covers {len(assemblies)} molecules (Entity_assembly_ID {assemblies}); "
            "choose one with entity_assembly=..."
        )
    # (res_seq, res_name) -> nucleus -> values (Gly HA2/HA3 are averaged into HA)
    rows: dict[tuple[int, str], dict[str, list[float]]] = {}
    for i in range(n):
        if entity_assembly is not None and assembly[i] != str(entity_assembly):
            continue
        if numbers[i] is None or cols["Val"][i] is None or cols["Atom_ID"][i] is None:
            continue
        res_name = _standard_name(cols["Comp_ID"][i] or "")
        atom = cols["Atom_ID"][i].upper()
        nucleus = _ATOM_TO_NUCLEUS.get(atom)
        if nucleus is None and res_name == "GLY" and atom in ("HA2", "HA3"):
            nucleus = "HA"
        if nucleus is None:
            continue
        try:
            value = float(cols["Val"][i])
        except ValueError:
            raise NmrDataError(f"{path}: shift row {i + 1}: value {cols['Val'][i]!r} is not a number") from None
        rows.setdefault((numbers[i] + int(residue_offset), res_name), {}).setdefault(nucleus, []).append(value)
    seq, names, nuclei, values = [], [], [], []
    for (rs, rn), per_nucleus in rows.items():
        for nucleus, vals in per_nucleus.items():
            seq.append(rs)
            names.append(rn)
            nuclei.append(nucleus)
            values.append(float(np.mean(vals)))
    if not values:
        raise NmrDataError(f"{path}: no backbone shifts (H, N, C, CA, CB, HA) in the _Atom_chem_shift loop")
    return ShiftData(np.array(seq), np.array(names), np.array(nuclei), np.array(values), str(path), numbering)


def _check_sequence(data: ShiftData, residue_names: dict[int, str], chain: str, path: str) -> None:
    """Refuse data whose residue types differ from the model's at the same numbers."""
    seen: dict[int, str] = dict(zip(data.res_seq.tolist(), data.res_name.tolist()))
    shared = [rs for rs in seen if rs in residue_names]
    if not shared:
        span = f"{min(residue_names)}-{max(residue_names)}" if residue_names else "none"
        raise NmrDataError(
            f"{path}: none of the shift residues ({min(seen)}-{max(seen)}, numbering={data.numbering!r}) are in "
            f"chain {chain} of the model (residues {span}); check numbering / residue_offset"
        )
    bad = [(rs, seen[rs], residue_names[rs]) for rs in sorted(shared) if seen[rs] != residue_names[rs]]
    if bad:
        listing = ", ".join(f"{rs}: data {a} / model {b}" for rs, a, b in bad[:6])
        best = _best_offset(seen, residue_names)
        hint = f"; the sequences would agree with residue_offset={best}" if best not in (None, 0) else ""
        raise NmrDataError(
            f"{path}: the residue types of {len(bad)} of {len(shared)} shared residues differ between data and model "
            f"(chain {chain}, numbering={data.numbering!r}): {listing}{' ...' if len(bad) > 6 else ''}{hint}. "
            "Try numbering='seq' or 'auth', residue_offset, or check that file and model are the same protein."
        )


def _best_offset(seen: dict[int, str], model: dict[int, str]) -> int | None:
    best, best_score = None, 0
    for off in range(-200, 201):
        pairs = [(model.get(rs + off), name) for rs, name in seen.items()]
        matched = sum(m == name for m, name in pairs)
        shared = sum(m is not None for m, _ in pairs)
        if shared and matched == shared and matched > best_score:
            best, best_score = off, matched
    return best


# ----------------------------------------------------------------------------------------------------------------
# The observable
# ----------------------------------------------------------------------------------------------------------------


class ShiftsObservable:
    """Likelihood of measured backbone chemical shifts given a weighted ensemble (see the module docstring).

    Parameters: ``data`` (NMR-STAR 3 path or a ``ShiftData``), ``nuclei`` (subset of ``NUCLEI`` to use), ``sigma``
    (ppm: one number, or a dict per nucleus merged into ``DEFAULT_SIGMA``), ``predictor`` (name, "module:factory",
    factory or ``ShiftPredictor``) and ``predictor_options``, ``chain`` (model chain of the data; default the only
    one), ``numbering`` ("auth" / "seq"), ``residue_offset``, ``shift_list``, ``entity_assembly`` (see
    ``read_shifts``).  Attributes: ``predictor``, ``rows`` / ``columns`` (predictor row and column of each datum),
    ``nucleus``, ``observed``, ``dropped`` (``(res_seq, nucleus, reason)`` of data not used).
    """

    name = "shifts"
    headline = ("chi2", "rmse_ca")

    def __init__(
        self,
        atoms: AtomInfo,
        data=None,
        nuclei: Sequence[str] = NUCLEI,
        sigma: float | Mapping[str, float] | None = None,
        predictor="builtin",
        predictor_options: Mapping | None = None,
        chain: str | None = None,
        numbering: str = "auth",
        residue_offset: int = 0,
        shift_list: str | None = None,
        entity_assembly: str | None = None,
    ):
        if data is None:
            raise NmrDataError("the shifts observable needs data: a BMRB NMR-STAR 3 file (_Atom_chem_shift loop)")
        nuclei = tuple(str(k).upper() for k in nuclei)
        unknown = [k for k in nuclei if k not in NUCLEI]
        if unknown or not nuclei:
            raise NmrDataError(f"observables.shifts.nuclei must be a non-empty subset of {NUCLEI}, got {list(nuclei)}")
        if sigma is None or isinstance(sigma, Mapping):
            given = {str(k).upper(): float(v) for k, v in (sigma or {}).items()}
            sigmas = {**DEFAULT_SIGMA, **given}
        else:
            sigmas = {k: float(sigma) for k in NUCLEI}
        if any(not sigmas[k] > 0 for k in nuclei):
            raise NmrDataError(f"observables.shifts.sigma must be > 0 ppm for every nucleus used, got {sigmas}")
        self.sigma = {k: sigmas[k] for k in nuclei}

        table = (
            data
            if isinstance(data, ShiftData)
            else read_shifts(data, numbering, residue_offset, shift_list, entity_assembly)
        )
        self.predictor = pred = shift_predictor(predictor, atoms, **dict(predictor_options or {}))
        columns_of = {k: j for j, k in enumerate(pred.nuclei)}
        ids = pred.residue_ids
        bb_chains = sorted({c for c, _ in ids})
        chain = select_chain(backbone(atoms), chain, table.source) if chain is None else str(chain)
        if chain not in bb_chains:
            raise NmrDataError(f"{table.source}: chain {chain!r} is not among the predictor's chains {bb_chains}")
        row_of = {rs: r for r, (c, rs) in enumerate(ids) if c == chain}
        model_names = {rs: _standard_name(pred.res_names[r]) for rs, r in row_of.items()}
        _check_sequence(table, model_names, chain, table.source)

        rows, cols, nucs, obs = [], [], [], []
        self.dropped: list[tuple[int, str, str]] = []
        self.n_other_nuclei = 0  # shifts of nuclei not asked for (option nuclei): not a mapping failure, only counted
        for rs, nucleus, value in zip(table.res_seq.tolist(), table.nucleus.tolist(), table.value.tolist()):
            if nucleus not in nuclei:
                self.n_other_nuclei += 1
                continue
            if rs not in row_of:
                self.dropped.append((rs, nucleus, "residue absent (not in the model)"))
            elif nucleus not in columns_of or not pred.defined[row_of[rs], columns_of[nucleus]]:
                self.dropped.append((rs, nucleus, "not predicted (no prediction for this atom on this model)"))
            else:
                rows.append(row_of[rs])
                cols.append(columns_of[nucleus])
                nucs.append(nucleus)
                obs.append(value)
        if self.dropped:
            warnings.warn(unmapped_warning(str(table.source), self._unmapped_items(), "shift(s)"), stacklevel=2)
        if not obs:
            raise NmrDataError(f"{table.source}: none of the shifts can be predicted on this model")
        self.rows, self.columns = np.array(rows), np.array(cols)
        self.nucleus = np.array(nucs)
        self.observed = np.array(obs, dtype=np.float32)
        inv_var = np.array([1.0 / self.sigma[k] ** 2 for k in nucs], dtype=np.float32)
        masks = {k: (self.nucleus == k).astype(np.float32) for k in nuclei}
        counts = {k: float(m.sum()) for k, m in masks.items()}
        self.counts = counts

        observed, inv_var_j = jnp.asarray(self.observed), jnp.asarray(inv_var)
        r_idx, c_idx = jnp.asarray(self.rows), jnp.asarray(self.columns)

        def member_predictions(coords):  # [E, N, 3] -> [E, M] (ppm)
            return jax.vmap(pred)(coords)[:, r_idx, c_idx]

        def log_likelihood_from_predictions(predictions, weights):
            resid = observed - weights @ predictions
            return -0.5 * jnp.sum(resid * resid * inv_var_j)

        def log_likelihood(coords, weights):
            return log_likelihood_from_predictions(member_predictions(coords), weights)

        def statistics(coords, weights):
            resid = observed - weights @ member_predictions(coords)
            out = {"chi2": jnp.mean(resid * resid * inv_var_j), "log_likelihood": -0.5 * jnp.sum(resid**2 * inv_var_j)}
            for k, m in masks.items():
                if counts[k] > 0:
                    out[f"rmse_{k.lower()}"] = jnp.sqrt(jnp.sum(m * resid * resid) / counts[k])
                    out[f"bias_{k.lower()}"] = -jnp.sum(m * resid) / counts[k]  # mean (predicted - observed)
            return out

        self._member_predictions = jax.jit(member_predictions)
        self._log_likelihood = jax.jit(log_likelihood)
        self._log_likelihood_from_predictions = log_likelihood_from_predictions
        self._statistics = jax.jit(statistics)

    def predict(self, coords, weights) -> jnp.ndarray:
        """Ensemble-averaged shifts ``[M]`` (ppm) of the used data, in the order of ``observed``."""
        return jnp.asarray(weights) @ self._member_predictions(coords)

    def member_predictions(self, coords) -> jnp.ndarray:
        """Each member's shifts ``[E, M]`` (ppm); the ensemble's is ``weights @`` this."""
        return self._member_predictions(coords)

    def log_likelihood_from_predictions(self, predictions, weights) -> jnp.ndarray:
        return self._log_likelihood_from_predictions(predictions, weights)

    def log_likelihood(self, coords, weights) -> jnp.ndarray:
        """Scalar Gaussian log-likelihood of the shifts (jit-, grad- and vmap-able)."""
        return self._log_likelihood(coords, weights)

    def report(self, coords, weights) -> dict:
        """``rmse_<nucleus>`` and ``bias_<nucleus>`` (ppm; predicted - observed) and ``n_<nucleus>`` per nucleus with
        data (ca, cb, c, n, h, ha), ``chi2`` (mean) and ``log_likelihood``; the shifts not used (``n_unmapped``,
        ``unmapped`` "residue nucleus: reason", ``unmapped_reasons``) and ``n_other_nuclei`` (shifts of nuclei
        outside the option ``nuclei``)."""
        out: dict = {k: float(v) for k, v in self._statistics(coords, weights).items()}
        for k, count in self.counts.items():
            out[f"n_{k.lower()}"] = count
        out.update(unmapped_report(self._unmapped_items()))
        out["n_other_nuclei"] = float(self.n_other_nuclei)
        return out

    def _unmapped_items(self) -> list[tuple[str, str]]:
        return [(f"{rs} {nucleus}", why) for rs, nucleus, why in self.dropped]
