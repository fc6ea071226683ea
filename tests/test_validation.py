"""Validation figures a crystallographer reads (guidance/structures/validation.py): Ramachandran classes on MolProbity's
Top8000 contours, rotamer outliers against the Lovell 2000 library, a heavy-atom clashscore, and the same for
multiconformer (altloc) models."""

from __future__ import annotations

import json
import math

import gemmi
import numpy as np
import pytest

from guidance.fixtures import build_peptide
from guidance.structures.io import read_structure
from guidance.structures.multiconf import ensemble_to_multiconf, read_multiconf
from guidance.structures.validation import (
    CLASH_OVERLAP,
    altloc_conformers,
    chi_windows,
    clashes,
    nearest_rotamer,
    ramachandran,
    ramachandran_class,
    ramachandran_value,
    rotamers,
    summary_line,
    validate,
    validate_multiconf,
)
from predictors.base import AtomLayout
from predictors.rotamers import CHI_ATOMS, library

# --------------------------------------------------------------------------------------------------- Ramachandran


@pytest.mark.parametrize("category, phi, psi, value", [
    # the favoured peaks and their contour values as MolProbity's cctbx ramalyze lists them (get_favored_peaks)
    ("general", -63, -43, 1.0), ("general", -115, 131, 0.57068), ("general", 53, 43, 0.323004),
    ("general", 53, -127, 0.0246619), ("glycine", 63, 41, 1.0), ("glycine", 79, -173, 0.553852),
    ("cis_proline", -75, 155, 1.0), ("cis_proline", -89, 5, 0.701149), ("trans_proline", -59, 143, 1.0),
    ("trans_proline", -57, -37, 0.99566), ("pre_proline", -57, -45, 1.0), ("pre_proline", -67, 147, 0.992025),
    ("ile_val", -63, -45, 1.0), ("ile_val", -121, 129, 0.76163),
])
def test_shipped_grids_reproduce_molprobitys_published_peak_values(category, phi, psi, value):
    assert ramachandran_value(category, phi, psi) == pytest.approx(value, abs=5e-6)


def test_interpolation_is_bilinear_between_bin_centres_and_periodic():
    # bin centres lie at odd degrees: a point halfway between two centres is their mean
    def general(phi, psi):
        return float(ramachandran_value("general", phi, psi))

    assert general(-62.0, -43.0) == pytest.approx(0.5 * (general(-63, -43) + general(-61, -43)))
    phi, psi = np.array([-179.5, 179.5, -63.2]), np.array([179.9, -179.9, -42.7])
    assert np.allclose(ramachandran_value("glycine", phi, psi), ramachandran_value("glycine", phi + 360, psi - 360))
    # across the +-180 seam: phi = 180 lies halfway between the edge centres 179 and -179
    assert general(180.0, 131.0) == pytest.approx(0.5 * (general(179, 131) + general(-179, 131)))
    assert general(179, 131) != general(-179, 131)


def test_molprobity_cutoffs_per_category():
    assert ramachandran_class("general", 0.02) == "favoured"
    assert ramachandran_class("general", 0.0199) == "allowed"
    assert ramachandran_class("general", 0.0005) == "allowed" and ramachandran_class("general", 0.00049) == "outlier"
    assert ramachandran_class("cis_proline", 0.0015) == "outlier"
    assert ramachandran_class("cis_proline", 0.002) == "allowed"
    assert ramachandran_class("glycine", 0.0008) == "outlier" and ramachandran_class("ile_val", 0.001) == "allowed"


def _peptide(phi, psi, sequence="AAAAAAA"):
    return build_peptide(sequence, [(phi, psi)] * len(sequence))


@pytest.mark.parametrize("phi, psi", [(-57.0, -47.0), (-120.0, 130.0)])
def test_ideal_helix_and_strand_are_favoured(phi, psi):
    layout, x = _peptide(phi, psi)
    entries = ramachandran(layout, x)
    assert len(entries) == 5  # chain ends have no phi (first) or psi (last)
    for e in entries:
        assert e["phi"] == pytest.approx(phi, abs=1e-6) and e["psi"] == pytest.approx(psi, abs=1e-6)
        assert (e["category"], e["class"]) == ("general", "favoured")


