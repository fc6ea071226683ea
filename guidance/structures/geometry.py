"""Ideal covalent geometry as restraints on any AtomLayout: bond-length and bond-angle Z-scores, a clash count, and
the pieces guidance.potentials.GeometryPotential builds on (a torch energy towards ideal geometry).

Ideal values are Engh & Huber (1991), Acta Cryst. A47:392-400, for the heavy atoms of the 20 standard amino acids,
shipped with their provenance in ``guidance/structures/data/engh_huber_1991.csv`` (bond lengths in A, angles in degrees, each a
mean and a standard deviation).  A restraint exists for every template term whose atoms are all in the layout:
bonds and angles inside a residue, across the peptide bond C(i-1)-N(i) of residues in the same chain with
consecutive numbers, and to a C-terminal OXT.  Atoms the layout lacks (no OXT, truncated side chains) just drop
their terms; residues without a template (ligands, modified residues) have none of their own, though a modified
amino acid (MSE, ...) still gets the peptide-bond terms to its neighbours.

The Z-score of a term is ``z = (value - ideal) / sd``; RMSZ = sqrt(mean z^2).  Two heavy atoms clash when they are
closer than a cutoff and are not within three covalent bonds of each other in the restraint graph (1-2, 1-3 and
1-4 pairs are exempt); pairs inside a residue without a template, S-S pairs (disulfides) and pairs involving an atom
other than C, N, O, S, Se or P (metal ions and their 1.9-2.4 A coordination bonds) are never counted.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from guidance.structures.io import as_ensemble
from predictors.base import AtomLayout

TABLE_PATH = Path(__file__).resolve().parent / "data" / "engh_huber_1991.csv"

# Residue names that take a standard template: protonation-state names of molecular-dynamics force fields.
RESIDUE_ALIASES = {"HID": "HIS", "HIE": "HIS", "HIP": "HIS", "HSD": "HIS", "HSE": "HIS", "HSP": "HIS",
                   "CYX": "CYS", "CYM": "CYS", "ASH": "ASP", "GLH": "GLU", "LYN": "LYS"}
LINK_RULES = ("LINK", "LINK_FROM_GLY", "LINK_TO_GLY", "LINK_TO_PRO")  # applied in this order, later ones override

CLASH_DISTANCE = 2.2  # A: the counted-clash cutoff of the metric (geometry_report, count_clashes)
REPULSION_DISTANCE = 2.5  # A: where GeometryPotential's flat-bottom wall starts, 0.3 A before a counted clash
REPULSION_SD = 0.1  # A: width of that wall (an overlap of REPULSION_SD costs as much as a 1-sd bond)
CLASHING_ELEMENTS = ("C", "N", "O", "S", "SE", "P")
HYDROGENS = ("H", "D")


# --------------------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class TemplateTerm:
    """One row of the ideal-geometry table: two atoms (a bond) or three (an angle, the middle one at the vertex).
    In link rules an atom name with a leading "-" belongs to the preceding residue."""

    atoms: tuple[str, ...]
    mean: float  # A or degrees
    sd: float
    source: str
    note: str = ""


@cache
def load_table(path: str | Path = TABLE_PATH) -> dict[str, tuple[TemplateTerm, ...]]:
    """The ideal-geometry table: group (residue name, link rule or CTERM) -> its terms, in file order."""
    groups: dict[str, list[TemplateTerm]] = {}
    with open(path, newline="") as fh:
        rows = csv.DictReader(line for line in fh if not line.startswith("#"))
        for row in rows:
            atoms = tuple(a for a in (row["atom1"], row["atom2"], row["atom3"]) if a)
            groups.setdefault(row["group"], []).append(
                TemplateTerm(atoms, float(row["mean"]), float(row["sd"]), row["source"], row["note"] or ""))
    return {g: tuple(terms) for g, terms in groups.items()}


def template_names() -> list[str]:
    """Residue names with a template (the 20 standard amino acids)."""
    return [g for g in load_table() if g not in LINK_RULES and g != "CTERM"]


def backbone_table() -> dict[str, dict[str, tuple[float, float]]]:
    """The backbone terms of the table as ``{"default" | "GLY" | "PRO": {term: (mean, sd)}}`` -- the shape of
    ``guidance.structures.metrics.ENGH_HUBER_1991``.  N-CA, CA-C, C-O, N-CA-C and CA-C-O are the residue's own; C-N is the
    peptide bond between two residues of the kind; CA-C-N has the residue's CA and C, C-N-CA its N and CA.  PRO has
    only N-CA, CA-C, N-CA-C and the C-N bond to its own N."""
    table = load_table()

    def own(res):
        return {"-".join(t.atoms): (t.mean, t.sd) for t in table[res]}

    def link(prev, cur):
        terms = _link_terms(prev, cur)
        return {"-".join(a.lstrip("-") for a in t.atoms): (t.mean, t.sd) for t in terms}

    out = {}
    for key, res in (("default", "ALA"), ("GLY", "GLY")):
        mine, pep = own(res), link(res, res)
        out[key] = {"N-CA": mine["N-CA"], "CA-C": mine["CA-C"], "C-N": pep["C-N"], "N-CA-C": mine["N-CA-C"],
                    "C-O": mine["C-O"], "CA-C-N": pep["CA-C-N"], "C-N-CA": pep["C-N-CA"], "CA-C-O": mine["CA-C-O"]}
    pro, to_pro = own("PRO"), link("ALA", "PRO")
    out["PRO"] = {"N-CA": pro["N-CA"], "CA-C": pro["CA-C"], "C-N": to_pro["C-N"], "N-CA-C": pro["N-CA-C"]}
    return out


def _link_terms(prev_res: str, cur_res: str) -> list[TemplateTerm]:
    """Peptide-link terms between residue types ``prev_res`` (i-1) and ``cur_res`` (i), overrides applied."""
    table = load_table()
    rules = ["LINK"]
    if prev_res == "GLY":
        rules.append("LINK_FROM_GLY")
    if cur_res == "GLY":
        rules.append("LINK_TO_GLY")
    if cur_res == "PRO":
        rules.append("LINK_TO_PRO")
    terms: dict[tuple[str, ...], TemplateTerm] = {}
    for rule in rules:
        for t in table[rule]:
            terms[t.atoms] = t
    return list(terms.values())


# --------------------------------------------------------------------------------------------------------------------
# Restraints of one layout


@dataclass(frozen=True)
class Restraints:
    """Bond and angle restraints of one layout, as index arrays into its atoms, with the ideal values.

    ``bond_kind`` / ``angle_kind`` name each term by its atom names joined with "-", "(-1)" marking an atom of the
    preceding residue ("C(-1)-N" is the peptide bond).  ``excluded`` holds the atom pairs within three bonds of each
    other in the bond graph (the restraint bonds plus ``extra_bonds``) and all pairs inside a residue without a
    template, as sorted keys ``i * n_atoms + j`` with i < j.  ``extra_bonds`` are covalent bonds of atoms outside the
    templates (ligands, modified residues, their links), inferred from reference coordinates when given.
    """

    n_atoms: int
    bonds: np.ndarray  # [Nb, 2] int64
    bond_ideal: np.ndarray  # [Nb] A
    bond_sd: np.ndarray  # [Nb] A
    bond_kind: np.ndarray  # [Nb] str
    angles: np.ndarray  # [Na, 3] int64, vertex in the middle
    angle_ideal: np.ndarray  # [Na] degrees
    angle_sd: np.ndarray  # [Na] degrees
    angle_kind: np.ndarray  # [Na] str
    residue: np.ndarray  # [N] int64: residue number of each atom in layout.residues() order
    clashable: np.ndarray  # [N] bool: heavy atom of an element that can clash (CLASHING_ELEMENTS)
    sulfur: np.ndarray  # [N] bool
    excluded: np.ndarray  # [M] int64 sorted pair keys
    extra_bonds: np.ndarray  # [K, 2] int64

    def is_excluded(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Whether atom pairs (i, j) are exempt from clashes: within three bonds, inside one residue without a
        template, or both sulfur."""
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        keys = lo.astype(np.int64) * self.n_atoms + hi
        pos = np.searchsorted(self.excluded, keys)
        pos = np.minimum(pos, max(len(self.excluded) - 1, 0))
        bonded = (self.excluded[pos] == keys) if len(self.excluded) else np.zeros(len(keys), dtype=bool)
        return bonded | (self.sulfur[i] & self.sulfur[j])


