"""Hydrogen positions from heavy atoms, in pure JAX (differentiable; jit-, grad- and vmap-able).

Structure predictors give heavy atoms only, while NMR data (NOEs, RDCs, J-couplings) are about protons.  Most protons
of a protein sit where the heavy atoms put them; this module places those from ideal local geometry:

- ``bisector`` rule, X-H along the unit sum of the bond directions pointing *away* from X's heavy neighbours:
  amide H (neighbours C(i-1) and CA; the direction is unit(N - C_prev) + unit(N - CA), normalised), HA and the other
  methine H (three neighbours: exactly tetrahedral for ideal bond angles), aromatic and other planar sp2 H (two
  neighbours).  With one neighbour and length L/3 it gives the centroid of a freely rotating methyl group (see
  ``rotor_centroid``).
- ``methylene`` rule, the two H of a CH2 group (and Gly HA2/HA3) with IUPAC names: in the plane bisecting the
  heavy-atom angle A-C-B, at +-(109.47 / 2) deg from the bisector.  A is the neighbour towards the backbone (CA for
  CB, N for Gly CA).  With n = unit(C - A) x unit(C - B), the H named ...2 lies on the -n side and the one named
  ...3 on the +n side (IUPAC-IUB 1970 / Markley et al. 1998 nomenclature; checked on every CH2 group of the
  deposited 2KJR ensemble, see tests/test_hydrogens.py).
- ``dihedral`` rule (NeRF, Parsons et al. 2005 J. Comput. Chem. 26, 1063): a bond length, a bond angle and a torsion
  from three reference atoms; used for the planar NH2 groups (Asn HD21 trans / HD22 cis to OD1, Gln HE21 / HE22 to
  OE1, Arg HH11 / HH21 cis and HH12 / HH22 trans to NE, as the deposited 2KJR models have them).
- Freely rotating groups (CH3, NH3+, OH, SH) are *not* placed: their H positions depend on a rotamer that heavy atoms
  do not fix.  ``PROTON_TEMPLATES`` marks them ``rotor``; consumers use a pseudo-atom (e.g. ``rotor_centroid``).

X-H lengths (A) are nuclear (neutron) distances: C(aliphatic)-H 1.09, C(aromatic)-H 1.08, N(side chain)-H 1.01,
O-H 0.96, S-H 1.34 (rounded from Allen & Bruno 2010, Acta Cryst. B66, 380); the backbone amide N-H is 1.02 A, the
vibrationally averaged length used for N-H dipolar couplings (Ottiger & Bax 1998, J. Am. Chem. Soc. 120, 12334).

Conventions: coordinates in Angstrom, ``coords [..., N, 3]`` (any leading batch axes); index tables are numpy and
fixed when a plan is built; names are IUPAC (PDB v3) atom names.  The chain's first residue gets no amide H (it is an
NH3+ terminus: a rotor) and neither does Pro.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from observables.base import AtomInfo

__all__ = [
    "ALIPHATIC_CH",
    "AMIDE_NH",
    "AROMATIC_CH",
    "PROTON_TEMPLATES",
    "HSite",
    "HydrogenPlan",
    "PlacementBuilder",
    "PlacementTable",
    "ResidueIndex",
    "bisector_h",
    "dihedral_h",
    "extend_with_hydrogens",
    "hydrogen_plan",
    "methylene_h",
    "place_alpha_h",
    "place_amide_h",
    "place_glycine_ha",
    "residue_groups",
    "residue_index",
    "rotor_centroid",
]

# X-H bond lengths (A), the project's one set (observables.rdc places H and sets D_max(N-H) with these); sources in
# the module docstring.  AMIDE_NH: backbone N-H, the vibrationally averaged length of N-H dipolar couplings (Ottiger &
# Bax 1998, J. Am. Chem. Soc. 120, 12334), also the value of the reference RDC analysis of the shared ubiquitin data.
# ALIPHATIC_CH: neutron-diffraction C(sp3)-H (Allen & Bruno 2010, Acta Cryst. B66, 380; Allen et al. 1987, J. Chem.
# Soc. Perkin Trans. 2, S1), also HA.
AMIDE_NH = 1.02
ALIPHATIC_CH = 1.09
AROMATIC_CH = 1.08
SIDECHAIN_NH = 1.01
HYDROXYL_OH = 0.96
THIOL_SH = 1.34
TETRAHEDRAL = math.acos(-1.0 / 3.0)  # 109.47 deg, the ideal H-C-H angle (radians)

_EPS = 1e-12  # A^2, keeps 1/|v| finite (and its gradient) for zero-length vectors of padded or degenerate input

STANDARD_RESIDUES = (
    "ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
    "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Geometry primitives (arrays in, arrays out)
# ----------------------------------------------------------------------------------------------------------------


def _unit(v):
    return v / jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True) + _EPS)


def bisector_h(center, neighbors, mask, length):
    """H at ``length`` from ``center`` along unit(sum_k mask_k unit(center - neighbor_k)).

    ``center [..., 3]``, ``neighbors [..., k, 3]``, ``mask [..., k]`` (1 for a real neighbour, 0 for padding),
    ``length`` broadcastable to ``[...]`` (A).
    """
    away = _unit(center[..., None, :] - neighbors) * mask[..., None]
    return center + jnp.asarray(length)[..., None] * _unit(jnp.sum(away, axis=-2))


def methylene_h(center, a, b, sign, length, half_angle=0.5 * TETRAHEDRAL):
    """One H of a CH2 group: ``center + length (cos(half_angle) e + sign sin(half_angle) n)``.

    e = unit(unit(C - A) + unit(C - B)) (the in-plane bisector, away from both neighbours), n = unit(unit(C - A) x
    unit(C - B)); ``sign`` -1 gives the IUPAC ...2 proton and +1 the ...3 proton when A is the neighbour towards the
    backbone (module docstring).  All arguments broadcast; ``half_angle`` in radians.
    """
    ua, ub = _unit(center - a), _unit(center - b)
    e = _unit(ua + ub)
    n = _unit(jnp.cross(ua, ub))
    sign = jnp.asarray(sign)[..., None]
    length = jnp.asarray(length)[..., None]
    return center + length * (jnp.cos(half_angle) * e + sign * jnp.sin(half_angle) * n)


def dihedral_h(c, b, a, length, angle, torsion):
    """Point D with |CD| = ``length`` (A), angle B-C-D = ``angle`` and torsion A-B-C-D = ``torsion`` (radians).

    Natural extension reference frame (NeRF; Parsons et al. 2005): with bc = unit(C - B), n = unit((B - A) x bc) and
    m = n x bc, D = C + L (-cos(angle) bc + sin(angle) cos(torsion) m + sin(angle) sin(torsion) n).
    """
    bc = _unit(c - b)
    n = _unit(jnp.cross(b - a, bc))
    m = jnp.cross(n, bc)
    length, angle, torsion = (jnp.asarray(x)[..., None] for x in (length, angle, torsion))
    return c + length * (
        -jnp.cos(angle) * bc + jnp.sin(angle) * jnp.cos(torsion) * m + jnp.sin(angle) * jnp.sin(torsion) * n
    )


def rotor_centroid(center, attached, bond):
    """Centroid of the H of a freely rotating XH_n group (n >= 2: CH3, NH3+), or the axis point of a single rotating H.

    The H lie on a cone about the attached-X axis at the tetrahedral angle, so their centroid is on the axis at
    bond cos(180 - 109.47 deg) = bond / 3 beyond X: 0.363 A for a methyl C-H of 1.09 A.
    """
    return bisector_h(center, attached[..., None, :], jnp.ones(attached.shape[:-1] + (1,)), bond / 3.0)


def place_amide_h(coords, n, ca, c_prev, length=AMIDE_NH):
    """Backbone amide H ``[..., K, 3]`` from index arrays ``n, ca, c_prev [K]`` into ``coords [..., N, 3]``.

    H is ``length`` (1.02 A) from N along unit(unit(N - C_prev) + unit(N - CA)): the bisector of the C(i-1)->N and
    CA->N directions, the sp2 N in the peptide plane.  The one amide-H placement (NOE, RDC, the demo data).
    """
    nb = jnp.stack([coords[..., c_prev, :], coords[..., ca, :]], axis=-2)
    return bisector_h(coords[..., n, :], nb, jnp.ones(nb.shape[:-1]), length)


def place_alpha_h(coords, ca, n, c, cb, length=ALIPHATIC_CH):
    """HA ``[..., K, 3]`` of non-glycine residues: tetrahedral from N, C and CB at 1.09 A from CA."""
    nb = jnp.stack([coords[..., n, :], coords[..., c, :], coords[..., cb, :]], axis=-2)
    return bisector_h(coords[..., ca, :], nb, jnp.ones(nb.shape[:-1]), length)


def place_glycine_ha(coords, ca, n, c, length=ALIPHATIC_CH):
    """Gly ``(HA2, HA3)``, each ``[..., K, 3]``, with IUPAC chirality (HA3 takes the place of an L-residue's HA)."""
    center, a, b = coords[..., ca, :], coords[..., n, :], coords[..., c, :]
    return methylene_h(center, a, b, -1.0, length), methylene_h(center, a, b, 1.0, length)


# ----------------------------------------------------------------------------------------------------------------
# Index tables: many placements evaluated as three vectorised batches
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlacementTable:
    """Fixed index tables for placing K points from ``coords [..., N, 3]``; ``place(coords) -> [..., K, 3]``.

    Three batches, one per rule (bisector, methylene, dihedral); ``order[k]`` is the row of output k in the
    concatenation (bisector rows, then methylene rows, then dihedral rows).
    """

    bis_center: np.ndarray  # [K1] int
    bis_neighbors: np.ndarray  # [K1, 3] int (padded with the center's index)
    bis_mask: np.ndarray  # [K1, 3] float32
    bis_length: np.ndarray  # [K1] A
    ch2: np.ndarray  # [K2, 3] int: center, A (towards the backbone), B
    ch2_sign: np.ndarray  # [K2] -1 (...2) or +1 (...3)
    ch2_length: np.ndarray  # [K2] A
    dih: np.ndarray  # [K3, 3] int: C (parent), B, A
    dih_geometry: np.ndarray  # [K3, 3] length (A), angle B-C-H and torsion A-B-C-H (radians)
    order: np.ndarray  # [K] int

    def __len__(self) -> int:
        return len(self.order)

    @functools.cached_property
    def _place_jit(self):
        return jax.jit(self._place)

    def place(self, coords):
        """Positions ``[..., K, 3]`` (A) of the K placements for ``coords [..., N, 3]`` (jit-compiled once per shape)."""
        return self._place_jit(coords)

    def _place(self, coords):
        coords = jnp.asarray(coords)
        parts = []
        if len(self.bis_center):
            parts.append(
                bisector_h(coords[..., self.bis_center, :], coords[..., self.bis_neighbors, :], self.bis_mask,
                           self.bis_length)
            )
        if len(self.ch2):
            c, a, b = (coords[..., self.ch2[:, k], :] for k in range(3))
            parts.append(methylene_h(c, a, b, self.ch2_sign, self.ch2_length))
        if len(self.dih):
            c, b, a = (coords[..., self.dih[:, k], :] for k in range(3))
            g = self.dih_geometry
            parts.append(dihedral_h(c, b, a, g[:, 0], g[:, 1], g[:, 2]))
        if not parts:
            return jnp.zeros(coords.shape[:-2] + (0, 3), coords.dtype)
        out = jnp.concatenate(parts, axis=-2)
        return out[..., self.order, :]


class PlacementBuilder:
    """Collects placements one at a time (``add_*`` return the output index) and builds a ``PlacementTable``."""

    def __init__(self):
        self._bis: list[tuple[int, tuple[int, ...], float]] = []
        self._ch2: list[tuple[int, int, int, float, float]] = []
        self._dih: list[tuple[int, int, int, float, float, float]] = []
        self._rows: list[tuple[str, int]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add_bisector(self, center: int, neighbors, length: float) -> int:
        neighbors = tuple(int(i) for i in neighbors)
        if not 1 <= len(neighbors) <= 3:
            raise ValueError(f"a bisector placement needs 1-3 neighbours, got {len(neighbors)}")
        self._bis.append((int(center), neighbors, float(length)))
        self._rows.append(("bis", len(self._bis) - 1))
        return len(self._rows) - 1

    def add_methylene(self, center: int, a: int, b: int, sign: float, length: float) -> int:
        self._ch2.append((int(center), int(a), int(b), float(sign), float(length)))
        self._rows.append(("ch2", len(self._ch2) - 1))
        return len(self._rows) - 1

    def add_dihedral(self, c: int, b: int, a: int, length: float, angle_deg: float, torsion_deg: float) -> int:
        self._dih.append((int(c), int(b), int(a), float(length), math.radians(angle_deg), math.radians(torsion_deg)))
        self._rows.append(("dih", len(self._dih) - 1))
        return len(self._rows) - 1

    def build(self) -> PlacementTable:
        k1, k2 = len(self._bis), len(self._ch2)
        bis_center = np.array([c for c, _, _ in self._bis], dtype=np.int32)
        bis_neighbors = np.array([list(nb) + [c] * (3 - len(nb)) for c, nb, _ in self._bis], dtype=np.int32)
        bis_mask = np.array([[1.0] * len(nb) + [0.0] * (3 - len(nb)) for _, nb, _ in self._bis], dtype=np.float32)
        offset = {"bis": 0, "ch2": k1, "dih": k1 + k2}
        return PlacementTable(
            bis_center=bis_center,
            bis_neighbors=bis_neighbors.reshape(-1, 3),
            bis_mask=bis_mask.reshape(-1, 3),
            bis_length=np.array([x for _, _, x in self._bis], dtype=np.float32),
            ch2=np.array([r[:3] for r in self._ch2], dtype=np.int32).reshape(-1, 3),
            ch2_sign=np.array([r[3] for r in self._ch2], dtype=np.float32),
            ch2_length=np.array([r[4] for r in self._ch2], dtype=np.float32),
            dih=np.array([r[:3] for r in self._dih], dtype=np.int32).reshape(-1, 3),
            dih_geometry=np.array([r[3:] for r in self._dih], dtype=np.float32).reshape(-1, 3),
            order=np.array([offset[kind] + i for kind, i in self._rows], dtype=np.int32),
        )


# ----------------------------------------------------------------------------------------------------------------
# Proton templates of the 20 standard amino acids (IUPAC names)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HSite:
    """Where one proton of a residue type sits.

    ``rule``: "bisector" (``refs`` = 1-3 heavy neighbours of ``parent``), "methylene" (``refs`` = (A, B), ``sign``
    -1/+1), "dihedral" (``refs`` = (B, A): torsion A-B-parent-H = ``torsion`` deg, angle B-parent-H = ``angle`` deg)
    or "rotor" (freely rotating group; ``refs`` = (the heavy atom ``parent`` is bonded to,), ``group`` names the
    group, e.g. "HB" for Ala's methyl).  A ref "-C" means atom C of the preceding residue.
    """

    name: str
    parent: str
    rule: str
    refs: tuple[str, ...]
    length: float
    sign: float = 0.0
    angle: float = 120.0
    torsion: float = 0.0
    group: str | None = None


def _templates() -> dict[str, tuple[HSite, ...]]:
    ch, ar, nh = ALIPHATIC_CH, AROMATIC_CH, SIDECHAIN_NH

    def ch2(parent, a, b, stem):
        return [HSite(stem + "2", parent, "methylene", (a, b), ch, sign=-1.0, group=stem),
                HSite(stem + "3", parent, "methylene", (a, b), ch, sign=1.0, group=stem)]

    def methyl(parent, attached, stem, bond=ch):
        return [HSite(f"{stem}{k}", parent, "rotor", (attached,), bond, group=stem) for k in (1, 2, 3)]

    def ring(name, parent, a, b, bond=ar):
        return [HSite(name, parent, "bisector", (a, b), bond)]

    def nh2(parent, b, ref, stem):  # planar NH2: ...1 trans, ...2 cis to ref about the parent-B bond
        return [HSite(stem + "1", parent, "dihedral", (b, ref), nh, torsion=180.0, group=stem),
                HSite(stem + "2", parent, "dihedral", (b, ref), nh, torsion=0.0, group=stem)]

    side: dict[str, list[HSite]] = {
        "ALA": methyl("CB", "CA", "HB"),
        "ARG": ch2("CB", "CA", "CG", "HB") + ch2("CG", "CB", "CD", "HG") + ch2("CD", "CG", "NE", "HD")
        + [HSite("HE", "NE", "bisector", ("CD", "CZ"), nh)]
        + [HSite("HH11", "NH1", "dihedral", ("CZ", "NE"), nh, torsion=0.0, group="HH1"),
           HSite("HH12", "NH1", "dihedral", ("CZ", "NE"), nh, torsion=180.0, group="HH1"),
           HSite("HH21", "NH2", "dihedral", ("CZ", "NE"), nh, torsion=0.0, group="HH2"),
           HSite("HH22", "NH2", "dihedral", ("CZ", "NE"), nh, torsion=180.0, group="HH2")],
        "ASN": ch2("CB", "CA", "CG", "HB") + nh2("ND2", "CG", "OD1", "HD2"),
        "ASP": ch2("CB", "CA", "CG", "HB"),
        "CYS": ch2("CB", "CA", "SG", "HB") + [HSite("HG", "SG", "rotor", ("CB",), THIOL_SH, group="HG")],
        "GLN": ch2("CB", "CA", "CG", "HB") + ch2("CG", "CB", "CD", "HG") + nh2("NE2", "CD", "OE1", "HE2"),
        "GLU": ch2("CB", "CA", "CG", "HB") + ch2("CG", "CB", "CD", "HG"),
        "GLY": [],
        "HIS": ch2("CB", "CA", "CG", "HB") + ring("HD1", "ND1", "CG", "CE1", nh) + ring("HD2", "CD2", "CG", "NE2")
        + ring("HE1", "CE1", "ND1", "NE2") + ring("HE2", "NE2", "CD2", "CE1", nh),
        "ILE": [HSite("HB", "CB", "bisector", ("CA", "CG1", "CG2"), ch)] + ch2("CG1", "CB", "CD1", "HG1")
        + methyl("CG2", "CB", "HG2") + methyl("CD1", "CG1", "HD1"),
        "LEU": ch2("CB", "CA", "CG", "HB") + [HSite("HG", "CG", "bisector", ("CB", "CD1", "CD2"), ch)]
        + methyl("CD1", "CG", "HD1") + methyl("CD2", "CG", "HD2"),
        "LYS": ch2("CB", "CA", "CG", "HB") + ch2("CG", "CB", "CD", "HG") + ch2("CD", "CG", "CE", "HD")
        + ch2("CE", "CD", "NZ", "HE") + methyl("NZ", "CE", "HZ", SIDECHAIN_NH),
        "MET": ch2("CB", "CA", "CG", "HB") + ch2("CG", "CB", "SD", "HG") + methyl("CE", "SD", "HE"),
        "PHE": ch2("CB", "CA", "CG", "HB") + ring("HD1", "CD1", "CG", "CE1") + ring("HD2", "CD2", "CG", "CE2")
        + ring("HE1", "CE1", "CD1", "CZ") + ring("HE2", "CE2", "CD2", "CZ") + ring("HZ", "CZ", "CE1", "CE2"),
        "PRO": ch2("CB", "CA", "CG", "HB") + ch2("CG", "CB", "CD", "HG") + ch2("CD", "CG", "N", "HD"),
        "SER": ch2("CB", "CA", "OG", "HB") + [HSite("HG", "OG", "rotor", ("CB",), HYDROXYL_OH, group="HG")],
        "THR": [HSite("HB", "CB", "bisector", ("CA", "OG1", "CG2"), ch),
                HSite("HG1", "OG1", "rotor", ("CB",), HYDROXYL_OH, group="HG1")] + methyl("CG2", "CB", "HG2"),
        "TRP": ch2("CB", "CA", "CG", "HB") + ring("HD1", "CD1", "CG", "NE1") + ring("HE1", "NE1", "CD1", "CE2", nh)
        + ring("HE3", "CE3", "CD2", "CZ3") + ring("HZ2", "CZ2", "CE2", "CH2") + ring("HZ3", "CZ3", "CE3", "CH2")
        + ring("HH2", "CH2", "CZ2", "CZ3"),
        "TYR": ch2("CB", "CA", "CG", "HB") + ring("HD1", "CD1", "CG", "CE1") + ring("HD2", "CD2", "CG", "CE2")
        + ring("HE1", "CE1", "CD1", "CZ") + ring("HE2", "CE2", "CD2", "CZ")
        + [HSite("HH", "OH", "rotor", ("CZ",), HYDROXYL_OH, group="HH")],
        "VAL": [HSite("HB", "CB", "bisector", ("CA", "CG1", "CG2"), ch)] + methyl("CG1", "CB", "HG1")
        + methyl("CG2", "CB", "HG2"),
    }
    out = {}
    for res, sites in side.items():
        backbone = []
        if res != "PRO":
            backbone.append(HSite("H", "N", "bisector", ("-C", "CA"), AMIDE_NH))
        if res == "GLY":
            backbone += ch2("CA", "N", "C", "HA")
        else:
            backbone.append(HSite("HA", "CA", "bisector", ("N", "C", "CB"), ch))
        out[res] = tuple(backbone + sites)
    return out


PROTON_TEMPLATES: dict[str, tuple[HSite, ...]] = _templates()
"""Protons of each standard residue type (IUPAC names) with the rule that places them; the N-terminal H1-H3
(an NH3+ rotor on N, attached CA) replace H on a chain's first residue (``n_terminal_sites``)."""

N_TERMINAL_SITES = tuple(HSite(f"H{k}", "N", "rotor", ("CA",), SIDECHAIN_NH, group="H") for k in (1, 2, 3))
BACKBONE_NAMES = ("H", "HA", "HA2", "HA3")


# ----------------------------------------------------------------------------------------------------------------
# Residues of an AtomInfo and the plan that places their hydrogens
# ----------------------------------------------------------------------------------------------------------------


class ResidueIndex(NamedTuple):
    """Residues of an ``AtomInfo`` in order of appearance.

    ``keys [R]`` (chain, res_seq), ``res_name [R]``, ``atoms [R]`` dicts atom name -> index, ``previous [R]`` the
    residue index of the covalently preceding residue (-1 for a chain start or a break).
    """

    keys: list[tuple[str, int]]
    res_name: list[str]
    atoms: list[dict[str, int]]
    previous: list[int]


def residue_groups(chain_id, res_seq) -> tuple[list[tuple[str, int]], np.ndarray]:
    """Residues as the observables see them: every atom with one (chain, residue number) is one residue, wherever
    it sits, and residues are numbered in order of their first atom (the rule of ``predictors.base.AtomLayout``'s
    ``residues`` / ``residue_index``, which observables cannot import).  Returns the keys ``[R]`` as ``(str, int)``
    and each atom's residue ``[N]`` (int64).  Chain ids are used as given (``str``): callers strip them if needed."""
    order: dict[tuple[str, int], int] = {}
    residue = np.array([order.setdefault((str(c), int(r)), len(order)) for c, r in zip(chain_id, res_seq)],
                       dtype=np.int64)
    return list(order), residue


def residue_index(atoms: AtomInfo, peptide_bond_max: float = 2.0) -> ResidueIndex:
    """Group atoms into residues by (chain, res_seq) (``residue_groups``, chain ids stripped) and link each residue
    to the one it is peptide-bonded to.

    A residue follows the previous residue of its chain (in order of appearance) if both have the bond atoms (C, N)
    and, when ``atoms.coords`` are given, C(i-1)-N(i) is shorter than ``peptide_bond_max`` A in the first conformer;
    without coordinates the residue numbers must be consecutive.  Names are upper-cased and stripped; an amide "HN"
    (X-PLOR/CHARMM) is read as "H".
    """
    keys, residue = residue_groups([str(c).strip() for c in atoms.chain_id], atoms.res_seq)
    res_name: list[str | None] = [None] * len(keys)
    members: list[dict[str, int]] = [{} for _ in keys]
    for i, r in enumerate(residue.tolist()):
        if res_name[r] is None:  # the residue's first atom names it
            res_name[r] = str(atoms.res_name[i]).strip().upper()
        name = str(atoms.atom_name[i]).strip().upper()
        name = "H" if name == "HN" else name
        members[r].setdefault(name, i)
    ref = None if atoms.coords is None else np.asarray(atoms.coords, dtype=np.float64).reshape(-1, len(atoms), 3)[0]
    previous = [-1] * len(keys)
    for r in range(1, len(keys)):
        p = r - 1
        if keys[p][0] != keys[r][0] or "C" not in members[p] or "N" not in members[r]:
            continue
        if ref is not None:
            bonded = np.linalg.norm(ref[members[p]["C"]] - ref[members[r]["N"]]) < peptide_bond_max
        else:
            bonded = keys[r][1] - keys[p][1] == 1
        previous[r] = p if bonded else -1
    return ResidueIndex(keys, res_name, members, previous)


def _resolve(ref: str, r: int, index: ResidueIndex) -> int | None:
    if ref.startswith("-"):
        p = index.previous[r]
        return None if p < 0 else index.atoms[p].get(ref[1:])
    return index.atoms[r].get(ref)


def add_site(builder: PlacementBuilder, site: HSite, r: int, index: ResidueIndex) -> int | None:
    """Add one templated (non-rotor) proton of residue ``r`` to ``builder``; None if an atom it needs is missing."""
    if site.rule == "rotor":
        raise ValueError(f"{site.name} is in a freely rotating group: it has no unique position")
    parent = index.atoms[r].get(site.parent)
    refs = [_resolve(x, r, index) for x in site.refs]
    if parent is None or any(x is None for x in refs):
        return None
    if site.rule == "bisector":
        return builder.add_bisector(parent, refs, site.length)
    if site.rule == "methylene":
        return builder.add_methylene(parent, refs[0], refs[1], site.sign, site.length)
    if site.rule == "dihedral":
        return builder.add_dihedral(parent, refs[0], refs[1], site.length, site.angle, site.torsion)
    raise ValueError(f"unknown placement rule {site.rule!r}")


@dataclass(frozen=True)
class HydrogenPlan:
    """Placed hydrogens of a model: ``table.place(coords [..., N, 3]) -> [..., K, 3]`` and their ``atoms`` (length K,
    element "H", IUPAC names) with ``parent [K]``, the index of the heavy atom each H is bonded to."""

    table: PlacementTable
    atoms: AtomInfo
    parent: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.table)

    def place(self, coords):
        return self.table.place(coords)


def hydrogen_plan(atoms: AtomInfo, scope: str = "backbone", missing_only: bool = True) -> HydrogenPlan:
    """The hydrogens of ``atoms`` that heavy atoms determine, as a ``HydrogenPlan``.

    ``scope="backbone"``: amide H (not on Pro or a chain's first residue, nor after a chain break) and HA (Gly: HA2,
    HA3).  ``scope="all"``: also every side-chain H that is not in a freely rotating group (methylene, methine,
    aromatic, planar NH/NH2).  ``missing_only``: skip protons the model already has (by name; "HN" counts as "H").
    Residues outside the 20 standard amino acids are left alone.
    """
    if scope not in ("backbone", "all"):
        raise ValueError(f"scope must be 'backbone' or 'all', got {scope!r}")
    index = residue_index(atoms)
    builder = PlacementBuilder()
    rows: list[tuple[int, str, int]] = []  # (residue, name, parent atom)
    for r, res in enumerate(index.res_name):
        for site in PROTON_TEMPLATES.get(res, ()):
            if site.rule == "rotor" or (scope == "backbone" and site.name not in BACKBONE_NAMES):
                continue
            if missing_only and site.name in index.atoms[r]:
                continue
            if add_site(builder, site, r, index) is not None:
                rows.append((r, site.name, index.atoms[r][site.parent]))
    k = len(rows)
    placed = AtomInfo(
        element=np.array(["H"] * k, dtype=str).reshape(k),
        atom_name=np.array([name for _, name, _ in rows], dtype=str).reshape(k),
        res_name=np.array([index.res_name[r] for r, _, _ in rows], dtype=str).reshape(k),
        res_seq=np.array([index.keys[r][1] for r, _, _ in rows], dtype=np.int64).reshape(k),
        chain_id=np.array([index.keys[r][0] for r, _, _ in rows], dtype=str).reshape(k),
    )
    return HydrogenPlan(builder.build(), placed, np.array([p for _, _, p in rows], dtype=np.int64))


def extend_with_hydrogens(atoms: AtomInfo, scope: str = "backbone", missing_only: bool = True):
    """Model atoms plus placed hydrogens: returns ``(extended AtomInfo [N + K], extend)``.

    ``extend(coords [..., N, 3]) -> [..., N + K, 3]`` is pure JAX (the model's atoms first, then the placed H in the
    order of ``hydrogen_plan``).  Reference conformers in ``atoms.coords`` are extended too.
    """
    plan = hydrogen_plan(atoms, scope=scope, missing_only=missing_only)

    def extend(coords):
        coords = jnp.asarray(coords)
        return jnp.concatenate([coords, plan.place(coords).astype(coords.dtype)], axis=-2)

    ref = None
    if atoms.coords is not None:
        ref = np.asarray(extend(np.asarray(atoms.coords, dtype=np.float32)))
    h = plan.atoms
    extended = AtomInfo(
        element=np.concatenate([np.asarray(atoms.element).astype(str), h.element]),
        atom_name=np.concatenate([np.asarray(atoms.atom_name).astype(str), h.atom_name]),
        res_name=np.concatenate([np.asarray(atoms.res_name).astype(str), h.res_name]),
        res_seq=np.concatenate([np.asarray(atoms.res_seq).astype(np.int64), h.res_seq]),
        chain_id=np.concatenate([np.asarray(atoms.chain_id).astype(str), h.chain_id]),
        coords=ref,
    )
    return extended, extend
