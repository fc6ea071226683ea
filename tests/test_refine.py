"""Restrained refinement of multiconformer models (guidance/refine.py) and the xray observable's per-atom target."""

from __future__ import annotations

import numpy as np
import pytest

from guidance.refine import (
    CHIRAL_SD,
    PLANE_SD,
    Refine,
    _ideal_chiral_volume,
    _z_terms,
    _geometry_arrays,
    geometry_summary,
    nonbonded_pairs,
    occupancy_groups,
    record_geometry,
    refine,
)
from guidance.structures.geometry import geometry_rmsz
from guidance.structures.multiconf import MulticonfModel, ensemble_to_multiconf, read_multiconf


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def test_ideal_chiral_volume_is_the_triple_product_of_bond_vectors_with_those_lengths_and_angles():
    rng = np.random.default_rng(1)
    a, b, c = (_unit(rng.normal(size=3)) for _ in range(3))
    lengths = (1.46, 1.53, 1.52)
    vecs = [v * length for v, length in zip((a, b, c), lengths)]
    angle = lambda u, v: np.degrees(np.arccos(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v)))  # noqa: E731
    bonds = {frozenset((0, 1)): lengths[0], frozenset((0, 2)): lengths[1], frozenset((0, 3)): lengths[2]}
    angles = {(1, 0, 2): angle(vecs[0], vecs[1]), (1, 0, 3): angle(vecs[0], vecs[2]), (2, 0, 3): angle(vecs[1], vecs[2])}
    direct = abs(np.dot(vecs[0], np.cross(vecs[1], vecs[2])))
    assert _ideal_chiral_volume(bonds, angles, 0, (1, 2, 3)) == pytest.approx(direct, rel=1e-9)
    # an L-amino-acid CA with Engh & Huber's ideal values: about 2.5 A^3 (the monomer library's CA value)
    eh_b = {frozenset((0, 1)): 1.458, frozenset((0, 2)): 1.525, frozenset((0, 3)): 1.530}
    eh_a = {(1, 0, 2): 111.2, (1, 0, 3): 110.5, (2, 0, 3): 110.1}
    assert _ideal_chiral_volume(eh_b, eh_a, 0, (1, 2, 3)) == pytest.approx(2.5, abs=0.1)


@pytest.fixture(scope="module")
def awa(shared_data):
    return read_multiconf(shared_data("structures/multiconf-peptides/AWA_2conf.pdb"))


def test_record_restraints_count_each_altloc_once_and_equal_the_layout_rmsz_for_one_conformer(awa, shared_data):
    geo = record_geometry(awa)
    single = read_multiconf(shared_data("xray/1dur/1dur.pdb"))
    g1 = record_geometry(single)
    from guidance.structures.io import read_structure

    conf = read_structure(shared_data("xray/1dur/1dur.pdb"))
    ref = geometry_rmsz(conf.layout, conf.coords)
    mine = geometry_summary(g1, single.coords)
    assert mine["bond_rmsz"] == pytest.approx(ref["bond_rmsz"], rel=1e-4)
    assert mine["angle_rmsz"] == pytest.approx(ref["angle_rmsz"], rel=1e-4)
    # AWA: a bond with an atom under A and B is two restraints, one without altlocs is one
    letters = {tuple(sorted({awa.altloc[r] for r in pair})) for pair in geo.bonds}
    assert ("A",) in letters and ("B",) in letters
    mixed = [pair for pair in geo.bonds if {awa.altloc[r] for r in pair} == {"A", "B"}]
    assert not mixed, "a restraint joins altloc A to altloc B"
    assert len({tuple(sorted(p)) for p in geo.bonds.tolist()}) == len(geo.bonds)


