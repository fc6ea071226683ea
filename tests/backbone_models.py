"""Small structures the NMR observable tests share: an ideal N-CA-C backbone built from phi/psi (NeRF, the demo's
``guidance.fixtures.nerf``) and the heavy atoms of one model of a PDB file."""

from __future__ import annotations

import math

import gemmi
import numpy as np

from guidance.fixtures import nerf
from observables.base import AtomInfo

# Ideal backbone geometry (A, degrees) for the test peptides.
BOND = {"N-CA": 1.458, "CA-C": 1.525, "C-N": 1.329}
ANGLE = {"N-CA-C": 111.2, "CA-C-N": 116.2, "C-N-CA": 121.7}


def peptide(phis, psis, res_names=None, start=1) -> tuple[AtomInfo, np.ndarray]:
    """Backbone N, CA, C of a peptide with the given phi/psi (degrees; trans peptide bonds): atoms and coords [N, 3]."""
    n_res = len(phis)
    res_names = res_names or ["ALA"] * n_res
    xyz = [np.zeros(3), np.array([BOND["N-CA"], 0.0, 0.0])]
    t = math.radians(180.0 - ANGLE["N-CA-C"])
    xyz.append(xyz[1] + BOND["CA-C"] * np.array([math.cos(t), math.sin(t), 0.0]))
    for i in range(1, n_res):
        n_, ca, c = xyz[-3], xyz[-2], xyz[-1]
        xyz.append(nerf(n_, ca, c, BOND["C-N"], ANGLE["CA-C-N"], psis[i - 1]))
        xyz.append(nerf(ca, c, xyz[-1], BOND["N-CA"], ANGLE["C-N-CA"], 180.0))
        xyz.append(nerf(c, xyz[-2], xyz[-1], BOND["CA-C"], ANGLE["N-CA-C"], phis[i]))
    coords = np.array(xyz, dtype=np.float64)
    atoms = AtomInfo(
        element=np.array(["N", "C", "C"] * n_res),
        atom_name=np.array(["N", "CA", "C"] * n_res),
        res_name=np.repeat(res_names, 3),
        res_seq=np.repeat(np.arange(start, start + n_res), 3),
        chain_id=np.full(3 * n_res, "A"),
        coords=coords[None].astype(np.float32),
    )
    return atoms, coords


def load_model(path, model: int = 0) -> tuple[AtomInfo, np.ndarray]:
    """Heavy atoms of one model of a PDB file as (AtomInfo, coords [N, 3])."""
    st = gemmi.read_structure(str(path))
    st.remove_hydrogens()
    rows = [(a, r, c) for c in st[model] for r in c for a in r]
    coords = np.array([a.pos.tolist() for a, _, _ in rows], dtype=np.float32)
    atoms = AtomInfo(
        element=np.array([a.element.name for a, _, _ in rows]),
        atom_name=np.array([a.name for a, _, _ in rows]),
        res_name=np.array([r.name for _, r, _ in rows]),
        res_seq=np.array([r.seqid.num for _, r, _ in rows]),
        chain_id=np.array([c.name for _, _, c in rows]),
        coords=coords[None],
    )
    return atoms, coords
