"""NOE distance restraints: the X-PLOR parser, r^-6 averaging over protons and ensemble members, the flat-bottom
likelihood, pseudo-atoms for heavy-atom models, and the deposited 2KJR NMR ensemble with its own restraints."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import enable_x64

import observables.noe  # noqa: F401  (registers "noe")
from observables.base import AtomInfo, build
from observables.hydrogens import dihedral_h, methylene_h, place_alpha_h, rotor_centroid
from observables.noe import (
    NoeObservable,
    RestraintFormatError,
    name_pattern,
    parse_xplor_restraints,
    parse_xplor_text,
)

ONE = np.ones(1, np.float32)


def _atoms(rows):
    """AtomInfo and coords [1, N, 3] from rows (res_name, res_seq, atom_name, xyz)."""
    res, seq, name, xyz = zip(*rows)
    coords = np.array(xyz, dtype=np.float32)
    return AtomInfo(np.array([n[0] for n in name]), np.array(name), np.array(res), np.array(seq),
                    np.array(["A"] * len(rows)), coords[None]), coords[None]


def _residue(res_name, res_seq, side=()):
    """Heavy atoms of one residue from ideal internal coordinates (NeRF); ``side``: (name, parent, grandparent,
    great-grandparent, bond A, angle deg, torsion deg) rows added after N, CA, C, CB."""
    n, ca = np.array([0.0, 1.458, 0.0]), np.zeros(3)
    c = 1.525 * np.array([math.cos(math.radians(-21.2)), math.sin(math.radians(-21.2)), 0.0])
    xyz = {"N": n, "CA": ca, "C": c}
    xyz["CB"] = np.asarray(dihedral_h(ca, n, c, 1.53, math.radians(110.5), math.radians(-122.6)))
    for name, p, g, gg, bond, angle, torsion in side:
        xyz[name] = np.asarray(dihedral_h(xyz[p], xyz[g], xyz[gg], bond, math.radians(angle), math.radians(torsion)))
    return [(res_name, res_seq, k, v) for k, v in xyz.items()]


# ------------------------------------------------------------------------------------------------------ parsing

FILE = """\
! a comment line; below an X-PLOR NOE block with its own keywords
{ a block comment
  { nested } spanning lines }
noe
  class all
  averaging all sum
assign (resid 1 and name HA*)      ! trailing comment
       (resid 2 and name H) 3.0 1.0 2.0
