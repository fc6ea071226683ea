"""Tests of observables/reflections.py: reading measured X-ray amplitudes, sigmas and free flags from MTZ and mmCIF
structure-factor files, and the French & Wilson conversion of intensities.

Three kinds of check:
- real deposits under ../shared/data/xray (skipped when that folder is absent), against the counts in its README;
- synthetic MTZ files written here with gemmi, whose content (and so the right answer) the test knows exactly;
- French & Wilson posterior moments against numbers computed independently: scipy quadrature over the intensity J
  (the implementation integrates over F), and closed forms in the limits where they exist.
"""

import math
import re

import gemmi
import numpy as np
import pytest
from scipy.integrate import quad
from scipy.special import gamma

from observables.reflections import ReflectionError, Reflections, french_wilson, read_reflections

# ----------------------------------------------------------------------------------------------------------------
# helpers

CELL = (30.0, 40.0, 50.0, 90.0, 90.0, 90.0)
SPACE_GROUP = "P 21 21 21"


def asu_hkl(d_min: float = 3.0) -> np.ndarray:
    """Indices h, k, l >= 0 (the P212121 asymmetric unit) with d >= d_min, leaving out the systematic absences
    (h00, 0k0, 00l with an odd index) by the rule of the space group, not through gemmi."""
    a, b, c = CELL[:3]
    hmax, kmax, lmax = (int(x / d_min) + 1 for x in (a, b, c))
    h, k, l = np.meshgrid(np.arange(hmax + 1), np.arange(kmax + 1), np.arange(lmax + 1), indexing="ij")
    hkl = np.stack([h.ravel(), k.ravel(), l.ravel()], 1)
    inv_d2 = (hkl[:, 0] / a) ** 2 + (hkl[:, 1] / b) ** 2 + (hkl[:, 2] / c) ** 2
    keep = (inv_d2 > 0) & (inv_d2 <= 1.0 / d_min**2)
    hkl = hkl[keep]
    axial_odd = np.zeros(len(hkl), bool)
    for axis in range(3):
        others = [i for i in range(3) if i != axis]
        on_axis = (hkl[:, others[0]] == 0) & (hkl[:, others[1]] == 0)
        axial_odd |= on_axis & (hkl[:, axis] % 2 == 1)
    return hkl[~axial_odd]


def wilson_amplitudes(n: int, rng: np.random.Generator, scale: float = 100.0) -> np.ndarray:
    """Acentric-Wilson-distributed amplitudes (F^2 exponential), kept away from zero."""
    return scale * np.sqrt(rng.exponential(size=n)) + 1.0


def write_mtz(path, hkl, columns, space_group: str = SPACE_GROUP, cell=CELL):
    """An MTZ file with H, K, L and ``columns`` = [(label, type, values)], written by gemmi."""
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi.find_spacegroup_by_name(space_group)
    mtz.set_cell_for_all(gemmi.UnitCell(*cell))
    mtz.add_dataset("synthetic")
    for label, mtz_type, _ in columns:
        mtz.add_column(label, mtz_type)
    data = np.column_stack([np.asarray(hkl, np.float64)] + [np.asarray(v, np.float64) for _, _, v in columns])
    mtz.set_data(data.astype(np.float32))
    mtz.write_to_file(str(path))
    return path


def ccp4_flags(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 20, size=n).astype(np.float64)


def by_hkl(refl: Reflections) -> dict:
    return {tuple(int(x) for x in h): i for i, h in enumerate(refl.hkl)}


def rows_of(refl: Reflections, hkl) -> np.ndarray:
    """The row of each of ``hkl`` in ``refl`` (every one must be there)."""
    index = by_hkl(refl)
    return np.array([index[tuple(int(x) for x in h)] for h in hkl])


def note_count(notes, pattern: str) -> int:
    """The number at the start of the note that matches ``pattern`` (a regex after the number); 0 if none does."""
    for note in notes:
        m = re.match(r"(\d+) " + pattern, note)
        if m:
            return int(m.group(1))
    return 0


