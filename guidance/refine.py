"""Restrained refinement of a multiconformer model against the data: coordinates, B-factors and occupancies.

After sampling, the ensemble becomes one multiconformer (altloc) model (``structures.multiconf``); this module
refines that model the way a crystallographic refinement program does, against the data likelihood of the atoms as
the data see them (every altloc record is one atom with its own position, occupancy and B), in macro-cycles:

    1. refit the data's nuisance parameters (bulk-solvent mask, scales, sigma_A) to the current model (again before
       each of the stages below);
    2. occupancies: minimise   -log L(q),  q per altloc group on the simplex
    3. B-factors:   minimise   -log L(B) + E_B(B)
    4. coordinates: minimise   -w * log L(x) + E_geom(x)

with L-BFGS (optax), every term in nats.  Occupancies and B come before coordinates: a minor altloc that starts at a
low occupancy has a weak data gradient on its atoms, so refining its coordinates first would leave them where the
sampler put them and its occupancy would then stay low (measured on a two-state peptide: occupancy 0.2 -> 0.25 with
coordinates first, -> 0.49 of the true 0.5 with occupancies first).

A stage's result is kept only if it raises the free set's log-likelihood (the PDB-REDO practice of judging
refinement choices by the free set: Joosten et al. 2012, Acta Cryst. D68:484), and, for coordinates, if bond and
angle RMSZ stay <= ``target_rmsz`` (a model outside the target takes any coordinate step that brings it closer);
a cycle that keeps nothing ends the refinement.

E_geom = 1/2 sum z^2 over (Z-score = (value - ideal) / sd):
    - bonds and angles: Engh & Huber (1991), Acta Cryst. A47:392 (``structures.geometry``);
    - planes: peptide groups (CA, C, O of residue i-1 with N, CA of residue i) and the planar side-chain groups of
      PHE, TYR, TRP, HIS, ARG, ASN, GLN, ASP, GLU (the planes of the CCP4 monomer library; Vagin et al. 2004, Acta
      Cryst. D60:2184), z = the atom's distance from the group's least-squares plane / 0.02 A (the library's sd;
      0.05 A for peptide groups, whose omega spreads by about 6 deg: MacArthur & Thornton 1996, J. Mol. Biol.
      264:1180);
    - chirality: the chiral volume V = (a - c) . ((b - c) x (d - c)) (A^3) at CA (N, C, CB), THR CB (CA, OG1,
      CG2) and ILE CB (CA, CG1, CG2), ideal |V| from the ideal bond lengths l and angles t of the centre:
      |V| = l1 l2 l3 sqrt(1 - cos^2 t12 - cos^2 t13 - cos^2 t23 + 2 cos t12 cos t13 cos t23) (the volume of the
      parallelepiped of the three bond vectors), with the start model's hand, sd 0.2 A^3 (the monomer library's);
    - non-bonded repulsion: heavy-atom pairs more than three bonds apart that can coexist (same altloc, or either
      blank) and are closer than d0 = r_i + r_j - 0.6 A (Bondi's van der Waals radii; 2.5 A when both are N or O:
      hydrogen bonds), z = (d0 - d) / 0.2 A.  Pairs are found at the start of every macro-cycle within 3.6 A;
      symmetry mates are not included.
E_B = 1/2 sum over restrained bonds ((B_i - B_j) / b_sd)^2, b_sd = 3 A^2 by default; B = 1 + softplus(u) > 1 A^2.

Occupancies: the records of one altloc group (a residue, or the unit ``ensemble_to_multiconf`` clustered with the
neighbour atoms it linked) share one occupancy per altloc id, q = total * softmax(logits), total = the group's
occupancy at the start (1 for a model from an ensemble).  Records without altloc keep their occupancy.

The data weight w is chosen automatically (``data_weight=None``) in the first macro-cycle:
w0 = |grad E_geom(x0 + 0.1 A noise)| / |grad log L(x0)| (the gradient balance of Brunger et al. 1989, Acta Cryst.
A45:50, where phenix.refine starts), then the coordinate step is run at w0 x 2^k for each k of ``weight_scan`` and,
among the runs whose bond and angle RMSZ stay <= ``target_rmsz``, the one with the lowest R-free is kept, with its
weight for every later cycle (phenix.refine's ``optimize_xyz_weight`` rule; Afonine et al. 2011, Acta Cryst. D67:
1063).  The free set enters only this choice of one number; it is never in the likelihood.  Data without an R-free
take the largest weight that meets the target.

The data side is any object with ``fit(x, q, b) -> state``, ``log_likelihood(state, x, q, b)`` (jittable) and
``report(x, q, b) -> dict`` (e.g. ``observables.xray.XrayAtoms``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.spatial import cKDTree

from guidance.structures.geometry import HYDROGENS, build_restraints
from guidance.structures.multiconf import MulticonfModel

__all__ = ["DataSum", "Refine", "RefineResult", "RecordGeometry", "geometry_summary", "record_geometry", "refine"]

log = logging.getLogger(__name__)

PLANE_SD = 0.02  # A
CHIRAL_SD = 0.2  # A^3
PEPTIDE_PLANE_SD = 0.05  # A: omega spreads by about 6 deg in well-refined structures (MacArthur & Thornton 1996)
# van der Waals radii (A), Bondi (1964) J. Phys. Chem. 68:441; the repulsion wall starts NONBONDED_OVERLAP below
# their sum, so only real clashes are pushed apart (1-5 contacts such as O(i-1)...C(i) at 2.7 A are normal)
VDW_RADII = {"C": 1.70, "N": 1.55, "O": 1.52, "S": 1.80, "SE": 1.90, "P": 1.80}
NONBONDED_OVERLAP = 0.6  # A
NONBONDED_D0_POLAR = 2.5  # A, N/O pairs (hydrogen bonds come to 2.6 A)
NONBONDED_SD = 0.2  # A
NONBONDED_SEARCH = 3.6  # A
POLAR = ("N", "O")

PLANES = {
    "PHE": ("CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ"),
    "TYR": ("CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "OH"),
    "TRP": ("CB", "CG", "CD1", "CD2", "NE1", "CE2", "CE3", "CZ2", "CZ3", "CH2"),
    "HIS": ("CB", "CG", "ND1", "CD2", "CE1", "NE2"),
    "ARG": ("CD", "NE", "CZ", "NH1", "NH2"),
    "ASN": ("CB", "CG", "OD1", "ND2"),
    "GLN": ("CG", "CD", "OE1", "NE2"),
    "ASP": ("CB", "CG", "OD1", "OD2"),
    "GLU": ("CG", "CD", "OE1", "OE2"),
}
PEPTIDE_PLANE = (("CA", -1), ("C", -1), ("O", -1), ("N", 0), ("CA", 0))
CHIRALS = {"*": ("CA", "N", "C", "CB"), "THR": ("CB", "CA", "OG1", "CG2"), "ILE": ("CB", "CA", "CG1", "CG2")}


@dataclass(frozen=True)
class Refine:
    """Options of :func:`refine` (module docstring).  ``cycles`` macro-cycles of ``xyz_steps`` / ``b_steps`` /
    ``occupancy_steps`` L-BFGS iterations (0 turns a stage off); ``data_weight`` fixes w (None: automatic, to
    ``target_rmsz``); ``b_sd`` (A^2) the bonded-B restraint; ``weight_scan`` the k the weight scan tries (w0 x 2^k)."""

    cycles: int = 3
    xyz_steps: int = 30
    b_steps: int = 20
    occupancy_steps: int = 15
    data_weight: float | None = None
    target_rmsz: float = 1.0
    b_sd: float = 3.0
    weight_scan: tuple[int, ...] = (-4, -3, -2, -1, 0)
    seed: int = 0

    def __post_init__(self):
        if self.cycles < 0 or min(self.xyz_steps, self.b_steps, self.occupancy_steps) < 0:
            raise ValueError("refine: cycles and steps must be >= 0")
        if not self.target_rmsz > 0 or not self.b_sd > 0:
            raise ValueError("refine: target_rmsz and b_sd must be > 0")
        if self.data_weight is not None and not self.data_weight > 0:
            raise ValueError(f"refine: data_weight must be > 0 or null (automatic), got {self.data_weight}")


# ----------------------------------------------------------------------------------------------------------------
# restraints on records


@dataclass(frozen=True)
class RecordGeometry:
    """The restraints of a multiconformer model as index arrays into its records (one restraint per altloc id its
    atoms carry, each atom taking that id's record, else its blank one, else its most occupied one)."""

    bonds: np.ndarray  # [Nb, 2]
    bond_ideal: np.ndarray
    bond_sd: np.ndarray
    angles: np.ndarray  # [Na, 3]
    angle_ideal: np.ndarray  # degrees
    angle_sd: np.ndarray
    planes: np.ndarray  # [Np, P] record indices, padded with -1
    plane_sd: np.ndarray  # [Np] A
    chirals: np.ndarray  # [Nc, 4] centre, a, b, c
    chiral_ideal: np.ndarray  # signed A^3
    clashable: np.ndarray  # [M] bool
    polar: np.ndarray  # [M] bool
    vdw: np.ndarray  # [M] A
    atom_pair_excluded: Callable  # (layout atoms i, j) -> bool: within three bonds
    record_atom: np.ndarray  # [M]
    record_altloc: np.ndarray  # [M] str
    b_pairs: np.ndarray  # [K, 2] record pairs of the bonded-B restraint


def _expand(model: MulticonfModel, tuples) -> tuple[np.ndarray, np.ndarray]:
    """Record tuples [T, k] for layout-atom tuples [n, k] -> (records, index of the layout tuple of each)."""
    letters_of = [sorted({a for a in model.altloc[list(model.records(i))] if a}) for i in range(len(model.layout))]
    out = {}
    tuples = np.asarray(tuples, np.int64)
    for t, atoms in enumerate(tuples.tolist()):
        letters = sorted({lt for a in atoms for lt in letters_of[a]}) or [""]
        for lt in letters:
            recs = tuple(model.record_for(a, lt) for a in atoms)
            if recs not in out:
                out[recs] = t
    recs = np.array(list(out), np.int64).reshape(-1, np.shape(tuples)[1])
    src = np.array(list(out.values()), np.int64)
    return recs, src


def _ideal_chiral_volume(bond_ideal: dict, angle_ideal: dict, centre: int, others: tuple[int, int, int]) -> float | None:
    lengths = [bond_ideal.get(frozenset((centre, o))) for o in others]
    pairs = [(others[0], others[1]), (others[0], others[2]), (others[1], others[2])]
    angles = [angle_ideal.get((min(a, b), centre, max(a, b))) for a, b in pairs]
    if any(v is None for v in lengths + angles):
        return None
    c12, c13, c23 = (np.cos(np.radians(t)) for t in angles)
    inner = 1.0 - c12**2 - c13**2 - c23**2 + 2.0 * c12 * c13 * c23
    return float(np.prod(lengths) * np.sqrt(max(inner, 0.0)))


def record_geometry(model: MulticonfModel) -> RecordGeometry:
    """The restraints of ``model`` (bonds, angles, planes, chiral volumes; module docstring) on its records."""
    layout = model.layout
    first = np.array([model.records(i)[0] for i in range(len(layout))])
    restraints = build_restraints(layout, reference=model.coords[first])
    bonds, b_src = _expand(model, restraints.bonds)
    angles, a_src = _expand(model, restraints.angles)
    extra, _ = _expand(model, restraints.extra_bonds)

    names = np.asarray(layout.atom_name).astype(str)
    res_names = np.asarray(layout.res_name).astype(str)
    by_residue = layout.residue_atoms()
    keys = list(by_residue)
    atoms_of = {k: {names[i]: int(i) for i in idx} for k, idx in by_residue.items()}
    planes, plane_sds, chirals = [], [], []
    for j, key in enumerate(keys):
        here, name = atoms_of[key], res_names[by_residue[key][0]]
        group = PLANES.get(name)
        if group and all(a in here for a in group):
            planes.append([here[a] for a in group])
            plane_sds.append(PLANE_SD)
        prev = atoms_of.get((key[0], key[1] - 1))
        if prev is not None:
            pool = {0: here, -1: prev}
            if all(a in pool[o] for a, o in PEPTIDE_PLANE):
                planes.append([pool[o][a] for a, o in PEPTIDE_PLANE])
                plane_sds.append(PEPTIDE_PLANE_SD)
        for res, centre in CHIRALS.items():
            if (res == "*" or res == name) and all(a in here for a in centre):
                chirals.append([here[a] for a in centre])

    bond_ideal = {frozenset(map(int, p)): v for p, v in zip(restraints.bonds, restraints.bond_ideal)}
    angle_ideal = {(min(int(t[0]), int(t[2])), int(t[1]), max(int(t[0]), int(t[2]))): v
                   for t, v in zip(restraints.angles, restraints.angle_ideal)}
    keep_chiral, volumes = [], []
    for c in chirals:
        v = _ideal_chiral_volume(bond_ideal, angle_ideal, c[0], tuple(c[1:]))
        if v is not None:
            keep_chiral.append(c)
            volumes.append(v)
    chiral_recs, c_src = _expand(model, np.array(keep_chiral, np.int64).reshape(-1, 4))
    x = model.coords
    if len(chiral_recs):
        signed = _chiral_volumes(x, chiral_recs)
        chiral_ideal = np.sign(np.where(signed == 0, 1.0, signed)) * np.array(volumes)[c_src]
    else:
        chiral_ideal = np.zeros(0)
    width = max((len(p) for p in planes), default=1)
    padded = np.array([p + [p[0]] * (width - len(p)) for p in planes], np.int64).reshape(-1, width)
    plane_recs, p_src = _expand(model, padded)
    # padding repeated the first atom; a repeated record would tilt the plane fit, so each row keeps its distinct
    # records and is padded with -1 (masked in the energy)
    plane_out = np.full(plane_recs.shape, -1, np.int64)
    for i, r in enumerate(plane_recs):
        seen = list(dict.fromkeys(r.tolist()))
        plane_out[i, :len(seen)] = seen

    element = np.char.upper(np.asarray(layout.element).astype(str))[model.atom]
    b_pairs = np.unique(np.sort(np.concatenate([bonds, extra]).reshape(-1, 2), axis=1), axis=0)
    return RecordGeometry(
        bonds=bonds, bond_ideal=restraints.bond_ideal[b_src], bond_sd=restraints.bond_sd[b_src],
        angles=angles, angle_ideal=restraints.angle_ideal[a_src], angle_sd=restraints.angle_sd[a_src],
        planes=plane_out, plane_sd=np.array(plane_sds, np.float64)[p_src], chirals=chiral_recs, chiral_ideal=chiral_ideal,
        clashable=restraints.clashable[model.atom] & ~np.isin(element, HYDROGENS),
        polar=np.isin(element, POLAR), vdw=np.array([VDW_RADII.get(e, 1.7) for e in element]),
        atom_pair_excluded=restraints.is_excluded, record_atom=model.atom, record_altloc=model.altloc,
        b_pairs=b_pairs,
    )


def _chiral_volumes(x: np.ndarray, chirals: np.ndarray) -> np.ndarray:
    c, a, b, d = (x[chirals[:, k]] for k in range(4))
    return np.einsum("ij,ij->i", a - c, np.cross(b - c, d - c))


def nonbonded_pairs(geo: RecordGeometry, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Record pairs [K, 2] that the repulsion term watches at coordinates ``x [M, 3]``, and their d0 [K] (A)."""
    idx = np.flatnonzero(geo.clashable)
    if len(idx) < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0)
    pairs = cKDTree(x[idx]).query_pairs(NONBONDED_SEARCH, output_type="ndarray")
    i, j = idx[pairs[:, 0]], idx[pairs[:, 1]]
    ai, aj = geo.record_atom[i], geo.record_atom[j]
    li, lj = geo.record_altloc[i], geo.record_altloc[j]
    keep = (ai != aj) & ((li == "") | (lj == "") | (li == lj))
    keep[keep] = ~geo.atom_pair_excluded(ai[keep], aj[keep])
    i, j = i[keep], j[keep]
    d0 = np.where(geo.polar[i] & geo.polar[j], NONBONDED_D0_POLAR, geo.vdw[i] + geo.vdw[j] - NONBONDED_OVERLAP)
    return np.stack([i, j], axis=1), d0


# ----------------------------------------------------------------------------------------------------------------
# energies (JAX)


def _pad(a: np.ndarray, size: int, fill) -> np.ndarray:
    out = np.full((size, *a.shape[1:]), fill, a.dtype)
    out[:len(a)] = a
    return out


def _capacity(n: int) -> int:
    return max(256, int(2 ** np.ceil(np.log2(max(n, 1)))))


def _geometry_arrays(geo: RecordGeometry) -> dict:
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
    planes = geo.planes
    return {
        "bonds": jnp.asarray(geo.bonds.reshape(-1, 2)), "bond_ideal": f32(geo.bond_ideal), "bond_sd": f32(geo.bond_sd),
        "angles": jnp.asarray(geo.angles.reshape(-1, 3)), "angle_ideal": f32(np.radians(geo.angle_ideal)),
        "angle_sd": f32(np.radians(geo.angle_sd)),
        "planes": jnp.asarray(np.maximum(planes, 0)), "plane_mask": f32(planes >= 0),
        "plane_sd": f32(geo.plane_sd.reshape(-1, 1)),
        "chirals": jnp.asarray(geo.chirals.reshape(-1, 4)), "chiral_ideal": f32(geo.chiral_ideal),
    }


def _z_terms(x, g, nb, nb_d0, nb_mask) -> dict:
    """Z-scores of every geometry term at coordinates x [M, 3] (JAX)."""
    d = jnp.linalg.norm(x[g["bonds"][:, 1]] - x[g["bonds"][:, 0]], axis=-1)
    u = x[g["angles"][:, 0]] - x[g["angles"][:, 1]]
    v = x[g["angles"][:, 2]] - x[g["angles"][:, 1]]
    theta = jnp.arctan2(jnp.linalg.norm(jnp.cross(u, v), axis=-1), jnp.sum(u * v, axis=-1))
    p = x[g["planes"]]  # [Np, P, 3]
    m = g["plane_mask"][..., None]
    centre = jnp.sum(p * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)
    dev = (p - centre[:, None]) * m
    cov = jnp.einsum("npi,npj->nij", dev, dev)
    normal = jnp.linalg.eigh(cov)[1][..., 0]  # smallest eigenvalue's vector: the plane's normal
    dist = jnp.einsum("npi,ni->np", dev, jax.lax.stop_gradient(normal))
    c, a, b, e = (x[g["chirals"][:, k]] for k in range(4))
    vol = jnp.sum((a - c) * jnp.cross(b - c, e - c), axis=-1)
    dn = jnp.linalg.norm(x[nb[:, 0]] - x[nb[:, 1]] + 1e-9, axis=-1)
    return {
        "bond": (d - g["bond_ideal"]) / g["bond_sd"],
        "angle": (theta - g["angle_ideal"]) / g["angle_sd"],
        "plane": dist / g["plane_sd"] * g["plane_mask"],
        "chiral": (vol - g["chiral_ideal"]) / CHIRAL_SD,
        "nonbonded": jnp.maximum(nb_d0 - dn, 0.0) / NONBONDED_SD * nb_mask,
    }


def _geometry_energy(x, g, nb, nb_d0, nb_mask):
    return sum(0.5 * jnp.sum(jnp.square(z)) for z in _z_terms(x, g, nb, nb_d0, nb_mask).values())


def geometry_summary(geo: RecordGeometry, x: np.ndarray) -> dict:
    """Bond / angle RMSZ, plane and chirality RMSZ, and the number of non-bonded overlaps (d < d0 - 0.4 A) of
    records ``x [M, 3]``."""
    g = _geometry_arrays(geo)
    nb, d0 = nonbonded_pairs(geo, x)
    z = {k: np.asarray(v, np.float64) for k, v in _z_terms(jnp.asarray(x, jnp.float32), g, jnp.asarray(nb.reshape(-1, 2)),
                                                          jnp.asarray(d0, jnp.float32), jnp.ones(len(nb))).items()}
    rms = lambda a: float(np.sqrt(np.mean(a**2))) if a.size else None  # noqa: E731
    planes = z["plane"][geo.planes >= 0] if len(geo.planes) else np.zeros(0)
    overlap = np.asarray(z["nonbonded"]) * NONBONDED_SD > 0.4
    return {"bond_rmsz": rms(z["bond"]), "angle_rmsz": rms(z["angle"]), "plane_rmsz": rms(planes),
            "chiral_rmsz": rms(z["chiral"]), "bond_outliers": int(np.sum(np.abs(z["bond"]) > 4)),
            "angle_outliers": int(np.sum(np.abs(z["angle"]) > 4)), "n_bonds": int(len(z["bond"])),
            "n_angles": int(len(z["angle"])), "nonbonded_overlaps": int(overlap.sum())}


# ----------------------------------------------------------------------------------------------------------------
# occupancy groups


def occupancy_groups(model: MulticonfModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group [M] (-1: records without altloc), slot [M] (the altloc's index in its group), start occupancies
    [G, K] with 0 for unused slots): one group per unit ``ensemble_to_multiconf`` clustered (with the neighbour
    atoms it linked), else per residue."""
    residue = model.layout.residue_index()[model.atom]
    unit = residue.copy()
    if model.groups:
        keys = list(model.layout.residue_atoms())
        pos = {k: j for j, k in enumerate(keys)}
        unit_of_res = np.arange(len(keys))
        atom_unit = np.full(len(model.layout), -1)
        for j, grp in enumerate(model.groups):
            for k in grp.residues:
                unit_of_res[pos[k]] = len(keys) + j
            atom_unit[grp.linked_atoms] = len(keys) + j
        unit = unit_of_res[residue]
        linked = atom_unit[model.atom] >= 0
        unit[linked] = atom_unit[model.atom][linked]
    alt = model.altloc != ""
    group = np.full(len(model.atom), -1, np.int64)
    slot = np.zeros(len(model.atom), np.int64)
    occ = []
    for g, u in enumerate(np.unique(unit[alt])):
        sel = np.flatnonzero(alt & (unit == u))
        ids = sorted(set(model.altloc[sel].tolist()))
        group[sel] = g
        slot[sel] = [ids.index(a) for a in model.altloc[sel]]
        occ.append([float(model.occupancy[sel][model.altloc[sel] == a].mean()) for a in ids])
    width = max((len(o) for o in occ), default=1)
    start = np.zeros((len(occ), width))
    for g, o in enumerate(occ):
        start[g, :len(o)] = o
    return group, slot, start


# ----------------------------------------------------------------------------------------------------------------
# the data


class DataSum:
    """Several refinable observables as one data side: ``parts`` = {name: (weight, target)} with each target an
    ``fit / log_likelihood / report`` object (``observables.xray.XrayAtoms``); the log-likelihood is the weighted
    sum, ``report`` gives each part's report under its name and the first part's R-work / R-free at the top."""

    def __init__(self, parts: dict[str, tuple[float, Any]]):
        if not parts:
            raise ValueError("DataSum needs at least one observable")
        self.parts = dict(parts)

    def fit(self, x, q, b):
        return tuple(t.fit(x, q, b) for _, t in self.parts.values())

    def log_likelihood(self, states, x, q, b):
        return sum(w * t.log_likelihood(s, x, q, b) for (w, t), s in zip(self.parts.values(), states))

    def report(self, x, q, b) -> dict:
        reports = {name: t.report(x, q, b) for name, (_, t) in self.parts.items()}
        out = {k: v for k, v in next(iter(reports.values())).items() if k in ("r_work", "r_free", "rscc", "ml_free")}
        out["log_likelihood"] = sum(w * reports[n]["log_likelihood"] for n, (w, _) in self.parts.items())
        out["observables"] = reports
        return out


# ----------------------------------------------------------------------------------------------------------------
# the refinement


@dataclass
class RefineResult:
    """What :func:`refine` made: the refined ``model``, the data weight used (and how it was chosen), before/after
    reports (R values and geometry), and a row per stage of every macro-cycle in ``history``."""

    model: MulticonfModel
    data_weight: float
    weight_rule: str
    before: dict
    after: dict
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _softplus_inv(y: np.ndarray) -> np.ndarray:
    return np.where(y > 20, y, np.log(np.expm1(np.maximum(y, 1e-6))))


def _lbfgs(fun: Callable, params, steps: int, aux) -> tuple[Any, jnp.ndarray]:
    """Minimise ``fun(params, aux)`` by optax's L-BFGS (zoom line search) for ``steps`` iterations; keeps the best
    finite iterate."""
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(lambda p: fun(p, aux))

    def step(carry, _):
        p, state, best_p, best_v = carry
        value, grad = value_and_grad(p, state=state)
        better = jnp.isfinite(value) & (value < best_v)
        best_p = jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), p, best_p)
        best_v = jnp.where(better, value, best_v)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=lambda q: fun(q, aux))
        return (optax.apply_updates(p, updates), state, best_p, best_v), value

    carry = (params, opt.init(params), params, jnp.inf)
    (p, _, best_p, best_v), _ = jax.lax.scan(step, carry, None, length=steps)
    final = fun(p, aux)
    return jax.tree_util.tree_map(lambda a, b: jnp.where(final < best_v, a, b), p, best_p), jnp.minimum(final, best_v)