def residue_index(layout) -> np.ndarray:
    """[N] int64: for each atom, the position of its residue (chain, residue number) in ``layout.residues()``.

    ``AtomLayout.residue_index``; a duck-typed layout (``chain_id`` and ``res_seq`` arrays) without that method gets
    the same rule."""
    method = getattr(layout, "residue_index", None)
    return method() if callable(method) else AtomLayout.residue_index(layout)


def build_restraints(layout, reference=None) -> Restraints:
    """Bond and angle restraints of ``layout`` (AtomLayout-like) from the Engh & Huber templates.

    Peptide-link terms join consecutive residues of a chain that both have N, CA and C, so a modified residue
    (MSE, PCA, ...) is linked to its neighbours even though it has no template of its own.  ``reference``
    (coordinates [N, 3] or an ensemble [E, N, 3]) is used only to find covalent bonds of atoms outside the
    templates (see :func:`infer_covalent_bonds`), so that e.g. a heme's thioether bond to a cysteine is not a clash.
    """
    table = load_table()
    element = np.char.upper(np.asarray(layout.element).astype(str))
    names = np.asarray(layout.atom_name).astype(str)
    res_names = np.asarray(layout.res_name).astype(str)
    chain = np.asarray(layout.chain_id).astype(str)
    seq = np.asarray(layout.res_seq).astype(np.int64)
    heavy = ~np.isin(element, HYDROGENS)
    residue = residue_index(layout)
    n_res = int(residue.max()) + 1 if len(residue) else 0

    atoms_of: list[dict[str, int]] = [{} for _ in range(n_res)]
    kind_of = [""] * n_res
    key_of: list[tuple[str, int]] = [("", 0)] * n_res
    for i in np.flatnonzero(heavy):
        r = residue[i]
        atoms_of[r].setdefault(names[i], int(i))
    for i in range(len(residue)):
        r = residue[i]
        if not kind_of[r]:
            kind_of[r] = RESIDUE_ALIASES.get(res_names[i], res_names[i])
            key_of[r] = (chain[i], int(seq[i]))
    templated_res = np.array([k in table and k not in LINK_RULES and k != "CTERM" for k in kind_of], dtype=bool)
    by_key = {k: r for r, k in enumerate(key_of)}

    bonds, bond_vals, bond_kind, angles, angle_vals, angle_kind = [], [], [], [], [], []

    def add(term: TemplateTerm, here: dict[str, int], before: dict[str, int] | None) -> None:
        idx = []
        for a in term.atoms:
            pool = before if a.startswith("-") else here
            if pool is None or a.lstrip("-") not in pool:
                return
            idx.append(pool[a.lstrip("-")])
        kind = "-".join(a[1:] + "(-1)" if a.startswith("-") else a for a in term.atoms)
        if len(idx) == 2:
            bonds.append(idx)
            bond_vals.append((term.mean, term.sd))
            bond_kind.append(kind)
        else:
            angles.append(idx)
            angle_vals.append((term.mean, term.sd))
            angle_kind.append(kind)

    for r in range(n_res):
        if not templated_res[r]:
            continue
        here = atoms_of[r]
        for term in table[kind_of[r]]:
            add(term, here, None)
        if "OXT" in here:
            for term in table["CTERM"]:
                add(term, here, None)
    for r in range(n_res):
        prev = by_key.get((key_of[r][0], key_of[r][1] - 1))
        if prev is not None and _is_amino_acid(atoms_of[prev]) and _is_amino_acid(atoms_of[r]):
            for term in _link_terms(kind_of[prev], kind_of[r]):
                add(term, atoms_of[r], atoms_of[prev])

    n = len(layout)
    bonds_arr = np.array(bonds, dtype=np.int64).reshape(-1, 2)
    bond_vals_arr = np.array(bond_vals, dtype=np.float64).reshape(-1, 2)
    angles_arr = np.array(angles, dtype=np.int64).reshape(-1, 3)
    angle_vals_arr = np.array(angle_vals, dtype=np.float64).reshape(-1, 2)

    covered = np.zeros(n, dtype=bool)
    covered[bonds_arr.ravel()] = True
    extra = (infer_covalent_bonds(layout, reference, ~covered) if reference is not None
             else np.zeros((0, 2), dtype=np.int64))
    graph = np.concatenate([bonds_arr, extra])

    # Pairs within three bonds: the bond graph's adjacency A, then A + A^2 + A^3.
    adj = sp.coo_matrix((np.ones(2 * len(graph)), (np.r_[graph[:, 0], graph[:, 1]], np.r_[graph[:, 1], graph[:, 0]])),
                        shape=(n, n)).tocsr()
    adj.data[:] = 1.0
    a2 = adj @ adj
    reach = (adj + a2 + a2 @ adj).tocoo()
    keep = reach.row < reach.col
    keys = [reach.row[keep].astype(np.int64) * n + reach.col[keep]]
    # Residues without a template: their internal chemistry is unknown, so no pair inside one is a clash.
    for r in np.flatnonzero(~templated_res):
        members = np.flatnonzero((residue == r) & heavy)
        if len(members) > 1:
            ii, jj = np.triu_indices(len(members), k=1)
            keys.append(members[ii].astype(np.int64) * n + members[jj])
    excluded = np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)

    return Restraints(
        n_atoms=n,
        bonds=bonds_arr, bond_ideal=bond_vals_arr[:, 0], bond_sd=bond_vals_arr[:, 1],
        bond_kind=np.array(bond_kind, dtype=str).reshape(-1),
        angles=angles_arr, angle_ideal=angle_vals_arr[:, 0], angle_sd=angle_vals_arr[:, 1],
        angle_kind=np.array(angle_kind, dtype=str).reshape(-1),
        residue=residue,
        clashable=heavy & np.isin(element, CLASHING_ELEMENTS),
        sulfur=element == "S",
        excluded=excluded,
        extra_bonds=extra,
    )