def fw_quadrature(i_obs: float, sig_i: float, s: float, centric: bool) -> tuple[float, float]:
    """Posterior mean and sd of F = sqrt(J) given I ~ N(J, sig_i^2) and the Wilson prior on J (acentric
    exp(-J/S)/S, centric exp(-J/(2S)) / sqrt(2 pi S J)), by scipy quadrature over J.  The J^a factors (a = -1/2 for
    the centric prior, +1/2 for sqrt(J)) are given to QUADPACK as algebraic end-point weights where the interval
    starts at 0."""
    a0 = -0.5 if centric else 0.0
    k = 1.0 / (2.0 * s) if centric else 1.0 / s

    def log_g(j):
        return -0.5 * ((i_obs - j) / sig_i) ** 2 - k * j

    j_top = max(0.0, i_obs - k * sig_i**2)  # where the Gaussian envelope peaks
    c = log_g(j_top)

    def g(j):
        return math.exp(log_g(j) - c)

    lo, hi = max(0.0, j_top - 40.0 * sig_i), j_top + 40.0 * sig_i
    moments = []
    for p in (0.0, 0.5, 1.0):  # integral of J^(a0 + p) g(J): normaliser, <sqrt J>, <J>
        if lo == 0.0:
            v, _ = quad(g, 0.0, hi, weight="alg", wvar=(a0 + p, 0.0), limit=500, epsabs=0.0, epsrel=1e-11)
        else:
            v, _ = quad(lambda j: j ** (a0 + p) * g(j), lo, hi, points=[j_top], limit=500, epsabs=0.0, epsrel=1e-11)
        moments.append(v)
    mean = moments[1] / moments[0]
    return mean, math.sqrt(moments[2] / moments[0] - mean**2)


# ----------------------------------------------------------------------------------------------------------------
# real deposits (../shared/data/xray)


def test_1dur_mtz_amplitudes_and_ccp4_free_flags(shared_data):
    """1DUR's REFMAC MTZ: the measured FP/SIGFP are taken (not the FC/FWT/DELFWT map columns beside them), 3197 usable
    reflections to 2.015 A in P212121, and FreeR_flag == 0 (CCP4, the minority) is the 271-reflection free set."""
    refl = read_reflections(shared_data("xray/1dur/1dur.mtz"))
    assert refl.columns == ["FP", "SIGFP"]
    assert len(refl) == 3197
    assert int(refl.free.sum()) == 271
    assert refl.free_rule.startswith("FreeR_flag == 0")
    assert "CCP4" in refl.free_rule
    assert refl.d_min == pytest.approx(2.015, abs=2e-3)
    assert refl.space_group.hm == "P 21 21 21"
    assert list(refl.cell.parameters) == pytest.approx([30.52, 37.75, 39.37, 90.0, 90.0, 90.0], abs=1e-3)
    assert np.all(refl.f_obs > 0) and np.all(refl.sigma > 0)
    assert len({tuple(h) for h in refl.hkl}) == len(refl)  # no reflection twice
    # the free set agrees with the file's own flag column, read here by gemmi directly
    mtz = gemmi.read_mtz_file(str(shared_data("xray/1dur/1dur.mtz")))
    flag = {tuple(int(x) for x in row[:3]): row[3] for row in
            np.column_stack([np.array(mtz.make_miller_array()), np.array(mtz.column_with_label("FreeR_flag"))])}
    assert all((flag[tuple(int(x) for x in h)] == 0) == f for h, f in zip(refl.hkl, refl.free))
    # the reflections that have no FP are the ones left out, and the notes count them
    n_rows = mtz.nreflections
    assert note_count(refl.notes, "reflections without a value or sigma") == n_rows - 3197
    summary = refl.summary()
    assert summary["n_reflections"] == 3197 and summary["n_free"] == 271 and summary["n_work"] == 3197 - 271


def test_5e5z_mtz_free_is_the_smaller_class(shared_data):
    """5E5Z's MTZ has FP/SIGFP and I/SIGI: auto takes the amplitudes; FREE has two values and the free set is its
    smaller class, FREE == 0: 18 of 403 reflections."""
    refl = read_reflections(shared_data("xray/5e5z/5e5z.mtz"))
    assert refl.columns == ["FP", "SIGFP"]
    assert len(refl) == 403
    assert int(refl.free.sum()) == 18
    assert refl.free_rule.startswith("FREE == 0")
    assert "smaller of two classes" in refl.free_rule
    assert refl.space_group.hm == "P 1 21 1"
    assert not any("intensities" in n for n in refl.notes)


def test_5e5z_french_wilson_amplitudes_match_the_deposited_ones(shared_data):
    """French & Wilson amplitudes from 5E5Z's I/SIGI follow the deposited FP: correlation > 0.99, and for the strong
    reflections (FP/SIGFP > 10) every ratio FP/F lies within 3 % of one overall scale (the file's I is on a
    different scale from its FP: FP ~ 10 sqrt(I)).  Same reflections and free set as with FP."""
    path = shared_data("xray/5e5z/5e5z.mtz")
    fp = read_reflections(path)
    fw = read_reflections(path, columns="I,SIGI")
    assert fw.columns == ["I", "SIGI"]
    assert any("French & Wilson" in n for n in fw.notes)
    assert len(fw) == 403 and int(fw.free.sum()) == 18
    j = rows_of(fp, fw.hkl)
    f_dep, s_dep = fp.f_obs[j], fp.sigma[j]
    assert np.array_equal(fp.free[j], fw.free)
    assert np.corrcoef(f_dep, fw.f_obs)[0, 1] > 0.99
    strong = f_dep / s_dep > 10
    assert strong.sum() > 200
    ratio = f_dep[strong] / fw.f_obs[strong]
    scale = np.median(ratio)
    assert 5 < scale < 20
    assert np.max(np.abs(ratio / scale - 1)) < 0.03
    assert np.all(fw.f_obs > 0) and np.all(fw.sigma > 0)