class _Problem:
    """The jitted objectives of one model: coordinates, B and occupancies as three parameter blocks."""

    def __init__(self, data, geo: RecordGeometry, group: np.ndarray, slot: np.ndarray, total: np.ndarray,
                 options: Refine):
        self.data, self.geo, self.options = data, geo, options
        self.g = _geometry_arrays(geo)
        self.group = jnp.asarray(np.maximum(group, 0))
        self.slot = jnp.asarray(slot)
        self.has_group = jnp.asarray(group >= 0)
        self.total = jnp.asarray(total, jnp.float32)
        self.b_pairs = jnp.asarray(geo.b_pairs.reshape(-1, 2))
        self._steps = {}

    def occupancy(self, logits, q_fixed, slot_mask):
        soft = jax.nn.softmax(jnp.where(slot_mask, logits, -jnp.inf), axis=-1) * self.total[:, None]
        return jnp.where(self.has_group, soft[self.group, self.slot], q_fixed)

    def bfactor(self, u):
        return 1.0 + jax.nn.softplus(u)

    def xyz_fun(self, x, aux):
        state, q, b, w, nb, d0, nb_mask = aux
        return -w * self.data.log_likelihood(state, x, q, b) + _geometry_energy(x, self.g, nb, d0, nb_mask)

    def b_fun(self, u, aux):
        state, x, q = aux
        b = self.bfactor(u)
        db = b[self.b_pairs[:, 0]] - b[self.b_pairs[:, 1]]
        return -self.data.log_likelihood(state, x, q, b) + 0.5 * jnp.sum(jnp.square(db / self.options.b_sd))

    def occ_fun(self, logits, aux):
        state, x, b, q_fixed, slot_mask = aux
        return -self.data.log_likelihood(state, x, self.occupancy(logits, q_fixed, slot_mask), b)

    def run(self, name: str, params, steps: int, aux):
        if (name, steps) not in self._steps:
            fun = {"xyz": self.xyz_fun, "b": self.b_fun, "occ": self.occ_fun}[name]
            self._steps[name, steps] = jax.jit(lambda p, a: _lbfgs(fun, p, steps, a))
        return self._steps[name, steps](params, aux)


