"""Ideal covalent geometry (Engh & Huber 1991): the shipped table, restraints of a layout, RMSZ, clashes and the
torch potential that restores geometry."""

from __future__ import annotations

import time
from collections import defaultdict
from itertools import combinations

import numpy as np
import pytest
import torch

from guidance.fixtures import build_two_state_peptide
from guidance.potentials import GeometryPotential
from guidance.structures.geometry import (
    CLASH_DISTANCE,
    LINK_RULES,
    build_restraints,
    clash_pairs,
    count_clashes,
    geometry_rmsz,
    load_table,
    rmsz,
    template_names,
    z_scores,
)
from guidance.structures.io import read_structure
from predictors.base import AtomLayout

HEAVY_ATOMS = {"ALA": 5, "ARG": 11, "ASN": 8, "ASP": 8, "CYS": 6, "GLN": 9, "GLU": 9, "GLY": 4, "HIS": 10, "ILE": 8,
               "LEU": 8, "LYS": 9, "MET": 8, "PHE": 11, "PRO": 7, "SER": 6, "THR": 7, "TRP": 14, "TYR": 12, "VAL": 7}
RINGS = {"PRO": 1, "PHE": 1, "TYR": 1, "HIS": 1, "TRP": 2}
BACKBONE_KINDS = {"N-CA", "CA-C", "C-O", "C(-1)-N", "N-CA-C", "CA-C-O", "CA(-1)-C(-1)-N", "O(-1)-C(-1)-N",
                  "C(-1)-N-CA"}


@pytest.fixture(scope="module")
def peptide():
    return build_two_state_peptide()


def _graph(res: str):
    table = load_table()
    bonds = [t.atoms for t in table[res] if len(t.atoms) == 2]
    angles = {t.atoms for t in table[res] if len(t.atoms) == 3}
    return bonds, angles


def _layout(rows) -> AtomLayout:
    """rows: (chain, res_seq, res_name, atom_name, element)."""
    chain, seq, res, name, element = zip(*rows)
    return AtomLayout(np.array(chain), np.array(seq), np.array(res), np.array(name), np.array(element))


# ------------------------------------------------------------------------------------------------------- the table


def test_table_covers_every_heavy_atom_bond_and_angle_of_the_20_amino_acids():
    assert sorted(template_names()) == sorted(HEAVY_ATOMS)
    for res, n_atoms in HEAVY_ATOMS.items():
        bonds, angles = _graph(res)
        atoms = {a for b in bonds for a in b}
        assert len(atoms) == n_atoms, res
        assert len(bonds) == n_atoms - 1 + RINGS.get(res, 0), res  # a tree plus one bond per ring
        neighbours = defaultdict(set)
        for a, b in bonds:
            neighbours[a].add(b)
            neighbours[b].add(a)
        expected = {frozenset([(a, v, b), (b, v, a)]) for v, nb in neighbours.items() for a, b in combinations(nb, 2)}
        found = {frozenset([t, t[::-1]]) for t in angles}
        assert found == expected, res  # one angle for every pair of bonds that share an atom, and no other


def test_table_values_are_physical_and_planar_centres_add_up():
    table = load_table()
    for group, terms in table.items():
        for t in terms:
            if len(t.atoms) == 2:
                assert 1.2 < t.mean < 1.85 and 0.009 < t.sd < 0.051, (group, t)
            else:
                assert 100.0 < t.mean < 134.0 and 0.9 < t.sd < 5.1, (group, t)

    def angle(res, a, v, b):
        return next(t.mean for t in table[res] if t.atoms in ((a, v, b), (b, v, a)))

    # the three angles at an sp2 atom add up to 360 degrees; a planar ring's inner angles to (n - 2) * 180
    for res, (v, a, b, c) in {"ARG": ("CZ", "NE", "NH1", "NH2"), "ASN": ("CG", "CB", "OD1", "ND2"),
                              "ASP": ("CG", "CB", "OD1", "OD2"), "PHE": ("CG", "CB", "CD1", "CD2"),
                              "TYR": ("CZ", "CE1", "CE2", "OH"), "HIS": ("CG", "CB", "ND1", "CD2"),
                              "TRP": ("CD2", "CG", "CE2", "CE3")}.items():
        total = angle(res, a, v, b) + angle(res, a, v, c) + angle(res, b, v, c)
        assert total == pytest.approx(360.0, abs=0.4), res
    rings = {"PHE": ["CG", "CD1", "CE1", "CZ", "CE2", "CD2"], "TYR": ["CG", "CD1", "CE1", "CZ", "CE2", "CD2"],
             "HIS": ["CG", "ND1", "CE1", "NE2", "CD2"], "TRP": ["CG", "CD1", "NE1", "CE2", "CD2"]}
    for res, ring in rings.items():
        inner = sum(angle(res, ring[k - 1], ring[k], ring[(k + 1) % len(ring)]) for k in range(len(ring)))
        assert inner == pytest.approx((len(ring) - 2) * 180.0, abs=0.2), res
    link = {t.atoms: t.mean for t in table["LINK"]}
    assert link[("-CA", "-C", "N")] + link[("-O", "-C", "N")] + 120.8 == pytest.approx(360.0)  # CA-C-O 120.8