def _is_amino_acid(atoms: dict[str, int]) -> bool:
    return "N" in atoms and "CA" in atoms and "C" in atoms


# Covalent radii (A), Cordero et al. (2008) Dalton Trans. 2832-2838; sp3 carbon.  Two atoms are taken as bonded
# when closer than the sum of their radii plus BOND_TOLERANCE (``is_bonded``: the project's one covalent-bond rule,
# also used by guidance/structures/multiconf.py).  Elements without a radius (metal ions, ...) never bond.
COVALENT_RADII = {"H": 0.31, "D": 0.31, "B": 0.84, "C": 0.76, "N": 0.71, "O": 0.66, "F": 0.57, "P": 1.07, "S": 1.05,
                  "CL": 1.02, "SE": 1.20, "BR": 1.20, "I": 1.39}
BOND_TOLERANCE = 0.4  # A


def covalent_radii(elements) -> np.ndarray:
    """[N] covalent radii (A) of ``elements`` (any case) from ``COVALENT_RADII``; NaN for elements without one."""
    element = np.char.upper(np.asarray(elements).astype(str))
    return np.array([COVALENT_RADII.get(e, np.nan) for e in element], dtype=np.float64).reshape(element.shape)


def is_bonded(distance, radius_i, radius_j):
    """The covalent-bond rule: ``distance < radius_i + radius_j + BOND_TOLERANCE`` (A; arrays broadcast; False where
    a radius is NaN)."""
    return distance < radius_i + radius_j + BOND_TOLERANCE


