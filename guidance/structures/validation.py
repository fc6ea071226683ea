"""Model validation as a crystallographer reads it: Ramachandran, rotamers and a heavy-atom clashscore, for one
conformer and for a multiconformer (altloc) model.  numpy, scipy and gemmi only (no JAX, no Hydra).

Ramachandran
    phi = C(i-1)-N-CA-C and psi = N-CA-C-N(i+1) of every residue with N, CA and C whose neighbours in the same
    chain (layout order) are bonded to it: a peptide C(i-1)-N(i) longer than ``PEPTIDE_BREAK`` = 2.0 A is a chain
    break, so chain ends and breaks have no entry.  Each residue falls in one of MolProbity's six categories, in this
    order: Gly -> "glycine"; Pro -> "cis_proline" when |omega| < 90 deg (omega = CA(i-1)-C(i-1)-N-CA; the split
    MolProbity's cctbx ramalyze uses, ``is_cislike_peptide``) else "trans_proline"; a residue followed by Pro ->
    "pre_proline"; Ile/Val -> "ile_val"; anything else (including modified amino acids) -> "general".  Its
    (phi, psi) is scored on the Top8000 percentile-contour grid of its category (Williams et al. 2018, Protein Sci.
    27:293-315; the data and licence: ``data/top8000_ramachandran.md``), bilinearly interpolated between the
    2-degree bin centres with periodic wrapping.  Favoured: value >= 0.02 (the 2 % contour); allowed: value >=
    0.0005 for general, 0.002 for cis-Pro, 0.001 for the other categories; else an outlier (the cutoffs of
    MolProbity / cctbx ``ramalyze.evalScore``).

Rotamers
    Side-chain chi angles (IUPAC atoms, ``predictors.rotamers.CHI_ATOMS``) of every residue that has entries in the
    Penultimate Rotamer Library (Lovell et al. 2000, Proteins 40:389-408, Table 1 modal values;
    ``predictors.rotamers.library()``; Pro has none and is skipped).  The distance of a residue to a rotamer is the
    largest over its chis of |chi_k - chi_k(rotamer)| / tol_k, differences wrapped to [0, 180] (the last chi of
    PHE/TYR/ASP/GLU modulo 180: its two namings are one conformation); the nearest rotamer is the one at the
    smallest distance, and the residue is an outlier when that distance exceeds 1, i.e. when no library rotamer
    matches every chi within its window.  The window of chi k of a residue type is
    ``tol_k = max(30, 3 * esd_k)`` degrees, esd_k being the largest standard deviation of that chi among the type's
    well-populated (>= 1 %) rotamers in MolProbity's Top8000 rotamer central values (Hintze et al. 2016, Proteins
    84:1177-1189; ``data/top8000_chi_esd.csv``): about 30 deg for chi1 and for sp3 chi2/chi3/chi4 (esd 7-16 deg),
    60-100 deg for the terminal chi of a ring (His, Phe, Tyr, Trp chi2) or of Asp and Met, and effectively no limit
    for the terminal amide/carboxylate chis of Asn, Gln and Glu (esd 50-75 deg), whose planar groups rotate freely
    in the data.  Three standard deviations cover ~99.7 % of a Gaussian rotamer well.  This is a box rule on modal
    values, NOT MolProbity's rotamericity contours (outlier < 0.3 %), so its outliers differ in detail.  Residues
    lacking a chi atom (or with a non-finite one) are counted as "incomplete", never as outliers.

Clashes (NOT MolProbity's clashscore)
    Heavy atoms only, no hydrogens: two atoms i, j of the elements C, N, O, S, Se, P clash when
    ``d_ij < r_i + r_j - CLASH_OVERLAP``, 0.4 A being MolProbity's serious-overlap criterion.  The radii are those
    probe (MolProbity's contact engine) gives heavy atoms: Word et al. 1999, J. Mol. Biol. 285:1711-1733 -- C 1.75,
    carbonyl C 1.65 (backbone C; Asp CG, Asn CG, Glu CD, Gln CD), N 1.55, O 1.40, S 1.80, P 1.80 A -- and Bondi's
    1.90 A for Se (Bondi 1964, J. Phys. Chem. 68:441-451).  With these radii the normal 2.7 A O(i-1)...C(i) backbone
    contact and hydrogen bonds (N...O >= 2.6 A, O...O >= 2.45 A) are not clashes.  Never clashes: pairs within
    three covalent bonds, S-S pairs and pairs inside a residue without a template (the rule of
    ``guidance.structures.geometry``: Engh & Huber template bonds plus covalent bonds inferred from the coordinates
    for ligands and links); pairs within three bonds through a disulfide (two Cys SG bonded by the covalent rule of
    ``geometry.is_bonded``); and two atoms that both coordinate one metal ion (within ``METAL_CONTACT`` = 2.9 A of
    it: metal-donor distances in proteins are 1.9-2.9 A, Harding 2006, Acta Cryst. D62:678-682), which are 1-3
    through the metal.  clashscore = 1000 * clashes / heavy atoms.  MolProbity counts all-atom
    contacts with hydrogens, which are most of its clashes, so this figure is usually well below MolProbity's
    clashscore: compare it between models, not with MolProbity's numbers.

Multiconformer models (``validate_multiconf``)
    Altloc id X's conformer takes, in every residue, the atoms listed under X, else the residue's blank atoms, and
    in a residue without X its most occupied altloc (``MulticonfModel.conformations``); each conformer is
    validated as a single model.  The whole model counts every residue/altloc combination once: the Ramachandran
    and rotamer entries of all conformers, merged where the atoms that define an entry have the same coordinates
    (a residue with A and B gives two entries where they differ, one where they do not).  Its clashes are between
    atom records that can coexist -- same altloc id, or either blank -- and it counts heavy-atom records, so an
    atom in two altlocs counts twice in the clashscore's denominator too.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from guidance.structures.geometry import (
    BOND_TOLERANCE,
    CLASHING_ELEMENTS,
    HYDROGENS,
    Restraints,
    build_restraints,
    covalent_radii,
    is_bonded,
)
from guidance.structures.multiconf import MulticonfModel
from predictors.rotamers import CHI_ATOMS, SYMMETRIC_LAST_CHI, dihedral, library

__all__ = [
    "RAMA_CATEGORIES",
    "altloc_conformers",
    "chi_windows",
    "clashes",
    "nearest_rotamer",
    "ramachandran",
    "ramachandran_class",
    "ramachandran_value",
    "rotamers",
    "summary_line",
    "validate",
    "validate_multiconf",
]

RAMA_PATH = Path(__file__).resolve().parent / "data" / "top8000_ramachandran.npz"
RAMA_CATEGORIES = ("general", "glycine", "cis_proline", "trans_proline", "pre_proline", "ile_val")
RAMA_FAVOURED = 0.02  # Top8000 contour value at or above which a residue is favoured (all categories)
RAMA_ALLOWED = {"general": 0.0005, "cis_proline": 0.002}  # at or above: allowed; below: outlier
RAMA_ALLOWED_DEFAULT = 0.001  # the other four categories
PEPTIDE_BREAK = 2.0  # A: a C(i-1)-N(i) distance above this is a chain break

CHI_ESD_PATH = Path(__file__).resolve().parent / "data" / "top8000_chi_esd.csv"
CHI_WINDOW_MIN = 30.0  # degrees: the narrowest rotamer window
CHI_WINDOW_ESD = 3.0  # window = this many Top8000 standard deviations

# Heavy-atom van der Waals radii (A) of probe, Word et al. (1999) J. Mol. Biol. 285:1711; Se from Bondi (1964).
VDW_RADII = {"C": 1.75, "N": 1.55, "O": 1.40, "S": 1.80, "SE": 1.90, "P": 1.80}
CARBONYL_RADIUS = 1.65  # A: probe's radius of a carbonyl carbon
CARBONYL_CARBONS = {"ASP": "CG", "ASN": "CG", "GLU": "CD", "GLN": "CD"}  # besides every amino acid's backbone C
CLASH_OVERLAP = 0.4  # A: overlap r_i + r_j - d above which a pair clashes (MolProbity's serious-clash criterion)
N_WORST = 10  # clash pairs listed, worst first
METAL_CONTACT = 2.9  # A: an atom this close to a metal ion coordinates it (metal-donor bonds 1.9-2.9 A, Harding 2006)
NON_METALS = CLASHING_ELEMENTS + HYDROGENS + ("B", "F", "SI", "CL", "BR", "I")

assert set(VDW_RADII) == set(CLASHING_ELEMENTS), "every element that can clash needs a van der Waals radius"


# --------------------------------------------------------------------------------------------------------------------
# Residues of a layout


@dataclass(frozen=True)
class _Residue:
    chain: str
    res_seq: int
    res_name: str
    atoms: dict[str, int]  # heavy-atom name -> layout index (first occurrence)

    def label(self) -> dict:
        return {"chain": self.chain, "res_seq": self.res_seq, "res_name": self.res_name}


def _residues(layout) -> list[_Residue]:
    """The layout's residues in layout order, with the indices of their heavy atoms by name."""
    element = np.char.upper(np.asarray(layout.element).astype(str))
    names = np.asarray(layout.atom_name).astype(str)
    res_names = np.asarray(layout.res_name).astype(str)
    out = []
    for (chain, seq), idx in layout.residue_atoms().items():
        atoms: dict[str, int] = {}
        for i in idx[~np.isin(element[idx], HYDROGENS)]:
            atoms.setdefault(str(names[i]), int(i))
        out.append(_Residue(str(chain), int(seq), str(res_names[idx[0]]), atoms))
    return out


