"""RDC file readers and wildcard couplings (observables/rdc.py): .pa files as people write them, PALES tables, bad
inputs, Gly HA#/methyl HB* wildcards (mean or sum of the members' couplings) and the shared ubiquitin data."""

from __future__ import annotations

import math
import re
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from backbone_models import peptide
from guidance.fixtures import nerf
from observables.base import AtomInfo
from observables.errors import InputError
from observables.rdc import (
    AtomRef,
    RDCError,
    RDCObservable,
    alignment_tensor,
    read_pa,
    read_pales,
    read_rdc,
)

# Residue 1 has no amide H (no C of residue 0); Gly 3, 6, 11 carry HA2/HA3; Ala 4 gets model methyl protons.
SEQ = ["MET", "GLN", "GLY", "ALA", "LEU", "GLY", "SER", "ALA", "LYS", "VAL", "GLY", "THR"]
GLY = [3, 6, 11]

# Independent D_max numbers (gamma in rad s^-1 T^-1, IUPAC 2001; hbar in J s) for the bond-type ratio check.
GAMMA = {"H": 26.7522128e7, "C": 6.728284e7, "N": -2.71261804e7}


def dmax(x: str, y: str, r: float) -> float:
    return -1e-7 * GAMMA[x] * GAMMA[y] * 1.054571817e-34 / (math.pi * (r * 1e-10) ** 3)


# ------------------------------------------------------------------------------------------------------------------
# model helpers
# ------------------------------------------------------------------------------------------------------------------


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def member(seed: int, seq=SEQ, methyl_h: bool = False) -> tuple[AtomInfo, np.ndarray]:
    """One conformer: the ideal N-CA-C backbone of ``backbone_models.peptide`` with random phi/psi, CB on every
    non-Gly residue and, with ``methyl_h``, model protons HB1/HB2/HB3 on Ala 4 (atoms appended after the backbone)."""
    rng = np.random.default_rng(seed)
    phis, psis = rng.uniform(-180, 180, size=(2, len(seq)))
    atoms, xyz = peptide(list(phis), list(psis), res_names=list(seq))
    pos = {(int(r), str(a)): xyz[i] for i, (r, a) in enumerate(zip(atoms.res_seq, atoms.atom_name))}
    extra = []  # (res, name, element, xyz)
    for res, name in enumerate(seq, start=1):
        if name != "GLY":
            cb = nerf(pos[(res, "C")], pos[(res, "N")], pos[(res, "CA")], 1.530, 110.5, -122.5)
            extra.append((res, "CB", "C", cb))
            if methyl_h and res == 4:
                for k, torsion in enumerate((60.0, 180.0, -60.0), start=1):
                    extra.append((res, f"HB{k}", "H", nerf(pos[(res, "N")], pos[(res, "CA")], cb, 1.09, 109.5, torsion)))
    info = AtomInfo(
        element=np.concatenate([atoms.element, [e[2] for e in extra]]),
        atom_name=np.concatenate([atoms.atom_name, [e[1] for e in extra]]),
        res_name=np.concatenate([atoms.res_name, [seq[e[0] - 1] for e in extra]]),
        res_seq=np.concatenate([atoms.res_seq, [e[0] for e in extra]]),
        chain_id=np.full(len(atoms.atom_name) + len(extra), "A"),
    )
    return info, np.concatenate([xyz, np.array([e[3] for e in extra])])


def ensemble(seeds=(11, 12), methyl_h: bool = False):
    """Two conformers of SEQ (same atoms, different phi/psi) with unequal weights: atoms, coords [2, N, 3], weights."""
    members = [member(s, methyl_h=methyl_h) for s in seeds]
    atoms = members[0][0]
    coords = np.stack([m[1] for m in members]).astype(np.float32)
    return atoms, jnp.asarray(coords), jnp.asarray([0.35, 0.65], dtype=jnp.float32)