# ------------------------------------------------------------------------------------------------ restraints


def test_restraints_of_the_demo_peptide_follow_its_chemistry(peptide):
    r = build_restraints(peptide.layout)
    n_res = len(peptide.layout.residues())
    per_residue = sum(sum(len(t.atoms) == 2 for t in load_table()[res]) for res in
                      [peptide.layout.res_name[peptide.layout.res_seq == s][0] for _, s in peptide.layout.residues()])
    assert len(r.bonds) == per_residue + (n_res - 1)  # the residues' own bonds plus one peptide bond per junction
    assert (r.bond_kind == "C(-1)-N").sum() == n_res - 1
    assert (r.angle_kind == "C(-1)-N-CA").sum() == n_res - 1
    gly_n = [k for k, (c, n, ca) in enumerate(r.angles) if r.angle_kind[k] == "C(-1)-N-CA"
             and peptide.layout.res_name[n] == "GLY"]
    assert len(gly_n) == 2 and np.all(r.angle_ideal[gly_n] == 120.6)  # C-N-CA of glycine: 120.6 (1.7)


def test_the_ideal_demo_peptide_has_zero_rmsz(peptide):
    r = build_restraints(peptide.layout)
    zb, za = z_scores(r, np.stack([peptide.coords_a, peptide.coords_b]).astype(np.float64))
    assert rmsz(zb) < 1e-3  # built with the table's bond lengths (float32 coordinates)
    backbone = np.isin(r.angle_kind, list(BACKBONE_KINDS))
    # the backbone is built with the table's angles; only glycine's O-C-N is off, because Engh & Huber's three
    # angles at a glycine C add up to 360.2 degrees and a planar C can only take 360
    assert rmsz(za[:, backbone]) < 0.02
    assert np.abs(za).max() < 0.5


def test_a_stretched_bond_raises_exactly_its_term(peptide):
    layout, x = peptide.layout, peptide.coords_a.astype(np.float64)
    r = build_restraints(layout)
    idx = layout.index()
    ce, nz = idx[("A", 4, "CE")], idx[("A", 4, "NZ")]  # the terminal atom of Lys 4
    bad = x.copy()
    bad[nz] = x[ce] + (x[nz] - x[ce]) * (1.0 + 0.09 / np.linalg.norm(x[nz] - x[ce]))  # CE-NZ 0.09 A longer
    zb0, za0 = z_scores(r, x[None])
    zb1, za1 = z_scores(r, bad[None])
    term = np.flatnonzero((r.bonds[:, 0] == ce) & (r.bonds[:, 1] == nz))
    assert len(term) == 1 and r.bond_kind[term[0]] == "CE-NZ" and r.bond_sd[term[0]] == 0.030
    changed = np.flatnonzero(np.abs(zb1 - zb0)[0] > 1e-9)
    assert changed.tolist() == term.tolist()
    assert zb1[0, term[0]] - zb0[0, term[0]] == pytest.approx(0.09 / 0.030)
    np.testing.assert_allclose(za1, za0, atol=1e-9)  # moving NZ along the bond leaves every angle alone
    pot = GeometryPotential(layout, restraints=r)
    parts0 = pot.energy_and_grad(torch.tensor(x[None]))[2]
    parts1 = pot.energy_and_grad(torch.tensor(bad[None]))[2]
    assert (parts1["bonds"] - parts0["bonds"]).item() == pytest.approx(0.5 * (zb1[0, term[0]] ** 2
                                                                               - zb0[0, term[0]] ** 2))
    assert (parts1["angles"] - parts0["angles"]).item() == pytest.approx(0.0, abs=1e-9)


