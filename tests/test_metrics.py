"""Structural metrics: superposition, RMSD, altloc assignment and backbone geometry checks."""

import numpy as np
import pytest

from guidance.metrics import ENGH_HUBER_1991, altloc_assignment, geometry_report, kabsch, rmsd, superpose
from predictors.base import AtomLayout


def random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# --------------------------------------------------------------------------------------------------------------- kabsch


def test_kabsch_recovers_a_known_rigid_motion():
    rng = np.random.default_rng(0)
    mobile = rng.normal(size=(30, 3)) * 5.0
    rot, t = random_rotation(rng), np.array([3.0, -7.0, 12.0])
    target = mobile @ rot.T + t
    r_fit, t_fit = kabsch(mobile, target)
    assert np.abs(r_fit - rot).max() < 1e-5
    assert np.abs(t_fit - t).max() < 1e-5
    assert np.abs(superpose(mobile, target) - target).max() < 1e-5


def test_kabsch_returns_a_proper_rotation_for_a_mirror_image():
    rng = np.random.default_rng(1)
    mobile = rng.normal(size=(20, 3)) * 4.0
    target = mobile * np.array([1.0, 1.0, -1.0])  # reflection: no rotation can reach it
    r_fit, _ = kabsch(mobile, target)
    assert np.linalg.det(r_fit) == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(r_fit @ r_fit.T, np.eye(3), atol=1e-9)


def test_weighted_kabsch_fits_only_the_weighted_atoms():
    rng = np.random.default_rng(2)
    mobile = rng.normal(size=(12, 3)) * 4.0
    rot, t = random_rotation(rng), np.array([1.0, 2.0, 3.0])
    target = mobile @ rot.T + t
    target[:4] += rng.normal(size=(4, 3)) * 3.0  # corrupt four atoms and give them zero weight
    w = np.r_[np.zeros(4), np.ones(8)]
    r_fit, t_fit = kabsch(mobile, target, w)
    assert np.abs(r_fit - rot).max() < 1e-6 and np.abs(t_fit - t).max() < 1e-6
    moved = superpose(mobile, target, fit_mask=w > 0)
    assert rmsd(moved, target, mask=w > 0) < 1e-6


def test_rmsd_of_identical_structures_is_zero_and_counts_masked_atoms_only():
    x = np.random.default_rng(3).normal(size=(10, 3))
    assert rmsd(x, x) == 0.0
    y = x.copy()
    y[0] += [3.0, 0.0, 0.0]
    assert rmsd(x, y) == pytest.approx(np.sqrt(9.0 / 10))
    assert rmsd(x, y, mask=np.arange(10) > 0) == 0.0


# -------------------------------------------------------------------------------------------------------- altlocs

N_ATOMS, REGION = 24, slice(10, 16)


def altloc_references(rng):
    ref_a = rng.normal(size=(N_ATOMS, 3)) * 6.0
    ref_b = ref_a.copy()
    ref_b[REGION] += np.array([2.5, -1.5, 1.0])  # altloc B: the region moved, the rest shared
    region = np.zeros(N_ATOMS, dtype=bool)
    region[REGION] = True
    return np.stack([ref_a, ref_b]), region


def test_altloc_assignment_fractions_and_best_rmsd():
    rng = np.random.default_rng(4)
    refs, region = altloc_references(rng)
    members = np.stack([refs[0] + rng.normal(size=(N_ATOMS, 3)) * s for s in (0.1, 0.2, 0.3)]
                       + [refs[1] + rng.normal(size=(N_ATOMS, 3)) * 0.15])
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    out = altloc_assignment(members, weights, refs, ["A", "B"], region)
    assert out["A"]["assigned_fraction"] == pytest.approx(0.6)
    assert out["B"]["assigned_fraction"] == pytest.approx(0.4)
    assert out["A"]["members"] == [0, 1, 2] and out["B"]["members"] == [3]
    assert out["A"]["best_rmsd"] == pytest.approx(min(rmsd(m, refs[0], region) for m in members))
    assert out["B"]["best_rmsd"] == pytest.approx(rmsd(members[3], refs[1], region))
    assert out["A"]["best_rmsd"] < 0.3 and out["B"]["best_rmsd"] < 0.3


def test_altloc_ties_go_to_the_first_reference():
    rng = np.random.default_rng(5)
    refs, region = altloc_references(rng)
    same = np.stack([refs[0], refs[0]])
    out = altloc_assignment(refs[:1], [1.0], same, ["A", "B"], region)
    assert out["A"]["assigned_fraction"] == 1.0 and out["B"]["assigned_fraction"] == 0.0
    assert out["B"]["members"] == [] and out["B"]["best_rmsd"] == 0.0


def test_superpose_first_makes_the_assignment_invariant_to_rigid_motion():
    rng = np.random.default_rng(6)
    refs, region = altloc_references(rng)
    members = np.stack([refs[0] + rng.normal(size=(N_ATOMS, 3)) * 0.1, refs[1] + rng.normal(size=(N_ATOMS, 3)) * 0.1])
    weights = np.array([0.7, 0.3])
    moved = members.copy()
    moved[1] = members[1] @ random_rotation(rng).T + np.array([20.0, -5.0, 8.0])

    still = altloc_assignment(members, weights, refs, ["A", "B"], region, superpose_first=True)
    after = altloc_assignment(moved, weights, refs, ["A", "B"], region, superpose_first=True)
    for rid in ("A", "B"):
        assert after[rid]["assigned_fraction"] == pytest.approx(still[rid]["assigned_fraction"])
        assert after[rid]["best_rmsd"] == pytest.approx(still[rid]["best_rmsd"], abs=1e-6)
        assert after[rid]["members"] == still[rid]["members"]
    assert after["B"]["assigned_fraction"] == pytest.approx(0.3)
    # without superposition the moved member is far from both references: only superposing first recognises it as B
    assert min(rmsd(moved[1], ref, region) for ref in refs) > 5.0