def nh_lines(coords: np.ndarray, weights: np.ndarray, atoms: AtomInfo, seed: int = 5) -> list[str]:
    """.pa lines '<res>N-H <Hz>' of the weighted ensemble for a random tensor (amide H on the C(i-1)-N / CA-N
    bisector, computed here independently), so that the N-H couplings alone pin the tensor down."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    t = alignment_tensor(10.0, 0.4, q * np.sign(np.diag(r)))
    lines = []
    for res in range(2, len(SEQ) + 1):
        value = 0.0
        for w, xyz in zip(np.asarray(weights), np.asarray(coords, dtype=np.float64)):
            pos = {(int(rr), str(a)): xyz[i] for i, (rr, a) in enumerate(zip(atoms.res_seq, atoms.atom_name))}
            n = pos[(res, "N")]
            u = unit(unit(n - pos[(res - 1, "C")]) + unit(n - pos[(res, "CA")]))
            value += w * float(u @ t @ u)
        lines.append(f"{res}N-H {value:.6f}")
    return lines


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def predictions(obs: RDCObservable, coords, weights) -> dict[str, float]:
    """{label: predicted coupling (Hz)} of the weighted ensemble (tensor fitted inside)."""
    return dict(zip((c.label for c in obs.couplings), np.asarray(obs.predict(coords, weights), dtype=np.float64)))


def rows_by_label(obs: RDCObservable, coords, weights) -> dict[str, np.ndarray]:
    """{label: ensemble design row [5]} = weights @ member_predictions (what the prediction is linear in)."""
    rows = np.einsum("e,emk->mk", np.asarray(weights, np.float64), np.asarray(obs.member_predictions(coords), np.float64))
    return dict(zip((c.label for c in obs.couplings), rows))


def pair(c) -> tuple:
    """Order-free (res, name) pair of a coupling with the amide H alias HN = H."""
    def canon(a):
        return (a.res_seq, "H" if a.name == "HN" else a.name)
    return tuple(sorted([canon(c.atom1), canon(c.atom2)]))


# ------------------------------------------------------------------------------------------------------------------
# .pa files as people write them
# ------------------------------------------------------------------------------------------------------------------

PA_LINES = [
    "REMARK  ubiquitin-like test data, bicelles",  # 1
    "# label\tvalue (Hz)\terror (Hz)",  # 2
    "! Bax-style comment",  # 3
    "// C++-style comment",  # 4
    "",  # 5
    "2N-H\t13.2\t0.5",  # 6: tabs, error column
    "3HN-N     -8.78    0.25   # HN-N order, trailing comment",  # 7: several spaces
    "   ",  # 8: white space only
    "4CA-HA  21.4   ! trailing bang comment",  # 9: no error
    "5N-C-1  -1.05 0.1",  # 10: C(4) - N(5) through the offset
    "6C-7N\t\t0.85",  # 11: C(i) - N(i+1) with explicit residues
    "7CA-C   -2.5  0.3  // trailing slashes",  # 12
    "8HN-HA  4.75",  # 13
    "9CA-HA#  3.1 0.6",  # 14: wildcard, # is not a comment here (no white space before it)
    "A.10N-A.10H 1.5",  # 15: chain prefixes
    "11n-h  -0.5",  # 16: lower case
    "12N  117.3",  # 17: one atom = a CSA line, ignored
]
PA_EXPECTED = [  # (chain1, res1, name1, chain2, res2, name2, value, error, line)
    (None, 2, "N", None, 2, "H", 13.2, 0.5, 6),
    (None, 3, "HN", None, 3, "N", -8.78, 0.25, 7),
    (None, 4, "CA", None, 4, "HA", 21.4, None, 9),
    (None, 5, "N", None, 4, "C", -1.05, 0.1, 10),
    (None, 6, "C", None, 7, "N", 0.85, None, 11),
    (None, 7, "CA", None, 7, "C", -2.5, 0.3, 12),
    (None, 8, "HN", None, 8, "HA", 4.75, None, 13),
    (None, 9, "CA", None, 9, "HA#", 3.1, 0.6, 14),
    ("A", 10, "N", "A", 10, "H", 1.5, None, 15),
    (None, 11, "N", None, 11, "H", -0.5, None, 16),
]


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["LF", "CRLF"])
def test_pa_reader_whitespace_comments_errors_and_label_forms(tmp_path, newline):
    path = tmp_path / "mixed.pa"
    path.write_bytes(newline.join(PA_LINES).encode() + newline.encode())
    got = [
        (c.atom1.chain, c.atom1.res_seq, c.atom1.name, c.atom2.chain, c.atom2.res_seq, c.atom2.name, c.value, c.error,
         int(c.source.rsplit(":", 1)[1]))
        for c in read_pa(path)
    ]
    assert got == PA_EXPECTED
    assert all(c.source.startswith(str(path) + ":") for c in read_pa(path))
    assert [c.label for c in read_rdc(path)] == [
        "2N-H", "3HN-N", "4CA-HA", "5N-4C", "6C-7N", "7CA-C", "8HN-HA", "9CA-HA#", "A.10N-H", "11N-H"
    ]  # format auto -> pa


def test_pa_equivalent_labels_of_one_pair_are_duplicates(tmp_path):
    """14C-15N, 15N-14C, 15N-C-1, 14C-N+1 name one pair (C(14)-N(15)); 14N-H and 14HN-N likewise (HN = H)."""
    forms = ["14C-15N", "15N-14C", "15N-C-1", "14C-N+1"]
    pairs = {pair(read_pa(write(tmp_path, f"f{k}.pa", f"{label} 1.0\n"))[0]) for k, label in enumerate(forms)}
    assert pairs == {((14, "C"), (15, "N"))}
    for first, second in [("14C-15N", "15N-C-1"), ("14C-N+1", "15N-14C"), ("14N-H", "14HN-N")]:
        path = write(tmp_path, "dup.pa", f"# two forms\n{first} 1.0\n\n{second} 2.0\n")
        with pytest.raises(RDCError, match=rf"dup\.pa:4: coupling {re.escape(second)} is already given at line 2"):
            read_pa(path)


def test_pa_pair_types_map_onto_the_model(tmp_path):
    """Every pair type of the .pa reader is built on a heavy-atom model: fixed-length types N-H, CA-HA, C-N, CA-C,
    and HN-HA with the model distance; the bond-type ratio of CA-HA is D_max(C-H, 1.09 A) / D_max(N-H, 1.02 A)."""
    atoms, coords, weights = ensemble()
    text = "\n".join([
        "2N-H 13.2", "3N-H 2.0", "4HN-N -8.78", "5N-H 4.0", "7N-H -3.0", "9N-H 6.5",
        "4CA-HA 21.4", "6N-C-1 -1.05", "7C-8N 0.85", "8CA-C -2.5", "10HN-HA 4.75", "11CA-HA# 3.1",
    ]) + "\n"
    obs = RDCObservable(atoms, data=write(tmp_path, "types.pa", text))
    assert obs.bond_types == ["N-H"] * 6 + ["CA-HA", "C-N", "C-N", "CA-C", "H-HA", "CA-HA"]
    assert obs.model_distance_types == ["H-HA"]
    rep = obs.report(coords, weights)
    assert rep["n"] == 12 and rep["n_unmapped"] == 0 and rep["unmapped"] == [] and rep["unmapped_reasons"] == {}
    assert rep["model_distance_types"] == ["H-HA"]
    assert obs.scale_by_type["N-H"] == pytest.approx(1.0)
    assert obs.scale_by_type["CA-HA"] == pytest.approx(dmax("C", "H", 1.09) / dmax("N", "H", 1.02), rel=1e-6)
    assert obs.scale_by_type["C-N"] == pytest.approx(dmax("C", "N", 1.329) / dmax("N", "H", 1.02), rel=1e-6)
    assert obs.scale_by_type["CA-C"] == pytest.approx(dmax("C", "C", 1.525) / dmax("N", "H", 1.02), rel=1e-6)
    np.testing.assert_allclose(obs.observed, [13.2, 2.0, -8.78, 4.0, -3.0, 6.5, 21.4, -1.05, 0.85, -2.5, 4.75, 3.1])


def test_model_distance_pair_type_is_order_free(tmp_path):
    atoms, coords, weights = ensemble()
    nh = nh_lines(coords, weights, atoms)
    obs = RDCObservable(atoms, data=write(tmp_path, "hnha.pa", "\n".join(nh + ["4HN-HA 2.0", "5HA-HN 1.0"])),
                        sigma={"N-H": 1.0, "H-HA": 2.0})
    assert obs.model_distance_types == ["H-HA"] and obs.bond_types[-2:] == ["H-HA", "H-HA"]
    np.testing.assert_allclose(obs.sigma[-2:], [2.0, 2.0])


def test_pa_with_utf8_bom_is_read(tmp_path):
    path = tmp_path / "bom.pa"
    path.write_bytes("\ufeff# written by Notepad\r\n2N-H 13.2\r\n3N-H -8.78\r\n".encode("utf-8"))
    assert [(c.atom1.res_seq, c.value) for c in read_pa(path)] == [(2, 13.2), (3, -8.78)]


def test_pa_with_cp1252_comment_is_read(tmp_path):
    path = tmp_path / "cp1252.pa"
    path.write_bytes(b"# Cornilescu & Bax\x85 2000, caf\xe9\n2N-H 13.2\n3N-H eight\n")
    with pytest.raises(RDCError, match=r"cp1252\.pa:3: cannot read 'eight'"):
        read_pa(path)


# ------------------------------------------------------------------------------------------------------------------
# wildcards
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("average", ["mean", "sum"])
def test_glycine_ha_wildcard_is_the_mean_or_sum_of_ha2_and_ha3(tmp_path, average):
    """CA-HA# of Gly 3, 6, 11 predicted as (sum or mean of) the explicit CA-HA2 and CA-HA3 couplings, on the same
    two-member ensemble.  The N-H couplings fix the tensor (CA-HA sigma 1e6 Hz: no say in the fit), so the two
    observables fit the same tensor and the predictions must agree to float32 precision."""
    atoms, coords, weights = ensemble()
    nh = nh_lines(coords, weights, atoms)
    wild = write(tmp_path, "wild.pa", "\n".join(nh + [f"{g}CA-HA# 1.0" for g in GLY]) + "\n")
    explicit = write(tmp_path, "explicit.pa", "\n".join(nh + [f"{g}CA-HA{k} 1.0" for g in GLY for k in (2, 3)]) + "\n")
    sigma = {"N-H": 1.0, "CA-HA": 1e6}
    kwargs = {} if average == "mean" else {"wildcard_average": "sum"}
    obs_w = RDCObservable(atoms, data=wild, sigma=sigma, **kwargs)
    obs_e = RDCObservable(atoms, data=explicit, sigma=sigma, wildcard_average=average)
    assert obs_w.wildcard_average == average and obs_w.bond_types[-3:] == ["CA-HA"] * 3

    t_w, t_e = obs_w.tensor(coords, weights), obs_e.tensor(coords, weights)
    np.testing.assert_allclose(t_w, t_e, rtol=1e-5, atol=1e-5 * np.abs(t_e).max())
    assert obs_e.report(coords, weights)["q_factor_N-H"] < 1e-3  # noise-free N-H data: the tensor is recovered

    pw, pe = predictions(obs_w, coords, weights), predictions(obs_e, coords, weights)
    combine = (lambda a, b: 0.5 * (a + b)) if average == "mean" else (lambda a, b: a + b)
    for g in GLY:
        ha2, ha3 = pe[f"{g}CA-HA2"], pe[f"{g}CA-HA3"]
        assert abs(ha2 - ha3) > 1.0  # the two protons really differ, so mean/sum/one member are distinguishable
        assert pw[f"{g}CA-HA#"] == pytest.approx(combine(ha2, ha3), rel=1e-5, abs=1e-4)
    for label in (line.split()[0] for line in nh):
        assert pw[label] == pytest.approx(pe[label], rel=1e-5, abs=1e-4)

    # the design rows themselves (independent of the fit): row(HA#) = factor * (row(HA2) + row(HA3))
    rw, re_ = rows_by_label(obs_w, coords, weights), rows_by_label(obs_e, coords, weights)
    factor = 0.5 if average == "mean" else 1.0
    for g in GLY:
        np.testing.assert_allclose(rw[f"{g}CA-HA#"], factor * (re_[f"{g}CA-HA2"] + re_[f"{g}CA-HA3"]), rtol=1e-5,
                                   atol=1e-7)


@pytest.mark.parametrize("average", ["mean", "sum"])
def test_methyl_wildcards_over_model_protons(tmp_path, average):
    """Ala 4 carries model protons HB1-3: 4CB-HB*, 4CB-HB# and 4CB-HB% all mean (or sum) the explicit CB-HB1/2/3
    couplings (a pair type without a fixed length: D_max ~ r^-3 from the model)."""
    atoms, coords, weights = ensemble(methyl_h=True)
    nh = nh_lines(coords, weights, atoms)
    wild = "\n".join(nh + ["4CB-HB* 1", "4CB-HB# 1", "4CB-HB% 1"])
    sigma = {"N-H": 1.0, "CB-HB": 1e6}
    obs_w = RDCObservable(atoms, data=write(tmp_path, "w.pa", wild), sigma=sigma, wildcard_average=average)
    # explicit members are pair types of their own (CB-HB1, CB-HB2, CB-HB3: no fixed length, named by the atoms)
    obs_e = RDCObservable(atoms, data=write(tmp_path, "e.pa", "\n".join(nh + [f"4CB-HB{k} 1" for k in (1, 2, 3)])),
                          sigma={"N-H": 1.0, "CB-HB1": 1e6, "CB-HB2": 1e6, "CB-HB3": 1e6})
    assert obs_w.model_distance_types == ["CB-HB"] and obs_w.report(coords, weights)["n_unmapped"] == 0
    pw, pe = predictions(obs_w, coords, weights), predictions(obs_e, coords, weights)
    members = [pe[f"4CB-HB{k}"] for k in (1, 2, 3)]
    assert max(members) - min(members) > 1.0
    expected = float(np.mean(members)) if average == "mean" else float(np.sum(members))
    for label in ("4CB-HB*", "4CB-HB#", "4CB-HB%"):
        assert pw[label] == pytest.approx(expected, rel=1e-5, abs=1e-4)

    # model_hydrogens=False ignores the model's HB atoms, which are not placeable either: the wildcard is unmapped
    with pytest.warns(UserWarning, match=r"3 RDC\(s\) skipped"):
        off = RDCObservable(atoms, data=write(tmp_path, "w.pa", wild), sigma=sigma, model_hydrogens=False)
    rep = off.report(coords, weights)
    assert rep["n"] == len(nh) and rep["n_unmapped"] == 3 and rep["unmapped_reasons"] == {"atom absent": 3}
    assert "model_hydrogens is false" in rep["unmapped"][0]


def test_wildcards_that_match_nothing_are_unmapped(tmp_path):
    atoms, coords, weights = ensemble()  # no protons in the model
    nh = nh_lines(coords, weights, atoms)
    extra = [
        "4CB-HG* 1.0",  # Ala has no HG at all
        "5CB-HB* 1.0",  # Leu has HB2/HB3, but the model has no protons and HB is not placed
        "3CA-HA 1.0",  # Gly has no HA (HA2/HA3)
        "7CA-HA% 1.0",  # Ser: HA% needs one more character; Ser has no HA1..HA9
    ]
    with pytest.warns(UserWarning, match=r"4 RDC\(s\) skipped"):
        obs = RDCObservable(atoms, data=write(tmp_path, "nothing.pa", "\n".join(nh + extra) + "\n"))
    rep = obs.report(coords, weights)
    assert rep["n"] == len(nh) and rep["n_skipped"] == 4 and rep["n_missing"] == 0
    assert rep["n_unmapped"] == 4
    assert rep["unmapped_reasons"] == {"unknown atom name": 3, "atom absent": 1}
    got = dict(s.split(": ", 1) for s in rep["unmapped"])
    assert got["4CB-HG*"] == "unknown atom name (HG* matches no atom of ALA)"
    assert got["5CB-HB*"].startswith("atom absent (HB* of LEU 5")
    assert got["3CA-HA"].startswith("unknown atom name (HA is not an atom of GLY") and "HA# for their mean" in got["3CA-HA"]
    assert got["7CA-HA%"] == "unknown atom name (HA% matches no atom of SER)"
    assert dict(obs.skipped) == got

    # place_hydrogens=False: Gly HA2/HA3 cannot be built, so CA-HA# is unmapped (never averaged over a subset)
    heavy = [f"{r}N-CA 1.{r}" for r in range(1, 10)] + ["3CA-HA# 2.0", "6CA-HA# 2.0"]
    with pytest.warns(UserWarning, match="placement off"):
        obs = RDCObservable(atoms, data=write(tmp_path, "off.pa", "\n".join(heavy)), place_hydrogens=False)
    rep = obs.report(coords, weights)
    assert rep["n"] == 9 and rep["n_unmapped"] == 2 and rep["unmapped_reasons"] == {"placement off": 2}
    assert [s.split(":")[0] for s in rep["unmapped"]] == ["3CA-HA#", "6CA-HA#"]


# ------------------------------------------------------------------------------------------------------------------
# PALES tables
# ------------------------------------------------------------------------------------------------------------------

PALES = """REMARK Ubiquitin-like test peptide, N-H, CA-HA and C-N couplings
REMARK written as PALES -inD expects