def _report(data, geo: RecordGeometry, x, q, b) -> dict:
    r = data.report(x, q, b)
    out = {k: r[k] for k in ("r_work", "r_free", "rscc", "log_likelihood", "ml_free") if r.get(k) is not None}
    out.update(geometry_summary(geo, np.asarray(x, np.float64)))
    return out


def _free_score(report: dict) -> float | None:
    """Lower is better: minus the free set's log-likelihood where the data give one, else R-free, else None."""
    if report.get("ml_free") is not None:
        return -float(report["ml_free"])
    if report.get("r_free") is not None:
        return float(report["r_free"])
    return None


def _keep(new: dict, current: dict, stage: str, options: Refine) -> bool:
    """Whether a stage's result replaces the current model: when it raises the free set's likelihood (the
    PDB-REDO rule of judging refinement choices by the free set; Joosten et al. 2012, Acta Cryst. D68:484), or when
    it is the coordinate step that brings a model outside the geometry target back inside it."""
    if stage == "xyz" and not _meets(current, options.target_rmsz):
        return _meets(new, options.target_rmsz) or (new["bond_rmsz"] or 0) < (current["bond_rmsz"] or 0)
    if stage == "xyz" and not _meets(new, options.target_rmsz):
        return False
    a, b = _free_score(new), _free_score(current)
    return a is None or b is None or a < b


