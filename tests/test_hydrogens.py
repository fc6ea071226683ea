"""Hydrogen placement from heavy atoms: ideal geometry on generated coordinates, and agreement with the protons of a
deposited NMR ensemble (2KJR, 20 models with hydrogens)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from observables.base import AtomInfo
from observables.hydrogens import (
    AMIDE_NH,
    TETRAHEDRAL,
    bisector_h,
    dihedral_h,
    extend_with_hydrogens,
    hydrogen_plan,
    methylene_h,
    place_alpha_h,
    place_amide_h,
    place_glycine_ha,
    rotor_centroid,
)


def _angle(a, b, c):
    u, v = a - b, c - b
    return math.degrees(math.acos(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))))


def _torsion(a, b, c, d):
    b0, b1, b2 = a - b, c - b, d - c
    b1 = b1 / np.linalg.norm(b1)
    v, w = b0 - np.dot(b0, b1) * b1, b2 - np.dot(b2, b1) * b1
    return math.degrees(math.atan2(np.dot(np.cross(b1, v), w), np.dot(v, w)))


def _peptide(sequence=("GLY", "ALA", "PRO", "SER"), phi=-65.0, psi=-40.0):
    """Backbone (+ CB) of a peptide built from ideal internal coordinates with NeRF (Engh & Huber 1991 values)."""
    n = np.array([0.0, 1.458, 0.0])
    ca = np.zeros(3)
    c = 1.525 * np.array([math.cos(math.radians(-21.2)), math.sin(math.radians(-21.2)), 0.0])  # N-CA-C 111.2 deg
    rows = []
    prev = None
    for k, res in enumerate(sequence):
        if k:
            n = np.asarray(dihedral_h(prev["C"], prev["CA"], prev["N"], 1.329, math.radians(116.2), math.radians(psi)))
            ca = np.asarray(dihedral_h(n, prev["C"], prev["CA"], 1.458, math.radians(121.7), math.radians(180.0)))
            c = np.asarray(dihedral_h(ca, n, prev["C"], 1.525, math.radians(111.2), math.radians(phi)))
        o = np.asarray(dihedral_h(c, ca, n, 1.231, math.radians(120.5), math.radians(psi + 180.0)))
        atoms = {"N": n, "CA": ca, "C": c, "O": o}
        if res != "GLY":
            atoms["CB"] = np.asarray(dihedral_h(ca, n, c, 1.53, math.radians(110.5), math.radians(-122.6)))
        if res == "PRO":
            atoms["CG"] = np.asarray(dihedral_h(atoms["CB"], ca, n, 1.50, math.radians(104.5), math.radians(30.0)))
            atoms["CD"] = np.asarray(dihedral_h(n, ca, atoms["CB"], 1.47, math.radians(103.0), math.radians(-20.0)))
        if res == "SER":
            atoms["OG"] = np.asarray(dihedral_h(atoms["CB"], ca, n, 1.42, math.radians(111.0), math.radians(60.0)))
        for name, xyz in atoms.items():
            rows.append((name[0], name, res, k + 1, "A", xyz))
        prev = atoms
    cols = list(zip(*rows))
    coords = np.array(cols[5], dtype=np.float32)
    return AtomInfo(np.array(cols[0]), np.array(cols[1]), np.array(cols[2]), np.array(cols[3]), np.array(cols[4]),
                    coords[None]), coords


def test_amide_h_is_on_the_bisector_at_1_02_angstrom():
    atoms, x = _peptide()
    idx = {(int(r), n): i for i, (r, n) in enumerate(zip(atoms.res_seq, atoms.atom_name))}
    h = np.asarray(place_amide_h(x, np.array([idx[2, "N"]]), np.array([idx[2, "CA"]]), np.array([idx[1, "C"]])))[0]
    n, ca, cp = x[idx[2, "N"]], x[idx[2, "CA"]], x[idx[1, "C"]]
    assert np.linalg.norm(h - n) == pytest.approx(AMIDE_NH, abs=1e-5)
    # in the peptide plane, at equal angles to C(i-1) and CA
    assert abs(np.dot(h - n, np.cross(cp - n, ca - n))) < 1e-4
    assert _angle(cp, n, h) == pytest.approx(_angle(ca, n, h), abs=1e-3)


def test_alpha_h_is_the_fourth_vertex_of_a_tetrahedron():
    vertices = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float32) / math.sqrt(3)
    center = np.array([0.3, -1.2, 2.0], dtype=np.float32)
    coords = np.concatenate([center[None], center + 1.5 * vertices[:3]])
    h = np.asarray(place_alpha_h(coords, np.array([0]), np.array([1]), np.array([2]), np.array([3])))[0]
    np.testing.assert_allclose(h, center + 1.09 * vertices[3], atol=1e-5)


def test_methylene_pair_is_tetrahedral_and_a_mirror_image_swaps_the_names():
    rng = np.random.default_rng(1)
    c, a, b = rng.normal(size=(3, 3)).astype(np.float32)
    h2 = np.asarray(methylene_h(c, a, b, -1.0, 1.09))
    h3 = np.asarray(methylene_h(c, a, b, 1.0, 1.09))
    assert np.linalg.norm(h2 - c) == pytest.approx(1.09, abs=1e-5)
    assert np.linalg.norm(h3 - c) == pytest.approx(1.09, abs=1e-5)
    assert _angle(h2, c, h3) == pytest.approx(math.degrees(TETRAHEDRAL), abs=1e-3)
    # symmetric about the A-C-B plane
    assert _angle(a, c, h2) == pytest.approx(_angle(a, c, h3), abs=1e-3)
    mirror = np.diag([1.0, 1.0, -1.0]).astype(np.float32)
    h2m = np.asarray(methylene_h(c @ mirror, a @ mirror, b @ mirror, -1.0, 1.09))
    np.testing.assert_allclose(h2m, h3 @ mirror, atol=1e-5)
    # Gly: HA2/HA3 are the methylene pair on CA with A = N, B = C
    g2, g3 = place_glycine_ha(np.stack([c, a, b]), np.array([0]), np.array([1]), np.array([2]))
    np.testing.assert_allclose(np.asarray(g2)[0], h2, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g3)[0], h3, atol=1e-6)


def test_dihedral_placement_reproduces_its_internal_coordinates():
    rng = np.random.default_rng(2)
    for torsion in (-150.0, -60.0, 0.0, 75.0, 180.0):
        a, b, c = rng.normal(size=(3, 3)) * 1.5
        d = np.asarray(dihedral_h(c, b, a, 1.01, math.radians(119.0), math.radians(torsion)))
        assert np.linalg.norm(d - c) == pytest.approx(1.01, abs=1e-5)
        assert _angle(b, c, d) == pytest.approx(119.0, abs=1e-3)
        assert (_torsion(a, b, c, d) - torsion + 180.0) % 360.0 - 180.0 == pytest.approx(0.0, abs=1e-3)


def test_rotor_centroid_is_the_mean_of_three_staggered_methyl_protons():
    rng = np.random.default_rng(3)
    x, c, ref = rng.normal(size=(3, 3)) * 1.5
    protons = [np.asarray(dihedral_h(c, x, ref, 1.09, TETRAHEDRAL, math.radians(t))) for t in (60.0, 180.0, 300.0)]
    np.testing.assert_allclose(np.asarray(rotor_centroid(c, x, 1.09)), np.mean(protons, axis=0), atol=1e-5)
    assert np.linalg.norm(np.mean(protons, axis=0) - c) == pytest.approx(1.09 / 3.0, abs=1e-5)


def test_plan_skips_proline_and_the_chain_start_and_follows_rigid_motions():
    atoms, x = _peptide()
    plan = hydrogen_plan(atoms)
    placed = {(int(r), n) for r, n in zip(plan.atoms.res_seq, plan.atoms.atom_name)}
    assert placed == {(1, "HA2"), (1, "HA3"), (2, "H"), (2, "HA"), (3, "HA"), (4, "H"), (4, "HA")}
    h = np.asarray(plan.place(x))
    theta = 0.7
    rot = np.array([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]],
                   dtype=np.float32)
    shift = np.array([3.0, -1.0, 2.0], dtype=np.float32)
    np.testing.assert_allclose(np.asarray(plan.place(x @ rot.T + shift)), h @ rot.T + shift, atol=1e-4)
    # side chains: Ser CB methylene pair; the hydroxyl H rotates freely and is not placed
    side = hydrogen_plan(atoms, scope="all")
    names = {(int(r), n) for r, n in zip(side.atoms.res_seq, side.atoms.atom_name)}
    assert {(4, "HB2"), (4, "HB3"), (3, "HD2"), (3, "HD3")} <= names and (4, "HG") not in names
    assert (2, "HB1") not in names and (2, "HB2") not in names  # Ala's methyl is a rotor


def test_placement_is_differentiable_and_batches():
    atoms, x = _peptide()
    plan = hydrogen_plan(atoms, scope="all")
    batch = jnp.stack([jnp.asarray(x), jnp.asarray(x) + 1.0])
    out = jax.jit(jax.vmap(plan.place))(batch)
    assert out.shape == (2, len(plan), 3)
    np.testing.assert_allclose(np.asarray(out[1] - out[0]), 1.0, atol=1e-4)
    g = jax.grad(lambda c: jnp.sum(plan.place(c) ** 2))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g)))
    # a degenerate (collapsed) input still has finite gradients
    g0 = jax.grad(lambda c: jnp.sum(bisector_h(c[0], c[1:], jnp.ones(2), 1.0)))(jnp.zeros((3, 3)))
    assert np.all(np.isfinite(np.asarray(g0)))


def test_extend_with_hydrogens_appends_placed_protons():
    atoms, x = _peptide()
    ext, extend = extend_with_hydrogens(atoms)
    k = len(hydrogen_plan(atoms))
    assert len(ext) == len(atoms) + k and ext.coords.shape == (1, len(atoms) + k, 3)
    assert list(ext.element[len(atoms):]) == ["H"] * k
    y = np.asarray(extend(x))
    np.testing.assert_allclose(y[: len(atoms)], x)
    np.testing.assert_allclose(ext.coords[0], y, atol=1e-5)
    # a model that already has its amide H (named HN, X-PLOR style) gets no second one
    with_h = AtomInfo(np.append(atoms.element, "H"), np.append(atoms.atom_name, "HN"),
                      np.append(atoms.res_name, "ALA"), np.append(atoms.res_seq, 2), np.append(atoms.chain_id, "A"))
    names = {(int(r), n) for r, n in zip(hydrogen_plan(with_h).atoms.res_seq, hydrogen_plan(with_h).atoms.atom_name)}
    assert (2, "H") not in names and (4, "H") in names


# ------------------------------------------------------------------------------------------------ 2KJR (deposited)


@pytest.fixture(scope="module")
def kjr(shared_data):
    from guidance.structures.io import read_structure

    conf = read_structure(shared_data("nmr/2KJR/2KJR.pdb"), hydrogens=True)
    atoms = AtomInfo.from_layout(conf.layout, conf.coords)
    heavy = np.array([e != "H" for e in atoms.element])
    heavy_atoms = AtomInfo(atoms.element[heavy], atoms.atom_name[heavy], atoms.res_name[heavy], atoms.res_seq[heavy],
                           atoms.chain_id[heavy], conf.coords[:, heavy])
    where = {(c, int(r), n): i for i, (c, r, n) in enumerate(zip(atoms.chain_id, atoms.res_seq, atoms.atom_name))}
    return atoms, heavy_atoms, conf.coords.astype(np.float32), heavy, where


def _errors(plan, coords_heavy, coords_full, where):
    placed = np.asarray(plan.place(coords_heavy))  # [20, K, 3]
    err: dict[str, list] = {}
    for k, (c, r, n, res) in enumerate(zip(plan.atoms.chain_id, plan.atoms.res_seq, plan.atoms.atom_name,
                                           plan.atoms.res_name)):
        i = where.get((c, int(r), n))
        if i is None:  # e.g. His HE2: the deposited His are the HD1 tautomer
            continue
        label = n if n in ("H", "HA", "HA2", "HA3") else f"{res}:{n}"
        err.setdefault(label, []).append(np.linalg.norm(placed[:, k] - coords_full[:, i], axis=-1))
    return {k: float(np.sqrt(np.mean(np.square(v)))) for k, v in err.items()}


def test_backbone_protons_match_the_deposited_2kjr_ensemble(kjr):
    """Amide H (1.02 A bisector) and HA (tetrahedral) of all 20 models within 0.1 A RMS of the deposited protons."""
    _, heavy_atoms, coords, heavy, where = kjr
    plan = hydrogen_plan(heavy_atoms)
    rms = _errors(plan, coords[:, heavy], coords, where)
    print("2KJR backbone H placement RMS (A), 20 models:", {k: round(v, 3) for k, v in rms.items()})
    assert rms["H"] < 0.1 and rms["HA"] < 0.1 and rms["HA2"] < 0.1 and rms["HA3"] < 0.1
    counts = {n: int(np.sum(plan.atoms.atom_name == n)) for n in ("H", "HA", "HA2", "HA3")}
    assert counts == {"H": 94, "HA": 87, "HA2": 8, "HA3": 8}  # 95 residues, Met1 (NH3+ terminus), 8 Gly, no Pro


def test_side_chain_protons_and_stereo_names_match_2kjr(kjr):
    """Every non-rotating side-chain proton (CH2 pairs with their IUPAC names, methine, aromatic, NH, NH2) of all 20
    models within 0.1 A RMS; a wrong HB2/HB3 assignment would be off by ~1.8 A."""
    _, heavy_atoms, coords, heavy, where = kjr
    plan = hydrogen_plan(heavy_atoms, scope="all")
    rms = _errors(plan, coords[:, heavy], coords, where)
    print("2KJR side-chain H placement, worst RMS (A):", sorted(rms.items(), key=lambda kv: -kv[1])[:5])
    assert len(rms) > 60 and max(rms.values()) < 0.1


def test_missing_only_places_nothing_on_a_model_with_hydrogens(kjr):
    atoms = kjr[0]
    assert len(hydrogen_plan(atoms, scope="all")) == sum(1 for r in set(zip(atoms.res_seq, atoms.res_name))
                                                         if r[1] == "HIS")  # only His HE2 (HD1 tautomer deposited)