def _check_conformer(layout, coords) -> np.ndarray:
    x = np.asarray(coords, dtype=np.float64)
    if x.shape != (len(layout), 3):
        raise ValueError(f"coords has shape {np.shape(coords)}, expected ({len(layout)}, 3) to match the layout"
                         " (one conformer; validate each member of an ensemble separately)")
    return x


def _finite_dihedral(x: np.ndarray, idx) -> float:
    """Dihedral (degrees) of the four atoms ``idx`` of ``x``; NaN when a coordinate is not finite."""
    p = x[list(idx)]
    return dihedral(*p) if np.all(np.isfinite(p)) else float("nan")


# --------------------------------------------------------------------------------------------------------------------
# Ramachandran


@cache
def _rama_grids() -> dict[str, np.ndarray]:
    """Category -> [180, 180] Top8000 contour values, indexed [phi bin, psi bin], bin centres -179, -177, ..., 179."""
    with np.load(RAMA_PATH) as data:
        centres = data["centres"]
        if not np.allclose(centres, np.arange(-179.0, 180.0, 2.0)):
            raise ValueError(f"{RAMA_PATH}: unexpected grid centres (expected -179 to 179 in steps of 2 degrees)")
        return {c: np.asarray(data[c], dtype=np.float64) for c in RAMA_CATEGORIES}