def test_disallowed_backbone_is_an_outlier_for_alanine_but_favoured_for_its_mirror_in_glycine():
    layout, x = _peptide(120.0, -120.0, "AAGAA")
    classes = {e["res_name"]: (e["category"], e["class"]) for e in ramachandran(layout, x)}
    assert classes["ALA"] == ("general", "outlier")
    assert classes["GLY"] == ("glycine", "favoured")  # the Gly map is symmetric: (120, -120) mirrors (-120, 120)
    # (60, -120), sometimes quoted as forbidden, lies in a sparse but populated region of the Top8000 general map
    # (MolProbity lists a small favoured peak at (53, -127)): allowed, not an outlier
    layout, x = _peptide(60.0, -120.0, "AAA")
    assert ramachandran(layout, x)[0]["class"] == "allowed"


def test_categories_follow_molprobitys_order():
    layout, x = _peptide(-65.0, -40.0, "AVAAIAGA")
    res_name = layout.res_name.copy()
    res_name[layout.res_seq == 4] = "PRO"  # renamed: the backbone is all the Ramachandran test reads
    layout = AtomLayout(layout.chain_id, layout.res_seq, res_name, layout.atom_name, layout.element)
    got = {e["res_seq"]: e["category"] for e in ramachandran(layout, x)}
    assert got == {2: "ile_val", 3: "pre_proline", 4: "trans_proline", 5: "ile_val", 6: "general", 7: "glycine"}


def test_a_chain_break_removes_the_residues_on_both_sides():
    layout, x = _peptide(-65.0, -40.0)
    moved = x.copy()
    moved[layout.res_seq >= 5] += np.array([0.0, 0.0, 10.0])  # C(4)-N(5) now 9-11 A
    assert [e["res_seq"] for e in ramachandran(layout, moved)] == [2, 3, 6]


@pytest.fixture(scope="module")
def dur(shared_data):
    return read_structure(shared_data("xray/1dur/1dur.pdb"))


def test_phi_psi_agree_with_gemmi_on_a_deposited_structure(dur, shared_data):
    st = gemmi.read_structure(str(shared_data("xray/1dur/1dur.pdb")))
    residues = {(ch.name, r.seqid.num): (ch, i) for ch in st[0] for i, r in enumerate(ch)}
    entries = ramachandran(dur.layout, dur.coords[0])
    assert len(entries) > 40
    for e in entries:
        ch, i = residues[(e["chain"], e["res_seq"])]
        phi, psi = gemmi.calculate_phi_psi(ch[i - 1], ch[i], ch[i + 1])
        assert e["phi"] == pytest.approx(math.degrees(phi), abs=1e-3)
        assert e["psi"] == pytest.approx(math.degrees(psi), abs=1e-3)


def test_a_cis_proline_of_a_deposited_structure_uses_the_cis_map(shared_data):
    path = shared_data("structures/altloc/1vme_final_carved_edited_0.5occA_0.5occB.cif")
    conf = read_structure(path)
    st = gemmi.read_structure(str(path))
    chain = st[0]["A"]
    omega = {chain[i + 1].seqid.num: math.degrees(gemmi.calculate_omega(chain[i], chain[i + 1]))
             for i in range(len(chain) - 1) if chain[i + 1].name == "PRO"}
    for e in ramachandran(conf.layout, conf.coords[0]):
        if e["res_name"] == "PRO" and e["chain"] == "A":
            assert e["category"] == ("cis_proline" if abs(omega[e["res_seq"]]) < 90 else "trans_proline")
    assert any(abs(w) < 30 for w in omega.values())  # this entry has one (A 25)


# ------------------------------------------------------------------------------------------------------- rotamers


def _with_chis(sequence, index, chis, phi_psi=(-65.0, -40.0)):
    """A peptide whose residue ``index`` (0-based) has side-chain ``chis``."""
    return build_peptide(sequence, [phi_psi] * len(sequence), chis={index: tuple(chis)})


def _entry(layout, x, res_seq):
    return next(e for e in rotamers(layout, x) if e["res_seq"] == res_seq)