# ------------------------------------------------------------------------------------------------------- geometry


def place(a, b, c, bond, angle_deg, torsion_deg):
    """NeRF: the atom d with |cd| = bond, angle(b, c, d) = angle, torsion(a, b, c, d) = torsion."""
    bc = (c - b) / np.linalg.norm(c - b)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    ang, tor = np.radians(angle_deg), np.radians(torsion_deg)
    d_local = bond * np.array([-np.cos(ang), np.sin(ang) * np.cos(tor), np.sin(ang) * np.sin(tor)])
    return c + d_local[0] * bc + d_local[1] * np.cross(n, bc) + d_local[2] * n


def ideal_helix(n_res: int = 12, phi: float = -57.8, psi: float = -47.0):
    """Poly-Ala alpha helix (N, CA, C, O) with Engh & Huber bond lengths and angles, trans peptides."""
    ideal = ENGH_HUBER_1991["default"]
    b_nca, b_cac, b_cn = ideal["N-CA"][0], ideal["CA-C"][0], ideal["C-N"][0]
    a_ncac, a_cacn, a_cnca = ideal["N-CA-C"][0], 116.2, 121.7  # CA-C-N and C-N-CA from the same table
    n = np.zeros(3)
    ca = np.array([b_nca, 0.0, 0.0])
    c = ca + b_cac * np.array([-np.cos(np.radians(a_ncac)), np.sin(np.radians(a_ncac)), 0.0])
    residues = []
    for i in range(n_res):
        o = place(n, ca, c, 1.231, 120.1, psi + 180.0)
        residues.append((n, ca, c, o))
        n_next = place(n, ca, c, b_cn, a_cacn, psi)
        ca_next = place(ca, c, n_next, b_nca, a_cnca, 180.0)
        c_next = place(c, n_next, ca_next, b_cac, a_ncac, phi)
        n, ca, c = n_next, ca_next, c_next
    xyz = np.array([atom for res in residues for atom in res])
    layout = AtomLayout(
        chain_id=["A"] * (4 * n_res),
        res_seq=np.repeat(np.arange(1, n_res + 1), 4),
        res_name=["ALA"] * (4 * n_res),
        atom_name=["N", "CA", "C", "O"] * n_res,
        element=["N", "C", "C", "O"] * n_res,
    )
    return layout, xyz


def test_ideal_backbone_has_zero_rmsz_and_no_clashes():
    layout, xyz = ideal_helix()
    report = geometry_report(layout, np.stack([xyz, xyz + 5.0]))
    assert report["n_members"] == 2 and report["n_residues_backbone"] == 12
    assert report["bond_rmsz"] < 1e-6 and report["angle_rmsz"] < 1e-6
    assert report["clashes_per_1000_atoms"] == 0.0
    assert 3.7 < report["min_ca_ca"] < 3.9  # trans peptide CA-CA distance


def test_a_stretched_bond_raises_the_bond_rmsz():
    layout, xyz = ideal_helix()
    bad = xyz.copy()
    ca, c = bad[4 * 5 + 1], bad[4 * 5 + 2]
    bad[4 * 5 + 2] = ca + (c - ca) * (1.725 / np.linalg.norm(c - ca))  # CA-C 1.525 -> 1.725 A, about 10 sigma
    report = geometry_report(layout, np.stack([xyz, bad]))
    assert report["bond_rmsz"] > 1.0
    assert report["per_member"]["bond_rmsz"][0] < 1e-6 and report["per_member"]["bond_rmsz"][1] > 1.0
    assert report["rmsz_ca_c"] > report["rmsz_n_ca"]


def test_a_planted_clash_is_counted():
    layout, xyz = ideal_helix()
    n, ca, c = xyz[4 * 4: 4 * 4 + 3]
    outward = -((n - ca) / np.linalg.norm(n - ca) + (c - ca) / np.linalg.norm(c - ca))
    water = ca + 1.5 * outward / np.linalg.norm(outward)  # 1.5 A from CA of residue 5, away from its bonded atoms
    layout_w = AtomLayout(
        chain_id=np.append(layout.chain_id, "W"), res_seq=np.append(layout.res_seq, 1),
        res_name=np.append(layout.res_name, "HOH"), atom_name=np.append(layout.atom_name, "O"),
        element=np.append(layout.element, "O"),
    )
    report = geometry_report(layout_w, np.stack([np.vstack([xyz, water]), np.vstack([xyz, water + 30.0])]))
    assert report["per_member"]["clashes"] == [1, 0]
    assert report["clashes_per_1000_atoms"] == pytest.approx(0.5 * 1000.0 / 49)


def test_disulfide_is_not_a_clash():
    layout = AtomLayout(chain_id=["A", "A"], res_seq=[3, 30], res_name=["CYS", "CYS"], atom_name=["SG", "SG"],
                        element=["S", "S"])
    report = geometry_report(layout, np.array([[[0.0, 0.0, 0.0], [2.04, 0.0, 0.0]]]))
    assert report["clashes_per_1000_atoms"] == 0.0
    assert report["bond_rmsz"] is None and report["min_ca_ca"] is None