def ramachandran_value(category: str, phi, psi) -> np.ndarray:
    """Top8000 contour value (0..1, a fraction) at (phi, psi) in degrees for a category of ``RAMA_CATEGORIES``:
    bilinear interpolation between the 2-degree bin centres, periodic in both angles.  Arrays broadcast."""
    if category not in RAMA_CATEGORIES:
        raise ValueError(f"unknown Ramachandran category {category!r}; expected one of {', '.join(RAMA_CATEGORIES)}")
    grid = _rama_grids()[category]
    u = (np.asarray(phi, dtype=np.float64) + 179.0) / 2.0  # fractional bin index; centre k at -179 + 2k
    v = (np.asarray(psi, dtype=np.float64) + 179.0) / 2.0
    if not (np.all(np.isfinite(u)) and np.all(np.isfinite(v))):
        raise ValueError("phi and psi must be finite angles in degrees")
    i0, j0 = np.floor(u), np.floor(v)
    fu, fv = u - i0, v - j0
    i0, j0 = i0.astype(np.int64) % 180, j0.astype(np.int64) % 180
    i1, j1 = (i0 + 1) % 180, (j0 + 1) % 180
    return ((1 - fu) * (1 - fv) * grid[i0, j0] + fu * (1 - fv) * grid[i1, j0]
            + (1 - fu) * fv * grid[i0, j1] + fu * fv * grid[i1, j1])


def ramachandran_class(category: str, value: float) -> str:
    """"favoured", "allowed" or "outlier" for a contour ``value`` of ``category`` (MolProbity's cutoffs)."""
    if value >= RAMA_FAVOURED:
        return "favoured"
    return "allowed" if value >= RAMA_ALLOWED.get(category, RAMA_ALLOWED_DEFAULT) else "outlier"


def _rama_category(res_name: str, next_name: str, omega: float) -> str:
    if res_name == "GLY":
        return "glycine"
    if res_name == "PRO":
        return "cis_proline" if abs(omega) < 90.0 else "trans_proline"
    if next_name == "PRO":
        return "pre_proline"
    return "ile_val" if res_name in ("ILE", "VAL") else "general"


