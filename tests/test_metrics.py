"""Structural metrics: superposition, RMSD, altloc assignment, LDDT, region RMSD, recovery and geometry reports."""

import numpy as np
import pytest

from guidance.structures.metrics import (
    ENGH_HUBER_1991,
    altloc_assignment,
    geometry_report,
    kabsch,
    lddt,
    recovery,
    region_rmsd,
    rmsd,
    superpose,
)
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
    ideal = {term: mean for term, (mean, _sd) in ENGH_HUBER_1991["default"].items()}
    b_nca, b_cac, b_cn, b_co = ideal["N-CA"], ideal["CA-C"], ideal["C-N"], ideal["C-O"]
    a_ncac, a_cacn, a_cnca, a_caco = ideal["N-CA-C"], ideal["CA-C-N"], ideal["C-N-CA"], ideal["CA-C-O"]
    n = np.zeros(3)
    ca = np.array([b_nca, 0.0, 0.0])
    c = ca + b_cac * np.array([-np.cos(np.radians(a_ncac)), np.sin(np.radians(a_ncac)), 0.0])
    residues = []
    for i in range(n_res):
        o = place(n, ca, c, b_co, a_caco, psi + 180.0)  # planar: O-C-N = 360 - CA-C-O - CA-C-N = 123.0, ideal too
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


def test_engh_huber_backbone_values_are_the_published_ones():
    # Engh & Huber (1991) backbone means (sds), as transcribed in guidance/structures/data/engh_huber_1991.csv
    assert ENGH_HUBER_1991["default"] == {
        "N-CA": (1.458, 0.019), "CA-C": (1.525, 0.021), "C-N": (1.329, 0.014), "N-CA-C": (111.2, 2.8),
        "C-O": (1.231, 0.020), "CA-C-N": (116.2, 2.0), "C-N-CA": (121.7, 1.8), "CA-C-O": (120.8, 1.7)}
    assert ENGH_HUBER_1991["GLY"] == {
        "N-CA": (1.451, 0.016), "CA-C": (1.516, 0.018), "C-N": (1.329, 0.014), "N-CA-C": (112.5, 2.9),
        "C-O": (1.231, 0.020), "CA-C-N": (116.4, 2.1), "C-N-CA": (120.6, 1.7), "CA-C-O": (120.8, 2.1)}
    assert ENGH_HUBER_1991["PRO"] == {"N-CA": (1.466, 0.015), "CA-C": (1.525, 0.021), "C-N": (1.341, 0.016),
                                      "N-CA-C": (111.8, 2.5)}
    # the peptide carbon is planar: its three angles add up to 360 degrees
    d = ENGH_HUBER_1991["default"]
    assert d["CA-C-O"][0] + d["CA-C-N"][0] + 123.0 == pytest.approx(360.0)  # O-C-N 123.0 (TRANS link)


def test_ideal_backbone_has_zero_rmsz_and_no_clashes():
    layout, xyz = ideal_helix()
    report = geometry_report(layout, np.stack([xyz, xyz + 5.0]))
    assert report["n_members"] == 2 and report["n_residues_backbone"] == 12
    assert report["n_bonds"] == 12 * 3 + 11 and report["n_angles"] == 12 * 2 + 11 * 3
    assert report["bond_rmsz"] < 1e-6 and report["angle_rmsz"] < 1e-6
    assert report["bond_outliers"] == 0 and report["angle_outliers"] == 0
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


# ---------------------------------------------------------------------------------------------------------- lddt


def lddt_by_hand(model, ref, residue, radius=15.0, thresholds=(0.5, 1.0, 2.0, 4.0)) -> float:
    """LDDT by its definition, one pair at a time (Mariani et al. 2013, global score)."""
    preserved, total = np.zeros(len(thresholds)), 0
    for i in range(len(ref)):
        for j in range(i + 1, len(ref)):
            d_ref = float(np.sqrt(np.sum((ref[i] - ref[j]) ** 2)))
            if residue[i] == residue[j] or d_ref >= radius:
                continue
            total += 1
            d_mod = float(np.sqrt(np.sum((model[i] - model[j]) ** 2)))
            for k, t in enumerate(thresholds):
                preserved[k] += abs(d_mod - d_ref) < t
    return float(np.mean(preserved / total))