def test_missing_atoms_drop_their_terms_and_oxt_adds_its_own(peptide):
    layout = peptide.layout
    full = build_restraints(layout)
    keep = ~((layout.res_seq == 4) & (layout.atom_name == "NZ"))
    cut = build_restraints(layout.select(keep))
    assert len(full.bonds) - len(cut.bonds) == 1 and len(full.angles) - len(cut.angles) == 1  # CE-NZ, CD-CE-NZ
    last = int(layout.res_seq.max())
    with_oxt = AtomLayout(np.append(layout.chain_id, "A"), np.append(layout.res_seq, last),
                          np.append(layout.res_name, layout.res_name[-1]), np.append(layout.atom_name, "OXT"),
                          np.append(layout.element, "O"))
    r = build_restraints(with_oxt)
    assert len(r.bonds) == len(full.bonds) + 1 and len(r.angles) == len(full.angles) + 2
    assert {"C-OXT"} <= set(r.bond_kind) and {"CA-C-OXT", "O-C-OXT"} <= set(r.angle_kind)


def test_peptide_bonds_join_only_consecutive_residues_of_one_chain():
    backbone = [("N", "N"), ("CA", "C"), ("C", "C"), ("O", "O")]
    rows = ([("A", 1, "ALA", a, e) for a, e in backbone] + [("A", 2, "PRO", a, e) for a, e in backbone]
            + [("A", 2, "PRO", "CD", "C")] + [("A", 4, "GLY", a, e) for a, e in backbone]
            + [("B", 5, "ALA", a, e) for a, e in backbone] + [("B", 6, "MSE", a, e) for a, e in backbone])
    r = build_restraints(_layout(rows))
    links = r.bonds[r.bond_kind == "C(-1)-N"]
    assert len(links) == 2  # A1-A2 (to Pro) and B5-B6 (to a residue without a template); not A2-A4, nor A4-B5
    to_pro = r.bond_ideal[r.bond_kind == "C(-1)-N"][0]
    assert to_pro == 1.341  # X-Pro peptide bond (PTRANS)
    assert "C(-1)-N-CD" in set(r.angle_kind)


# ------------------------------------------------------------------------------------------------ clashes


def test_atoms_within_three_bonds_are_exempt_and_further_ones_are_not(peptide):
    layout = peptide.layout
    r = build_restraints(layout)
    idx = layout.index()

    def pair(a, b):
        return np.array([idx[("A",) + a]]), np.array([idx[("A",) + b]])

    assert r.is_excluded(*pair((5, "C"), (6, "N")))[0]  # 1-2
    assert r.is_excluded(*pair((5, "O"), (6, "N")))[0]  # 1-3
    assert r.is_excluded(*pair((5, "CB"), (6, "N")))[0]  # 1-4
    assert not r.is_excluded(*pair((5, "O"), (6, "CB")))[0]  # 1-5
    assert not r.is_excluded(*pair((2, "CA"), (20, "CA")))[0]


def test_clash_rule_spares_disulfides_metal_ions_and_covalent_ligands():
    def count(rows, xyz, reference=None):
        layout = _layout(rows)
        r = build_restraints(layout, reference)
        return len(clash_pairs(r, np.asarray(xyz, dtype=np.float64)))

    ss = [("A", 3, "CYS", "SG", "S"), ("A", 30, "CYS", "SG", "S")]
    cc = [("A", 3, "ALA", "CB", "C"), ("A", 30, "ALA", "CB", "C")]
    two = [[0.0, 0, 0], [2.04, 0, 0]]
    assert count(ss, two) == 0 and count(cc, two) == 1
    zn = [("A", 3, "CYS", "SG", "S"), ("A", 99, "ZN", "ZN", "ZN")]
    assert count(zn, [[0.0, 0, 0], [1.9, 0, 0]]) == 0  # coordination bond, not a clash
    lig = [("A", 3, "CYS", "CB", "C"), ("A", 3, "CYS", "SG", "S"), ("A", 99, "HEC", "CAB", "C"),
           ("A", 99, "HEC", "CBB", "C")]
    xyz = [[-1.8, 0, 0], [0.0, 0, 0], [1.82, 0, 0], [2.4, 1.4, 0]]  # thioether SG-CAB 1.82 A, CAB-CBB 1.52 A
    assert count(lig, xyz) == 1  # without coordinates to read the bond from, SG-CAB looks like a clash
    assert count(lig, xyz, reference=xyz) == 0
    assert count(lig[2:], xyz[2:]) == 0  # atoms inside one residue without a template never clash