def _linked(x: np.ndarray, before: _Residue, after: _Residue) -> bool:
    """Whether ``before``'s C and ``after``'s N are within ``PEPTIDE_BREAK`` (same chain assumed)."""
    d = np.linalg.norm(x[before.atoms["C"]] - x[after.atoms["N"]])
    return bool(d <= PEPTIDE_BREAK)


def _rama_entries(residues: list[_Residue], x: np.ndarray) -> list[tuple[dict, tuple[int, ...]]]:
    """(entry, defining atom indices) per residue with phi and psi."""
    backbone = [r for r in residues if {"N", "CA", "C"} <= r.atoms.keys()]
    out = []
    for k in range(1, len(backbone) - 1):
        prev, res, nxt = backbone[k - 1], backbone[k], backbone[k + 1]
        if prev.chain != res.chain or nxt.chain != res.chain or not (_linked(x, prev, res) and _linked(x, res, nxt)):
            continue
        n, ca, c = res.atoms["N"], res.atoms["CA"], res.atoms["C"]
        phi = _finite_dihedral(x, (prev.atoms["C"], n, ca, c))
        psi = _finite_dihedral(x, (n, ca, c, nxt.atoms["N"]))
        omega = _finite_dihedral(x, (prev.atoms["CA"], prev.atoms["C"], n, ca))
        if not np.isfinite([phi, psi, omega]).all():
            continue
        category = _rama_category(res.res_name, nxt.res_name, omega)
        value = float(ramachandran_value(category, phi, psi))
        entry = {**res.label(), "phi": phi, "psi": psi, "category": category, "value": value,
                 "class": ramachandran_class(category, value)}
        out.append((entry, (prev.atoms["CA"], prev.atoms["C"], n, ca, c, nxt.atoms["N"])))
    return out


def ramachandran(layout, coords) -> list[dict]:
    """Per residue with phi and psi (rules in the module docstring), in layout order: ``{chain, res_seq, res_name,
    phi, psi (degrees), category, value (Top8000 contour value, 0..1), class}``."""
    x = _check_conformer(layout, coords)
    return [e for e, _ in _rama_entries(_residues(layout), x)]


def _rama_summary(entries: list[dict]) -> dict:
    n = len(entries)
    counts = {c: sum(e["class"] == c for e in entries) for c in ("favoured", "allowed", "outlier")}
    outliers = [{k: e[k] for k in ("chain", "res_seq", "res_name", "phi", "psi", "category", "value", "altloc")
                 if k in e} for e in entries if e["class"] == "outlier"]
    return {"n": n, "favoured": counts["favoured"], "allowed": counts["allowed"], "outliers": counts["outlier"],
            "favoured_pct": _pct(counts["favoured"], n), "outlier_pct": _pct(counts["outlier"], n),
            "outliers_list": outliers}


def _pct(k: int, n: int) -> float | None:
    return 100.0 * k / n if n else None


# --------------------------------------------------------------------------------------------------------------------
# Rotamers


@cache
def chi_windows() -> dict[str, tuple[float, ...]]:
    """Residue type -> rotamer window (degrees) of each chi: max(CHI_WINDOW_MIN, CHI_WINDOW_ESD * esd_max), esd_max
    from ``data/top8000_chi_esd.csv`` (Top8000 central values, Hintze et al. 2016)."""
    text = CHI_ESD_PATH.read_text()
    rows = csv.DictReader(line for line in text.splitlines() if line and not line.startswith("#"))
    esd: dict[str, dict[int, float]] = {}
    for row in rows:
        esd.setdefault(row["residue"], {})[int(row["chi"])] = float(row["esd_max"])
    out = {}
    for res, quads in CHI_ATOMS.items():
        if sorted(esd.get(res, {})) != list(range(1, len(quads) + 1)):
            raise ValueError(f"{CHI_ESD_PATH}: {res} needs an esd_max for chi 1 to {len(quads)}")
        out[res] = tuple(max(CHI_WINDOW_MIN, CHI_WINDOW_ESD * esd[res][k]) for k in range(1, len(quads) + 1))
    return out


def _angle_diff(a: float, b: float, period: float = 360.0) -> float:
    """|a - b| wrapped to [0, period / 2] (degrees)."""
    d = (a - b) % period
    return min(d, period - d)