def compact_chain(rng, n_res=20, atoms_per_res=4):
    """A compact random chain (atoms 1.5 A apart, folded into a ~10 A blob) with residue labels."""
    steps = rng.normal(size=(n_res * atoms_per_res, 3))
    steps *= 1.5 / np.linalg.norm(steps, axis=1, keepdims=True)
    xyz = np.cumsum(steps, axis=0)
    xyz = (xyz - xyz.mean(0)) * 0.8
    return xyz, np.repeat(np.arange(n_res), atoms_per_res)


def test_lddt_of_identical_structures_is_one_and_is_blind_to_rigid_motion():
    rng = np.random.default_rng(7)
    ref, residue = compact_chain(rng)
    assert lddt(ref, ref, residue_ids=residue) == 1.0
    moved = ref @ random_rotation(rng).T + np.array([30.0, -4.0, 11.0])
    assert lddt(moved, ref, residue_ids=residue) == pytest.approx(1.0)  # distances only: no superposition needed


@pytest.mark.parametrize("noise", [0.2, 0.7, 1.5, 3.0])
def test_lddt_matches_a_pair_by_pair_count(noise):
    rng = np.random.default_rng(8)
    ref, residue = compact_chain(rng)
    model = ref + rng.normal(size=ref.shape) * noise
    expected = lddt_by_hand(model, ref, residue)
    assert lddt(model, ref, residue_ids=residue) == pytest.approx(expected, abs=1e-12)
    # without residue labels every pair counts, including pairs inside one residue
    assert lddt(model, ref) == pytest.approx(lddt_by_hand(model, ref, np.arange(len(ref))), abs=1e-12)


def test_lddt_known_value_for_three_atoms():
    # atoms on a line at 0, 5 and 12 A; the third moves out by 0.75 A: two of three pair distances change by 0.75 A,
    # preserved at 1, 2, 4 A but not at 0.5 A -> (1/3 + 1 + 1 + 1) / 4
    ref = np.array([[0.0, 0, 0], [5.0, 0, 0], [12.0, 0, 0]])
    model = ref.copy()
    model[2, 0] += 0.75
    assert lddt(model, ref) == pytest.approx((1 / 3 + 3) / 4)
    # an atom beyond the inclusion radius of every other atom adds no pair, wherever the model puts it
    ref4, model4 = np.vstack([ref, [100.0, 0, 0]]), np.vstack([model, [50.0, 3.0, 0]])
    assert lddt(model4, ref4) == pytest.approx((1 / 3 + 3) / 4)
    # masking the moved atom leaves one preserved pair
    assert lddt(model, ref, mask=np.array([True, True, False])) == 1.0


def test_lddt_of_a_scrambled_model_is_low():
    rng = np.random.default_rng(9)
    ref, residue = compact_chain(rng)
    scrambled = ref[rng.permutation(len(ref))]
    assert lddt(scrambled, ref, residue_ids=residue) < 0.35
    assert lddt(ref + rng.normal(size=ref.shape) * 0.1, ref, residue_ids=residue) > 0.95


def test_lddt_leaves_out_pairs_inside_one_residue_when_told_the_residues():
    # A and B (residue 0) sit 5 A from C (residue 1); B swings round C: only the A-B distance changes (7.07 -> 10 A)
    ref = np.array([[5.0, 0, 0], [0.0, 5, 0], [0.0, 0, 0]])
    model = ref.copy()
    model[1] = [-5.0, 0, 0]
    assert lddt(model, ref, residue_ids=["0", "0", "1"]) == 1.0
    assert lddt(model, ref) == pytest.approx((2 / 3 + 2 / 3 + 2 / 3 + 1) / 4)  # A-B counted: preserved at 4 A only