def test_the_demo_peptide_has_no_clash_and_its_old_lys_rotamer_is_caught(peptide):
    # The first design threaded Lys 4 NZ (rotamer mttt) through the Glu 25 carboxylate (1.1-1.5 A); a bond graph
    # from distances took those pairs for bonds.  The restraint graph does not: the demo builder now uses it, and the
    # default design has Lys 4 in tttt.
    out = count_clashes(peptide.layout, np.stack([peptide.coords_a, peptide.coords_b]))
    assert out["clashes"] == [0, 0] and out["n_heavy_atoms"] == len(peptide.layout)
    from guidance.fixtures import DEFAULT_PHI_PSI, DEFAULT_SEQUENCE, build_peptide

    layout, xyz = build_peptide(DEFAULT_SEQUENCE, DEFAULT_PHI_PSI, chis={3: (-65.0, 180.0, 180.0, 180.0)})
    pairs = clash_pairs(build_restraints(layout), xyz.astype(np.float64))
    names = {(int(layout.res_seq[i]), str(layout.atom_name[i]), int(layout.res_seq[j]), str(layout.atom_name[j]))
             for i, j in pairs}
    assert names == {(4, "NZ", 25, "CG"), (4, "NZ", 25, "CD"), (4, "NZ", 25, "OE2")}


# ---------------------------------------------------------------------------------------------- deposited data


@pytest.mark.parametrize("name, members", [("5SOP_single_001.pdb", None), ("6b8x_final.pdb", [0])])
def test_deposited_high_resolution_structures_have_rmsz_of_order_one(shared_data, name, members):
    """Refined X-ray structures scatter about the Engh & Huber means by about their sds (RMSZ ~ 0.3-1.5): 5SOP
    (1.05 A) measures bond RMSZ 0.80/0.96/0.96 and angle RMSZ 0.91/1.01/1.01 for altlocs A/B/C; 6b8x altloc A
    0.85 / 0.96.  (6b8x altloc B as expanded by read_structure splices B atoms onto residues modelled in A only,
    and shows bond RMSZ 3.2: the splice, not the refinement.)"""
    conf = read_structure(shared_data(f"structures/altloc/{name}"))
    coords = conf.coords if members is None else conf.coords[members]
    out = geometry_rmsz(conf.layout, coords)
    print(name, "bond", out["per_member"]["bond_rmsz"], "angle", out["per_member"]["angle_rmsz"])
    assert out["n_bonds"] > 2000 and out["n_angles"] > 3000
    for b, a in zip(out["per_member"]["bond_rmsz"], out["per_member"]["angle_rmsz"]):
        assert 0.3 < b < 1.5 and 0.3 < a < 1.5
    assert count_clashes(conf.layout, coords, CLASH_DISTANCE)["clashes"] == [0] * len(coords)


# ---------------------------------------------------------------------------------------------- the potential


def _distorted(peptide, seed=0, noise=0.15, push=4.0) -> np.ndarray:
    """The demo peptide with coordinate noise and its second helix pushed 4 A into the first (clashes)."""
    rng = np.random.default_rng(seed)
    x = peptide.coords_a.astype(np.float64) + rng.normal(size=peptide.coords_a.shape) * noise
    rs = peptide.layout.res_seq
    towards = x[rs <= 9].mean(0) - x[rs >= 18].mean(0)
    x[rs >= 18] += push * towards / np.linalg.norm(towards)
    return x


def test_gradient_matches_finite_differences(peptide):
    pot = GeometryPotential(peptide.layout, onset=1.0)  # whole at any steering time
    x = torch.tensor(_distorted(peptide)[None])  # float64
    energy, grad, parts = pot.energy_and_grad(x, 0.3)
    assert all(v.item() > 1.0 for v in parts.values())  # bonds, angles and clashes all active
    assert energy.item() == pytest.approx(sum(v.item() for v in parts.values()))
    pairs = pot.pairs(x)
    rng = np.random.default_rng(1)
    h = 1e-6
    for i in rng.choice(len(peptide.layout), 12, replace=False):
        for c in range(3):
            xp, xm = x.clone(), x.clone()
            xp[0, i, c] += h
            xm[0, i, c] -= h
            fd = (sum(pot.energy_parts(xp, pairs).values()) - sum(pot.energy_parts(xm, pairs).values())) / (2 * h)
            assert grad[0, i, c].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-4)