def nearest_rotamer(res_name: str, chis) -> tuple[str, float, list[float]]:
    """The library rotamer of ``res_name`` nearest to ``chis`` (degrees, chi1 first): ``(name, distance,
    deviations)``, distance = max_k |chi_k - rotamer_k| / window_k (> 1: an outlier; windows of
    :func:`chi_windows`), deviations in degrees (wrapped; the last chi of PHE/TYR/ASP/GLU modulo 180)."""
    rotamers_of = library().get(res_name)
    if not rotamers_of or res_name not in CHI_ATOMS:
        raise ValueError(f"residue type {res_name!r} has no rotamers in the Lovell 2000 library")
    chis = [float(c) for c in chis]
    if len(chis) != len(CHI_ATOMS[res_name]):
        raise ValueError(f"{res_name} has {len(CHI_ATOMS[res_name])} chi angles, got {len(chis)}")
    window = chi_windows()[res_name]
    last = len(chis) - 1
    best = ("", np.inf, [])
    for name, _count, modal in rotamers_of:
        dev = [_angle_diff(c, m, 180.0 if (k == last and res_name in SYMMETRIC_LAST_CHI) else 360.0)
               for k, (c, m) in enumerate(zip(chis, modal))]
        dist = max(d / w for d, w in zip(dev, window))
        if dist < best[1]:
            best = (name, dist, dev)
    return best


def _rotamer_entries(residues: list[_Residue], x: np.ndarray) -> list[tuple[dict, tuple[int, ...]]]:
    """(entry, chi atom indices) per residue with library rotamers; incomplete ones have ``chis`` None."""
    lib = library()
    out = []
    for res in residues:
        if res.res_name not in CHI_ATOMS or res.res_name not in lib:
            continue
        quads = CHI_ATOMS[res.res_name]
        names = list(dict.fromkeys(a for q in quads for a in q))
        if not set(names) <= res.atoms.keys() or not np.all(np.isfinite(x[[res.atoms[a] for a in names]])):
            out.append(({**res.label(), "chis": None}, ()))
            continue
        chis = [_finite_dihedral(x, [res.atoms[a] for a in q]) for q in quads]
        name, dist, dev = nearest_rotamer(res.res_name, chis)
        entry = {**res.label(), "chis": chis, "nearest": name, "deviation": dev, "distance": dist,
                 "outlier": bool(dist > 1.0)}
        out.append((entry, tuple(res.atoms[a] for a in names)))
    return out


def rotamers(layout, coords) -> list[dict]:
    """Per residue with library rotamers (rule in the module docstring), in layout order: ``{chain, res_seq,
    res_name, chis (degrees), nearest (rotamer name), deviation (degrees per chi), distance, outlier}``; a residue
    missing a chi atom has ``chis`` None and nothing else."""
    x = _check_conformer(layout, coords)
    return [e for e, _ in _rotamer_entries(_residues(layout), x)]


def _rotamer_summary(entries: list[dict]) -> dict:
    complete = [e for e in entries if e["chis"] is not None]
    outliers = [e for e in complete if e["outlier"]]
    return {"n": len(complete), "outliers": len(outliers), "outlier_pct": _pct(len(outliers), len(complete)),
            "incomplete": len(entries) - len(complete),
            "outliers_list": [{k: e[k] for k in ("chain", "res_seq", "res_name", "chis", "nearest", "deviation",
                                                 "altloc") if k in e} for e in outliers],
            "incomplete_list": [{k: e[k] for k in ("chain", "res_seq", "res_name", "altloc") if k in e}
                                for e in entries if e["chis"] is None]}


# --------------------------------------------------------------------------------------------------------------------
# Clashes


def _vdw_radii(layout, atom: np.ndarray) -> np.ndarray:
    """[M] van der Waals radii (A) of layout atoms ``atom`` (``VDW_RADII``, carbonyl carbons ``CARBONYL_RADIUS``);
    NaN for elements without one."""
    element = np.char.upper(np.asarray(layout.element).astype(str))[atom]
    radius = np.array([VDW_RADII.get(e, np.nan) for e in element], dtype=np.float64)
    names = np.asarray(layout.atom_name).astype(str)[atom]
    res_names = np.asarray(layout.res_name).astype(str)[atom]
    side = np.array([CARBONYL_CARBONS.get(r) == n for r, n in zip(res_names, names)], dtype=bool)
    carbonyl = (element == "C") & ((names == "C") | side)
    radius[carbonyl] = CARBONYL_RADIUS
    return radius


