"""The embedded two-state peptide: ideal covalent geometry, a loop that moves as a rigid crankshaft, no clashes."""

from __future__ import annotations

import numpy as np
import pytest

from guidance.fixtures import TwoStatePeptide, build_peptide, build_two_state_peptide, write_two_state_structure
from guidance.structures.io import read_structure

# Engh & Huber (1991) ideal backbone geometry, A and degrees: (non-glycine, glycine)
BOND = {("N", "CA"): (1.458, 1.451), ("CA", "C"): (1.525, 1.516), ("C", "O"): (1.231, 1.231)}
PEPTIDE_BOND = 1.329  # C(i)-N(i+1)
ANGLE_N_CA_C = (111.2, 112.5)
ANGLE_CA_C_N = (116.2, 116.4)
ANGLE_C_N_CA = (121.7, 120.6)


@pytest.fixture(scope="module")
def peptide() -> TwoStatePeptide:
    return build_two_state_peptide()


def _atom(p: TwoStatePeptide, coords, res: int, name: str) -> np.ndarray:
    return np.asarray(coords, dtype=np.float64)[p.layout.index()[("A", res, name)]]


def _angle(a, b, c) -> float:
    u, v = a - b, c - b
    return float(np.degrees(np.arccos(u @ v / np.linalg.norm(u) / np.linalg.norm(v))))


def _dihedral(a, b, c, d) -> float:
    b1 = (c - b) / np.linalg.norm(c - b)
    v, w = (a - b) - ((a - b) @ b1) * b1, (d - c) - ((d - c) @ b1) * b1
    return float(np.degrees(np.arctan2(np.cross(b1, v) @ w, v @ w)))


def _bonds(coords) -> np.ndarray:
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    return (d < 1.9) & ~np.eye(len(coords), dtype=bool)


def _residues(p: TwoStatePeptide) -> list[tuple[int, bool]]:
    return [(r, p.layout.res_name[p.layout.res_seq == r][0] == "GLY") for _, r in p.layout.residues()]


def test_backbone_bond_lengths_are_the_engh_huber_values(peptide):
    residues = _residues(peptide)
    for coords in (peptide.coords_a, peptide.coords_b):
        for r, gly in residues:
            for (a, b), ideal in BOND.items():
                d = np.linalg.norm(_atom(peptide, coords, r, a) - _atom(peptide, coords, r, b))
                assert d == pytest.approx(ideal[gly], abs=1e-3)
                assert d == pytest.approx(ideal[0], abs=0.01)  # within 0.01 A of the non-glycine value too
        for r, _ in residues[:-1]:
            d = np.linalg.norm(_atom(peptide, coords, r, "C") - _atom(peptide, coords, r + 1, "N"))
            assert d == pytest.approx(PEPTIDE_BOND, abs=1e-3)


def test_backbone_bond_angles_are_the_engh_huber_values(peptide):
    residues = _residues(peptide)
    x = peptide.coords_a
    for r, gly in residues:
        n_ca_c = _angle(*(_atom(peptide, x, r, n) for n in ("N", "CA", "C")))
        assert n_ca_c == pytest.approx(ANGLE_N_CA_C[gly], abs=0.05)
    for (r, gly), (r1, gly1) in zip(residues[:-1], residues[1:]):
        ca, c, n, ca1 = (_atom(peptide, x, *k) for k in ((r, "CA"), (r, "C"), (r1, "N"), (r1, "CA")))
        assert _angle(ca, c, n) == pytest.approx(ANGLE_CA_C_N[gly], abs=0.05)
        assert _angle(c, n, ca1) == pytest.approx(ANGLE_C_N_CA[gly1], abs=0.05)
        assert abs(_dihedral(ca, c, n, ca1)) == pytest.approx(180.0, abs=0.05)  # omega: trans
        # trans peptides: consecutive CA atoms 3.8 A apart
        assert np.linalg.norm(ca1 - ca) == pytest.approx(3.8, abs=0.02)


def test_residues_are_l_amino_acids(peptide):
    x = peptide.coords_a
    for r, gly in _residues(peptide):
        if not gly:
            torsion = _dihedral(*(_atom(peptide, x, r, n) for n in ("C", "N", "CA", "CB")))
            assert torsion == pytest.approx(-122.5, abs=3.0)


def test_built_backbone_has_the_requested_torsions():
    phi_psi = [(-60.0, -45.0), (-120.0, 130.0), (-75.0, 150.0), (60.0, 40.0), (-90.0, 0.0)]
    layout, x = build_peptide("AVSGK", phi_psi)
    idx = layout.index()
    at = lambda r, n: x[idx[("A", r, n)]]  # noqa: E731
    for r in range(2, 5):
        phi = _dihedral(at(r - 1, "C"), at(r, "N"), at(r, "CA"), at(r, "C"))
        psi = _dihedral(at(r, "N"), at(r, "CA"), at(r, "C"), at(r + 1, "N"))
        assert (phi, psi) == pytest.approx(phi_psi[r - 1], abs=1e-6)