def test_5wkd_mmcif_status_gives_the_free_set_and_drops_unobserved(shared_data):
    """The PDB's structure-factor mmCIF of 5WKD: F_meas_au/F_meas_sigma_au are read (not F_calc or pdbx_FWT), the free
    set is _refln.status 'f' (22 of 367 usable), and the 39 rows with status 'x' (unobserved, '?' amplitudes) are
    left out and counted in the notes."""
    path = shared_data("xray/5wkd/r5wkdsf.ent")
    refl = read_reflections(path)
    assert refl.columns == ["_refln.F_meas_au", "_refln.F_meas_sigma_au"]
    assert len(refl) == 367
    assert int(refl.free.sum()) == 22
    assert refl.free_rule == "_refln.status == 'f'"
    assert note_count(refl.notes, "reflections with _refln.status other than o/f") == 39
    assert refl.space_group.hm == "C 1 2 1"
    # independent cross-check with gemmi: the rows kept are exactly the 'o' and 'f' rows, and the 'f' rows are the
    # deposit's pdbx_r_free_flag == 0 (CCP4 convention)
    rb = gemmi.as_refln_blocks(gemmi.cif.read(str(path)))[0]
    status = list(rb.block.find_loop("_refln.status"))
    flags = np.asarray(rb.make_float_array("pdbx_r_free_flag"))
    rows = {tuple(int(x) for x in h): (s, fl) for h, s, fl in zip(np.array(rb.make_miller_array()), status, flags)}
    assert sum(s == "x" for s in status) == 39
    for h, free in zip(refl.hkl, refl.free):
        s, fl = rows[tuple(int(x) for x in h)]
        assert s in ("o", "f") and (s == "f") == free and (fl == 0) == free
    assert {h for h, (s, _) in rows.items() if s in ("o", "f")} == set(by_hkl(refl))


def test_1dur_sf_cif_without_flags_gets_a_reproducible_generated_free_set(shared_data):
    """1DUR's deposited structure-factor mmCIF has no free flags: about 5 % of the reflections become a generated
    free set, the same on every read, a different one with another seed, and the notes say it was generated."""
    path = shared_data("xray/1dur/1dur-sf.cif")
    a = read_reflections(path)
    b = read_reflections(path)
    c = read_reflections(path, seed=1)
    assert a.columns == ["_refln.F_meas_au", "_refln.F_meas_sigma_au"]
    assert a.free_rule.startswith("generated")
    assert any("generated" in n for n in a.notes)
    assert 0.04 < a.free.mean() < 0.06
    assert np.array_equal(a.hkl, b.hkl) and np.array_equal(a.free, b.free)
    assert np.array_equal(a.hkl, c.hkl)
    assert not np.array_equal(a.free, c.free)
    assert 0.04 < c.free.mean() < 0.06
    # the generated fraction follows generate_free
    d = read_reflections(path, generate_free=0.1)
    assert 0.08 < d.free.mean() < 0.12


# ----------------------------------------------------------------------------------------------------------------
# synthetic MTZ files: column choice


def test_map_coefficients_only_are_refused_pointing_to_density(tmp_path):
    """An MTZ with map coefficients only (FWT/PHWT, DELFWT/PHDELWT: an F followed by a phase) holds no measured data;
    reading it fails with a message that names the file and points to observables=[density]."""
    hkl = asu_hkl()
    rng = np.random.default_rng(1)
    n = len(hkl)
    path = write_mtz(tmp_path / "maps.mtz", hkl, [
        ("FWT", "F", wilson_amplitudes(n, rng)), ("PHWT", "P", rng.uniform(-180, 180, n)),
        ("DELFWT", "F", wilson_amplitudes(n, rng, 10.0)), ("PHDELWT", "P", rng.uniform(-180, 180, n)),
        ("FreeR_flag", "I", ccp4_flags(n, rng))])
    with pytest.raises(ReflectionError) as err:
        read_reflections(path)
    message = str(err.value)
    assert "observables=[density]" in message
    assert "maps.mtz" in message
    assert "FWT" in message


def test_explicit_amplitude_and_phase_columns_are_refused(tmp_path):
    """Naming an amplitude and its phase (columns="FWT,PHWT") is refused as map coefficients, not read as F and sigma."""
    hkl = asu_hkl()
    rng = np.random.default_rng(2)
    n = len(hkl)
    path = write_mtz(tmp_path / "maps.mtz", hkl, [
        ("FWT", "F", wilson_amplitudes(n, rng)), ("PHWT", "P", rng.uniform(-180, 180, n)),
        ("FreeR_flag", "I", ccp4_flags(n, rng))])
    with pytest.raises(ReflectionError, match=r"observables=\[density\]"):
        read_reflections(path, columns="FWT,PHWT")