@pytest.mark.parametrize("res_name, letter", [("LEU", "L"), ("LYS", "K"), ("PHE", "F"), ("MET", "M"), ("GLN", "Q")])
def test_a_side_chain_built_at_a_library_rotamer_is_that_rotamer(res_name, letter):
    for name, _count, modal in library()[res_name]:
        layout, x = _with_chis(f"A{letter}A", 1, modal)
        e = _entry(layout, x, 2)
        # the built chis are measured back (IUPAC atoms, independent dihedral placement by NeRF)
        assert np.allclose((np.array(e["chis"]) - modal + 180.0) % 360.0 - 180.0, 0.0, atol=1e-6)
        assert not e["outlier"] and e["distance"] == pytest.approx(0.0, abs=1e-6)
        assert e["nearest"] == name or max(e["deviation"]) < 1e-6  # PHE/TYR: two namings of one rotamer


def test_chi1_sixty_degrees_from_every_rotamer_is_an_outlier():
    # LEU mt (-65, 175); chi1 -5 is 60 deg from mt and further from pp (62) and mp (-85)
    layout, x = _with_chis("ALA", 1, (-5.0, 175.0))
    e = _entry(layout, x, 2)
    assert all(abs(((-5.0 - m[0] + 180) % 360) - 180) >= 60 - 1e-9 for _, _, m in library()["LEU"])
    assert e["outlier"] and e["nearest"] == "mt" and e["deviation"][0] == pytest.approx(60.0, abs=1e-6)
    report = validate(layout, x)["rotamers"]
    assert (report["n"], report["outliers"]) == (1, 1)
    assert report["outliers_list"][0]["res_seq"] == 2


@pytest.mark.parametrize("chi2", [-85.0, -30.0, 20.0, 60.0, 130.0])
def test_phe_chi2_and_chi2_plus_180_are_one_conformation(chi2):
    a = _entry(*_with_chis("AFA", 1, (-65.0, chi2)), 2)
    b = _entry(*_with_chis("AFA", 1, (-65.0, chi2 + 180.0)), 2)
    assert (a["outlier"], a["nearest"]) == (b["outlier"], b["nearest"])
    assert a["distance"] == pytest.approx(b["distance"], abs=1e-6)


def test_windows_are_three_top8000_esd_but_at_least_30_degrees():
    w = chi_windows()
    assert set(w) == set(CHI_ATOMS)
    assert w["VAL"] == (30.0,) and w["LEU"] == pytest.approx((37.5, 47.1))  # Top8000 Leu mp: esd 12.5, 15.7 deg
    assert w["ASN"][1] > 150  # the Asn amide rotates freely in the Top8000 data (esd 55 deg)
    assert all(min(v) >= 30.0 for v in w.values())


def test_missing_side_chain_atoms_make_a_residue_incomplete_not_an_outlier():
    layout, x = _with_chis("AKA", 1, (-5.0, 180.0, 180.0, 180.0))  # chi1 far from every rotamer
    keep = ~((layout.res_seq == 2) & (layout.atom_name == "NZ"))
    report = validate(layout.select(keep), x[keep])["rotamers"]
    assert (report["n"], report["outliers"], report["incomplete"]) == (0, 0, 1)
    assert report["incomplete_list"] == [{"chain": "A", "res_seq": 2, "res_name": "LYS"}]


def test_nearest_rotamer_refuses_residues_without_rotamers_and_wrong_chi_counts():
    with pytest.raises(ValueError, match="PRO"):
        nearest_rotamer("PRO", (30.0, -35.0))
    with pytest.raises(ValueError, match="2 chi"):
        nearest_rotamer("LEU", (-65.0,))


# -------------------------------------------------------------------------------------------------------- clashes