def test_state_b_differs_from_a_only_in_the_loop(peptide):
    first, last = peptide.loop
    rs = peptide.layout.res_seq
    in_loop_residues = (rs >= first) & (rs <= last)
    assert peptide.loop_mask[in_loop_residues].all()
    outside = ~peptide.loop_mask
    np.testing.assert_array_equal(peptide.coords_a[outside], peptide.coords_b[outside])
    moved = np.linalg.norm(peptide.coords_a - peptide.coords_b, axis=-1)
    assert moved[peptide.loop_mask].min() > 0.5
    # only atoms of the loop and of its two flanking residues move
    assert set(rs[peptide.loop_mask].tolist()) == set(range(first - 1, last + 2))


def test_the_loop_moves_rigidly_keeping_every_bond_and_angle(peptide):
    a, b = peptide.coords_a.astype(np.float64), peptide.coords_b.astype(np.float64)
    bonds = _bonds(a)
    da = np.linalg.norm(a[:, None] - a[None], axis=-1)
    db = np.linalg.norm(b[:, None] - b[None], axis=-1)
    np.testing.assert_allclose(db[bonds], da[bonds], atol=1e-4)
    # at the default swing the glycine pivots' N-CA-C angles (the only ones a crankshaft can change) are restored
    first, last = peptide.loop
    for r in (first - 1, last + 1):
        angles = [_angle(*(_atom(peptide, x, r, n) for n in ("N", "CA", "C"))) for x in (a, b)]
        assert angles[1] == pytest.approx(angles[0], abs=0.05)
    # the loop itself is internally rigid
    m = peptide.loop_mask
    np.testing.assert_allclose(db[np.ix_(m, m)], da[np.ix_(m, m)], atol=1e-4)


def test_loop_backbone_rmsd_between_states_is_at_least_3_angstrom(peptide):
    first, last = peptide.loop
    rs = peptide.layout.res_seq
    bb = (rs >= first) & (rs <= last) & np.isin(peptide.layout.atom_name, ["N", "CA", "C", "O"])
    rmsd = np.sqrt(((peptide.coords_a[bb] - peptide.coords_b[bb]) ** 2).sum(-1).mean())
    assert rmsd >= 3.0


def test_no_clashes_between_atoms_more_than_two_bonds_apart_in_either_state(peptide):
    a = peptide.coords_a.astype(np.float64)
    bonds = _bonds(a).astype(np.int64) + np.eye(len(a), dtype=np.int64)
    within_two = (bonds @ bonds) > 0  # 1-2 and 1-3 pairs
    for x in (a, peptide.coords_b.astype(np.float64)):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        assert d[~within_two].min() > 2.5


def test_peptide_is_compact_and_the_loop_touches_the_helices(peptide):
    a = peptide.coords_a
    rg = np.sqrt(((a - a.mean(0)) ** 2).sum(-1).mean())
    assert rg < 10.0  # a 27-residue extended chain would have Rg near 25 A
    first, last = peptide.loop
    rs = peptide.layout.res_seq
    loop, rest = (rs >= first) & (rs <= last), (rs < first - 1) | (rs > last + 1)
    d = np.linalg.norm(a[loop][:, None] - a[rest][None], axis=-1)
    assert (d < 4.5).sum() >= 10


def test_build_is_deterministic(peptide):
    again = build_two_state_peptide()
    np.testing.assert_array_equal(again.coords_a, peptide.coords_a)
    np.testing.assert_array_equal(again.coords_b, peptide.coords_b)
    assert again.layout.keys() == peptide.layout.keys()
    assert len(peptide.sequence) == len(peptide.layout.residues())


def test_a_swing_that_clashes_is_refused():
    with pytest.raises(ValueError, match="clash"):
        build_two_state_peptide(swing_deg=180.0 + 134.49)


def test_written_altloc_file_reads_back_as_two_weighted_conformers(peptide, tmp_path):
    path = write_two_state_structure(tmp_path / "two_state.pdb", peptide)
    conf = read_structure(path)
    assert conf.kind == "altloc" and conf.ids == ["A", "B"]
    np.testing.assert_allclose(conf.weights, [0.6, 0.4], atol=1e-6)
    assert conf.layout.keys() == peptide.layout.keys()
    np.testing.assert_array_equal(conf.varying, peptide.loop_mask)
    np.testing.assert_allclose(conf.coords[0], peptide.coords_a, atol=1e-3)
    np.testing.assert_allclose(conf.coords[1], peptide.coords_b, atol=1e-3)
