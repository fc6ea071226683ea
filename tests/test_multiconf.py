"""Ensembles <-> multiconformer (altloc) models: clustering members per residue gives altlocs whose occupancies are
the members' summed weights, and a multiconformer model read back as an ensemble keeps every residue's occupancies."""

from __future__ import annotations

from pathlib import Path

import gemmi
import numpy as np
import pytest

from guidance.structures.multiconf import (
    MulticonfModel,
    ensemble_to_multiconf,
    multiconf_to_ensemble,
    read_altloc_ensemble,
    read_multiconf,
    write_multiconf,
)
from guidance.structures.io import read_structure
from predictors.base import AtomLayout

PEPTIDES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "structures" / "multiconf-peptides"

# ----------------------------------------------------------------------------------------------------------------
# a real tripeptide geometry (ALA-SER-ALA, as in qFit's ASA test peptide), built in code so these tests always run

_ASA = [  # residue, name, atom, element, x, y, z
    (1, "ALA", "N", "N", 0.661, 1.882, 2.716), (1, "ALA", "CA", "C", 2.002, 1.825, 2.146),
    (1, "ALA", "C", "C", 2.974, 2.688, 2.942), (1, "ALA", "O", "O", 2.902, 3.916, 2.906),
    (1, "ALA", "CB", "C", 1.976, 2.260, 0.689),
    (2, "SER", "N", "N", 3.885, 2.037, 3.661), (2, "SER", "CA", "C", 4.884, 2.713, 4.476),
    (2, "SER", "C", "C", 6.272, 2.339, 3.980), (2, "SER", "O", "O", 6.604, 1.152, 3.888),
    (2, "SER", "CB", "C", 4.731, 2.347, 5.955), (2, "SER", "OG", "O", 3.498, 2.818, 6.472),
    (3, "ALA", "N", "N", 7.076, 3.348, 3.662), (3, "ALA", "CA", "C", 8.432, 3.124, 3.174),
    (3, "ALA", "C", "C", 9.458, 3.813, 4.067), (3, "ALA", "O", "O", 9.520, 5.041, 4.125),
    (3, "ALA", "CB", "C", 8.566, 3.610, 1.739),
]
LAYOUT = AtomLayout(
    chain_id=["A"] * len(_ASA), res_seq=[a[0] for a in _ASA], res_name=[a[1] for a in _ASA],
    atom_name=[a[2] for a in _ASA], element=[a[3] for a in _ASA],
)
XYZ = np.array([a[4:] for a in _ASA])
RES2 = np.flatnonzero(LAYOUT.res_seq == 2)
OG, CB, CA2 = (LAYOUT.index()[("A", 2, n)] for n in ("OG", "CB", "CA"))
C2, N3 = LAYOUT.index()[("A", 2, "C")], LAYOUT.index()[("A", 3, "N")]


def _serine_rotamer(degrees: float) -> np.ndarray:
    """The tripeptide with the serine OG turned about CA-CB by ``degrees`` (chi1 + degrees)."""
    axis = XYZ[CB] - XYZ[CA2]
    axis /= np.linalg.norm(axis)
    v = XYZ[OG] - XYZ[CB]
    t = np.radians(degrees)
    rotated = v * np.cos(t) + np.cross(axis, v) * np.sin(t) + axis * (axis @ v) * (1 - np.cos(t))
    out = XYZ.copy()
    out[OG] = XYZ[CB] + rotated
    return out


def _records(model: MulticonfModel) -> dict:
    """(atom key, altloc) -> (xyz, occupancy): what a file says, independent of record order."""
    keys = model.layout.keys()
    return {(keys[a], alt): (xyz, occ) for a, alt, xyz, occ in
            zip(model.atom.tolist(), model.altloc.tolist(), model.coords, model.occupancy.tolist())}


def _assert_same_records(a: MulticonfModel, b: MulticonfModel, coord_tol=1e-3, occ_tol=1e-3):
    ra, rb = _records(a), _records(b)
    assert sorted(ra) == sorted(rb)
    for key, (xyz, occ) in ra.items():
        np.testing.assert_allclose(rb[key][0], xyz, atol=coord_tol, err_msg=str(key))
        assert rb[key][1] == pytest.approx(occ, abs=occ_tol), key