def test_energy_is_internal_no_net_force_or_torque_and_rigid_motions_cost_nothing(peptide):
    pot = GeometryPotential(peptide.layout)
    x = torch.tensor(_distorted(peptide, seed=2)[None])
    energy, grad, _ = pot.energy_and_grad(x)  # float64; |grad| is about 2e4 here
    assert grad.sum(1).norm().item() < 1e-9 * grad.norm().item()  # net force
    torque = torch.linalg.cross(x[0] - x[0].mean(0), grad[0], dim=-1).sum(0)
    assert torque.norm().item() < 1e-9 * grad.norm().item() * 10.0  # net torque (10 A: the peptide's size)
    q, _ = torch.linalg.qr(torch.tensor(np.random.default_rng(3).normal(size=(3, 3))))
    moved = x @ q.T + torch.tensor([10.0, -3.0, 7.0], dtype=x.dtype)
    assert pot.energy_and_grad(moved)[0].item() == pytest.approx(energy.item(), rel=1e-9)


def test_descending_the_potential_restores_geometry_and_removes_clashes(peptide):
    layout = peptide.layout
    x = _distorted(peptide)
    before_geo, before_clash = geometry_rmsz(layout, x), count_clashes(layout, x)["clashes"][0]
    pot = GeometryPotential(layout)
    y = torch.tensor(x[None])
    for _ in range(300):
        y = y - 2e-5 * pot.energy_and_grad(y)[1]  # plain gradient descent, step in A^2 per unit energy
    after = y[0].numpy()
    after_geo, after_clash = geometry_rmsz(layout, after), count_clashes(layout, after)["clashes"][0]
    assert before_geo["bond_rmsz"] > 10 and after_geo["bond_rmsz"] < 1.0
    assert before_geo["angle_rmsz"] > 5 and after_geo["angle_rmsz"] < 1.5
    assert after_clash < before_clash / 1.5


def test_potential_keeps_float32_and_handles_a_batch(peptide):
    pot = GeometryPotential(peptide.layout)
    x = torch.tensor(np.stack([peptide.coords_a, peptide.coords_b, _distorted(peptide).astype(np.float32)]))
    energy, grad, _ = pot.energy_and_grad(x, 0.0)
    assert energy.dtype == grad.dtype == torch.float32 and energy.shape == (3,) and grad.shape == x.shape
    single = pot.energy_and_grad(x[2:3])[0]
    assert energy[2].item() == pytest.approx(single.item(), rel=1e-5)  # members do not see each other
    assert energy[0].item() == pytest.approx(energy[1].item(), rel=1e-4)  # the two states: same geometry


def test_potential_handles_5000_atoms_times_16_structures_quickly(peptide):
    layout, n, copies = peptide.layout, len(peptide.layout), 25  # 25 chains of 202 atoms = 5050 atoms
    big = AtomLayout(np.repeat([chr(65 + k) for k in range(copies)], n), np.tile(layout.res_seq, copies),
                     np.tile(layout.res_name, copies), np.tile(layout.atom_name, copies),
                     np.tile(layout.element, copies))
    xyz = np.concatenate([peptide.coords_a + [40.0 * (k % 5), 40.0 * (k // 5), 0.0] for k in range(copies)])
    pot = GeometryPotential(big)
    x = torch.tensor(np.stack([xyz] * 16)) + 0.1 * torch.randn(16, len(big), 3, generator=torch.Generator().manual_seed(0))
    pot.energy_and_grad(x.float())  # warm-up
    start = time.perf_counter()
    energy, grad, _ = pot.energy_and_grad(x.float())
    elapsed = time.perf_counter() - start
    print(f"GeometryPotential: {len(big)} atoms x 16 structures in {elapsed:.3f} s")
    assert torch.isfinite(energy).all() and torch.isfinite(grad).all()
    assert elapsed < 2.0  # measured about 0.12 s on one CPU thread


def test_link_rules_are_known():
    assert set(LINK_RULES) <= set(load_table())


def test_onset_delays_the_term_with_a_linear_ramp(peptide):
    layout, xyz = peptide.layout, peptide.coords_a
    x = torch.as_tensor(xyz, dtype=torch.float64)[None] + 0.1 * torch.randn((2, len(layout), 3), dtype=torch.float64,
                                                                             generator=torch.Generator().manual_seed(4))
    always = GeometryPotential(layout, onset=1.0)
    late = GeometryPotential(layout, onset=0.3, ramp=0.2)
    e_full, g_full, _ = always.energy_and_grad(x, t=0.9)
    for t, k in ((1.0, 0.0), (0.5, 0.0), (0.4, 0.5), (0.3, 1.0), (0.0, 1.0)):
        assert late.scale(t) == pytest.approx(k)
        e, g, parts = late.energy_and_grad(x, t=t)
        torch.testing.assert_close(e, k * e_full)
        torch.testing.assert_close(g, k * g_full)
        torch.testing.assert_close(sum(parts.values()), e)
    with pytest.raises(ValueError, match="onset"):
        GeometryPotential(layout, onset=1.5)