def test_auto_finds_unusually_named_amplitudes_by_type(tmp_path):
    """With column names it does not know, auto takes the first F column followed by its Q sigma ('FOBS_X',
    'SIGFOBS_X'), passing over an F column followed by a phase (FC/PHIC) that comes first; the values read are the
    ones written."""
    hkl = asu_hkl()
    rng = np.random.default_rng(3)
    n = len(hkl)
    f = wilson_amplitudes(n, rng)
    sig = 0.05 * f + 1.0
    path = write_mtz(tmp_path / "odd.mtz", hkl, [
        ("FC", "F", wilson_amplitudes(n, rng)), ("PHIC", "P", rng.uniform(-180, 180, n)),
        ("FOBS_X", "F", f), ("SIGFOBS_X", "Q", sig), ("FreeR_flag", "I", ccp4_flags(n, rng))])
    refl = read_reflections(path)
    assert refl.columns == ["FOBS_X", "SIGFOBS_X"]
    assert len(refl) == n
    j = rows_of(refl, hkl)
    np.testing.assert_allclose(refl.f_obs[j], f, rtol=1e-6)
    np.testing.assert_allclose(refl.sigma[j], sig, rtol=1e-6)


def test_auto_prefers_amplitudes_and_falls_back_to_intensities(tmp_path):
    """Auto takes amplitudes when a file has both amplitudes and intensities; a file with only an unusually named J
    intensity and its Q sigma is read through French & Wilson, and the notes say so."""
    hkl = asu_hkl()
    rng = np.random.default_rng(4)
    n = len(hkl)
    f = wilson_amplitudes(n, rng)
    i = f**2
    flags = ("FreeR_flag", "I", ccp4_flags(n, rng))
    both = write_mtz(tmp_path / "both.mtz", hkl, [
        ("IOBS_X", "J", i), ("SIGIOBS_X", "Q", 0.02 * i + 1), ("FOBS_X", "F", f), ("SIGFOBS_X", "Q", 0.01 * f + 1), flags])
    assert read_reflections(both).columns == ["FOBS_X", "SIGFOBS_X"]
    only_i = write_mtz(tmp_path / "only_i.mtz", hkl, [("IOBS_X", "J", i), ("SIGIOBS_X", "Q", 0.02 * i + 1), flags])
    refl = read_reflections(only_i)
    assert refl.columns == ["IOBS_X", "SIGIOBS_X"]
    assert any("French & Wilson" in note for note in refl.notes)
    assert len(refl) == n


def test_explicit_missing_column_error_lists_the_file_columns(tmp_path):
    """Naming a column the MTZ does not have fails with a message that names the missing label and lists the
    columns the file does have."""
    hkl = asu_hkl()
    rng = np.random.default_rng(5)
    n = len(hkl)
    f = wilson_amplitudes(n, rng)
    path = write_mtz(tmp_path / "odd.mtz", hkl, [
        ("FOBS_X", "F", f), ("SIGFOBS_X", "Q", 0.05 * f + 1), ("FreeR_flag", "I", ccp4_flags(n, rng))])
    with pytest.raises(ReflectionError) as err:
        read_reflections(path, columns="FP,SIGFP")
    message = str(err.value)
    assert "FP" in message.split(";")[0]
    for label in ("FOBS_X", "SIGFOBS_X", "FreeR_flag"):
        assert label in message
    # an explicit pair that exists is taken as given
    assert read_reflections(path, columns="FOBS_X, SIGFOBS_X").columns == ["FOBS_X", "SIGFOBS_X"]