def _bond_lengths_a_reader_forms(model: MulticonfModel, i: int, j: int) -> dict[tuple[str, str], float]:
    """Lengths of bond i-j for the altloc pairs a reader links: the same id, or blank with any id."""
    out = {}
    for ri in model.records(i):
        for rj in model.records(j):
            a, b = model.altloc[ri], model.altloc[rj]
            if a == b or not a or not b:
                out[(a, b)] = float(np.linalg.norm(model.coords[ri] - model.coords[rj]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# ensemble -> multiconformer model


def _two_rotamer_ensemble():
    """Five members: three near one serine rotamer (weights 0.2, 0.3, 0.2), two near another (0.1, 0.2)."""
    rng = np.random.default_rng(1)
    base = np.stack([XYZ] * 3 + [_serine_rotamer(120.0)] * 2)
    return base + rng.normal(scale=0.02, size=base.shape), np.array([0.2, 0.3, 0.2, 0.1, 0.2])


def test_two_clusters_weighted_07_and_03_become_altlocs_a_and_b_with_those_occupancies():
    coords, weights = _two_rotamer_ensemble()
    model = ensemble_to_multiconf(LAYOUT, coords, weights)
    altlocs = model.altlocs()
    assert altlocs[("A", 2)] == pytest.approx({"A": 0.7, "B": 0.3})
    assert altlocs[("A", 1)] == {} and altlocs[("A", 3)] == {}  # one cluster: no altloc
    ids, x, occ, idx = model.conformations("A", 2)
    assert ids == ["A", "B"] and occ == pytest.approx([0.7, 0.3])
    # each altloc is the weighted mean of its members; a blank residue is the mean of all of them
    np.testing.assert_allclose(x[0], np.average(coords[:3, idx], axis=0, weights=weights[:3]), atol=1e-12)
    np.testing.assert_allclose(x[1], np.average(coords[3:, idx], axis=0, weights=weights[3:]), atol=1e-12)
    res1 = model.conformations("A", 1)
    np.testing.assert_allclose(res1[1][0], np.average(coords[:, res1[3]], axis=0, weights=weights), atol=1e-12)
    group = next(g for g in model.groups if g.residues == (("A", 2),))
    assert group.ids == ("A", "B") and group.members.tolist() == [0, 0, 0, 1, 1]


def test_members_within_the_threshold_merge_and_members_beyond_it_get_their_own_altloc():
    shift = np.zeros_like(XYZ)
    shift[RES2] = [0.0, 0.0, 1.0]  # moving residue 2 rigidly by d gives an RMSD of d over its atoms
    for d, expected in ((0.3, {}), (0.45, {}), (0.55, {"A": 0.5, "B": 0.5}), (0.7, {"A": 0.5, "B": 0.5})):
        model = ensemble_to_multiconf(LAYOUT, np.stack([XYZ, XYZ + d * shift]), [0.5, 0.5], threshold=0.5)
        assert model.altlocs()[("A", 2)] == pytest.approx(expected), d
    # complete linkage: a chain of members 0.2, 0.4 and 0.3 A apart does not collapse into one 0.9 A wide cluster
    chain = np.stack([XYZ + d * shift for d in (0.0, 0.2, 0.6, 0.9)])
    model = ensemble_to_multiconf(LAYOUT, chain, [0.25] * 4, threshold=0.5)
    ids, _, occ, idx = model.conformations("A", 2)
    assert len(ids) == 2 and occ == pytest.approx([0.5, 0.5])
    spread = [np.ptp(chain[g.members == c][:, idx, 2], axis=0).max()
              for g in model.groups if g.residues == (("A", 2),) for c in range(2)]
    assert max(spread) <= 0.5 + 1e-9


def test_more_clusters_than_the_cap_merge_the_most_similar_ones_and_keep_all_occupancy():
    angles = [0.0, 20.0, 120.0, 140.0, 240.0, 300.0]  # 0/20 and 120/140 are the closest pairs
    coords = np.stack([_serine_rotamer(a) for a in angles])
    weights = np.array([0.1, 0.15, 0.2, 0.05, 0.3, 0.2])
    uncapped = ensemble_to_multiconf(LAYOUT, coords, weights, threshold=0.05, max_altlocs=6)
    assert list(uncapped.altlocs()[("A", 2)]) == list("ABCDEF")
    model = ensemble_to_multiconf(LAYOUT, coords, weights, threshold=0.05)  # default cap: 4
    occ = model.altlocs()[("A", 2)]
    # letters by decreasing occupancy; the 0.25/0.25 tie goes to the cluster holding the lower member index
    assert occ == pytest.approx({"A": 0.3, "B": 0.25, "C": 0.25, "D": 0.2})
    group = next(g for g in model.groups if g.residues == (("A", 2),))
    assert group.members.tolist() == [1, 1, 2, 2, 0, 3]
    two = ensemble_to_multiconf(LAYOUT, coords, weights, threshold=0.05, max_altlocs=2)
    assert sum(two.altlocs()[("A", 2)].values()) == pytest.approx(1.0) and len(two.altlocs()[("A", 2)]) == 2
    # altlocs lighter than min_occupancy are dissolved into their nearest neighbour
    light = ensemble_to_multiconf(LAYOUT, coords, weights, threshold=0.05, max_altlocs=6, min_occupancy=0.12)
    assert all(v >= 0.12 for v in light.altlocs()[("A", 2)].values())
    assert sum(light.altlocs()[("A", 2)].values()) == pytest.approx(1.0)


def test_zero_weight_members_are_left_out():
    coords = np.stack([XYZ, _serine_rotamer(120.0), _serine_rotamer(240.0)])
    model = ensemble_to_multiconf(LAYOUT, coords, [0.6, 0.4, 0.0])
    assert model.altlocs()[("A", 2)] == pytest.approx({"A": 0.6, "B": 0.4})
    assert model.groups[1].members.tolist() == [0, 1, -1]


def test_medoid_altlocs_are_members_own_coordinates():
    coords, weights = _two_rotamer_ensemble()
    model = ensemble_to_multiconf(LAYOUT, coords, weights, center="medoid")
    _, x, _, idx = model.conformations("A", 2)
    for k, members in ((0, range(3)), (1, range(3, 5))):
        assert any(np.array_equal(x[k], coords[m][idx]) for m in members)


def test_superposing_on_a_fit_set_removes_rigid_motion_before_clustering():
    rot = gemmi.Mat33([[0, -1, 0], [1, 0, 0], [0, 0, 1]])  # 90 degrees about z
    turned = np.array([rot.multiply(gemmi.Vec3(*p)).tolist() for p in _serine_rotamer(120.0)]) + [5.0, -3.0, 2.0]
    coords, weights = np.stack([XYZ, turned]), [0.6, 0.4]
    assert all(ensemble_to_multiconf(LAYOUT, coords, weights).altlocs().values())  # every residue "moves"
    backbone = np.isin(LAYOUT.atom_name, ["N", "CA", "C", "O"])
    model = ensemble_to_multiconf(LAYOUT, coords, weights, fit=backbone)
    altlocs = model.altlocs()
    assert altlocs[("A", 1)] == {} and altlocs[("A", 3)] == {}
    assert altlocs[("A", 2)] == pytest.approx({"A": 0.6, "B": 0.4})
    # written in the frame of the heaviest member
    np.testing.assert_allclose(model.conformations("A", 2)[1][1], _serine_rotamer(120.0)[RES2], atol=1e-6)


def test_a_segment_shares_its_letters_while_residues_label_their_own():
    # residue 2 splits {m0} | {m1, m2}; residue 3 splits {m0, m1} | {m2}: per residue, "A" is a different member set
    moved3 = XYZ.copy()
    moved3[LAYOUT.res_seq == 3] += [0.0, 1.0, 0.0]
    moved3[OG] = _serine_rotamer(120.0)[OG]
    coords = np.stack([XYZ, _serine_rotamer(120.0), moved3])
    weights = np.array([0.4, 0.2, 0.4])
    per_residue = ensemble_to_multiconf(LAYOUT, coords, weights)
    groups = {g.residues: g for g in per_residue.groups}
    assert groups[(("A", 2),)].members.tolist() == [1, 0, 0]  # A = {m1, m2}, 0.6
    assert groups[(("A", 3),)].members.tolist() == [0, 0, 1]  # A = {m0, m1}, 0.6
    for segments in (None, [("A", 2, 3)]):
        model = ensemble_to_multiconf(LAYOUT, coords, weights, by="segment", segments=segments)
        group = next(g for g in model.groups if len(g.residues) == 2)
        assert group.residues == (("A", 2), ("A", 3)) and group.members.tolist() == [0, 2, 1]
        for res in (2, 3):  # each letter is one member in both residues
            ids, x, occ, idx = model.conformations("A", res)
            assert ids == ["A", "B", "C"] and occ == pytest.approx([0.4, 0.4, 0.2])
            for k, m in enumerate([0, 2, 1]):
                np.testing.assert_allclose(x[k], coords[m][idx], atol=1e-12)
    # linked letters: residue 3's clusters take the letters of residue 2's clusters they share most weight with
    linked = {g.residues: g for g in ensemble_to_multiconf(LAYOUT, coords, weights, letters="linked").groups}
    assert linked[(("A", 2),)].ids == ("A", "B")  # A = {m1, m2}, B = {m0}
    assert linked[(("A", 3),)].ids == ("B", "A")  # {m0, m1} shares m0 (0.4) with B; {m2} shares 0.4 with A
    with pytest.raises(ValueError, match="overlap"):
        ensemble_to_multiconf(LAYOUT, coords, weights, by="segment", segments=[("A", 1, 2), ("A", 2, 3)])
    with pytest.raises(ValueError, match="no residue"):
        ensemble_to_multiconf(LAYOUT, coords, weights, by="segment", segments=[("B", 1, 2)])


def test_neighbour_atoms_that_move_with_an_altloc_carry_it_so_peptide_bonds_stay_whole():
    # state B shifts residue 2 by 0.8 A and drags the N of residue 3 by 0.4 A; residue 3 still clusters as one
    state_b = XYZ.copy()
    state_b[RES2] += [0.0, 0.8, 0.0]
    state_b[N3] += [0.0, 0.4, 0.0]
    coords, weights = np.stack([XYZ, state_b]), np.array([0.6, 0.4])
    members_bond = {np.linalg.norm(c[C2] - c[N3]) for c in coords}
    model = ensemble_to_multiconf(LAYOUT, coords, weights)
    altlocs = model.altlocs()
    assert altlocs[("A", 2)] == pytest.approx({"A": 0.6, "B": 0.4})
    assert altlocs[("A", 3)] == pytest.approx({"A": 0.6, "B": 0.4})  # only its N ...
    assert [model.altloc[r] for r in model.records(N3)] == ["A", "B"]
    assert all(model.altloc[r] == "" for i in np.flatnonzero(LAYOUT.res_seq == 3)[1:] for r in model.records(i))
    group = next(g for g in model.groups if g.residues == (("A", 2),))
    assert group.linked_atoms.tolist() == [N3]
    # ... and every C(2)-N(3) bond a reader forms is one the members have
    bonds = _bond_lengths_a_reader_forms(model, C2, N3)
    assert set(bonds) == {("A", "A"), ("B", "B")}
    assert all(min(abs(v - m) for m in members_bond) < 1e-9 for v in bonds.values())
    # without the rule, the B conformer's bond to the shared N is off by the drag
    plain = ensemble_to_multiconf(LAYOUT, coords, weights, link_tolerance=None)
    worst = max(min(abs(v - m) for m in members_bond) for v in _bond_lengths_a_reader_forms(plain, C2, N3).values())
    assert worst > 0.1
    # residue 1 did not move with residue 2: it stays blank
    assert altlocs[("A", 1)] == {}


def test_an_ensemble_survives_multiconformer_model_and_back():
    coords, weights = _two_rotamer_ensemble()
    model = ensemble_to_multiconf(LAYOUT, coords, weights)
    ensemble = multiconf_to_ensemble(model)
    assert ensemble.ids == ["A", "B"] and ensemble.weights == pytest.approx([0.7, 0.3])
    again = ensemble_to_multiconf(ensemble.layout, ensemble.coords, ensemble.weights)
    _assert_same_records(model, again, coord_tol=1e-5, occ_tol=1e-9)


@pytest.mark.parametrize("bad, message", [
    ({"coords": np.zeros((2, 5, 3))}, "expected \\[E, 16, 3\\]"),
    ({"weights": [0.5, -0.5]}, "non-negative"),
    ({"weights": [1.0]}, "expected \\(2,\\)"),
    ({"threshold": 0.0}, "threshold"),
    ({"max_altlocs": 27}, "max_altlocs"),
    ({"by": "chain"}, "by must be"),
    ({"segments": [("A", 1, 2)]}, "by='segment'"),
    ({"center": "median"}, "center"),
    ({"letters": "alphabetical"}, "letters"),
    ({"fit": [0, 1]}, "at least 3"),
])
def test_bad_arguments_are_errors_that_say_what_is_wrong(bad, message):
    args = {"coords": np.stack([XYZ, XYZ]), "weights": [0.5, 0.5]} | bad
    coords, weights = args.pop("coords"), args.pop("weights")
    with pytest.raises(ValueError, match=message):
        ensemble_to_multiconf(LAYOUT, coords, weights, **args)


# ----------------------------------------------------------------------------------------------------------------
# files


@pytest.mark.parametrize("name", ["model.pdb", "model.cif", "model.cif.gz"])
def test_written_model_is_read_by_gemmi_read_structure_and_read_multiconf(tmp_path, name):
    coords, weights = _two_rotamer_ensemble()
    model = ensemble_to_multiconf(LAYOUT, coords, weights)
    path = write_multiconf(tmp_path / "out" / name, model)
    assert [p.name for p in path.parent.iterdir()] == [name]  # written atomically
    st = gemmi.read_structure(str(path))
    altloc_atoms = [(r.seqid.num, a.name, a.altloc, round(a.occ, 3)) for r in st[0]["A"] for a in r if a.has_altloc()]
    assert len(altloc_atoms) == 2 * len(RES2)
    assert {(num, alt, occ) for num, _, alt, occ in altloc_atoms} == {(2, "A", 0.7), (2, "B", 0.3)}
    conf = read_structure(path)
    assert conf.kind == "altloc" and conf.ids == ["A", "B"] and conf.weights == pytest.approx([0.7, 0.3])
    assert conf.layout.keys() == LAYOUT.keys()
    _assert_same_records(model, read_multiconf(path))


def test_pdb_rounds_occupancies_to_two_decimals_keeping_their_sum_and_mmcif_keeps_them(tmp_path):
    coords = np.stack([_serine_rotamer(a) for a in (0.0, 120.0, 240.0)])
    model = ensemble_to_multiconf(LAYOUT, coords, [1 / 3] * 3)
    pdb = read_multiconf(write_multiconf(tmp_path / "m.pdb", model)).altlocs()[("A", 2)]
    assert sorted(pdb.values()) == pytest.approx([0.33, 0.33, 0.34]) and sum(pdb.values()) == pytest.approx(1.0)
    cif = read_multiconf(write_multiconf(tmp_path / "m.cif", model)).altlocs()[("A", 2)]
    assert list(cif.values()) == pytest.approx([1 / 3] * 3, abs=1e-6)


def test_residues_with_different_occupancies_become_members_with_exactly_those_marginals(tmp_path):
    """Residue 1 has A/B at 0.6/0.4 and residue 3 at 0.5/0.5: one weight per altloc id cannot hold both, so the
    ensemble has members AA (0.5), A-then-B (0.1) and BB (0.4)."""
    res1, res3 = np.flatnonzero(LAYOUT.res_seq == 1), np.flatnonzero(LAYOUT.res_seq == 3)
    moved1, moved3 = XYZ.copy(), XYZ.copy()
    moved1[res1] += [0.0, 0.0, 1.0]
    moved3[res3] += [0.0, 0.0, 1.0]
    model = MulticonfModel(
        LAYOUT,
        atom=[*res1, *res1, *RES2, *res3, *res3],
        altloc=["A"] * 5 + ["B"] * 5 + [""] * len(RES2) + ["A"] * 5 + ["B"] * 5,
        coords=np.concatenate([XYZ[res1], moved1[res1], XYZ[RES2], XYZ[res3], moved3[res3]]),
        occupancy=[0.6] * 5 + [0.4] * 5 + [1.0] * len(RES2) + [0.5] * 10,
        b_factor=np.full(10 + len(RES2) + 10, 15.0),
    )
    conf = read_altloc_ensemble(write_multiconf(tmp_path / "mixed.cif", model))
    assert conf.ids == ["A", "A+B", "B"] and conf.weights == pytest.approx([0.5, 0.1, 0.4])
    np.testing.assert_allclose(conf.coords[1][res1], XYZ[res1], atol=1e-3)  # residue 1 in A ...
    np.testing.assert_allclose(conf.coords[1][res3], moved3[res3], atol=1e-3)  # ... residue 3 in B
    back = ensemble_to_multiconf(conf.layout, conf.coords, conf.weights)
    assert back.altlocs()[("A", 1)] == pytest.approx({"A": 0.6, "B": 0.4})
    assert back.altlocs()[("A", 3)] == pytest.approx({"A": 0.5, "B": 0.5})
    # read_structure keeps one weight per id: the mean occupancy over all of that id's atoms
    assert read_structure(tmp_path / "mixed.cif").weights == pytest.approx([0.55, 0.45])


# ----------------------------------------------------------------------------------------------------------------
# the shared multiconformer peptides (qFit's test set)

MULTICONF = (
    sorted(p.name for p in PEPTIDES.glob("*_multiconf.pdb")) + ["AWA_2conf.pdb", "AWA_3conf.pdb"]
    if PEPTIDES.is_dir() else ["no-shared-data"]
)


def _distinct_conformations(model: MulticonfModel, chain: str, res: int, tol: float = 1e-3):
    """A residue's conformations with identical ones (within ``tol`` A everywhere) merged, occupancies summed."""
    _, x, occ, _ = model.conformations(chain, res)
    kept_x: list[np.ndarray] = []
    kept_occ: list[float] = []
    for xk, ok in zip(x, occ):
        same = next((j for j, y in enumerate(kept_x) if np.abs(y - xk).max() <= tol), None)
        if same is None:
            kept_x.append(xk)
            kept_occ.append(ok)
        else:
            kept_occ[same] += ok
    return np.array(kept_x), np.array(kept_occ)


@pytest.mark.parametrize("name", MULTICONF)
def test_multiconformer_peptide_survives_ensemble_and_back_and_its_file_rereads_identically(
        shared_data, tmp_path, name):
    """altloc model -> ensemble -> multiconformer model keeps every residue's distinct altlocs (count, coordinates
    to 1e-3 A, occupancies to 1e-3 after normalising within the residue).  Altlocs that are exact copies of each
    other (SKH's HIS 1 and SER 3 list A and B at the same positions) are one conformation and come back merged."""
    path = shared_data(f"structures/multiconf-peptides/{name}")
    original = read_multiconf(path)
    ensemble = multiconf_to_ensemble(original)
    assert ensemble.weights.sum() == pytest.approx(1.0)
    back = ensemble_to_multiconf(ensemble.layout, ensemble.coords, ensemble.weights)
    assert back.layout.keys() == original.layout.keys()
    for chain, res in original.layout.residues():
        want_x, want_occ = _distinct_conformations(original, chain, res)
        ids, got_x, got_occ, _ = back.conformations(chain, res)
        assert len(ids) == len(want_x), (chain, res)
        assert (ids == [""]) == (len(want_x) == 1)
        for xk, ok in zip(want_x, want_occ):
            match = [j for j in range(len(got_x)) if np.abs(got_x[j] - xk).max() <= 1e-3]
            assert len(match) == 1, (chain, res)
            assert got_occ[match[0]] == pytest.approx(ok, abs=1e-3), (chain, res)
    for suffix in (".pdb", ".cif"):
        written = write_multiconf(tmp_path / f"back{suffix}", back)
        _assert_same_records(back, read_multiconf(written))
        assert read_structure(written).layout.keys() == original.layout.keys()
        # the file's own altloc records survive being written by us, too
        _assert_same_records(original, read_multiconf(write_multiconf(tmp_path / f"original{suffix}", original)))


@pytest.mark.parametrize("name", MULTICONF)
def test_altloc_ensemble_matches_read_structure_where_residues_share_their_occupancies(shared_data, name):
    path = shared_data(f"structures/multiconf-peptides/{name}")
    ensemble, conf = read_altloc_ensemble(path), read_structure(path)
    model = read_multiconf(path)
    occupancy_sets = {tuple(np.round(list(v.values()), 3)) for v in model.altlocs().values() if v}
    if len(occupancy_sets) == 1:
        assert ensemble.ids == conf.ids
        np.testing.assert_allclose(ensemble.coords, conf.coords, atol=1e-6)
        np.testing.assert_allclose(ensemble.weights, conf.weights, atol=1e-6)
    # every residue's occupancies are the ensemble's marginals
    for (chain, res), occ in model.altlocs().items():
        if not occ:
            continue
        ids, x, q, idx = model.conformations(chain, res)
        for k in range(len(ids)):
            takes = [np.abs(ensemble.coords[m][idx] - x[k]).max() <= 1e-5 for m in range(len(ensemble.ids))]
            duplicates = [j for j in range(len(ids)) if np.abs(x[j] - x[k]).max() <= 1e-5]
            assert ensemble.weights[takes].sum() == pytest.approx(q[duplicates].sum(), abs=1e-6), (res, ids[k])


def test_gnnafns_with_three_occupancy_patterns_becomes_three_members(shared_data):
    ensemble = read_altloc_ensemble(shared_data("structures/multiconf-peptides/GNNAFNS_multiconf.pdb"))
    # ASN 3 and ASN 6 are A/B 0.6/0.4, PHE 5 is 0.5/0.5: members AAA 0.5, (A, B, A) 0.1, BBB 0.4
    assert ensemble.ids == ["A", "A+B", "B"]
    np.testing.assert_allclose(ensemble.weights, [0.5, 0.1, 0.4], atol=1e-6)


def test_a_written_model_keeps_the_inputs_crystal_waters_and_ligands(shared_data, tmp_path):
    """1dur (deposited: 93 waters; its two Fe4S4 clusters are modelled atoms of the layout, as read_structure keeps
    ligands): the model written from its own conformers, with the input as ``fixed_from``, has the file's cell and
    space group, every water (same atoms and B) and the input's per-atom B; gemmi reads it without a warning, as
    PDB and as mmCIF."""
    import warnings

    import gemmi

    from guidance.structures.io import read_structure

    path = shared_data("xray/1dur/1dur.pdb")
    conf = read_structure(path)
    model = ensemble_to_multiconf(conf.layout, conf.coords, conf.weights, b_factors=conf.b_iso[0])
    source = gemmi.read_structure(str(path))

    def extra(st):  # the residues the layout lacks: (chain, name, number) -> [(atom, B)]
        keys = set(conf.layout.keys())
        return {(c.name, r.name, r.seqid.num): [(a.name, round(a.b_iso, 2)) for a in r]
                for c in st[0] for r in c if not any((c.name, r.seqid.num, a.name) in keys for a in r)}

    want = extra(source)
    assert sum(k[1] == "HOH" for k in want) == 93 and len(want) == 93
    assert sum(r.name == "SF4" for c in source[0] for r in c) == 2
    for name in ("m.pdb", "m.cif"):
        out = write_multiconf(tmp_path / name, model, crystal=conf.crystal, fixed_from=path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            st = gemmi.read_structure(str(out))
        assert not caught, [str(w.message) for w in caught]
        assert st.cell.parameters == pytest.approx(source.cell.parameters) and st.find_spacegroup().xhm() == "P 21 21 21"
        assert extra(st) == want, name
        back = read_structure(out)
        np.testing.assert_allclose(back.b_iso[0], conf.b_iso[0], atol=0.01)
        assert back.crystal is not None and back.crystal[1] == conf.crystal[1]