def test_plane_and_chirality_z_scores_match_an_independent_computation(awa):
    geo = record_geometry(awa)
    g = _geometry_arrays(geo)
    import jax.numpy as jnp

    x = awa.coords.copy()
    z = _z_terms(jnp.asarray(x, jnp.float32), g, jnp.zeros((1, 2), jnp.int32), jnp.zeros(1), jnp.zeros(1))
    # planes: distance to the least-squares plane by SVD (numpy), per atom
    for row, zrow, sd in zip(geo.planes, np.asarray(z["plane"]), geo.plane_sd):
        idx = row[row >= 0]
        pts = x[idx] - x[idx].mean(0)
        normal = np.linalg.svd(pts)[2][-1]
        np.testing.assert_allclose(np.abs(zrow[:len(idx)]), np.abs(pts @ normal) / sd, atol=0.02)
    assert set(np.round(geo.plane_sd, 3)) <= {PLANE_SD, 0.05}
    c, a, b, d = (x[geo.chirals[:, k]] for k in range(4))
    vol = np.einsum("ij,ij->i", a - c, np.cross(b - c, d - c))
    np.testing.assert_allclose(np.asarray(z["chiral"]), (vol - geo.chiral_ideal) / CHIRAL_SD, atol=1e-3)
    assert np.all(np.sign(geo.chiral_ideal) == np.sign(vol)), "the start model's hand is kept"


def test_nonbonded_pairs_leave_out_bonded_atoms_and_other_altlocs(awa):
    geo = record_geometry(awa)
    x = awa.coords.copy()
    pairs, d0 = nonbonded_pairs(geo, x)
    alt = awa.altloc[pairs]
    assert not np.any((alt[:, 0] != "") & (alt[:, 1] != "") & (alt[:, 0] != alt[:, 1]))
    assert not np.any(geo.atom_pair_excluded(awa.atom[pairs[:, 0]], awa.atom[pairs[:, 1]]))
    assert np.all((d0 >= 2.5) & (d0 <= 3.2))
    # a planted clash: move one blank atom onto another residue's atom
    names = awa.layout.keys()
    i = next(r for r in range(len(awa.atom)) if names[awa.atom[r]][2] == "O" and names[awa.atom[r]][1] == 1)
    j = next(r for r in range(len(awa.atom)) if names[awa.atom[r]][2] == "CA" and names[awa.atom[r]][1] == 3)
    x[i] = x[j] + np.array([2.0, 0.0, 0.0])
    pairs, d0 = nonbonded_pairs(geo, x)
    hit = [k for k, (p, q) in enumerate(pairs.tolist()) if {p, q} == {i, j}]
    assert hit and d0[hit[0]] > 2.0, "the planted 2.0 A contact is watched and lies inside the wall"
    assert geometry_summary(geo, x)["nonbonded_overlaps"] > geometry_summary(geo, awa.coords)["nonbonded_overlaps"]


def test_occupancy_groups_follow_the_units_of_ensemble_to_multiconf(awa):
    from guidance.structures.multiconf import multiconf_to_ensemble

    ens = multiconf_to_ensemble(awa)
    model = ensemble_to_multiconf(awa.layout, ens.coords, [0.7, 0.3])
    group, slot, start = occupancy_groups(model)
    assert set(group[model.altloc == ""]) == {-1}
    assert len(start) == len(model.groups) - sum(len(g) == 1 for g in model.groups)
    np.testing.assert_allclose(np.sort(start[0][start[0] > 0]), [0.3, 0.7])


@pytest.fixture(scope="module")
def synthetic_awa(shared_data, tmp_path_factory):
    """AWA's true A/B model (occupancy 0.5 each, B 20) and gemmi-made amplitudes of it in a P1 box (bulk solvent,
    5 % noise on |F|, 5 % free set: guidance.bench.entries.synthetic_amplitudes), with the xray observable on it."""
    from guidance.app.build import structure_atoms
    from guidance.bench.entries import prepare_entry, synthetic_amplitudes
    from guidance.bench.manifest import Entry
    from guidance.structures.io import read_structure
    from observables.base import AtomInfo
    from observables.xray import XrayObservable

    work = tmp_path_factory.mktemp("awa")
    entry = Entry("AWA", shared_data("structures/multiconf-peptides/AWA_2conf.pdb"), None, 1.5, (("A", 2, 2),))
    prep = prepare_entry(entry, work)
    mtz = synthetic_amplitudes(prep, 0.5, 1.5, work / "f.mtz")
    conf = read_structure(prep.structure)
    obs = XrayObservable(AtomInfo.from_layout(conf.layout, coords=conf.coords, **structure_atoms(conf)), mtz)
    truth = read_multiconf(prep.structure)
    truth = MulticonfModel(truth.layout, truth.atom, truth.altloc, truth.coords,
                           np.where(truth.altloc == "", 1.0, 0.5), np.full(len(truth.atom), 20.0))
    return truth, obs