def test_bonded_neighbours_are_not_clashes_and_a_planted_contact_is():
    layout, x = _peptide(-120.0, 130.0, "AAAAA")
    # many bonded pairs (1-2, 1-3, 1-4) are far inside r_i + r_j - 0.4, yet none counts
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    close = (d < 2 * 1.55 - CLASH_OVERLAP) & ~np.eye(len(x), dtype=bool)
    assert close.sum() > 2 * len(x)
    assert clashes(layout, x)["n_clashes"] == 0

    # a second strand far away, then one of its CB atoms put 2.0 A beyond residue 3's CB (non-bonded, C...C)
    other = AtomLayout(np.array(["B"] * len(layout)), layout.res_seq, layout.res_name, layout.atom_name, layout.element)
    both = AtomLayout(*(np.concatenate([getattr(layout, f), getattr(other, f)])
                        for f in ("chain_id", "res_seq", "res_name", "atom_name", "element")))
    xx = np.concatenate([x, x + 50.0])
    cb_a, ca_a = both.index()[("A", 3, "CB")], both.index()[("A", 3, "CA")]
    cb_b = both.index()[("B", 1, "CB")]
    unit = (xx[cb_a] - xx[ca_a]) / np.linalg.norm(xx[cb_a] - xx[ca_a])
    xx[cb_b] = xx[cb_a] + 2.0 * unit
    report = clashes(both, xx)
    assert report["n_clashes"] == 1
    worst = report["worst"][0]
    assert {(w["chain"], w["res_seq"], w["atom"]) for w in (worst["atom1"], worst["atom2"])} == {("A", 3, "CB"),
                                                                                                ("B", 1, "CB")}
    assert worst["distance"] == pytest.approx(2.0) and worst["overlap"] == pytest.approx(1.75 + 1.75 - 2.0)
    assert report["clashscore"] == pytest.approx(1000.0 / len(both))


def test_ideal_peptide_report_is_clean_and_json_able():
    layout, x = _peptide(-57.0, -47.0, "AKLFEVSA")
    report = validate(layout, x)
    json.dumps(report)
    assert report["ramachandran"]["favoured_pct"] == 100.0 and report["clashes"]["n_clashes"] == 0
    line = summary_line(report)
    assert line.startswith("Ramachandran favoured 100.0 %, outliers 0.0 % (n=6); rotamer outliers")
    assert line.endswith("clashscore (heavy atoms) 0.0")


def test_bad_inputs_are_refused_with_a_message():
    layout, x = _peptide(-57.0, -47.0, "AAA")
    with pytest.raises(ValueError, match=r"expected \(15, 3\)"):
        validate(layout, x[None])
    with pytest.raises(ValueError, match="unknown Ramachandran category"):
        ramachandran_value("alanine", -60, -40)
    with pytest.raises(ValueError, match="finite"):
        ramachandran_value("general", np.nan, -40)
    with pytest.raises(ValueError, match="summary_line"):
        summary_line({"ramachandran": {}})


# --------------------------------------------------------------------------------------------- deposited models


def test_a_well_refined_deposited_model_scores_like_one(dur):
    report = validate(dur.layout, dur.coords[0])
    rama, rota, clash = report["ramachandran"], report["rotamers"], report["clashes"]
    # 1DUR, 2.0 A, 55 residues: every residue with phi/psi is favoured; 2 of 38 side chains are off-rotamer
    # (Lys 15 chi1 -145, chi3 129; Glu 54 chi1 -135) and Ser 27 is deposited without its OG
    assert (rama["n"], rama["favoured"], rama["allowed"], rama["outliers"]) == (53, 53, 0, 0)
    assert (rota["n"], rota["outliers"], rota["incomplete"]) == (38, 2, 1)
    assert rota["incomplete_list"] == [{"chain": "A", "res_seq": 27, "res_name": "SER"}]
    assert {o["res_seq"] for o in rota["outliers_list"]} == {15, 54}
    assert clash["n_clashes"] == 0 and clash["n_atoms"] == len(dur.layout)


def test_disulfides_and_metal_sites_are_not_clashes(shared_data):
    # 9BN8 has a disulfide in its altloc B (Cys 208 - Cys 227); 2YL0 a heme iron with a bound CO
    for name in ("9BN8_single_001.pdb", "2YL0_single_001.pdb"):
        report = validate_multiconf(read_multiconf(shared_data(f"structures/altloc/{name}")), n_worst=100)
        names = [{w["atom1"]["res_name"], w["atom2"]["res_name"]} for w in report["model"]["clashes"]["worst"]]
        assert {"CYS"} not in names and {"HEC", "CMO"} not in names
        assert report["model"]["clashes"]["clashscore"] < 5.0