def _meets(report: dict, target: float) -> bool:
    return max(report["bond_rmsz"] or 0.0, report["angle_rmsz"] or 0.0) <= target


def refine(model: MulticonfModel, data, options: Refine = Refine(), progress: Callable[[str], None] | None = None
           ) -> RefineResult:
    """Refine ``model``'s coordinates, B-factors and occupancies against ``data`` (module docstring)."""
    t0 = time.perf_counter()
    say = progress or (lambda msg: log.info("%s", msg))
    geo = record_geometry(model)
    group, slot, start_occ = occupancy_groups(model)
    total = start_occ.sum(axis=1) if len(start_occ) else np.zeros(0)
    slot_mask = jnp.asarray(start_occ > 0) if len(start_occ) else jnp.zeros((0, 1), bool)
    problem = _Problem(data, geo, group, slot, total, options)

    x = jnp.asarray(model.coords, jnp.float32)
    b = jnp.asarray(np.maximum(model.b_factor, 1.5), jnp.float32)
    q_fixed = jnp.asarray(model.occupancy, jnp.float32)
    logits = jnp.asarray(np.log(np.maximum(start_occ / np.maximum(total[:, None], 1e-9), 1e-6)) if len(start_occ)
                         else np.zeros((0, 1)), jnp.float32)
    q = problem.occupancy(logits, q_fixed, slot_mask) if len(start_occ) else q_fixed
    before = _report(data, geo, x, q, b)
    say(f"refine: start R-work {before['r_work']:.4f}, R-free {before['r_free']:.4f}, bond/angle RMSZ "
        f"{before['bond_rmsz']:.2f}/{before['angle_rmsz']:.2f}; {len(model.atom)} atoms, {len(start_occ)} altloc groups")
    history = [{"cycle": 0, "stage": "start", **before}]
    weight, rule = options.data_weight, "given (refine.data_weight)"

    current = before
    for cycle in range(1, options.cycles + 1):
        accepted = 0
        stages = [("occupancy", options.occupancy_steps if len(start_occ) else 0), ("b", options.b_steps),
                  ("xyz", options.xyz_steps)]
        for stage, steps in stages:
            if not steps:
                continue
            state = data.fit(x, q, b)
            new_x, new_b, new_logits = x, b, logits
            if stage == "xyz":
                nb, d0 = nonbonded_pairs(geo, np.asarray(x, np.float64))
                cap = _capacity(len(nb))
                nb_args = (jnp.asarray(_pad(nb, cap, 0)), jnp.asarray(_pad(d0, cap, 0.0), jnp.float32),
                           jnp.asarray(_pad(np.ones(len(nb)), cap, 0.0), jnp.float32))
                if weight is None:
                    weight, new_x, rule = _choose_weight(problem, geo, x, q, b, state, nb_args, options, say)
                else:
                    new_x, _ = problem.run("xyz", x, steps, (state, q, b, jnp.float32(weight), *nb_args))
            elif stage == "b":
                u, _ = problem.run("b", jnp.asarray(_softplus_inv(np.asarray(b, np.float64) - 1.0), jnp.float32),
                                   steps, (state, x, q))
                new_b = problem.bfactor(u)
            else:
                new_logits, _ = problem.run("occ", logits, steps, (state, x, b, q_fixed, slot_mask))
            new_q = problem.occupancy(new_logits, q_fixed, slot_mask) if len(start_occ) else q
            rep = _report(data, geo, new_x, new_q, new_b)
            keep = _keep(rep, current, stage, options)
            history.append({"cycle": cycle, "stage": stage, "kept": keep, **rep})
            if keep:
                x, b, logits, q, current = new_x, new_b, new_logits, new_q, rep
                accepted += 1
        say(f"refine: cycle {cycle}/{options.cycles}: R-work {current.get('r_work', float('nan')):.4f}, R-free "
            f"{current.get('r_free', float('nan')):.4f}, bond/angle RMSZ {current['bond_rmsz']:.2f}/"
            f"{current['angle_rmsz']:.2f}; {accepted} stage(s) kept")
        if not accepted:
            break

    after = current
    refined = MulticonfModel(model.layout, model.atom, model.altloc, np.asarray(x, np.float64),
                             np.asarray(q, np.float64), np.asarray(b, np.float64), groups=model.groups, path=None)
    return RefineResult(refined, float(weight) if weight is not None else float("nan"), rule, before,
                        dict(after), history, time.perf_counter() - t0)


