"""The SAXS profile reader on what beamlines, SASBDB, ATSAS, BioXTAS RAW and FoXS write (../shared/data/saxs/formats,
expected counts and q ranges from its README "saxs/formats"), and its one-line refusals of malformed profiles."""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

from observables.base import AtomInfo
from observables.saxs import MIN_POINTS, SaxsDataError, SaxsObservable, guinier_analysis, guinier_rg, read_profile

FORMATS = "saxs/formats"

# file: (numeric rows of the data block, their q range (1/A) -- the shared README's table --, measured points,
#        first and last line of the block, first line of a measured point)
EXPECTED = {
    "glucose_isomerase.dat": (474, 0.0101, 0.2830, 474, (5, 478), 5),  # RAW: "### DATA:" header, JSON footer
    "lys_saxs.dat": (474, 0.0101, 0.2830, 474, (5, 478), 5),
    "csv.dat": (474, 0.0101, 0.2830, 474, (1, 474), 1),  # RAW CSV: commas, no header
    "foxs.dat": (501, 0.0, 0.5, 501, (3, 503), 3),  # FoXS model profile
    "crysol.fit": (409, 0.0, 0.2401, 404, (2, 410), 7),  # 5 rows I = sigma = 0 below the measured range
    "glucose_isomerase.out": (492, 0.0, 0.2830, 474, (54, 545), 72),  # GNOM: 18 extrapolated rows (S, I REG only)
}


def _numbers(line: str) -> list[float]:
    return [float(t) for t in re.split(r"[\s,]+", line.strip()) if t]


@pytest.fixture(scope="module")
def profiles(shared_data):
    return {name: (read_profile(shared_data(f"{FORMATS}/{name}")), shared_data(f"{FORMATS}/{name}"))
            for name in EXPECTED}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_format_reads_the_readme_counts_and_q_ranges(profiles, name):
    prof, path = profiles[name]
    rows, q_lo, q_hi, measured, (first, last), first_measured = EXPECTED[name]
    info = prof.info
    assert info["n_rows"] == rows and len(prof) == measured == info["n_points"]
    assert info["block_lines"] == [first, last] and info["q_units"] == "A"
    lines = path.read_text(errors="replace").replace("\x1a", "").splitlines()
    # the block's q range is the README's, from the file's own lines
    assert _numbers(lines[first - 1])[0] == pytest.approx(q_lo, abs=5e-5)
    assert _numbers(lines[last - 1])[0] == pytest.approx(q_hi, abs=5e-5)
    # first and last measured points: q, I, sigma as written on those lines
    head, tail = _numbers(lines[first_measured - 1]), _numbers(lines[last - 1])
    np.testing.assert_allclose([prof.q[0], prof.intensity[0], prof.sigma[0]], head[:3], rtol=1e-12)
    np.testing.assert_allclose([prof.q[-1], prof.intensity[-1], prof.sigma[-1]], tail[:3], rtol=1e-12)
    assert np.all(np.diff(prof.q) > 0) and np.all(prof.sigma > 0)
    assert info["dropped"]["count"] == 0 and info["sigma_model"] is None
    assert all(len(h) <= 120 for h in info["header"]) and len(info["header"]) <= 7


def test_gnom_out_uses_s_j_exp_error_and_skips_the_extrapolated_rows(profiles):
    """GNOM 5.0's "Experimental Data and Fit" block: S, J EXP, ERROR are q, I, sigma (J REG, I REG ignored); the 18
    rows before the data carry only S and I REG and are skipped, not counted; the P(r) block after it is ignored."""
    gnom, _ = profiles["glucose_isomerase.out"]
    dat, _ = profiles["glucose_isomerase.dat"]  # the file GNOM read ("Input 1: glucose_isomerase.dat")
    info = gnom.info
    assert info["columns"] == 5 and info["ignored_columns"] == [4, 5] and "J EXP" in info["column_names"]
    assert info["skipped"] == [{"reason": info["skipped"][0]["reason"], "lines": "54-71", "count": 18}]
    assert any("lines 554-727" in b for b in info["other_blocks"])  # "Real Space Data": R, P(R), ERROR
    # GNOM prints 6 significant digits of the input data: J EXP / ERROR are the .dat's I / sigma, not J REG
    np.testing.assert_allclose(gnom.q, dat.q, rtol=5e-6)
    np.testing.assert_allclose(gnom.intensity, dat.intensity, rtol=5e-6, atol=1e-9)
    np.testing.assert_allclose(gnom.sigma, dat.sigma, rtol=5e-6)