# ------------------------------------------------------------------------------------------ multiconformer models


def _two_state():
    """A strand with altlocs at residues 2 and 4: in B, residue 4's side chain sits where residue 2's is in A and
    residue 2's is moved 30 A away, so atoms of A and B overlap but never coexist."""
    layout, x = _with_chis("ALALA", 1, (-65.0, 175.0), phi_psi=(-120.0, 130.0))
    b = x.copy()
    idx = layout.index()
    side = {r: [idx[("A", r, n)] for n in ("CG", "CD1", "CD2")] for r in (2, 4)}
    b[side[4]] = x[side[2]] + np.array([0.3, 0.0, 0.0])
    b[side[2]] = x[side[2]] + np.array([0.0, 0.0, 30.0])
    return layout, np.stack([x, b]), np.array([0.6, 0.4])


def test_multiconf_reports_each_altloc_and_never_clashes_atoms_of_different_altlocs():
    layout, xs, w = _two_state()
    model = ensemble_to_multiconf(layout, xs, w)
    assert model.altlocs()[("A", 2)].keys() == {"A", "B"} and model.altlocs()[("A", 4)].keys() == {"A", "B"}
    conformers = altloc_conformers(model)
    assert np.allclose(conformers["A"], xs[0]) and np.allclose(conformers["B"], xs[1])

    report = validate_multiconf(model, n_worst=1000)
    json.dumps(report)
    assert set(report["altlocs"]) == {"A", "B"}
    for alt, x in zip("AB", xs):
        assert report["altlocs"][alt] == validate(layout, x, n_worst=1000)

    # the planted A/B overlap is real (about 0.3 A between altloc-B CG of residue 4 and altloc-A CG of residue 2) ...
    def record(res_seq, alt):
        return model.coords[(model.atom == layout.index()[("A", res_seq, "CG")]) & (model.altloc == alt)][0]

    assert np.linalg.norm(record(2, "A") - record(4, "B")) == pytest.approx(0.3)
    # ... but only pairs that can coexist are counted: the whole model's clashes are those of A plus those of B
    whole = report["model"]["clashes"]
    assert all({c["atom1"]["altloc"], c["atom2"]["altloc"]} != {"A", "B"} for c in whole["worst"])
    assert whole["n_clashes"] == sum(report["altlocs"][a]["clashes"]["n_clashes"] for a in "AB")
    assert whole["n_atoms"] == len(model.atom)

    # each residue/altloc combination once: residues 2 and 4 give two rotamer entries, the backbone one entry each
    rota = report["model"]["rotamers"]
    assert rota["n"] == report["altlocs"]["A"]["rotamers"]["n"] + 2
    assert report["model"]["ramachandran"]["n"] == report["altlocs"]["A"]["ramachandran"]["n"] == 3
    outliers = {(o["res_seq"], o["altloc"]) for o in rota["outliers_list"]}
    assert (2, "B") in outliers and all(alt == "B" for _, alt in outliers)  # A is at rotamers; B's side chains moved


def test_a_deposited_multiconformer_model(shared_data):
    model = read_multiconf(shared_data("structures/altloc/2YL0_single_001.pdb"))
    report = validate_multiconf(model)
    whole, per = report["model"], report["altlocs"]
    assert list(per) == sorted({a for ids in model.altlocs().values() for a in ids}) == ["A", "B", "C"]
    for alt in per:
        assert per[alt]["ramachandran"]["favoured_pct"] > 95 and per[alt]["ramachandran"]["outliers"] == 0
    # merged entries: at least as many as either conformer, at most both together
    for key in ("ramachandran", "rotamers"):
        assert max(per[a][key]["n"] for a in per) <= whole[key]["n"] <= sum(per[a][key]["n"] for a in per)
    assert whole["rotamers"]["n"] > per["A"]["rotamers"]["n"]  # side chains with altlocs count once per altloc
    assert summary_line(report) == summary_line(whole)