def test_friedel_pairs_are_averaged(tmp_path):
    """F(+)/SIGF(+)/F(-)/SIGF(-) (MTZ types G/L): where both mates are measured, F is their mean and sigma that of a
    mean of two, 0.5 sqrt(s+^2 + s-^2); where one mate is missing the other is taken as it is; the notes say the
    pairs were averaged."""
    hkl = asu_hkl()
    rng = np.random.default_rng(6)
    n = len(hkl)
    fp = wilson_amplitudes(n, rng)
    fm = fp * rng.uniform(0.9, 1.1, n)
    sp, sm = 0.05 * fp + 1, 0.04 * fm + 2
    only_plus, only_minus = np.arange(0, 40), np.arange(40, 70)
    fm[only_plus] = np.nan
    sm[only_plus] = np.nan
    fp[only_minus] = np.nan
    sp[only_minus] = np.nan
    path = write_mtz(tmp_path / "anom.mtz", hkl, [
        ("F(+)", "G", fp), ("SIGF(+)", "L", sp), ("F(-)", "G", fm), ("SIGF(-)", "L", sm),
        ("FreeR_flag", "I", ccp4_flags(n, rng))])
    refl = read_reflections(path)
    assert refl.columns == ["F(+)", "SIGF(+)", "F(-)", "SIGF(-)"]
    assert any("Friedel" in note and "averaged" in note for note in refl.notes)
    assert len(refl) == n
    j = rows_of(refl, hkl)
    both = np.ones(n, bool)
    both[only_plus] = both[only_minus] = False
    np.testing.assert_allclose(refl.f_obs[j][both], 0.5 * (fp[both] + fm[both]), rtol=1e-6)
    np.testing.assert_allclose(refl.sigma[j][both], 0.5 * np.hypot(sp[both], sm[both]), rtol=1e-6)
    np.testing.assert_allclose(refl.f_obs[j][only_plus], fp[only_plus], rtol=1e-6)
    np.testing.assert_allclose(refl.sigma[j][only_plus], sp[only_plus], rtol=1e-6)
    np.testing.assert_allclose(refl.f_obs[j][only_minus], fm[only_minus], rtol=1e-6)
    np.testing.assert_allclose(refl.sigma[j][only_minus], sm[only_minus], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# synthetic MTZ files: free flags


def _flagged_mtz(tmp_path, flag_label: str, flags, seed: int = 7):
    hkl = asu_hkl()
    rng = np.random.default_rng(seed)
    f = wilson_amplitudes(len(hkl), rng)
    path = write_mtz(tmp_path / "flags.mtz", hkl, [
        ("FP", "F", f), ("SIGFP", "Q", 0.05 * f + 1), (flag_label, "I", flags)])
    return path, hkl


def test_phenix_two_valued_flags_free_is_one(tmp_path):
    """Phenix-style flags (R-free-flags with values 0 and 1, 1 on ~10 % of the reflections): the free set is the
    reflections flagged 1, and the rule names the Phenix convention."""
    n = len(asu_hkl())
    rng = np.random.default_rng(8)
    flags = (rng.uniform(size=n) < 0.1).astype(np.float64)
    path, hkl = _flagged_mtz(tmp_path, "R-free-flags", flags)
    refl = read_reflections(path)
    j = rows_of(refl, hkl)
    assert np.array_equal(refl.free[j], flags == 1)
    assert refl.free_rule.startswith("R-free-flags == 1") and "Phenix" in refl.free_rule


def test_ccp4_twenty_valued_flags_free_is_zero_even_when_not_the_smallest(tmp_path):
    """CCP4 flags 0..19: the free set is flag 0, even when another value is rarer than 0."""
    n = len(asu_hkl())
    rng = np.random.default_rng(9)
    flags = rng.integers(0, 20, size=n).astype(np.float64)
    flags[np.flatnonzero(flags == 7)[5:]] = 8  # 7 becomes the rarest value; 0 is not
    values, counts = np.unique(flags, return_counts=True)
    assert values[np.argmin(counts)] == 7
    path, hkl = _flagged_mtz(tmp_path, "FreeR_flag", flags)
    refl = read_reflections(path)
    j = rows_of(refl, hkl)
    assert np.array_equal(refl.free[j], flags == 0)
    assert refl.free_rule.startswith("FreeR_flag == 0") and "CCP4" in refl.free_rule


def test_free_flag_column_found_by_type_and_name(tmp_path):
    """An integer column whose name contains 'free' but is not one of the usual names is taken as the flag column."""
    n = len(asu_hkl())
    flags = np.random.default_rng(10).integers(0, 20, size=n).astype(np.float64)
    path, hkl = _flagged_mtz(tmp_path, "my_free_set", flags)
    refl = read_reflections(path)
    assert refl.free_rule.startswith("my_free_set == 0")
    assert int(refl.free.sum()) == int((flags == 0).sum())


def test_free_flag_value_overrides_detection(tmp_path):
    """free_flag_value picks the free class whatever the detection would say: with Phenix 0/1 flags,
    free_flag_value=0 makes the majority class free, and the rule says the value was given; a value the column
    does not hold is an error that lists the values it has."""
    n = len(asu_hkl())
    rng = np.random.default_rng(11)
    flags = (rng.uniform(size=n) < 0.9).astype(np.float64)  # 0 is the minority here
    flags_phenix = 1.0 - flags  # 1 the minority
    path, hkl = _flagged_mtz(tmp_path, "R-free-flags", flags_phenix)
    refl = read_reflections(path, free_flag_value=0)
    j = rows_of(refl, hkl)
    assert np.array_equal(refl.free[j], flags_phenix == 0)
    assert refl.free.mean() > 0.8
    assert "(given)" in refl.free_rule
    with pytest.raises(ReflectionError, match=r"free_flag_value=5.*\[0, 1\]"):
        read_reflections(path, free_flag_value=5)


def test_flag_column_with_one_value_is_a_clear_error(tmp_path):
    """A flag column holding a single value defines no free set: reading fails with a message naming the column and
    saying what to do; free_column='none' then gives a generated free set instead."""
    n = len(asu_hkl())
    path, _ = _flagged_mtz(tmp_path, "FreeR_flag", np.ones(n))
    with pytest.raises(ReflectionError) as err:
        read_reflections(path)
    message = str(err.value)
    assert "FreeR_flag" in message and "one value" in message
    refl = read_reflections(path, free_column="none")
    assert refl.free_rule.startswith("generated") and 0.02 < refl.free.mean() < 0.08


def test_named_free_column_that_is_absent_is_an_error(tmp_path):
    """free_column naming a column the MTZ lacks fails and names that column."""
    n = len(asu_hkl())
    path, _ = _flagged_mtz(tmp_path, "FreeR_flag", np.random.default_rng(12).integers(0, 20, n).astype(float))
    with pytest.raises(ReflectionError, match="R-free-flags"):
        read_reflections(path, free_column="R-free-flags")


# ----------------------------------------------------------------------------------------------------------------
# synthetic MTZ files: what is left out


def test_unusable_and_absent_reflections_are_dropped_and_counted(tmp_path):
    """Reflections with a missing amplitude or sigma (NaN), sigma <= 0, F <= 0, and systematically absent reflections
    (P212121: h00, 0k0, 00l with an odd index) are left out, each kind counted in the notes; every other reflection
    is kept with its value."""
    good = asu_hkl()
    absent = np.array([[1, 0, 0], [3, 0, 0], [0, 1, 0], [0, 0, 5], [0, 0, 7]])
    hkl = np.concatenate([good, absent])
    n = len(hkl)
    rng = np.random.default_rng(13)
    f = wilson_amplitudes(n, rng)
    sig = 0.05 * f + 1
    f[[0, 1, 2]] = np.nan  # 3 missing amplitudes
    sig[[3, 4]] = np.nan  # 2 missing sigmas
    sig[[5, 6, 7, 8]] = 0.0  # 4 zero sigmas
    sig[9] = -1.0  # 1 negative sigma
    f[[10, 11, 12]] = 0.0  # 3 zero amplitudes
    f[[13, 14]] = -5.0  # 2 negative amplitudes
    path = write_mtz(tmp_path / "bad.mtz", hkl, [
        ("FP", "F", f), ("SIGFP", "Q", sig), ("FreeR_flag", "I", ccp4_flags(n, rng))])
    refl = read_reflections(path)
    assert note_count(refl.notes, "reflections without a value or sigma") == 5
    assert note_count(refl.notes, "reflections with F <= 0 or sigma <= 0") == 10
    assert note_count(refl.notes, "systematically absent reflections") == 5
    expected = {tuple(int(x) for x in h) for h in good[15:]}
    assert set(by_hkl(refl)) == expected
    assert len(refl) == len(good) - 15
    assert np.all(refl.f_obs > 0) and np.all(refl.sigma > 0) and np.all(np.isfinite(refl.f_obs))
    # select keeps the arrays together
    sub = refl.select(refl.free)
    assert len(sub) == int(refl.free.sum()) and sub.free.all() and sub.columns == refl.columns


def test_weak_intensities_give_positive_french_wilson_amplitudes(tmp_path):
    """Weak intensities, many of them negative: French & Wilson gives a positive, finite F and sigma for every
    intensity with I/sigma >= -4, leaves out those below -4 and those with sigma <= 0, and counts them."""
    hkl = asu_hkl()
    n = len(hkl)
    rng = np.random.default_rng(14)
    true_i = 4.0 * rng.exponential(size=n)
    sig_i = np.full(n, 4.0)
    i_obs = true_i + sig_i * rng.normal(size=n)
    i_obs[[0, 1, 2]] = -5.0 * sig_i[[0, 1, 2]]  # I/sigma = -5: dropped
    sig_i[[3, 4]] = 0.0  # dropped
    assert (i_obs < 0).sum() > 50
    path = write_mtz(tmp_path / "weak.mtz", hkl, [
        ("I", "J", i_obs), ("SIGI", "Q", sig_i), ("FreeR_flag", "I", ccp4_flags(n, rng))])
    refl = read_reflections(path)
    assert refl.columns == ["I", "SIGI"]
    assert note_count(refl.notes, "intensities with sigma <= 0 or I/sigma < -4") == 5
    assert len(refl) == n - 5
    assert np.all(np.isfinite(refl.f_obs)) and np.all(refl.f_obs > 0) and np.all(refl.sigma > 0)
    index = by_hkl(refl)
    kept = np.array([tuple(int(x) for x in h) in index for h in hkl])
    neg = kept & (i_obs < 0)
    assert neg.sum() > 50
    # a negative intensity gives a smaller amplitude than any clearly positive one in the same data
    j = rows_of(refl, hkl[kept])
    f_by_row = np.full(n, np.nan)
    f_by_row[kept] = refl.f_obs[j]
    assert np.nanmax(f_by_row[neg]) < np.nanmin(f_by_row[kept & (i_obs > 10 * sig_i)])


def test_sqrt_and_french_wilson_agree_on_strong_intensities(tmp_path):
    """For strong data (I/sigma >= 50) intensities="sqrt" (F = sqrt(I), sigma_F = sigma_I / 2F) and French & Wilson
    give the same amplitudes to 1e-3 and sigmas to 2 %, on the same reflections; the notes name the rule used."""
    hkl = asu_hkl()
    n = len(hkl)
    rng = np.random.default_rng(15)
    i_obs = 1e4 * (rng.exponential(size=n) + 0.5)
    sig_i = i_obs / rng.uniform(50, 200, n)
    path = write_mtz(tmp_path / "strong.mtz", hkl, [
        ("I", "J", i_obs), ("SIGI", "Q", sig_i), ("FreeR_flag", "I", ccp4_flags(n, rng))])
    fw = read_reflections(path)
    sq = read_reflections(path, intensities="sqrt")
    assert any("sqrt" in note for note in sq.notes)
    assert any("French & Wilson" in note for note in fw.notes)
    assert np.array_equal(fw.hkl, sq.hkl) and np.array_equal(fw.free, sq.free)
    assert len(fw) == n
    np.testing.assert_allclose(fw.f_obs, sq.f_obs, rtol=1e-3)
    np.testing.assert_allclose(fw.sigma, sq.sigma, rtol=2e-2)
    index = by_hkl(sq)
    j = np.array([index[tuple(int(x) for x in h)] for h in hkl])
    np.testing.assert_allclose(sq.f_obs[j], np.sqrt(i_obs), rtol=1e-6)
    np.testing.assert_allclose(sq.sigma[j], sig_i / (2 * np.sqrt(i_obs)), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# French & Wilson physics


@pytest.mark.parametrize("centric", [False, True])
def test_french_wilson_strong_limit_is_sqrt_i(centric):
    """For I >> sigma the posterior mean of F tends to sqrt(I) (relative difference < 1e-3 at I/sigma = 100) and its
    sd to sigma / (2 sqrt I), whatever the Wilson mean (here 0.3 to 3 times I)."""
    i_obs = np.array([100.0, 1e4, 2.5e5, 1e6])
    sig_i = i_obs / 100.0
    for factor in (0.3, 1.0, 3.0):
        f, s = french_wilson(i_obs, sig_i, factor * i_obs, np.full(4, centric))
        np.testing.assert_allclose(f, np.sqrt(i_obs), rtol=1e-3)
        np.testing.assert_allclose(s, sig_i / (2 * np.sqrt(i_obs)), rtol=2e-2)


CASES = [  # (I, sigma_I, Wilson mean S, centric)
    (50.0, 10.0, 40.0, False), (50.0, 10.0, 40.0, True),
    (0.0, 1.0, 1.0, False), (0.0, 1.0, 1.0, True),
    (-5.0, 3.0, 10.0, False), (-10.0, 4.0, 20.0, True),
    (-3.0, 1.0, 0.5, False), (-3.0, 1.0, 0.5, True),
    (-12.0, 3.0, 200.0, False), (-12.0, 3.0, 200.0, True),
    (2.0, 5.0, 100.0, False), (5.0, 1.0, 0.01, False), (0.0, 1.0, 1e-3, True),
    (300.0, 10.0, 100.0, True), (1e4, 1.0, 1e4, False), (1e6, 100.0, 1e5, True),
]


@pytest.mark.parametrize("i_obs,sig_i,s,centric", CASES)
def test_french_wilson_matches_quadrature_over_j(i_obs, sig_i, s, centric):
    """The posterior mean and sd of F given I, sigma_I and the Wilson mean S agree to 1e-3 (relative) with an
    independent scipy quadrature over the intensity J, for acentric and centric reflections, negative, zero, weak and
    very strong (I/sigma = 1e4) intensities, and priors much wider or much narrower than sigma."""
    f, sd = french_wilson(np.array([i_obs]), np.array([sig_i]), np.array([s]), np.array([centric]))
    f_ref, sd_ref = fw_quadrature(i_obs, sig_i, s, centric)
    assert f[0] == pytest.approx(f_ref, rel=1e-3)
    assert sd[0] == pytest.approx(sd_ref, rel=1e-3)


def test_french_wilson_vectorised_equals_one_by_one():
    """Converting many reflections at once gives the same numbers as converting each alone (no cross-talk between
    rows)."""
    i_obs, sig_i, s, centric = (np.array(v) for v in zip(*CASES))
    f_all, sd_all = french_wilson(i_obs, sig_i, s, centric)
    for k in range(len(CASES)):
        f1, sd1 = french_wilson(i_obs[k:k + 1], sig_i[k:k + 1], s[k:k + 1], centric[k:k + 1])
        assert f_all[k] == pytest.approx(f1[0], rel=1e-12) and sd_all[k] == pytest.approx(sd1[0], rel=1e-12)


def test_french_wilson_zero_intensity_with_a_wide_prior_is_a_half_normal_moment():
    """With I = 0 and sigma << S the prior is flat over the posterior, so J given I is half-normal of scale sigma:
    acentric <F> = <J^1/2> = sigma^1/2 2^1/4 Gamma(3/4) / sqrt(pi); centric (prior ~ J^-1/2)
    <F> = sigma^1/2 2^1/4 sqrt(pi) / Gamma(1/4) (closed forms, to 1e-3)."""
    sig = np.array([1.0, 4.0, 100.0])
    s = 1e5 * sig
    f_a, sd_a = french_wilson(np.zeros(3), sig, s, np.zeros(3, bool))
    f_c, _ = french_wilson(np.zeros(3), sig, s, np.ones(3, bool))
    mean_a = np.sqrt(sig) * 2**0.25 * gamma(0.75) / math.sqrt(math.pi)
    mean_c = np.sqrt(sig) * 2**0.25 * math.sqrt(math.pi) / gamma(0.25)
    np.testing.assert_allclose(f_a, mean_a, rtol=1e-3)
    np.testing.assert_allclose(f_c, mean_c, rtol=1e-3)
    # acentric <J> = sigma sqrt(2/pi) for the half-normal
    np.testing.assert_allclose(sd_a**2 + f_a**2, sig * math.sqrt(2 / math.pi), rtol=1e-3)


@pytest.mark.parametrize("centric", [False, True])
def test_french_wilson_negative_intensities_give_positive_increasing_amplitudes(centric):
    """The posterior mean F is positive and finite for every negative intensity down to I/sigma = -4, with a positive
    sd, and it rises with I (a larger measurement never gives a smaller amplitude)."""
    sig = 2.0
    i_obs = np.linspace(-4 * sig, 3 * sig, 71)
    for s in (0.1, 1.0, 10.0, 1e3):
        f, sd = french_wilson(i_obs, np.full_like(i_obs, sig), np.full_like(i_obs, s), np.full(len(i_obs), centric))
        assert np.all(np.isfinite(f)) and np.all(f > 0) and np.all(sd > 0)
        assert np.all(np.diff(f) > 0)


# ----------------------------------------------------------------------------------------------------------------
# errors


def test_missing_file_is_a_one_line_error_naming_it(tmp_path):
    """A file that does not exist gives a one-line ReflectionError that names it."""
    path = tmp_path / "nowhere.mtz"
    with pytest.raises(ReflectionError) as err:
        read_reflections(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "not found" in message


def test_unknown_suffix_is_a_one_line_error_naming_it(tmp_path):
    """A file of an unknown kind (.hkl) gives a one-line ReflectionError that names it and the kinds expected."""
    path = tmp_path / "data.hkl"
    path.write_text("   1   0   0  100.0  5.0\n")
    with pytest.raises(ReflectionError) as err:
        read_reflections(path)
    message = str(err.value)
    assert "\n" not in message and "data.hkl" in message and ".mtz" in message


def test_unreadable_mtz_and_bad_options_are_reflection_errors(tmp_path):
    """A corrupt MTZ is a ReflectionError naming the file (not a gemmi RuntimeError); an unknown intensities rule or a
    generate_free fraction outside (0, 0.5) is refused."""
    bad = tmp_path / "broken.mtz"
    bad.write_bytes(b"not an mtz file " * 8)
    with pytest.raises(ReflectionError, match="broken.mtz"):
        read_reflections(bad)
    n = len(asu_hkl())
    path, _ = _flagged_mtz(tmp_path, "FreeR_flag", np.ones(n))
    with pytest.raises(ReflectionError, match="intensities"):
        read_reflections(path, intensities="truncate")
    with pytest.raises(ReflectionError, match="generate_free"):
        read_reflections(path, free_column="none", generate_free=0.7)


def test_generated_free_set_is_silent_for_any_seed(tmp_path):
    """Every integer seed, large or negative, gives a free set of about the requested size without a numpy overflow
    warning, and different seeds give different sets."""
    n = len(asu_hkl())
    path, _ = _flagged_mtz(tmp_path, "FreeR_flag", np.ones(n))
    sets = []
    with np.errstate(all="raise"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for seed in (0, 1, 2, 12345, -3, 2**40):
                refl = read_reflections(path, free_column="none", seed=seed)
                assert 0.02 < refl.free.mean() < 0.08
                sets.append(refl.free)
    assert len({s.tobytes() for s in sets}) == len(sets)