def test_crysol_fit_reads_q_iexp_sigma_and_skips_the_rows_without_data(profiles):
    fit, _ = profiles["crysol.fit"]
    assert fit.info["ignored_columns"] == [4]  # I_fit
    assert fit.info["skipped"][0]["lines"] == "2-6" and fit.info["skipped"][0]["count"] == 5
    assert fit.info["header"][0].startswith("2POL.pdb") and "Chi^2: 1.468" in fit.info["header"][0]


def test_raw_files_keep_header_and_footer_and_csv_is_the_same_data(profiles):
    dat, _ = profiles["glucose_isomerase.dat"]
    csv, _ = profiles["csv.dat"]
    assert dat.info["header"][:3] == ["### DATA:", "#", "# 474"] and dat.info["column_names"].split() == ["Q", "I(Q)",
                                                                                                         "Error"]
    assert dat.info["footer"][0] == "### HEADER:" and dat.info["footer"][-1].startswith("... (")
    np.testing.assert_allclose(csv.intensity, dat.intensity, rtol=1e-8)


def test_foxs_profile_errors_are_foxs_simulated_errors(profiles):
    """foxs.dat is a model profile: its third column is IMP.saxs Profile::add_errors' simulated error
    0.03 I 5 (q + 0.001) ra with ra = |k / 10 - 1| + 1, k ~ Poisson(10) -- not a measurement."""
    prof, _ = profiles["foxs.dat"]
    ra = prof.sigma / (0.15 * (prof.q + 0.001) * prof.intensity)
    assert ra.min() > 0.9999 and ra.max() < 3.0
    np.testing.assert_allclose((ra - 1.0) * 10.0, np.round((ra - 1.0) * 10.0), atol=1e-4)
    assert prof.info["header"][0].startswith("# SAXS profile: number of points = 501")


def test_lysozyme_keeps_loading_as_before(shared_data):
    prof = read_profile(shared_data("saxs/lysozyme/lyzexp.dat"))
    assert len(prof) == 197 and prof.info["header"] == ["lizosyme, high angles (>.22) 46 mg/ml, small angles (<.22) "
                                                        "15 mg/ml"]


# ------------------------------------------------------------------------------------------------------------------
# Guinier analysis: ln I = ln I0 - q^2 Rg^2 / 3 for q Rg < 1.3 (Guinier 1939)
# ------------------------------------------------------------------------------------------------------------------


def _numpy_guinier(q, i, s, q_max):
    sel = (q <= q_max) & (i > 0)
    slope, intercept = np.polyfit(q[sel] ** 2, np.log(i[sel]), 1, w=i[sel] / s[sel])  # weights 1 / sigma(ln I)
    return math.sqrt(-3.0 * slope), math.exp(intercept), int(sel.sum())


def test_guinier_of_the_lysozyme_data_matches_published_values_and_numpy(shared_data):
    """lyzexp.dat (IMP/FoXS lysozyme): the shared README gives Guinier Rg 15.1-15.2 A (q Rg < 1.3).  lys_saxs.dat
    (BioXTAS RAW lysozyme): RAW 2.0.0's own Guinier fit is stored in the file's footer (Rg 13.91 A) -- hen egg-white
    lysozyme's Rg is 14-15 A depending on concentration and q range.  Both agree with a direct numpy fit."""
    lyz = read_profile(shared_data("saxs/lysozyme/lyzexp.dat"))
    g = guinier_analysis(lyz.q, lyz.intensity, lyz.sigma)
    assert 14.9 <= g["rg"] <= 15.4 and g["qmax_rg"] < 1.3 and g["n_points"] >= 10
    rg, i0, n = _numpy_guinier(lyz.q, lyz.intensity, lyz.sigma, g["q_max"])
    assert (g["rg"], g["i0"], g["n_points"]) == (pytest.approx(rg, rel=1e-9), pytest.approx(i0, rel=1e-9), n)
    assert guinier_rg(lyz.q, lyz.intensity, lyz.sigma) == (g["rg"], g["i0"], g["n_points"])

    path = shared_data(f"{FORMATS}/lys_saxs.dat")
    raw = read_profile(path)
    g = guinier_analysis(raw.q, raw.intensity, raw.sigma)
    text = path.read_text()
    raw_rg = float(re.search(r'"guinier": \{.*?"Rg": "([0-9.]+)"', text, re.S).group(1))
    raw_err = float(re.search(r'"guinier": \{.*?"Rg_err": ([0-9.e-]+)', text, re.S).group(1))
    assert 13.5 < g["rg"] < 15.5 and g["rg"] == pytest.approx(raw_rg, abs=0.01)
    assert g["rg_error"] == pytest.approx(raw_err, rel=0.02)
    rg, _, n = _numpy_guinier(raw.q, raw.intensity, raw.sigma, g["q_max"])
    assert g["rg"] == pytest.approx(rg, rel=1e-9) and g["n_points"] == n
    assert g["q_min"] == pytest.approx(raw.q[0]) and g["qmax_rg"] == pytest.approx(g["q_max"] * g["rg"])