def _choose_weight(problem: _Problem, geo, x0, q, b, state, nb_args, options: Refine, say):
    """The data weight (module docstring): of w0 x 2^k for the k of ``weight_scan``, the one with the lowest R-free
    among those whose coordinate step keeps bond and angle RMSZ <= target (the largest such without an R-free)."""
    data = problem.data
    rng = np.random.default_rng(options.seed)
    shaken = x0 + jnp.asarray(rng.normal(0.0, 0.1, size=x0.shape), jnp.float32)
    g_geom = jax.grad(lambda x: _geometry_energy(x, problem.g, *nb_args))(shaken)
    g_data = jax.grad(lambda x: data.log_likelihood(state, x, q, b))(x0)
    w0 = float(jnp.linalg.norm(g_geom) / jnp.maximum(jnp.linalg.norm(g_data), 1e-12))
    tried = []
    for k in options.weight_scan:
        w = w0 * 2.0**k
        x, _ = problem.run("xyz", x0, options.xyz_steps, (state, q, b, jnp.float32(w), *nb_args))
        rep = _report(data, geo, x, q, b)
        tried.append((k, w, x, rep))
        say(f"refine: data weight {w:.3g} (w0 x 2^{k}): R-work {rep.get('r_work', float('nan')):.4f}, R-free "
            f"{rep.get('r_free', float('nan')):.4f}, bond/angle RMSZ {rep['bond_rmsz']:.2f}/{rep['angle_rmsz']:.2f}")
    passing = [t for t in tried if _meets(t[3], options.target_rmsz)] or [min(tried, key=lambda t: t[0])]
    if all(_free_score(t[3]) is not None for t in passing):
        k, w, x, _ = min(passing, key=lambda t: _free_score(t[3]))
        how = "the highest free-set likelihood"
    else:
        k, w, x, _ = max(passing, key=lambda t: t[0])
        how = "the largest"
    rule = (f"automatic: w0 = |grad E_geom| / |grad log L| = {w0:.3g}; of w0 x 2^k for k in "
            f"{list(options.weight_scan)}, {how} with bond and angle RMSZ <= {options.target_rmsz}: k = {k}")
    return w, x, rule
