"""The embedded two-state test case: a helix-loop-helix peptide whose loop has two conformations.

Nothing is downloaded.  The peptide is built from backbone torsions (phi, psi, omega) and side-chain chi angles
with ideal bond lengths and angles by NeRF, the natural extension reference frame (Parsons, Holmes, Rojas, Tsai &
Strauss 2005, J. Comput. Chem. 26:1063-1068): each new atom is placed from the three atoms before it, a bond
length, a bond angle and a torsion.  Ideal bond lengths (A) and angles (degrees) are those of Engh & Huber
(1991), Acta Cryst. A47:392-400, for the corresponding atom types.

State A is the built peptide.  State B differs from A only in the loop: the loop is turned rigidly (a "crankshaft"
or backrub-like move, Davis et al. 2006, Structure 14:265) about the axis through the CA atoms of the two residues
flanking it.  The atoms that turn are those strictly between the two pivot CAs along the chain: C and O of the
first pivot residue, every atom of the loop residues, and N of the second pivot residue.  This keeps every bond
length exact (the pivot CAs lie on the axis).  In general the N-CA-C (and N-CA-CB, CB-CA-C) angles at the two
pivot CAs change, together with the pivots' phi/psi; the built-in design uses glycine pivots and a swing at which
both pivot N-CA-C angles come back to their ideal values, so there every bond length *and* bond angle of state B
equals state A.  ``loop_mask`` marks exactly the atoms that move.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guidance.structures.metrics import ENGH_HUBER_1991
from predictors.base import AtomLayout

__all__ = [
    "TwoStatePeptide",
    "build_two_state_peptide",
    "write_two_state_structure",
    "build_peptide",
    "DEFAULT_SEQUENCE",
    "DEFAULT_LOOP",
    "DEFAULT_SWING_DEG",
    "DEFAULT_PHI_PSI",
    "crankshaft",
    "ENGH_HUBER_BACKBONE",
]

# ---------------------------------------------------------------------------------------------------------------
# Ideal geometry, Engh & Huber (1991).  Lengths in A, angles in degrees.
# Backbone of non-glycine residues (N-CH1E, CH1E-C, C-NH1, C-O; angles N-CH1E-C, CH1E-C-NH1, C-NH1-CH1E, CH1E-C-O).
# Backbone of non-glycine residues and of glycine: the means of the one Engh & Huber table in guidance/structures/metrics.py.
ENGH_HUBER_BACKBONE = {term: mean for term, (mean, _sd) in ENGH_HUBER_1991["default"].items()}
ENGH_HUBER_GLYCINE = {term: mean for term, (mean, _sd) in ENGH_HUBER_1991["GLY"].items()}
# CB: (CA-CB length, N-CA-CB angle, C-CA-CB angle) for CH1E-CH3E (Ala), CH1E-CH1E (beta-branched Val/Ile/Thr)
# and CH1E-CH2E (the rest).
_CB_ALA = (1.521, 110.4, 110.5)
_CB_BRANCHED = (1.540, 111.5, 109.1)
_CB_DEFAULT = (1.530, 110.5, 110.1)

# Side-chain heavy atoms after CB: (atom, element, three reference atoms, bond, angle, chi index, torsion offset).
# The torsion placing the atom about the bond (ref2 -> ref3) is ``chi[chi_index] + offset`` (chi_index None:
# the offset alone).  Lengths/angles are Engh & Huber (1991) values for the corresponding atom types; the offsets
# of branch atoms (Val CG2, Thr CG2, Ile CG2, Leu CD2) follow the IUPAC naming seen in deposited structures.
_SIDE_CHAINS: dict[str, list[tuple]] = {
    "GLY": [],
    "ALA": [],
    "SER": [("OG", "O", ("N", "CA", "CB"), 1.417, 111.1, 0, 0.0)],
    "CYS": [("SG", "S", ("N", "CA", "CB"), 1.808, 114.4, 0, 0.0)],
    "VAL": [("CG1", "C", ("N", "CA", "CB"), 1.521, 110.5, 0, 0.0),
            ("CG2", "C", ("N", "CA", "CB"), 1.521, 110.5, 0, 122.5)],
    "THR": [("OG1", "O", ("N", "CA", "CB"), 1.433, 109.6, 0, 0.0),
            ("CG2", "C", ("N", "CA", "CB"), 1.521, 110.5, 0, -120.0)],
    "ILE": [("CG1", "C", ("N", "CA", "CB"), 1.530, 110.4, 0, 0.0),
            ("CG2", "C", ("N", "CA", "CB"), 1.521, 110.5, 0, -124.5),
            ("CD1", "C", ("CA", "CB", "CG1"), 1.513, 113.8, 1, 0.0)],
    "LEU": [("CG", "C", ("N", "CA", "CB"), 1.530, 116.3, 0, 0.0),
            ("CD1", "C", ("CA", "CB", "CG"), 1.521, 110.7, 1, 0.0),
            ("CD2", "C", ("CA", "CB", "CG"), 1.521, 110.7, 1, 122.6)],
    "MET": [("CG", "C", ("N", "CA", "CB"), 1.520, 114.1, 0, 0.0),
            ("SD", "S", ("CA", "CB", "CG"), 1.803, 112.7, 1, 0.0),
            ("CE", "C", ("CB", "CG", "SD"), 1.791, 100.9, 2, 0.0)],
    "PHE": [("CG", "C", ("N", "CA", "CB"), 1.502, 113.8, 0, 0.0),
            ("CD1", "C", ("CA", "CB", "CG"), 1.384, 120.7, 1, 0.0),
            ("CD2", "C", ("CA", "CB", "CG"), 1.384, 120.7, 1, 180.0),
            ("CE1", "C", ("CB", "CG", "CD1"), 1.382, 120.7, None, 180.0),
            ("CE2", "C", ("CB", "CG", "CD2"), 1.382, 120.7, None, 180.0),
            ("CZ", "C", ("CG", "CD1", "CE1"), 1.382, 120.0, None, 0.0)],
    "TYR": [("CG", "C", ("N", "CA", "CB"), 1.512, 113.9, 0, 0.0),
            ("CD1", "C", ("CA", "CB", "CG"), 1.389, 120.8, 1, 0.0),
            ("CD2", "C", ("CA", "CB", "CG"), 1.389, 120.8, 1, 180.0),
            ("CE1", "C", ("CB", "CG", "CD1"), 1.382, 121.2, None, 180.0),
            ("CE2", "C", ("CB", "CG", "CD2"), 1.382, 121.2, None, 180.0),
            ("CZ", "C", ("CG", "CD1", "CE1"), 1.378, 119.6, None, 0.0),
            ("OH", "O", ("CD1", "CE1", "CZ"), 1.376, 119.9, None, 180.0)],
    "ASN": [("CG", "C", ("N", "CA", "CB"), 1.516, 112.6, 0, 0.0),
            ("OD1", "O", ("CA", "CB", "CG"), 1.231, 120.8, 1, 0.0),
            ("ND2", "N", ("CA", "CB", "CG"), 1.328, 116.4, 1, 180.0)],
    "ASP": [("CG", "C", ("N", "CA", "CB"), 1.516, 112.6, 0, 0.0),
            ("OD1", "O", ("CA", "CB", "CG"), 1.249, 118.4, 1, 0.0),
            ("OD2", "O", ("CA", "CB", "CG"), 1.249, 118.4, 1, 180.0)],
    "GLN": [("CG", "C", ("N", "CA", "CB"), 1.520, 114.1, 0, 0.0),
            ("CD", "C", ("CA", "CB", "CG"), 1.516, 112.6, 1, 0.0),
            ("OE1", "O", ("CB", "CG", "CD"), 1.231, 120.8, 2, 0.0),
            ("NE2", "N", ("CB", "CG", "CD"), 1.328, 116.4, 2, 180.0)],
    "GLU": [("CG", "C", ("N", "CA", "CB"), 1.520, 114.1, 0, 0.0),
            ("CD", "C", ("CA", "CB", "CG"), 1.516, 112.6, 1, 0.0),
            ("OE1", "O", ("CB", "CG", "CD"), 1.249, 118.4, 2, 0.0),
            ("OE2", "O", ("CB", "CG", "CD"), 1.249, 118.4, 2, 180.0)],
    "LYS": [("CG", "C", ("N", "CA", "CB"), 1.520, 114.1, 0, 0.0),
            ("CD", "C", ("CA", "CB", "CG"), 1.520, 111.3, 1, 0.0),
            ("CE", "C", ("CB", "CG", "CD"), 1.520, 111.3, 2, 0.0),
            ("NZ", "N", ("CG", "CD", "CE"), 1.489, 111.9, 3, 0.0)],
    "ARG": [("CG", "C", ("N", "CA", "CB"), 1.520, 114.1, 0, 0.0),
            ("CD", "C", ("CA", "CB", "CG"), 1.520, 111.3, 1, 0.0),
            ("NE", "N", ("CB", "CG", "CD"), 1.460, 112.0, 2, 0.0),
            ("CZ", "C", ("CG", "CD", "NE"), 1.329, 124.2, 3, 0.0),
            ("NH1", "N", ("CD", "NE", "CZ"), 1.326, 120.0, None, 0.0),
            ("NH2", "N", ("CD", "NE", "CZ"), 1.326, 120.0, None, 180.0)],
}

# Default side-chain rotamers (chi1, chi2, ...) in degrees: common rotamers of the penultimate rotamer library
# (Lovell, Word, Richardson & Richardson 2000, Proteins 40:389), mostly "m"/"t" chi1 as seen in helices.
_ROTAMERS: dict[str, tuple[float, ...]] = {
    "SER": (-65.0,), "CYS": (-65.0,), "VAL": (175.0,), "THR": (-65.0,), "ILE": (-65.0, 170.0),
    "LEU": (-65.0, 175.0), "MET": (-65.0, 180.0, 75.0), "PHE": (-65.0, 95.0), "TYR": (-65.0, 95.0),
    "ASN": (-65.0, -40.0), "ASP": (-70.0, -15.0), "GLN": (-65.0, 180.0, -25.0), "GLU": (-65.0, 180.0, -10.0),
    "LYS": (-65.0, 180.0, 180.0, 180.0), "ARG": (-65.0, 180.0, 180.0, 180.0),
}

ONE_TO_THREE = {
    "G": "GLY", "A": "ALA", "S": "SER", "C": "CYS", "V": "VAL", "T": "THR", "I": "ILE", "L": "LEU", "M": "MET",
    "F": "PHE", "Y": "TYR", "N": "ASN", "D": "ASP", "Q": "GLN", "E": "GLU", "K": "LYS", "R": "ARG",
}

# Backbone torsions (phi, psi) in degrees.  Ideal right-handed alpha helix (Barlow & Thornton 1988 mean values).
ALPHA_HELIX = (-62.0, -41.0)
OMEGA_TRANS = 180.0

# The built-in design (residues 1-27): helix 1-9, Gly 10 (pivot), loop 11-16, Gly 17 (pivot), helix 18-27.
# The loop torsions were chosen by an offline numerical search for: Ramachandran-allowed loop (phi, psi); the two
# helices packed against each other (centroids 11 A apart, crossing at about 130 degrees); no clash in either
# state; the loop touching the helices in both states; and glycine pivots whose
# N-CA-C angle is restored by the *same* swing at both ends, so that at DEFAULT_SWING_DEG every bond angle of state
# B equals state A (to < 0.01 degrees).  Surface positions are Glu/Lys, positions facing the other helix Leu/Ile/Ala.
DEFAULT_SEQUENCE = "EELKEEIKEGAATSASGEKSLEKAEEL"
DEFAULT_LOOP = (11, 16)
DEFAULT_SWING_DEG = 134.49
# Lys 4 in the all-trans rotamer "tttt": with the default "mttt" its NZ ran into Glu 25's carboxylate (1.1 A)
DEFAULT_CHIS = {3: (-177.0, 180.0, 180.0, 180.0)}
DEFAULT_PHI_PSI = (
    [ALPHA_HELIX] * 9
    + [(-62.44, -58.20)]  # Gly 10, first pivot
    + [(-146.47, 154.98), (-82.97, 0.75), (-96.62, 150.04), (-60.89, 115.72), (-76.95, 161.18), (-72.80, 157.30)]
    + [(93.24, 55.53)]  # Gly 17, second pivot (left-handed region, glycine only)
    + [ALPHA_HELIX] * 10
)
MIN_NONBONDED_DISTANCE = 2.5  # A, between heavy atoms more than two bonds apart


# ---------------------------------------------------------------------------------------------------------------
# NeRF (Parsons et al. 2005)


def nerf(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle_deg: float, torsion_deg: float) -> np.ndarray:
    """Place atom d with |cd| = bond, angle(b, c, d) = angle and dihedral(a, b, c, d) = torsion."""
    theta, phi = np.radians(angle_deg), np.radians(torsion_deg)
    # d in the local frame of c: x along b->c, y in the abc plane, z normal to it (Parsons et al. 2005).
    d_local = bond * np.array([-np.cos(theta), np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi)])
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    frame = np.stack([bc, np.cross(n, bc), n], axis=1)
    return c + frame @ d_local


def _place_cb(n: np.ndarray, ca: np.ndarray, c: np.ndarray, res_name: str) -> np.ndarray:
    """CB with the Engh & Huber CA-CB length and both N-CA-CB and C-CA-CB angles exact, L chirality."""
    if res_name == "ALA":
        bond, ang_n, ang_c = _CB_ALA
    elif res_name in ("VAL", "ILE", "THR"):
        bond, ang_n, ang_c = _CB_BRANCHED
    else:
        bond, ang_n, ang_c = _CB_DEFAULT
    un, uc = (n - ca) / np.linalg.norm(n - ca), (c - ca) / np.linalg.norm(c - ca)
    g = float(un @ uc)
    cn, cc = np.cos(np.radians(ang_n)), np.cos(np.radians(ang_c))
    # direction d = p*un + q*uc + r*w with d.un = cos(ang_n), d.uc = cos(ang_c), |d| = 1
    p = (cn - g * cc) / (1.0 - g * g)
    q = (cc - g * cn) / (1.0 - g * g)
    w = np.cross(un, uc)
    w /= np.linalg.norm(w)
    r = np.sqrt(max(0.0, 1.0 - p * p - q * q - 2.0 * p * q * g))
    # L-amino acids: CB on the side of cross(N-CA, C-CA), dihedral C-N-CA-CB about -122 degrees.
    return ca + bond * (p * un + q * uc + r * w)


def _backbone_geometry(res_name: str) -> dict:
    return ENGH_HUBER_GLYCINE if res_name == "GLY" else ENGH_HUBER_BACKBONE


def build_peptide(
    sequence: str,
    phi_psi,
    *,
    chain: str = "A",
    first_residue: int = 1,
    chis: dict[int, tuple[float, ...]] | None = None,
) -> tuple[AtomLayout, np.ndarray]:
    """Build a peptide (heavy atoms) from one-letter ``sequence`` and per-residue (phi, psi) in degrees.

    Returns the layout (N, CA, C, O, then side chain, per residue) and coordinates [N, 3] (float64).  Omega is
    trans (180 degrees) everywhere; the first residue's phi is unused and the last residue's psi only places its O.
    ``chis`` maps a residue index (0-based) to its chi angles, overriding the default rotamer.
    """
    seq3 = []
    for i, letter in enumerate(sequence.upper()):
        if letter not in ONE_TO_THREE:
            raise ValueError(
                f"residue {i + 1} ({letter!r}) is not in the supported alphabet {''.join(sorted(ONE_TO_THREE))}"
            )
        seq3.append(ONE_TO_THREE[letter])
    phi_psi = np.asarray(phi_psi, dtype=np.float64)
    if phi_psi.shape != (len(seq3), 2):
        raise ValueError(f"phi_psi has shape {phi_psi.shape}, expected ({len(seq3)}, 2)")
    chis = chis or {}

    # Start frame: N at the origin, CA along x, C in the xy plane.
    geo = _backbone_geometry(seq3[0])
    n = np.zeros(3)
    ca = np.array([geo["N-CA"], 0.0, 0.0])
    t = np.radians(180.0 - geo["N-CA-C"])
    c = ca + geo["CA-C"] * np.array([np.cos(t), np.sin(t), 0.0])

    names, elements, res_names, res_seqs, xyz = [], [], [], [], []

    def add(name, element, pos, i):
        names.append(name)
        elements.append(element)
        res_names.append(seq3[i])
        res_seqs.append(first_residue + i)
        xyz.append(pos)

    for i, rn in enumerate(seq3):
        geo = _backbone_geometry(rn)
        phi, psi = phi_psi[i]
        if i > 0:
            prev_geo = _backbone_geometry(seq3[i - 1])
            prev_n, prev_ca, prev_c = n, ca, c
            n = nerf(prev_n, prev_ca, prev_c, prev_geo["C-N"], prev_geo["CA-C-N"], phi_psi[i - 1][1])
            ca = nerf(prev_ca, prev_c, n, geo["N-CA"], geo["C-N-CA"], OMEGA_TRANS)
            c = nerf(prev_c, n, ca, geo["CA-C"], geo["N-CA-C"], phi)
        # O is trans to the next N about CA-C: dihedral N-CA-C-O = psi + 180.
        o = nerf(n, ca, c, geo["C-O"], geo["CA-C-O"], psi + 180.0)
        add("N", "N", n, i)
        add("CA", "C", ca, i)
        add("C", "C", c, i)
        add("O", "O", o, i)
        if rn == "GLY":
            continue
        atoms = {"N": n, "CA": ca, "C": c, "CB": _place_cb(n, ca, c, rn)}
        add("CB", "C", atoms["CB"], i)
        chi = chis.get(i, _ROTAMERS.get(rn, ()))
        for name, element, (r1, r2, r3), bond, angle, chi_index, offset in _SIDE_CHAINS[rn]:
            torsion = offset + (chi[chi_index] if chi_index is not None else 0.0)
            atoms[name] = nerf(atoms[r1], atoms[r2], atoms[r3], bond, angle, torsion)
            add(name, element, atoms[name], i)

    layout = AtomLayout(
        chain_id=np.full(len(names), chain, dtype=object),
        res_seq=np.array(res_seqs, dtype=np.int64),
        res_name=np.array(res_names, dtype=object),
        atom_name=np.array(names, dtype=object),
        element=np.array(elements, dtype=object),
    )
    return layout, np.array(xyz, dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------
# the two-state peptide


@dataclass
class TwoStatePeptide:
    """Two conformations of one peptide that differ only in ``loop_mask`` atoms (the loop)."""

    layout: AtomLayout
    coords_a: np.ndarray  # [N, 3] float32
    coords_b: np.ndarray  # [N, 3] float32
    loop_mask: np.ndarray  # [N] bool: the atoms that move between A and B
    loop: tuple[int, int]  # first and last loop residue number
    sequence: str


def crankshaft(
    coords: np.ndarray, axis_from: np.ndarray, axis_to: np.ndarray, mask: np.ndarray, angle_deg: float
) -> np.ndarray:
    """Rotate ``coords[mask]`` by ``angle_deg`` about the line through ``axis_from`` and ``axis_to`` (Rodrigues)."""
    k = (axis_to - axis_from) / np.linalg.norm(axis_to - axis_from)
    t = np.radians(angle_deg)
    v = coords[mask] - axis_from
    rotated = v * np.cos(t) + np.cross(k, v) * np.sin(t) + np.outer(v @ k, k) * (1.0 - np.cos(t))
    out = np.array(coords, dtype=np.float64, copy=True)
    out[mask] = rotated + axis_from
    return out


def _moving_atoms(layout: AtomLayout, loop: tuple[int, int]) -> np.ndarray:
    """Atoms strictly between the pivot CAs along the chain: C, O of the first pivot, the loop, N of the second."""
    first, last = loop
    rs, names = layout.res_seq, layout.atom_name
    loop = (rs >= first) & (rs <= last)
    return loop | ((rs == first - 1) & np.isin(names, ["C", "O"])) | ((rs == last + 1) & (names == "N"))


def _close_in_bond_graph(layout: AtomLayout, bonds: int = 2) -> np.ndarray:
    """[N, N] bool: atom pairs at most ``bonds`` covalent bonds apart (and the diagonal), from the residue topology
    (guidance.structures.geometry's Engh & Huber templates), not from distances -- so an overlap cannot pass for a bond."""
    from guidance.structures.geometry import build_restraints

    pairs = build_restraints(layout).bonds
    step = np.eye(len(layout), dtype=np.int64)
    step[pairs[:, 0], pairs[:, 1]] = step[pairs[:, 1], pairs[:, 0]] = 1
    within = step.copy()
    for _ in range(bonds - 1):
        within = np.minimum(within @ step, 1)
    return within.astype(bool)


def _closest_nonbonded(layout: AtomLayout, coords: np.ndarray, close: np.ndarray) -> tuple[float, str]:
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    d[close] = np.inf
    i, j = np.unravel_index(np.argmin(d), d.shape)
    keys = layout.keys()
    return float(d[i, j]), f"{keys[i][2]} {keys[i][1]} - {keys[j][2]} {keys[j][1]}"


def build_two_state_peptide(
    sequence: str = DEFAULT_SEQUENCE,
    loop: tuple[int, int] = DEFAULT_LOOP,
    swing_deg: float = DEFAULT_SWING_DEG,
    *,
    phi_psi=None,
    min_distance: float = MIN_NONBONDED_DISTANCE,
) -> TwoStatePeptide:
    """Build the two-state peptide (chain A, residues numbered from 1, heavy atoms only).

    The default is a 27-residue helix-loop-helix (helix 1-9, Gly 10, loop 11-16, Gly 17, helix 18-27) whose
    loop turns by 134.49 degrees between the states (loop backbone RMSD about 9.8 A).  ``phi_psi`` ([n, 2] degrees)
    is required for any sequence length or loop other than the default design; a different sequence of the same
    length reuses the default backbone with its own side chains.  Positive ``swing_deg`` turns the loop
    right-handedly about the axis from CA(first - 1) to CA(last + 1).  Raises ``ValueError`` if either state has
    two atoms more than two bonds apart closer than ``min_distance`` A.  Deterministic: no randomness.
    """
    sequence = sequence.upper()
    first, last = int(loop[0]), int(loop[1])
    if not 2 <= first <= last <= len(sequence) - 1:
        raise ValueError(
            f"loop {loop} must lie inside residues 2..{len(sequence) - 1} so that both flanking (pivot) residues exist"
        )
    if phi_psi is None:
        if len(sequence) != len(DEFAULT_SEQUENCE) or (first, last) != DEFAULT_LOOP:
            raise ValueError(
                f"the built-in backbone is for {len(DEFAULT_SEQUENCE)} residues with loop {DEFAULT_LOOP};"
                f" pass phi_psi ([{len(sequence)}, 2] degrees) for a {len(sequence)}-residue peptide with loop {loop}"
            )
        phi_psi = DEFAULT_PHI_PSI
        chis = DEFAULT_CHIS
    else:
        chis = None
    layout, coords_a = build_peptide(sequence, phi_psi, chis=chis)
    index = layout.index()
    moving = _moving_atoms(layout, (first, last))
    coords_b = crankshaft(coords_a, coords_a[index[("A", first - 1, "CA")]], coords_a[index[("A", last + 1, "CA")]],
                          moving, swing_deg)
    close = _close_in_bond_graph(layout)
    for state, xyz in (("A", coords_a), ("B", coords_b)):
        dist, pair = _closest_nonbonded(layout, xyz, close)
        if dist < min_distance:
            raise ValueError(
                f"state {state} has a clash: atoms {pair} are {dist:.2f} A apart (< {min_distance} A);"
                " choose another swing_deg, loop, phi_psi or sequence"
            )
    return TwoStatePeptide(
        layout=layout,
        coords_a=coords_a.astype(np.float32),
        coords_b=coords_b.astype(np.float32),
        loop_mask=moving,
        loop=(first, last),
        sequence=sequence,
    )


def write_two_state_structure(path, peptide: TwoStatePeptide, occupancies=(0.6, 0.4)) -> Path:
    """Write the two states as one model with altlocs A / B on the loop atoms (PDB, or mmCIF by suffix)."""
    from guidance.structures.io import write_altloc_structure

    coords = np.stack([peptide.coords_a, peptide.coords_b]).astype(np.float64)
    return write_altloc_structure(path, peptide.layout, coords, occupancies, ids=("A", "B"))