def test_refinement_of_a_perturbed_two_state_model_returns_to_the_true_r_free(synthetic_awa):
    """From the true model with 0.3 A of noise on every atom, occupancies 0.8/0.2 and B 35: R-free ends within 0.01 of
    the true model's, B's occupancy within 0.1 of 0.5, bond/angle RMSZ <= 1 (the target), and every kept stage did
    not lower the free set's likelihood."""
    truth, obs = synthetic_awa
    data = obs.atoms(np.asarray(truth.layout.element)[truth.atom], truth.b_factor)
    r_true = data.report(truth.coords, truth.occupancy, truth.b_factor)["r_free"]
    rng = np.random.default_rng(0)
    start = MulticonfModel(truth.layout, truth.atom, truth.altloc,
                           truth.coords + rng.normal(0.0, 0.3, truth.coords.shape),
                           np.select([truth.altloc == "A", truth.altloc == "B"], [0.8, 0.2], 1.0),
                           np.full(len(truth.atom), 35.0))
    result = refine(start, data, Refine(weight_scan=(-4, -2, 0)))
    assert result.before["r_free"] > r_true + 0.2
    assert result.after["r_free"] <= r_true + 0.01, result.history
    occ_b = result.model.occupancy[result.model.altloc == "B"].mean()
    assert occ_b == pytest.approx(0.5, abs=0.1)
    assert max(result.after["bond_rmsz"], result.after["angle_rmsz"]) <= 1.0
    kept = [h for h in result.history[1:] if h["kept"]]
    assert kept and all(b["ml_free"] > a["ml_free"] or b["stage"] == "xyz" and a["bond_rmsz"] > 1.0
                        for a, b in zip([result.before, *kept], kept))
    assert "automatic" in result.weight_rule
    # the model written and read back gives the same R (what mode=score of multiconformer.cif reports)
    again = data.report(result.model.coords, result.model.occupancy, result.model.b_factor)
    assert again["r_free"] == pytest.approx(result.after["r_free"], abs=1e-6)


def test_per_atom_target_of_a_multiconformer_file_equals_score_mode_of_its_conformers(shared_data):
    """XrayAtoms on the records of 1dur equals XrayObservable.report on read_structure's conformers (cctbx:
    0.1512 / 0.1354 with bin scales; this model 0.1531 / 0.1379, README)."""
    from guidance.app.build import structure_atoms
    from guidance.structures.io import read_structure
    from observables.base import AtomInfo
    from observables.xray import XrayObservable

    pdb, mtz = shared_data("xray/1dur/1dur.pdb"), shared_data("xray/1dur/1dur.mtz")
    conf = read_structure(pdb)
    obs = XrayObservable(AtomInfo.from_layout(conf.layout, coords=conf.coords, **structure_atoms(conf)), mtz)
    score = obs.report(conf.coords, conf.weights)
    model = read_multiconf(pdb)
    mine = obs.atoms(np.asarray(model.layout.element)[model.atom], model.b_factor).report(
        model.coords, model.occupancy, model.b_factor)
    assert mine["r_work"] == pytest.approx(score["r_work"], abs=2e-5)
    assert mine["r_free"] == pytest.approx(score["r_free"], abs=2e-5)
    assert score["r_free"] == pytest.approx(0.1379, abs=5e-4)


def test_a_model_without_restraint_groups_still_gets_its_geometry_report(shared_data):
    """TRS (a Tris ligand: no template, so no bonds, planes or chiral centres) used to fail a whole bench job."""
    model = read_multiconf(shared_data("structures/multiconf-peptides/TRS_multiconf.pdb"))
    geo = record_geometry(model)
    assert geo.planes.shape[0] == 0 and len(geo.chirals) == 0
    summary = geometry_summary(geo, model.coords)
    assert summary["plane_rmsz"] is None and summary["nonbonded_overlaps"] == 0