ASSI ( resid 1:2 and ( name HB# or name HG% ) and not name HB3 )
     ( segid "A" and resid 3 and name HZ ) 4.0 2.0 1.0
  OR ( resid 1 and name HA2 ) ( resid 3 and name HZ )
assign (resid 1 and name C)(resid 2 and name N)
       (resid 2 and name CA)(resid 2 and name C) 1.0 -60.0 20.0 2
end
"""


def test_parser_reads_multiline_or_statements_and_skips_other_restraint_types():
    rs = parse_xplor_text(FILE, "test.tbl")
    assert len(rs.restraints) == 2 and len(rs.skipped) == 1
    first, second = rs.restraints
    assert (first.line, first.lower, first.upper) == (7, 2.0, 5.0)
    assert [p[0].text for p in first.pairs] == ["resid 1 and name HA*"]
    assert second.line == 9 and (second.lower, second.upper) == (2.0, 5.0) and len(second.pairs) == 2
    assert second.pairs[0][0].node == ("and", ("and", ("resid", 1, 2), ("or", ("name", "HB#"), ("name", "HG%"))),
                                       ("not", ("name", "HB3")))
    assert second.pairs[0][1].node[1][1] == ("segid", "A")
    assert rs.skipped[0].line == 12 and "dihedral" in rs.skipped[0].reason
    assert rs.ignored == ((4, 6), (14, 14))  # noe / class / averaging ... end: NOE-block keywords, not restraints


def test_wildcards_follow_xplor():
    names = ["HA", "HB", "HB2", "HB3", "HD1", "HD2", "HD11", "HD", "HG1", "HG12", "HN"]

    def match(p):
        return [n for n in names if name_pattern(p).fullmatch(n)]

    assert match("HB*") == ["HB", "HB2", "HB3"]
    assert match("hd#") == ["HD1", "HD2", "HD11"]
    assert match("HG%") == ["HG1"]
    assert match("HD+") == ["HD1", "HD2"]
    assert match("H%") == ["HA", "HB", "HD", "HN"]


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("assign (resid 1 and nme HA) (resid 2 and name H) 3.0 1.0 1.0\n", 1, ["'nme'"]),
        ("\n\nassign (resid 1 and name HA)\n  (resid 2 and name H) 3.0 1.0\n", 3, ["three numbers", "3.0 1.0"]),
        ("assign (resid 1 and name HA (resid 2 and name H) 3.0 1.0 1.0\n", 1, ["never closed"]),
        ("! ok\nassign (resid x1 and name HA) (resid 2 and name H) 3.0 1.0 1.0\n", 2, ["resid 'x1'"]),
        ("assign (resid 1 and name HA) (resid 2 and name H) 3.0 -1.0 1.0\n", 1, [">= 0"]),
        ("assign (resid 1 name HA) (resid 2 and name H) 3.0 1.0 1.0\n", 1, ["missing 'and'/'or'"]),
        ("noe\n{ never closed\nassign (resid 1 and name HA) (resid 2 and name H) 3 1 1\n", 2, ["'{'"]),
        (
            (
                "assign (resid 1 and name HA) (resid 2 and name H) (resid 3 and name H) 3.0 1.0 1.0\n"
                "  or (resid 4 and name H) (resid 5 and name H)\n"
            ),
            1,
            ["first pair", "3 atom selection"],
        ),
    ],
)
def test_parser_errors_name_the_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "bad.tbl"
    path.write_text(text)
    with pytest.raises(RestraintFormatError) as err:
        parse_xplor_restraints(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}, line {line}:"), msg
    for w in words:
        assert w in msg, msg


# ------------------------------------------------------------------------------------------ averaging and penalty


def _two_protons_and_partner():
    """Residue 1 has two protons (HA2, HA3) 4.0 and sqrt(4^2 + 1.8^2) A from residue 2's H."""
    return _atoms([("UNK", 1, "HA2", (0.0, 0.0, 0.0)), ("UNK", 1, "HA3", (1.8, 0.0, 0.0)),
                   ("UNK", 2, "H", (0.0, 4.0, 0.0)), ("UNK", 3, "HZ", (0.0, -5.0, 0.0))])


def test_sum_averaging_over_ambiguous_protons_matches_a_hand_computation():
    atoms, x = _two_protons_and_partner()
    r1, r2 = 4.0, math.hypot(4.0, 1.8)
    text = ("assign (resid 1 and name HA*) (resid 2 and name H) 3.0 1.0 2.0\n"
            "assign (resid 1 and name HA2) (resid 2 and name H) 3.0 1.0 2.0 or (resid 1 and name HA3) (resid 3 and "
            "name HZ)\n")
    rs = parse_xplor_text(text)
    r_sum = np.asarray(NoeObservable(atoms, rs).predict(x, ONE))
    r3 = math.hypot(1.8, 5.0)
    assert r_sum[0] == pytest.approx((r1**-6 + r2**-6) ** (-1 / 6), rel=1e-5)
    assert r_sum[1] == pytest.approx((r1**-6 + r3**-6) ** (-1 / 6), rel=1e-5)  # OR pairs add up too
    assert r_sum[0] < min(r1, r2)  # summing intensities: closer than either proton
    r_mean = np.asarray(NoeObservable(atoms, rs, proton_averaging="mean").predict(x, ONE))
    assert r_mean[0] == pytest.approx(((r1**-6 + r2**-6) / 2) ** (-1 / 6), rel=1e-5)


def test_ensemble_average_is_over_r_minus_6_with_member_weights():
    atoms, x = _atoms([("UNK", 1, "HA", (0.0, 0.0, 0.0)), ("UNK", 2, "H", (0.0, 3.0, 0.0))])
    rs = parse_xplor_text("assign (resid 1 and name HA) (resid 2 and name H) 3.0 1.0 1.0\n")
    ens = np.concatenate([x, x * np.array([1.0, 2.0, 1.0], np.float32)])  # members at 3 A and 6 A
    w = np.array([0.3, 0.7], np.float32)
    r6 = float(NoeObservable(atoms, rs).predict(ens, w)[0])
    assert r6 == pytest.approx((0.3 * 3.0**-6 + 0.7 * 6.0**-6) ** (-1 / 6), rel=1e-5)
    assert r6 < 0.3 * 3.0 + 0.7 * 6.0  # the close member dominates
    r3 = float(NoeObservable(atoms, rs, averaging="r-3").predict(ens, w)[0])
    assert r3 == pytest.approx((0.3 * 3.0**-3 + 0.7 * 6.0**-3) ** (-1 / 3), rel=1e-5)
    each = NoeObservable(atoms, rs, averaging="none")
    np.testing.assert_allclose(np.asarray(each.predict(ens, w))[:, 0], [3.0, 6.0], rtol=1e-5)
    # every member alone: the 6 A member violates the 4 A upper bound by 2 A, weighted 0.7
    assert float(each.log_likelihood(ens, w)) == pytest.approx(-0.7 * 0.5 * (2.0 / 0.5) ** 2, rel=1e-5)


def test_flat_bottom_is_zero_inside_the_bounds_and_quadratic_outside():
    atoms, x = _atoms([("UNK", 1, "HA", (0.0, 0.0, 0.0)), ("UNK", 2, "H", (0.0, 3.0, 0.0))])
    obs = NoeObservable(atoms, parse_xplor_text("assign (resid 1 and name HA) (resid 2 and name H) 3.0 1.0 1.5\n"),
                        sigma=0.25)
    for r, v in ((2.2, 0.0), (3.0, 0.0), (4.4, 0.0), (5.0, 0.5), (1.6, 0.4)):
        y = x * np.array([1.0, r / 3.0, 1.0], np.float32)
        assert float(obs.log_likelihood(y, ONE)) == pytest.approx(-0.5 * (v / 0.25) ** 2, abs=1e-5)
        assert float(obs.violations(y, ONE)[0]) == pytest.approx(v, abs=1e-5)
    g = jax.grad(obs.log_likelihood)(jnp.asarray(x), jnp.asarray(ONE))
    assert np.all(np.asarray(g) == 0.0)
    rep = obs.report(x * np.array([1.0, 4.9 / 3.0, 1.0], np.float32), ONE)
    assert rep["violations"] == 0 and rep["violations_gt_0_3"] == 1
    assert rep["max_violation"] == pytest.approx(0.4, abs=1e-5) and rep["rms_violation"] == pytest.approx(0.4, abs=1e-5)
    assert rep["n_restraints"] == 1


def test_linear_tail_beyond_rswitch_keeps_value_and_slope():
    atoms, x = _atoms([("UNK", 1, "HA", (0.0, 0.0, 0.0)), ("UNK", 2, "H", (0.0, 3.0, 0.0))])
    rs = parse_xplor_text("assign (resid 1 and name HA) (resid 2 and name H) 3.0 1.0 1.0\n")
    soft = NoeObservable(atoms, rs, sigma=0.5, rswitch=1.0)

    def ll(r):
        return float(soft.log_likelihood(x * np.array([1.0, r / 3.0, 1.0], np.float32), ONE))

    assert ll(4.5) == pytest.approx(-0.5 * (0.5 / 0.5) ** 2, rel=1e-5)  # harmonic below rswitch
    assert ll(5.0) == pytest.approx(-0.5 * (1.0 / 0.5) ** 2, rel=1e-4)  # continuous at rswitch
    slope = (ll(9.0) - ll(7.0)) / 2.0
    assert slope == pytest.approx(-1.0 / 0.5**2, rel=1e-3)  # constant force rswitch / sigma^2 beyond


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    atoms, x = _two_protons_and_partner()
    text = ("assign (resid 1 and name HA*) (resid 2 and name H) 2.5 0.5 0.5\n"
            "assign (resid 1 and name HA3) (resid 3 and name HZ) 4.0 1.0 0.5\n"
            "assign (resid 2 and name H) (resid 3 and name HZ) 6.0 0.5 0.5\n")
    with enable_x64():
        obs = NoeObservable(atoms, parse_xplor_text(text), sigma=0.3)
        ens = jnp.asarray(np.concatenate([x, x + rng.normal(0, 0.6, x.shape)]).astype(np.float64))
        w = jnp.asarray([0.6, 0.4])
        g, gw = jax.grad(obs.log_likelihood, argnums=(0, 1))(ens, w)
        assert float(obs.log_likelihood(ens, w)) < -1.0  # some restraints violated: a non-trivial gradient
        h = 1e-6
        for idx in [(0, 0, 0), (0, 1, 1), (1, 2, 1), (1, 3, 2), (0, 3, 1)]:
            e = np.zeros(ens.shape)
            e[idx] = h
            fd = (obs.log_likelihood(ens + e, w) - obs.log_likelihood(ens - e, w)) / (2 * h)
            assert float(g[idx]) == pytest.approx(float(fd), rel=1e-5, abs=1e-7)
        fd_w = (obs.log_likelihood(ens, w + jnp.array([h, 0.0])) - obs.log_likelihood(ens, w - jnp.array([h, 0.0])))
        assert float(gw[0]) == pytest.approx(float(fd_w) / (2 * h), rel=1e-5)


def test_log_likelihood_vmaps_over_particles():
    rng = np.random.default_rng(1)
    atoms, x = _two_protons_and_partner()
    obs = NoeObservable(atoms, parse_xplor_text("assign (resid 1 and name HA*) (resid 2 and name H) 2.5 0.5 0.5\n"))
    particles = np.stack([np.concatenate([x, x + rng.normal(0, 1, x.shape)]) for _ in range(3)]).astype(np.float32)
    w = np.array([0.5, 0.5], np.float32)
    batched = jax.jit(jax.vmap(obs.log_likelihood, in_axes=(0, None)))(particles, w)
    np.testing.assert_allclose(np.asarray(batched), [float(obs.log_likelihood(p, w)) for p in particles], rtol=1e-6)


# --------------------------------------------------------------------------------------- heavy-atom models, names


def test_placed_alpha_proton_and_methyl_pseudo_atom_on_a_heavy_atom_alanine():
    rows = _residue("ALA", 1) + [("UNK", 2, "HX", (4.0, 3.0, -2.0))]
    atoms, x = _atoms(rows)
    text = ("assign (resid 1 and name HA) (resid 2 and name HX) 4.0 2.0 1.0\n"
            "assign (resid 1 and name HB*) (resid 2 and name HX) 4.0 2.0 1.0\n")
    obs = NoeObservable(atoms, parse_xplor_text(text))
    at = {n: i for i, n in enumerate(atoms.atom_name)}
    ha = np.asarray(place_alpha_h(x[0], np.array([at["CA"]]), np.array([at["N"]]), np.array([at["C"]]),
                                  np.array([at["CB"]])))[0]
    q = np.asarray(rotor_centroid(x[0, at["CB"]], x[0, at["CA"]], 1.09))
    hx = x[0, at["HX"]]
    r = np.asarray(obs.predict(x, ONE))
    assert r[0] == pytest.approx(np.linalg.norm(ha - hx), rel=1e-5)
    # methyl: one pseudo-atom standing for 3 protons (sum averaging: 3 r^-6), Wuthrich correction 1.0 A on both bounds
    assert r[1] == pytest.approx((3 * np.linalg.norm(q - hx) ** -6) ** (-1 / 6), rel=1e-5)
    np.testing.assert_allclose(obs.correction, [0.0, 1.0])
    np.testing.assert_allclose(obs.upper, [5.0, 6.0])
    np.testing.assert_allclose(obs.lower, [2.0, 1.0])


def test_wuthrich_mode_merges_both_valine_methyls_into_one_pseudo_atom():
    side = [("CG1", "CB", "CA", "N", 1.53, 110.5, 180.0), ("CG2", "CB", "CA", "N", 1.53, 110.5, -60.0)]
    atoms, x = _atoms(_residue("VAL", 1, side) + [("UNK", 2, "HX", (2.0, -3.0, 4.0))])
    rs = parse_xplor_text("assign (resid 1 and name HG*) (resid 2 and name HX) 4.0 2.0 1.0\n")
    at = {n: i for i, n in enumerate(atoms.atom_name)}
    q1, q2 = (np.asarray(rotor_centroid(x[0, at[c]], x[0, at["CB"]], 1.09)) for c in ("CG1", "CG2"))
    hx = x[0, at["HX"]]
    classic = NoeObservable(atoms, rs, hydrogens="wuthrich")
    assert float(classic.correction[0]) == pytest.approx(2.4)  # QQG
    assert float(classic.predict(x, ONE)[0]) == pytest.approx(
        (6 * np.linalg.norm(0.5 * (q1 + q2) - hx) ** -6) ** (-1 / 6), rel=1e-5)
    placed = NoeObservable(atoms, rs)  # two methyl pseudo-atoms, 3 protons each
    assert float(placed.correction[0]) == pytest.approx(1.0)
    assert float(placed.predict(x, ONE)[0]) == pytest.approx(
        (3 * np.linalg.norm(q1 - hx) ** -6 + 3 * np.linalg.norm(q2 - hx) ** -6) ** (-1 / 6), rel=1e-5)


def test_xplor_methylene_names_are_recognised_and_map_to_iupac():
    """X-PLOR's HB1 is IUPAC HB3: a file naming HB1 (which IUPAC lacks) is read with X-PLOR names."""
    atoms, x = _atoms(_residue("SER", 1, [("OG", "CB", "CA", "N", 1.42, 111.0, 60.0)])
                      + [("UNK", 2, "HX", (3.0, 3.0, 3.0))])
    at = {n: i for i, n in enumerate(atoms.atom_name)}
    hb3 = np.asarray(methylene_h(x[0, at["CB"]], x[0, at["CA"]], x[0, at["OG"]], 1.0, 1.09))
    expected = np.linalg.norm(hb3 - x[0, at["HX"]])
    for name, convention in (("HB1", "xplor"), ("HB3", "iupac")):
        obs = NoeObservable(atoms, parse_xplor_text(f"assign (resid 1 and name {name}) (resid 2 and name HX) 4 2 1\n"))
        assert obs.nomenclature == convention
        assert float(obs.predict(x, ONE)[0]) == pytest.approx(expected, rel=1e-5)
    mixed = parse_xplor_text("assign (resid 1 and name HB1) (resid 2 and name HX) 4 2 1\n"
                             "assign (resid 1 and name HB3) (resid 2 and name HX) 4 2 1\n")
    with pytest.raises(RestraintFormatError, match="nomenclature"):
        NoeObservable(atoms, mixed)
    assert NoeObservable(atoms, mixed, nomenclature="iupac").nomenclature == "iupac"


def test_restraints_the_model_cannot_satisfy_are_skipped_with_reasons():
    atoms, x = _two_protons_and_partner()
    text = ("assign (resid 1 and name HA2) (resid 2 and name H) 3.0 1.0 1.0\n"
            "assign (resid 9 and name HA) (resid 2 and name H) 3.0 1.0 1.0\n"
            "assign (resid 2 and name H) (resid 2 and name H) 3.0 1.0 1.0\n")
    with pytest.warns(UserWarning, match=r"x.tbl: 2 restraint\(s\) cannot be mapped .* no atom matched: x.tbl:2"):
        obs = NoeObservable(atoms, parse_xplor_text(text, "x.tbl"))
    assert [r.line for r in obs.restraints] == [1]
    assert [s.line for s in obs.skipped] == [2, 3]
    assert "matches no atom" in obs.skipped[0].reason and "same single point" in obs.skipped[1].reason
    rep = obs.report(x, ONE)
    assert rep["n_skipped"] == 2 and rep["n_unmapped"] == 2
    assert rep["unmapped"][0].startswith("x.tbl:2: no atom matched")
    assert rep["unmapped_reasons"] == {"no atom matched": 1, "same point": 1}


def test_registered_and_built_from_its_config(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from guidance.app.job import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        composed = compose("run", overrides=["observables=[noe]"])
    cfg = OmegaConf.to_container(composed.observables.noe, resolve=True)  # the app's options: the factory's own
    cfg.pop("weight")
    assert cfg.pop("restraints") is None
    path = tmp_path / "r.tbl"
    path.write_text("assign (resid 1 and name HA2) (resid 2 and name H) 3.0 1.0 1.0\n")
    atoms, x = _two_protons_and_partner()
    obs = build("noe", atoms, restraints=str(path), **cfg)
    assert obs.name == "noe" and set(obs.report(x, ONE)) >= {"violations", "rms_violation", "n_restraints",
                                                            "max_violation", "violations_gt_0_3"}
    with pytest.raises(RestraintFormatError, match="needs a restraint file"):
        build("noe", atoms, **cfg)


# ------------------------------------------------------------------------------------------------- 2KJR (deposited)


@pytest.fixture(scope="module")
def kjr(shared_data):
    from guidance.structures.io import read_structure

    mr = shared_data("nmr/2KJR/2KJR.mr")
    conf = read_structure(shared_data("nmr/2KJR/2KJR.pdb"), hydrogens=True)
    atoms = AtomInfo.from_layout(conf.layout, conf.coords)
    rs = parse_xplor_restraints(mr)
    return mr, rs, atoms, conf.coords.astype(np.float32)


def _heavy(atoms, coords):
    keep = np.array([e != "H" for e in atoms.element])
    sub = AtomInfo(atoms.element[keep], atoms.atom_name[keep], atoms.res_name[keep], atoms.res_seq[keep],
                   atoms.chain_id[keep], coords[:, keep])
    return sub, coords[:, keep]


def test_every_restraint_of_2kjr_is_parsed(kjr):
    """1362 NOEs + 62 hydrogen-bond distances; the 112 TALOS dihedrals and 84 five-atom statements are skipped with
    their reason; the PDB's atom-name table after the restraints is ignored text."""
    mr, rs, atoms, _ = kjr
    statements = sum(1 for line in mr.read_text().splitlines() if re.match(r"\s*assign\b", line, re.IGNORECASE))
    print(rs.summary())
    assert len(rs.restraints) == 1424
    assert len(rs.restraints) + len(rs.skipped) == statements == 1620
    reasons = {}
    for s in rs.skipped:
        reasons[s.reason] = reasons.get(s.reason, 0) + 1
    assert sorted(reasons.values()) == [84, 112] and any("dihedral" in r for r in reasons)
    assert rs.ignored == ((2174, 16274),)
    obs = NoeObservable(atoms, rs)
    assert obs.nomenclature == "xplor" and len(obs.restraints) == 1424 and not obs.skipped


def test_deposited_2kjr_ensemble_satisfies_its_restraints(kjr):
    """An NMR ensemble refined against these restraints (X-PLOR, sum averaging, its own protons): no model violates
    any restraint by more than 0.5 A, and the r^-6 ensemble average violates even less."""
    _, rs, atoms, coords = kjr
    obs = NoeObservable(atoms, rs)
    per_model = [obs.report(coords[i : i + 1], ONE) for i in range(len(coords))]
    ens = obs.report(coords, np.full(len(coords), 1.0 / len(coords), np.float32))
    print("2KJR per model: violations > 0.5 A", [int(p["violations"]) for p in per_model],
          "> 0.3 A", [int(p["violations_gt_0_3"]) for p in per_model],
          "RMS (A) max", round(max(p["rms_violation"] for p in per_model), 4),
          "max (A)", round(max(p["max_violation"] for p in per_model), 3))
    print("2KJR ensemble (r^-6, uniform weights):", {k: round(v, 4) for k, v in ens.items() if isinstance(v, float)})
    assert all(p["violations"] == 0 for p in per_model)
    assert max(p["max_violation"] for p in per_model) < 0.5
    assert max(p["rms_violation"] for p in per_model) < 0.025
    assert ens["violations"] == 0 and ens["violations_gt_0_3"] == 0 and ens["rms_violation"] < 0.01
    assert ens["member_violations"] == 0


def test_heavy_atom_model_with_placed_protons_and_pseudo_atoms(kjr):
    """Model 1 without its hydrogens: placed protons reproduce the explicit-H distances, pseudo-atoms stand in for the
    rest, and the model still satisfies the restraints."""
    _, rs, atoms, coords = kjr
    full = NoeObservable(atoms, rs)
    heavy_atoms, heavy = _heavy(atoms, coords[:1])
    r_full = np.asarray(full.predict(coords[:1], ONE))
    for mode in ("placed", "wuthrich"):
        obs = NoeObservable(heavy_atoms, rs, hydrogens=mode)
        rep = obs.report(heavy, ONE)
        print(f"2KJR model 1, heavy atoms only ({mode}):", {k: round(v, 4) for k, v in rep.items() if isinstance(v, float)})
        assert len(obs.restraints) == 1424
        assert rep["violations"] == 0 and rep["rms_violation"] < 0.025 and rep["max_violation"] < 0.5
        exact = obs.correction == 0  # only real or placed atoms: the same distances as with the deposited protons
        dr = np.abs(np.asarray(obs.predict(heavy, ONE)) - r_full)[exact]
        assert exact.sum() > 350 and dr.max() < 0.1
    classic = NoeObservable(heavy_atoms, rs, hydrogens="wuthrich")
    corr = {r.line: float(c) for r, c in zip(classic.restraints, classic.correction)}
    assert corr[42] == pytest.approx(2.0)  # Phe 15 HA - HD*: the ring-flipping HD1/HD2 pair (QD)
    assert corr[43] == pytest.approx(1.0)  # Phe 15 HA - Ile 16 HG2*: a methyl
    assert corr[35] == pytest.approx(3.0)  # Ser 13 HB* - Phe 15 HE*: CH2 (1.0) + ring pair (2.0)
    assert set(np.round(classic.correction, 1)) == {0.0, 1.0, 2.0, 3.0, 4.0}  # corrections of the two ends add


def test_perturbed_2kjr_models_score_worse(kjr):
    _, rs, atoms, coords = kjr
    obs = NoeObservable(atoms, rs)
    good = obs.report(coords[:1], ONE)
    rng = np.random.default_rng(0)
    noisy = obs.report(coords[:1] + rng.normal(0.0, 1.0, coords[:1].shape).astype(np.float32), ONE)
    strand = coords[:1].copy()
    moved = (atoms.res_seq >= 16) & (atoms.res_seq <= 22)  # the first beta strand, shifted 2 A along x
    strand[:, moved] += np.array([2.0, 0.0, 0.0], np.float32)
    shifted = obs.report(strand, ONE)
    print("2KJR model 1: deposited", {k: round(good[k], 3) for k in ("violations", "rms_violation")},
          "random 1 A/axis", {k: round(noisy[k], 3) for k in ("violations", "rms_violation")},
          "strand 16-22 +2 A", {k: round(shifted[k], 3) for k in ("violations", "rms_violation")})
    assert noisy["violations"] > 100 and noisy["rms_violation"] > 20 * good["rms_violation"]
    assert shifted["violations"] >= 10 and shifted["log_likelihood"] < good["log_likelihood"] - 10.0
    # the gradient is a guidance direction: one small step along it reduces the violations of the shifted strand
    g = np.asarray(jax.grad(obs.log_likelihood)(jnp.asarray(strand), jnp.asarray(ONE)))
    assert np.all(np.isfinite(g))
    step = strand + 0.002 * g
    assert float(obs.log_likelihood(step, ONE)) > shifted["log_likelihood"]