def _disulfide_pairs(residues: list[_Residue], x: np.ndarray) -> list[tuple[int, int]]:
    """Atom pairs within three bonds through a disulfide: CA-CB-SG of two Cys whose SG are covalently bonded
    (``geometry.is_bonded``), pairs whose bond path through SG-SG has at most three bonds."""
    cys = [r for r in residues if r.res_name == "CYS" and {"CA", "CB", "SG"} <= r.atoms.keys()]
    sg = np.array([r.atoms["SG"] for r in cys], dtype=np.int64)
    if len(sg) < 2 or not np.all(np.isfinite(x[sg])):
        return []
    radius = covalent_radii(["S"])[0]
    out = []
    for a, b in cKDTree(x[sg]).query_pairs(2 * radius + BOND_TOLERANCE):
        if not is_bonded(np.linalg.norm(x[sg[a]] - x[sg[b]]), radius, radius):
            continue
        arm_a = [cys[a].atoms[n] for n in ("SG", "CB", "CA")]  # depth 0, 1, 2 from the S-S bond
        arm_b = [cys[b].atoms[n] for n in ("SG", "CB", "CA")]
        out += [(i, j) for da, i in enumerate(arm_a) for db, j in enumerate(arm_b) if da + db + 1 <= 3]
    return out


def _metal_bridged_pairs(layout, x: np.ndarray) -> list[tuple[int, int]]:
    """Pairs of atoms that both coordinate one metal ion (within ``METAL_CONTACT`` of it): 1-3 through the metal."""
    element = np.char.upper(np.asarray(layout.element).astype(str))
    metal = np.flatnonzero(~np.isin(element, NON_METALS) & np.all(np.isfinite(x), axis=1))
    ligand = np.flatnonzero(np.isin(element, CLASHING_ELEMENTS) & np.all(np.isfinite(x), axis=1))
    if not len(metal) or len(ligand) < 2:
        return []
    out = []
    for near in cKDTree(x[ligand]).query_ball_point(x[metal], METAL_CONTACT):
        members = sorted(ligand[near].tolist())
        out += [(i, j) for k, i in enumerate(members) for j in members[k + 1:]]
    return out