def bonded_matrix(coords, radii, a, b) -> np.ndarray:
    """[len(a), len(b)] bool: atoms ``a`` and ``b`` (index arrays) bonded by :func:`is_bonded` in ``coords`` [N, 3],
    with per-atom ``radii`` [N] (e.g. from :func:`covalent_radii`)."""
    d = np.linalg.norm(coords[a][:, None, :] - coords[b][None, :, :], axis=-1)
    return is_bonded(d, radii[a][:, None], radii[b][None, :])


def infer_covalent_bonds(layout, reference, atoms=None) -> np.ndarray:
    """[K, 2] covalent bonds (i < j) with at least one atom in ``atoms`` (bool mask; default all), from distances in
    ``reference`` ([N, 3], or [E, N, 3] where a bond must hold in every member): d < r_i + r_j + 0.4 A with the
    covalent radii of ``COVALENT_RADII``.  Hydrogens, metal ions and elements without a radius never bond here."""
    ref = as_ensemble(reference, len(layout), "reference", match="the layout")
    element = np.char.upper(np.asarray(layout.element).astype(str))
    radius = covalent_radii(element)
    atoms = np.ones(len(layout), dtype=bool) if atoms is None else np.asarray(atoms, dtype=bool)
    usable = np.isfinite(radius) & ~np.isin(element, HYDROGENS) & np.all(np.isfinite(ref), axis=(0, 2))
    idx = np.flatnonzero(usable)
    if len(idx) < 2 or not atoms[idx].any():
        return np.zeros((0, 2), dtype=np.int64)
    cutoff = 2.0 * np.nanmax(radius[idx]) + BOND_TOLERANCE
    pairs = cKDTree(ref[0, idx]).query_pairs(cutoff, output_type="ndarray")
    i, j = idx[pairs[:, 0]], idx[pairs[:, 1]]
    keep = atoms[i] | atoms[j]
    i, j = i[keep], j[keep]
    d = np.linalg.norm(ref[:, i] - ref[:, j], axis=-1)  # [E, K]
    bonded = np.all(is_bonded(d, radius[i], radius[j]), axis=0)
    return np.stack([np.minimum(i, j)[bonded], np.maximum(i, j)[bonded]], axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------------
# Z-scores and clashes (numpy)


def bond_lengths(coords: np.ndarray, bonds: np.ndarray) -> np.ndarray:
    """[..., Nb] distances (A) of atom pairs ``bonds`` [Nb, 2] in ``coords`` [..., N, 3]."""
    return np.linalg.norm(coords[..., bonds[:, 1], :] - coords[..., bonds[:, 0], :], axis=-1)


def bond_angles(coords: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """[..., Na] angles (degrees) at the middle atom of triples ``angles`` [Na, 3] in ``coords`` [..., N, 3]."""
    u = coords[..., angles[:, 0], :] - coords[..., angles[:, 1], :]
    v = coords[..., angles[:, 2], :] - coords[..., angles[:, 1], :]
    return np.degrees(np.arctan2(np.linalg.norm(np.cross(u, v), axis=-1), np.sum(u * v, axis=-1)))


def z_scores(restraints: Restraints, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bond and angle Z-scores ``(value - ideal) / sd``: ([E, Nb], [E, Na]) for coords [E, N, 3]."""
    zb = (bond_lengths(coords, restraints.bonds) - restraints.bond_ideal) / restraints.bond_sd
    za = (bond_angles(coords, restraints.angles) - restraints.angle_ideal) / restraints.angle_sd
    return zb, za


def rmsz(z: np.ndarray) -> float | None:
    """Root-mean-square of the finite Z-scores; None when there are none."""
    z = np.asarray(z, dtype=np.float64).ravel()
    z = z[np.isfinite(z)]
    return float(np.sqrt(np.mean(z**2))) if z.size else None


OUTLIER_Z = 4.0  # |z| above which a bond or angle is an outlier (MolProbity's convention)


def geometry_rmsz(layout, coords, restraints: Restraints | None = None) -> dict:
    """Bond-length and bond-angle RMSZ of an ensemble ``coords [E, N, 3]`` against Engh & Huber (1991).

    ``bond_rmsz`` / ``angle_rmsz`` pool every restraint of every member; ``per_member`` has them per member.
    ``n_bonds`` / ``n_angles`` count the restraints of one member; ``bond_outliers`` / ``angle_outliers`` are the
    member-averaged numbers of terms with |z| > 4.  Terms with a non-finite coordinate are left out.  Values that
    cannot be computed (no restraint) are None.
    """
    coords = as_ensemble(coords, len(layout), match="the layout")
    restraints = restraints or build_restraints(layout)
    zb, za = z_scores(restraints, coords)
    with np.errstate(invalid="ignore"):
        out_b, out_a = np.abs(zb) > OUTLIER_Z, np.abs(za) > OUTLIER_Z
    return {
        "bond_rmsz": rmsz(zb),
        "angle_rmsz": rmsz(za),
        "n_bonds": len(restraints.bonds),
        "n_angles": len(restraints.angles),
        "bond_outliers": float(out_b.sum(axis=1).mean()),
        "angle_outliers": float(out_a.sum(axis=1).mean()),
        "per_member": {
            "bond_rmsz": [rmsz(z) for z in zb],
            "angle_rmsz": [rmsz(z) for z in za],
            "bond_outliers": out_b.sum(axis=1).astype(int).tolist(),
            "angle_outliers": out_a.sum(axis=1).astype(int).tolist(),
        },
    }


def clash_pairs(restraints: Restraints, xyz: np.ndarray, distance: float = CLASH_DISTANCE) -> np.ndarray:
    """[K, 2] atom pairs (i < j) of one structure ``xyz [N, 3]`` closer than ``distance`` A that count as clashes."""
    ok = restraints.clashable & np.all(np.isfinite(xyz), axis=1)
    idx = np.flatnonzero(ok)
    if len(idx) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = cKDTree(xyz[idx]).query_pairs(distance, output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    i, j = idx[pairs[:, 0]], idx[pairs[:, 1]]
    keep = ~restraints.is_excluded(i, j)
    return np.stack([np.minimum(i, j)[keep], np.maximum(i, j)[keep]], axis=1)


def count_clashes(layout, coords, distance: float = CLASH_DISTANCE, restraints: Restraints | None = None) -> dict:
    """Clashing heavy-atom pairs of each member of ``coords [E, N, 3]`` (rule in the module docstring).

    Returns ``clashes`` (count per member), ``clashes_per_1000_atoms`` (member mean, per 1000 heavy atoms of the
    layout), ``per_member_per_1000_atoms`` and ``n_heavy_atoms``.
    """
    coords = as_ensemble(coords, len(layout), match="the layout")
    restraints = restraints or build_restraints(layout)
    element = np.char.upper(np.asarray(layout.element).astype(str))
    n_heavy = int((~np.isin(element, HYDROGENS)).sum())
    counts = np.array([len(clash_pairs(restraints, x, distance)) for x in coords], dtype=np.int64)
    rate = counts * 1000.0 / max(n_heavy, 1)
    return {"clashes": counts.tolist(), "clashes_per_1000_atoms": float(rate.mean()),
            "per_member_per_1000_atoms": rate.tolist(), "n_heavy_atoms": n_heavy}