def test_lddt_rejects_pairless_input():
    with pytest.raises(ValueError, match="inclusion radius"):
        lddt(np.zeros((2, 3)) + [[0, 0, 0], [20, 0, 0]], np.array([[0.0, 0, 0], [20, 0, 0]]))


# ------------------------------------------------------------------------------------------------ region RMSD


def test_region_rmsd_measures_the_region_with_the_rest_in_register():
    rng = np.random.default_rng(11)
    refs, region = altloc_references(rng)  # altloc B = A with the region moved by (2.5, -1.5, 1.0)
    shift = np.linalg.norm([2.5, -1.5, 1.0])
    member = refs[1] @ random_rotation(rng).T + np.array([-8.0, 3.0, 20.0])  # state B, anywhere in space
    assert region_rmsd(member, refs[1], region) == pytest.approx(0.0, abs=1e-9)
    assert region_rmsd(member, refs[0], region) == pytest.approx(shift, abs=1e-9)
    # fitting on the region itself instead hides the displacement
    assert region_rmsd(member, refs[0], region, fit_mask=region) == pytest.approx(0.0, abs=1e-9)


def test_region_rmsd_needs_atoms_to_fit_on():
    x = np.random.default_rng(12).normal(size=(5, 3))
    with pytest.raises(ValueError, match="at least 3 atoms"):
        region_rmsd(x, x, np.array([True, True, True, False, False]))


# ------------------------------------------------------------------------------------------------ recovery


def test_recovery_counts_the_states_some_member_comes_within_the_threshold_of():
    out = recovery({"A": 0.4, "B": 1.0, "C": 2.3, "D": None}, threshold=1.0)
    assert out["recovered"] == {"A": True, "B": True, "C": False, "D": False}
    assert out["n_recovered"] == 2 and out["n_states"] == 4 and out["fraction"] == 0.5


def test_recovery_reads_altloc_assignment_output():
    rng = np.random.default_rng(13)
    refs, region = altloc_references(rng)
    members = np.stack([refs[0] + rng.normal(size=(N_ATOMS, 3)) * 0.05] * 2)  # both members near A only
    assigned = altloc_assignment(members, [0.5, 0.5], refs, ["A", "B"], region)
    out = recovery(assigned, threshold=1.0)
    assert out["recovered"] == {"A": True, "B": False} and out["fraction"] == 0.5
    assert recovery({})["fraction"] is None


def test_symmetric_side_chain_atoms_are_compared_under_their_better_naming():
    """A Phe ring turned by 180 degrees about CB-CG is the same molecule with CD1/CD2 and CE1/CE2 renamed: its region
    RMSD is zero under the swap rule (as in LDDT) and ~2.2 A without.  Asn OD1/ND2 are not interchangeable."""
    from guidance.fixtures import build_peptide
    from guidance.structures.metrics import region_rmsd, symmetric_swaps
    from predictors.rotamers import set_chis

    helix = [(-57.0, -47.0)] * 4
    layout, xyz = build_peptide("AFNA", helix, chis={1: (-65.0, -85.0), 2: (-65.0, -20.0)})
    swaps = symmetric_swaps(layout)
    assert len(swaps) == 1 and sorted(layout.atom_name[swaps[0][0]]) == ["CD1", "CE1"]
    phe = layout.res_seq == 2
    names = layout.atom_name[phe].tolist()
    flipped = xyz.copy()
    flipped[phe] = set_chis(names, xyz[phe], "PHE", (-65.0, 95.0))  # chi2 + 180: the same ring, names exchanged
    region = phe | (layout.res_seq == 3)
    assert region_rmsd(flipped, xyz, region) > 1.0
    assert region_rmsd(flipped, xyz, region, swaps=swaps) < 0.01  # the built ring is symmetric to ~0.003 A
    asn = layout.res_seq == 3
    turned = xyz.copy()
    turned[asn] = set_chis(layout.atom_name[asn].tolist(), xyz[asn], "ASN", (-65.0, 160.0))
    assert region_rmsd(turned, xyz, region, swaps=swaps) == pytest.approx(region_rmsd(turned, xyz, region))