@dataclass(frozen=True)
class _Exemptions:
    """Atom pairs that are never clashes: those any of ``restraints`` exempts (within three bonds, S-S, inside a
    residue without a template) and ``bridged`` (sorted keys i * n + j, i < j: through disulfides and metals)."""

    restraints: tuple[Restraints, ...]
    bridged: np.ndarray

    def exempt(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        n = self.restraints[0].n_atoms
        out = np.isin(np.minimum(i, j).astype(np.int64) * n + np.maximum(i, j), self.bridged)
        for rest in self.restraints:
            out |= rest.is_excluded(i, j)
        return out


def _exemptions(layout, residues: list[_Residue], x: np.ndarray) -> _Exemptions:
    """The exemptions of conformer ``x`` [N, 3] of ``layout``."""
    n = len(layout)
    pairs = np.array(_disulfide_pairs(residues, x) + _metal_bridged_pairs(layout, x), np.int64).reshape(-1, 2)
    return _Exemptions((build_restraints(layout, x),), np.unique(pairs.min(axis=1) * n + pairs.max(axis=1)))


def _union(exemptions: list[_Exemptions]) -> _Exemptions:
    """Pairs exempt in any of ``exemptions`` (of one layout)."""
    return _Exemptions(tuple(r for e in exemptions for r in e.restraints),
                       np.unique(np.concatenate([e.bridged for e in exemptions])))


def _clash_pairs(layout, x: np.ndarray, atom: np.ndarray, altloc: np.ndarray,
                 exemptions: _Exemptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clashing record pairs (r, s), r < s, with distances and overlaps (A), worst first.

    Records are atom ``atom[r]`` of the layout at ``x[r]`` under altloc id ``altloc[r]`` ("" for none).  A pair is
    exempt when both records are one atom, when their altlocs cannot coexist (neither blank and not equal), or
    when ``exemptions`` exempt the atom pair."""
    radius = _vdw_radii(layout, atom)
    ok = exemptions.restraints[0].clashable[atom] & np.all(np.isfinite(x), axis=1)
    idx = np.flatnonzero(ok)
    empty = np.zeros((0, 2), np.int64), np.zeros(0), np.zeros(0)
    if len(idx) < 2:
        return empty
    cutoff = 2.0 * max(VDW_RADII.values()) - CLASH_OVERLAP
    pairs = cKDTree(x[idx]).query_pairs(cutoff, output_type="ndarray")
    if len(pairs) == 0:
        return empty
    r, s = idx[pairs[:, 0]], idx[pairs[:, 1]]
    r, s = np.minimum(r, s), np.maximum(r, s)
    d = np.linalg.norm(x[r] - x[s], axis=1)
    overlap = radius[r] + radius[s] - d
    keep = (overlap > CLASH_OVERLAP) & (atom[r] != atom[s])
    keep &= (altloc[r] == altloc[s]) | (altloc[r] == "") | (altloc[s] == "")
    keep[keep] &= ~exemptions.exempt(atom[r[keep]], atom[s[keep]])
    order = np.argsort(-overlap[keep], kind="stable")
    return np.stack([r[keep], s[keep]], axis=1)[order], d[keep][order], overlap[keep][order]


def _atom_label(layout, i: int, altloc: str) -> dict:
    return {"chain": str(layout.chain_id[i]), "res_seq": int(layout.res_seq[i]), "res_name": str(layout.res_name[i]),
            "atom": str(layout.atom_name[i]), "altloc": altloc}


def _clash_summary(layout, x: np.ndarray, atom: np.ndarray, altloc: np.ndarray, exemptions: _Exemptions,
                   n_worst: int) -> dict:
    pairs, d, overlap = _clash_pairs(layout, x, atom, altloc, exemptions)
    heavy = ~np.isin(np.char.upper(np.asarray(layout.element).astype(str))[atom], HYDROGENS)
    n_atoms = int(heavy.sum())
    worst = [{"atom1": _atom_label(layout, int(atom[r]), str(altloc[r])),
              "atom2": _atom_label(layout, int(atom[s]), str(altloc[s])),
              "distance": float(dd), "overlap": float(ov)}
             for (r, s), dd, ov in zip(pairs[:n_worst], d[:n_worst], overlap[:n_worst])]
    return {"clashscore": 1000.0 * len(pairs) / n_atoms if n_atoms else None, "n_clashes": int(len(pairs)),
            "n_atoms": n_atoms, "worst": worst,
            "note": "heavy atoms only, no hydrogens: not MolProbity's all-atom clashscore (usually lower)"}


def _conformer_clashes(layout, x: np.ndarray, exemptions: _Exemptions, n_worst: int) -> dict:
    atom, altloc = np.arange(len(layout)), np.full(len(layout), "", dtype=object)
    return _clash_summary(layout, x, atom, altloc, exemptions, n_worst)


def clashes(layout, coords, *, n_worst: int = N_WORST) -> dict:
    """Heavy-atom clashes of one conformer ``coords`` [N, 3] (rule in the module docstring): ``{clashscore (per
    1000 heavy atoms), n_clashes, n_atoms (heavy), worst: [{atom1, atom2, distance (A), overlap (A)}] worst first
    (at most ``n_worst``), note}``.  Covalent bonds of ligands and links are inferred from ``coords``."""
    x = _check_conformer(layout, coords)
    return _conformer_clashes(layout, x, _exemptions(layout, _residues(layout), x), n_worst)


# --------------------------------------------------------------------------------------------------------------------
# Reports


def validate(layout, coords, *, n_worst: int = N_WORST) -> dict:
    """Ramachandran, rotamer and clash figures of one conformer ``coords`` [N, 3] (A) laid out as ``layout``
    (``predictors.base.AtomLayout``), as a JSON-able dict ``{ramachandran, rotamers, clashes}``:

    - ramachandran: ``n, favoured, allowed, outliers, favoured_pct, outlier_pct`` (percent of n; None when n = 0),
      ``outliers_list [{chain, res_seq, res_name, phi, psi, category, value}]``;
    - rotamers: ``n`` (complete side chains), ``outliers, outlier_pct, incomplete``, ``outliers_list [{chain,
      res_seq, res_name, chis, nearest, deviation}]``, ``incomplete_list``;
    - clashes: as :func:`clashes`.
    """
    x = _check_conformer(layout, coords)
    residues = _residues(layout)
    return {"ramachandran": _rama_summary([e for e, _ in _rama_entries(residues, x)]),
            "rotamers": _rotamer_summary([e for e, _ in _rotamer_entries(residues, x)]),
            "clashes": _conformer_clashes(layout, x, _exemptions(layout, residues, x), n_worst)}


def altloc_conformers(model: MulticonfModel) -> dict[str, np.ndarray]:
    """Altloc id -> its conformer [N, 3]: every residue at that id, else (a residue without it) at its most occupied
    one, atoms not listed under an id at their blank (else most occupied) position.  ``{"": coords}`` for a model
    without altlocs."""
    layout = model.layout
    per_residue = [model.conformations(chain, res) for chain, res in layout.residues()]
    ids = sorted({a for ids_, *_ in per_residue for a in ids_ if a}) or [""]
    out = {}
    for alt in ids:
        x = np.empty((len(layout), 3))
        for ids_, xyz, q, idx in per_residue:
            x[idx] = xyz[ids_.index(alt)] if alt in ids_ else xyz[int(np.argmax(q))]
        out[alt] = x
    return out


def _merged(per_altloc: dict[str, list[tuple[dict, tuple[int, ...]]]], conformers: dict[str, np.ndarray]) -> list:
    """One entry per distinct (residue, coordinates of its defining atoms) over the altloc conformers, in residue
    order, with ``altloc``: "" when every conformer gives it, else the ids that do, joined by ","."""
    groups: dict[tuple, tuple[dict, list[str]]] = {}
    for alt, entries in per_altloc.items():
        x = conformers[alt]
        for entry, atoms in entries:
            key = (entry["chain"], entry["res_seq"], x[list(atoms)].tobytes())
            groups.setdefault(key, (entry, []))[1].append(alt)
    order = {k: i for i, k in enumerate(dict.fromkeys((e["chain"], e["res_seq"]) for e, _ in groups.values()))}
    ranked = sorted(groups.values(), key=lambda g: (order[(g[0]["chain"], g[0]["res_seq"])], g[1]))
    return [{**entry, "altloc": "" if len(alts) == len(per_altloc) else ",".join(alts)} for entry, alts in ranked]


def validate_multiconf(model: MulticonfModel, *, n_worst: int = N_WORST) -> dict:
    """Validation of a multiconformer model: ``{"model": whole-model figures, "altlocs": {id: figures of that id's
    conformer}}`` (rules in the module docstring; figures as in :func:`validate`).  ``altlocs`` is empty for a
    model without altloc ids.  Whole-model list entries carry ``altloc`` ("" = the same in every conformer)."""
    layout = model.layout
    conformers = altloc_conformers(model)
    residues = _residues(layout)
    exemptions = {alt: _exemptions(layout, residues, x) for alt, x in conformers.items()}
    rama = {alt: _rama_entries(residues, x) for alt, x in conformers.items()}
    rota = {alt: _rotamer_entries(residues, x) for alt, x in conformers.items()}
    union = _union(list(exemptions.values()))
    whole = {"ramachandran": _rama_summary(_merged(rama, conformers)),
             "rotamers": _rotamer_summary(_merged(rota, conformers)),
             "clashes": _clash_summary(layout, model.coords, model.atom, model.altloc, union, n_worst)}
    per_altloc = {} if list(conformers) == [""] else {
        alt: {"ramachandran": _rama_summary([e for e, _ in rama[alt]]),
              "rotamers": _rotamer_summary([e for e, _ in rota[alt]]),
              "clashes": _conformer_clashes(layout, x, exemptions[alt], n_worst)}
        for alt, x in conformers.items()}
    return {"model": whole, "altlocs": per_altloc}


def summary_line(report: dict) -> str:
    """One log line from a :func:`validate` report, or from the whole-model part of a :func:`validate_multiconf`
    one, e.g. "Ramachandran favoured 97.8 %, outliers 0.0 % (n=412); rotamer outliers 1.2 % (n=330); clashscore
    (heavy atoms) 3.4"."""
    if isinstance(report, dict) and "model" in report:
        report = report["model"]
    try:
        rama, rota, clash = report["ramachandran"], report["rotamers"], report["clashes"]
    except (KeyError, TypeError):
        raise ValueError("summary_line needs a report of validate() or validate_multiconf()") from None

    def pct(v):
        return "n/a" if v is None else f"{v:.1f} %"

    score = "n/a" if clash["clashscore"] is None else f"{clash['clashscore']:.1f}"
    return (f"Ramachandran favoured {pct(rama['favoured_pct'])}, outliers {pct(rama['outlier_pct'])} "
            f"(n={rama['n']}); rotamer outliers {pct(rota['outlier_pct'])} (n={rota['n']}); "
            f"clashscore (heavy atoms) {score}")