DATA SEQUENCE MQGALGSAKV GT

VARS   RESID_I RESNAME_I ATOMNAME_I RESID_J RESNAME_J ATOMNAME_J D      DD    W
FORMAT %5d     %6s       %6s        %5d     %6s       %6s        %9.3f  %9.3f %.2f

    2    GLN      N      2    GLN     HN   13.200  0.500 1.00
    3    GLY      N      3    GLY     HN   -8.780  0.250 1.00
    4    ALA     HN      4    ALA      N   -6.810  0.250 1.00
    5    LEU      N      5    LEU     HN   -3.190  0.300 0.50
\t7\tSER\tN\t7\tSER\tH\t4.620\t0.400\t1.00
    8    ALA      N      8    ALA     HN  -13.620  0.250 0.00
    4    ALA     CA      4    ALA     HA   21.400  1.000 1.00
    6    GLY     CA      6    GLY    HA#    3.100  1.000 1.00
    8    ALA      C      9    LYS      N   -1.050  0.100 1.00
"""
PALES_AS_PA = """# the same couplings as a .pa file
2N-H 13.2 0.5
3N-H -8.78 0.25
4HN-N -6.81 0.25
5N-H -3.19 0.3
7N-H 4.62 0.4
8N-H -13.62 0.25
4CA-HA 21.4 1.0
6CA-HA# 3.1 1.0
8C-9N -1.05 0.1
"""


def test_pales_table_equals_the_equivalent_pa_file(tmp_path):
    pales_path = write(tmp_path, "ubq.tbl", PALES)
    pa_path = write(tmp_path, "ubq.pa", PALES_AS_PA)
    pales, pa = read_pales(pales_path), read_pa(pa_path)
    assert len(pales) == len(pa) == 9
    assert [pair(c) for c in pales] == [pair(c) for c in pa]
    assert [(c.value, c.error) for c in pales] == [(c.value, c.error) for c in pa]
    assert [(c.atom1.name, c.atom2.name) for c in pales][:4] == [("N", "HN"), ("N", "HN"), ("HN", "N"), ("N", "HN")]
    assert pales[0].atom1 == AtomRef(None, 2, "N") and pales[0].atom1.res_name == "GLN"
    assert pales[7].atom2.name == "HA#" and pales[8].atom2 == AtomRef(None, 9, "N")
    assert pales[0].source == f"{pales_path}:9" and pales[-1].source == f"{pales_path}:17"

    for name in ("ubq.tab", "ubq.txt", "pales_named.pa"):  # auto-detection by the VARS line, whatever the suffix
        path = write(tmp_path, name, PALES)
        assert [(pair(c), c.value, c.error) for c in read_rdc(path)] == [(pair(c), c.value, c.error) for c in pales]
    assert [c.value for c in read_rdc(pa_path)] == [c.value for c in pa]

    # the two files give the same observable: same couplings used, same predictions on the same ensemble
    atoms, coords, weights = ensemble()
    obs_t, obs_p = RDCObservable(atoms, data=pales_path), RDCObservable(atoms, data=pa_path)
    assert obs_t.bond_types == obs_p.bond_types == ["N-H"] * 6 + ["CA-HA", "CA-HA", "C-N"]
    np.testing.assert_allclose(obs_t.predict(coords, weights), obs_p.predict(coords, weights), rtol=1e-6, atol=1e-6)

    # RESNAME columns are checked against the model
    with pytest.raises(RDCError, match=r"ubq\.tbl:9: residue A\.2 is TRP in the data but GLN in the model"):
        RDCObservable(atoms, data=write(tmp_path, "ubq.tbl", PALES.replace("    2    GLN      N      2    GLN",
                                                                              "    2    TRP      N      2    TRP")))


def test_pales_output_table_uses_d_obs(tmp_path):
    text = (
        "VARS RESID_I RESNAME_I ATOMNAME_I RESID_J RESNAME_J ATOMNAME_J DI D_OBS D D_DIFF DD W\n"
        "FORMAT %5d %6s %6s %5d %6s %6s %9.2f %9.3f %9.3f %9.3f %.2f %.2f\n"
        "2 GLN N 2 GLN HN -1.0 13.200 12.000 1.2 0.5 1.0\n"
        "3 GLY N 3 GLY HN 1.0 -8.780 -8.000 -0.78 0.25 1.0\n"
    )
    got = read_rdc(write(tmp_path, "out.tbl", text))
    assert [(c.atom1.res_seq, c.value, c.error) for c in got] == [(2, 13.2, 0.5), (3, -8.78, 0.25)]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.replace(" RESID_J RESNAME_J ATOMNAME_J D ", " RESID_J RESNAME_J D "),
         r"bad\.tbl:6: the VARS line lacks column\(s\) ATOMNAME_J"),
        (lambda t: t.replace(" RESNAME_J ATOMNAME_J D      DD    W", " RESNAME_J ATOMNAME_J DD    W"),
         r"bad\.tbl:6: the VARS line lacks column\(s\) D;"),
        (lambda t: t.replace("3    GLY     HN   -8.780  0.250 1.00", "3    GLY     HN   -8.780  0.250"),
         r"bad\.tbl:10: 8 fields but the VARS line names 9 columns"),
        (lambda t: t.replace("5    LEU     HN   -3.190  0.300 0.50", "5    LEU     HN   -3.190  0.300 0.50 7"),
         r"bad\.tbl:12: 10 fields but the VARS line names 9 columns"),
        (lambda t: t.replace("-8.780  0.250", "-8.780  0.000"), r"bad\.tbl:10: the error must be a finite number > 0"),
        (lambda t: t.replace("21.400  1.000", "21.400  -1.00"), r"bad\.tbl:15: the error must be a finite number > 0"),
        (lambda t: t.replace("0.300 0.50", "0.300 -0.5"), r"bad\.tbl:12: the weight W must be a finite number >= 0"),
        (lambda t: t.replace("    2    GLN", "    x    GLN", 1), r"bad\.tbl:9: RESID_I 'x' is not an integer"),
        (lambda t: t.replace("VARS", "REMARK VARS").replace("FORMAT", "REMARK FORMAT"),
         r"bad\.tbl:9: data before the VARS line"),
    ],
    ids=["no-ATOMNAME_J", "no-D", "short-row", "long-row", "DD-zero", "DD-negative", "W-negative", "RESID", "no-VARS"],
)
def test_pales_errors_name_file_and_line(tmp_path, edit, match):
    path = write(tmp_path, "bad.tbl", edit(PALES))
    with pytest.raises(RDCError, match=match) as info:
        read_pales(path)
    assert isinstance(info.value, InputError) and "\n" not in str(info.value)
    if re.search(r"^\s*VARS\s", edit(PALES), flags=re.M):  # read_rdc picks the PALES reader and fails the same
        with pytest.raises(RDCError, match=match):
            read_rdc(path)


# ------------------------------------------------------------------------------------------------------------------
# bad .pa inputs
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, match",
    [
        (b"2N-H 13.2\n\nN-H 1.0\n", r"bad\.pa:3: cannot read the interaction label 'N-H'"),
        (b"2N-H 13.2\n3N_H 1.0\n", r"bad\.pa:2: cannot read the interaction label '3N_H'"),
        (b"# c\n2N-H 13.2\n3N-H eight\n", r"bad\.pa:3: cannot read 'eight' as a coupling"),
        (b"2N-H 13.2 abc\n", r"bad\.pa:1: cannot read '13.2 abc' as a coupling"),
        (b"2N-H 13.2\r\n3N-H 1,5\r\n", r"bad\.pa:2: cannot read '1,5' as a coupling"),
        (b"2N-H nan\n", r"bad\.pa:1: the coupling must be a finite number"),
        (b"2N-H 13.2 0\n", r"bad\.pa:1: the error must be a finite number > 0"),
        (b"2N-H 13.2 0.5 1.0\n", r"bad\.pa:1: expected '<label> <value Hz> \[<error Hz>\]', got 4 fields"),
        (b"2N-H\n", r"bad\.pa:1: expected '<label> <value Hz> \[<error Hz>\]', got 1 fields"),
        (b"2N-O 1.0\n", r"bad\.pa:1: unknown atom name 'O' in '2N-O'"),
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xcb\x48\xcd\xc9\xc9\x07\x00", r"bad\.pa: not a text file \(it contains NUL"),
        (bytes(range(128, 256)) * 4, r"bad\.pa: not a text file \(undecodable byte at offset 0\)"),
        (b"", r"bad\.pa: no RDCs found; expected lines"),
        (b"# only comments\n\nREMARK nothing here\n", r"bad\.pa: no RDCs found; expected"),
        (b"2N 117.3\n3N 120.1\n", r"bad\.pa: no RDCs found \(only 2 one-atom CSA lines\)"),
    ],
    ids=["no-residue", "underscore", "value-word", "error-word", "decimal-comma", "nan", "error-zero", "4-fields",
         "1-field", "oxygen", "gzip", "binary", "empty", "comments-only", "csa-only"],
)
def test_bad_pa_inputs_raise_one_line_rdc_errors(tmp_path, content, match):
    path = tmp_path / "bad.pa"
    path.write_bytes(content)
    for reader in (read_pa, read_rdc):
        with pytest.raises(RDCError, match=match) as info:
            reader(path)
        assert isinstance(info.value, InputError) and "\n" not in str(info.value)
        assert str(path) in str(info.value)


def test_missing_file_or_directory(tmp_path):
    with pytest.raises(RDCError, match=r"absent\.pa: not found"):
        read_rdc(tmp_path / "absent.pa")
    with pytest.raises(RDCError, match=r"is a directory"):
        read_pa(tmp_path)
    with pytest.raises(RDCError, match=r"unknown RDC format 'xml'"):
        read_rdc(write(tmp_path, "x.pa", "2N-H 1\n"), format="xml")


# ------------------------------------------------------------------------------------------------------------------
# shared ubiquitin data
# ------------------------------------------------------------------------------------------------------------------


def independent_nh(path) -> list[tuple[int, float]]:
    """(residue, Hz) of every '<res>N-H <Hz>' line, by a parser written for this test."""
    out = []
    for line in path.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0].endswith("N-H") and fields[0][:-3].isdigit():
            out.append((int(fields[0][:-3]), float(fields[1])))
    return out


@pytest.mark.parametrize("name", ["ubq_bicelle_hn-n.pa", "ubq_bicelle_hn-h.pa", "ubq_bicelle_hn-c.pa"])
def test_shared_ubiquitin_files_load_with_63_nh_couplings(shared_data, name):
    """README: 63 N-H RDCs per file; the one-atom lines (15N/1H/13C CSA data) are not RDCs."""
    path = shared_data(f"rdc/ubiquitin/{name}")
    couplings = read_rdc(path)
    expected = independent_nh(path)
    assert len(couplings) == len(expected) == 63
    assert [(c.atom1.res_seq, c.value) for c in couplings] == expected
    assert all((c.atom1.name, c.atom2.name) == ("N", "H") and c.atom1.res_seq == c.atom2.res_seq for c in couplings)
    n_one_atom = sum(1 for line in path.read_text().splitlines() if re.fullmatch(r"\d+[A-Z]+\s+\S+", line.strip()))
    assert n_one_atom == 63  # present in the file, and ignored