def test_guinier_of_glucose_isomerase_matches_raw(profiles):
    prof, path = profiles["glucose_isomerase.dat"]
    raw_rg = float(re.search(r'"guinier": \{.*?"Rg": "([0-9.]+)"', path.read_text(), re.S).group(1))
    assert guinier_analysis(prof.q, prof.intensity, prof.sigma)["rg"] == pytest.approx(raw_rg, abs=0.01)


def _tiny_atoms(n=24, seed=3) -> AtomInfo:
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=6.0, size=(1, n, 3)).astype(np.float32)
    el = np.array(["C", "N", "O"] * (n // 3))
    return AtomInfo(el, np.array(["CA", "N", "O"] * (n // 3)), np.full(n, "GLY"), np.repeat(np.arange(n // 3), 3),
                    np.full(n, "A"), x)


def test_observable_report_carries_the_data_and_guinier(shared_data):
    atoms = _tiny_atoms()
    obs = SaxsObservable(atoms, data=shared_data(f"{FORMATS}/glucose_isomerase.out"), mode="fast", fit_c1_c2=False,
                         q_max=0.25)
    rep = obs.report(jnp.asarray(atoms.coords), jnp.ones(1))
    d, g = rep["data"], rep["guinier"]
    assert d["n_points"] == 474 and d["n_fitted"] == len(obs.profile) < 474 and d["q_units"] == "A"
    assert "largest q" in d["q_units_reason"] and d["ignored_columns"] == [4, 5] and d["skipped"][0]["count"] == 18
    assert d["header"] and d["dropped"] == {"count": 0}
    assert g["rg"] == pytest.approx(33.61, abs=0.01) and g["n_points"] == 50 and g["qmax_rg"] < 1.3
    assert rep["rg_guinier_data"] == g["rg"] and math.isfinite(rep["rg"]) and "warning" not in rep
    assert rep["rg_guinier_model"] is None or rep["rg_guinier_model"] > 0
    assert any("Guinier analysis of the data: Rg 33.61" in n for n in obs.notes)


def test_plot_saxs_fit_writes_a_png(tmp_path, profiles):
    from guidance.app.plots import plot_saxs_fit

    prof, _ = profiles["lys_saxs.dat"]
    g = guinier_analysis(prof.q, prof.intensity, prof.sigma)
    model = g["i0"] * np.exp(-((prof.q * g["rg"]) ** 2) / 3.0)
    out = plot_saxs_fit(prof.q, prof.intensity, prof.sigma, model, tmp_path / "saxs_fit.png", title="t", guinier=g)
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------------------------
# malformed and unusual profiles, written here
# ------------------------------------------------------------------------------------------------------------------


def _good(n=20, q0=0.01, dq=0.01, rg=15.0):
    q = q0 + dq * np.arange(n)
    i = 100.0 * np.exp(-((q * rg) ** 2) / 3.0)
    return q, i, 0.01 * i + 0.01


def _write(tmp_path, lines, name="p.dat"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _lines(q, i, s, sep=" "):
    return [sep.join(f"{v:.6e}" for v in row) for row in zip(q, i, s)]


def _refused(path, line=None, **kw) -> str:
    with pytest.raises(SaxsDataError) as info:
        read_profile(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert (f"{path}:{line}:" if line else str(path)) in msg, msg
    return msg


def test_empty_and_binary_and_missing_files_are_refused(tmp_path):
    empty = tmp_path / "empty.dat"
    empty.write_text("")
    assert "empty" in _refused(empty)
    junk = tmp_path / "junk.dat"
    junk.write_bytes(bytes(range(256)) * 8)
    assert "not a text file" in _refused(junk)
    assert "cannot read" in _refused(tmp_path / "absent.dat")
    assert "directory" in _refused(tmp_path)
    text = _write(tmp_path, ["a title", "no numbers here", "at all"], "text.dat")
    assert "no data lines" in _refused(text)


def test_two_columns_are_refused_then_accepted_with_a_sigma_model(tmp_path):
    q, i, _ = _good()
    path = _write(tmp_path, ["# q I"] + [f"{a:.5f} {b:.6e}" for a, b in zip(q, i)])
    msg = _refused(path, line=2)
    assert "no sigma" in msg and "sigma_model" in msg
    rel = read_profile(path, sigma_model="relative", sigma_fraction=0.05)
    np.testing.assert_allclose(rel.sigma, 0.05 * np.abs(i), rtol=1e-5)
    assert rel.info["sigma_model"] == "relative" and any("sigma made up" in n for n in rel.info["notes"])
    poi = read_profile(path, sigma_model="poisson")
    np.testing.assert_allclose(poi.sigma, 0.03 * np.sqrt(i.max() * i), rtol=1e-5)


def test_sigma_model_in_the_observable_is_reported(tmp_path):
    q, i, _ = _good(30)
    path = _write(tmp_path, [f"{a:.5f} {b:.6e}" for a, b in zip(q, i)])
    atoms = _tiny_atoms()
    with pytest.raises(SaxsDataError, match="sigma_model"):
        SaxsObservable(atoms, data=path)
    obs = SaxsObservable(atoms, data=path, sigma_model="relative", mode="exact", fit_c1_c2=False)
    rep = obs.report(jnp.asarray(atoms.coords), jnp.ones(1))
    assert rep["data"]["sigma_model"] == "relative" and "sigma_model=relative" in rep["warning"]


@pytest.mark.parametrize(
    "row, index, words",
    [
        ("0.050 nan 0.1", 4, ["non-finite"]),
        ("0.050 inf 0.1", 4, ["non-finite"]),
        ("0.050 1.0 -0.1", 4, ["sigma = -0.1 <= 0"]),
        ("0.050 1.0 0", 4, ["sigma = 0 <= 0"]),
        ("0.050 1.0", 4, ["2 number(s)", "missing"]),
        ("0.040 1.0 0.1", 4, ["duplicate q", "after q = 0.04 on line 5"]),
        ("0.020 1.0 0.1", 4, ["q decreases"]),
        ("-0.05 1.0 0.1", 0, ["negative q"]),
        ("0.050 1.0x 0.1", 4, ["not a line of numbers"]),
    ],
)
def test_bad_points_are_one_line_errors_and_dropped_on_request(tmp_path, row, index, words):
    q, i, s = _good()
    lines = _lines(q, i, s)
    lines[index] = row
    path = _write(tmp_path, ["# q I sigma"] + lines)
    msg = _refused(path, line=index + 2)
    assert all(w in msg for w in words) and "drop_bad_points" in msg, msg
    with pytest.warns(UserWarning, match=r"dropped 1 bad point"):
        prof = read_profile(path, drop_bad_points=True)
    assert len(prof) == len(q) - 1 and prof.info["dropped"]["count"] == 1
    assert prof.info["dropped"]["lines"] == str(index + 2) and np.all(np.diff(prof.q) > 0)


def test_a_decreasing_q_run_is_reported_and_the_longest_increasing_data_kept(tmp_path):
    q, i, s = _good(30)
    lines = _lines(q, i, s)
    lines[10:13] = _lines(q[10:13] - 0.08, i[10:13], s[10:13])  # three lines out of order mid-block
    path = _write(tmp_path, lines)
    assert "q decreases" in _refused(path, line=11)
    with pytest.warns(UserWarning, match=r"dropped 3 bad point\(s\) \(line\(s\) 11-13\)"):
        prof = read_profile(path, drop_bad_points=True)
    np.testing.assert_allclose(prof.q, np.delete(q, [10, 11, 12]), rtol=1e-6)


def test_too_few_points_are_refused(tmp_path):
    q, i, s = _good(MIN_POINTS - 1)
    msg = _refused(_write(tmp_path, _lines(q, i, s)))
    assert f"only {MIN_POINTS - 1} usable data point(s)" in msg and f"at least {MIN_POINTS}" in msg
    q, i, s = _good(MIN_POINTS)
    assert len(read_profile(_write(tmp_path, _lines(q, i, s), "ten.dat"))) == MIN_POINTS


def test_units_are_detected_from_the_header_or_the_q_range_and_the_option_wins(tmp_path):
    q, i, s = _good(40, q0=0.01, dq=0.006)  # 1/A up to 0.244
    nm_header = _write(tmp_path, ["# q [nm^-1]  I  sigma"] + _lines(q * 10, i, s), "nm_header.dat")
    prof = read_profile(nm_header)
    np.testing.assert_allclose(prof.q, q, rtol=1e-6)
    assert prof.info["q_units"] == "nm" and "header" in prof.info["q_units_reason"]
    no_header = _write(tmp_path, _lines(q * 10, i, s), "nm_plain.dat")  # q_max 2.44 > 1: 1/nm
    prof = read_profile(no_header)
    assert prof.info["q_units"] == "nm" and "largest q 2.44 > 1" in prof.info["q_units_reason"]
    np.testing.assert_allclose(prof.q, q, rtol=1e-6)
    small_nm = _write(tmp_path, ["q(1/nm) I(q) err"] + _lines(q, i, s), "nm_small.dat")  # header beats q range
    np.testing.assert_allclose(read_profile(small_nm).q, q / 10, rtol=1e-6)
    waxs = _write(tmp_path, ["# q (A^-1), I, sigma"] + _lines(q * 6, i, s), "waxs.dat")  # 1.46 1/A: header says A
    prof = read_profile(waxs)
    assert prof.info["q_units"] == "A" and prof.q.max() == pytest.approx(6 * q.max(), rel=1e-6)
    forced = read_profile(no_header, q_units="A")
    assert forced.info["q_units_reason"] == "set by the q_units option"
    np.testing.assert_allclose(forced.q, q * 10, rtol=1e-6)


def test_separators_comments_titles_and_line_endings(tmp_path):
    q, i, s = _good(25)
    # ATSAS-style: a title line, then column names, then data
    atsas = _write(tmp_path, ["Sample: lysozyme 5 mg/ml", "q I sigma"] + _lines(q, i, s), "atsas.dat")
    prof = read_profile(atsas)
    assert len(prof) == 25 and prof.info["header"] == ["Sample: lysozyme 5 mg/ml", "q I sigma"]
    assert prof.info["column_names"] == "q I sigma"
    # semicolons, tabs, inline comments, Fortran D exponents, CRLF, a trailing 0x1A
    rows = [f"{a:.5f};{b:.6e};{c:.6e}" for a, b, c in zip(q, i, s)]
    rows[3] += "  # a note on this point"
    rows[4] = rows[4].replace(";", "\t")
    rows[5] = f"{q[5]:.5f} {i[5]:.6E} {s[5]:.6E}".replace("E", "D")
    path = tmp_path / "mixed.dat"
    path.write_bytes(("% header\r\n" + "\r\n".join(rows) + "\r\n\x1a").encode())
    prof = read_profile(path)
    np.testing.assert_allclose(prof.intensity, i, rtol=1e-6)
    assert prof.info["block_lines"] == [2, 26]
    # decimal commas with semicolon separators
    comma = _write(tmp_path, [f"{a:.5f};{b:.6f};{c:.6f}".replace(".", ",") for a, b, c in zip(q, i, s)], "c.dat")
    np.testing.assert_allclose(read_profile(comma).q, q, rtol=1e-6)
    # extra columns are ignored with a note
    four = _write(tmp_path, [f"{r} 7.0" for r in _lines(q, i, s)], "four.dat")
    prof = read_profile(four)
    assert prof.info["ignored_columns"] == [4] and any("column 4 ignored" in n for n in prof.info["notes"])


def test_option_errors_name_the_option(tmp_path):
    q, i, s = _good()
    path = _write(tmp_path, _lines(q, i, s))
    for kw, word in (({"q_units": "parsec"}, "q_units"), ({"sigma_model": "bogus"}, "sigma_model"),
                     ({"sigma_fraction": 0}, "sigma_fraction")):
        with pytest.raises(SaxsDataError, match=word) as info:
            read_profile(path, **kw)
        assert "\n" not in str(info.value)
    atoms = _tiny_atoms()
    with pytest.raises(SaxsDataError, match="drop_bad_points"):
        SaxsObservable(atoms, data=path, drop_bad_points="yes")
    with pytest.raises(SaxsDataError, match="guinier_qrg_max"):
        SaxsObservable(atoms, data=path, guinier_qrg_max=5)
