"""Physics, numerics and I/O checks of the SAXS observable (CPU; lysozyme checks use ../shared/data)."""

from __future__ import annotations

import math
import warnings

import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import observables.saxs  # noqa: F401  (registers "saxs")
from observables.base import AtomInfo, Observable, build
from observables.saxs import (
    DebyeKernel,
    SaxsDataError,
    SaxsObservable,
    SaxsProfile,
    exposure,
    guinier_rg,
    implicit_hydrogens,
    read_profile,
    spline_matrix,
)

LYSOZYME_PDB = "saxs/lysozyme/6lyz.pdb"
LYSOZYME_DAT = "saxs/lysozyme/lyzexp.dat"


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------


def atoms_from_structure(path) -> AtomInfo:
    """Heavy protein atoms of the first model (waters and hydrogens removed), with their coordinates."""
    st = gemmi.read_structure(str(path))
    st.remove_waters()
    st.remove_hydrogens()
    rows = [(ch.name, r.seqid.num, r.name, a.name, a.element.name, a.pos.tolist())
            for ch in st[0] for r in ch for a in r]
    return AtomInfo(
        element=np.array([r[4] for r in rows]),
        atom_name=np.array([r[3] for r in rows]),
        res_name=np.array([r[2] for r in rows]),
        res_seq=np.array([r[1] for r in rows]),
        chain_id=np.array([r[0] for r in rows]),
        coords=np.array([r[5] for r in rows], np.float32)[None],
    )


def peptide(n_res: int = 8, seed: int = 0) -> AtomInfo:
    """A compact poly-Ala-like chain: N, CA, C, O, CB per residue on a 1.5 A random walk (elements and names real)."""
    rng = np.random.default_rng(seed)
    names = ["N", "CA", "C", "O", "CB"]
    n = n_res * len(names)
    steps = rng.normal(size=(n, 3))
    steps *= 1.5 / np.linalg.norm(steps, axis=1, keepdims=True)
    coords = np.cumsum(steps, axis=0) + 5.0
    return AtomInfo(
        element=np.array([nm[0] for nm in names] * n_res),
        atom_name=np.array(names * n_res),
        res_name=np.array(["ALA"] * n),
        res_seq=np.repeat(np.arange(1, n_res + 1), len(names)),
        chain_id=np.array(["A"] * n),
        coords=coords.astype(np.float32)[None],
    )


def flat_profile(q: np.ndarray) -> SaxsProfile:
    return SaxsProfile(q=q, intensity=np.ones_like(q), sigma=np.ones_like(q))


def model_intensity(obs: SaxsObservable, coords, weights, c1: float, c2: float, partials=None) -> np.ndarray:
    """I(q; c1, c2) of the weighted ensemble from the observable's partial profiles (channels v - s, s, e w)."""
    if partials is None:
        partials = obs.partial_profiles(coords)
    p = np.tensordot(np.asarray(weights, np.float64), np.asarray(partials, np.float64), axes=1)
    q = obs.profile.q
    kappa = 1.0 / (16.0 * np.pi)
    a1 = 1.0 - c1**3 * np.exp(-kappa * (c1**2 - 1.0) * obs.mean_v23 * q**2)
    a = np.stack([np.ones_like(q), a1, np.full_like(q, c2)], axis=1)[:, : p.shape[1]]
    return np.einsum("mc,mcd,md->m", a, p, a)


# ------------------------------------------------------------------------------------------------------------------
# reading profiles
# ------------------------------------------------------------------------------------------------------------------


def test_reader_reads_lyzexp_with_its_title_and_trailing_eof_byte(shared_data):
    """The FoXS test profile: a title line, 3 columns in 1/A, and a 0x1A byte after the last number."""
    path = shared_data(LYSOZYME_DAT)
    assert path.read_bytes().endswith(b"\x1a")
    prof = read_profile(path)
    assert len(prof) == 197  # 196 newline-terminated data lines + the last one, ended by 0x1A
    assert prof.q[0] == pytest.approx(0.04138455) and prof.q[-1] == pytest.approx(0.4983631)
    assert prof.intensity[-1] == pytest.approx(0.04550579) and prof.sigma[-1] == pytest.approx(0.02159633)
    assert np.all(prof.sigma > 0)


def test_reader_converts_inverse_nanometres(tmp_path):
    """The same profile written in 1/nm is read back in 1/A: detected from the q range (auto) or told (nm)."""
    q = np.linspace(0.01, 0.45, 40)
    i = np.exp(-((q * 15.0) ** 2) / 3.0)
    lines = ["# q (1/nm)  I  sigma"] + [f"{10 * a:.6e} {b:.6e} {0.01 * b:.6e}" for a, b in zip(q, i)]
    path = tmp_path / "nm.dat"
    path.write_text("\n".join(lines) + "\n")
    np.testing.assert_allclose(read_profile(path).q, q, rtol=1e-6)
    np.testing.assert_allclose(read_profile(path, q_units="nm").q, q, rtol=1e-6)
    np.testing.assert_allclose(read_profile(path, q_units="A").q, 10 * q, rtol=1e-6)
    angstrom = tmp_path / "a.dat"
    angstrom.write_text("\n".join(f"{a} {b} {0.01 * b}" for a, b in zip(q, i)))
    np.testing.assert_allclose(read_profile(angstrom).q, q, rtol=1e-12)


def _rows(n=12, q0=0.01, dq=0.01):
    return [f"{q0 + k * dq:.4f} {math.exp(-((q0 + k * dq) * 15) ** 2 / 3):.6e} 0.01" for k in range(n)]


def test_reader_refuses_nonpositive_sigma_unless_told_to_drop(tmp_path):
    """sigma <= 0 is an error naming the first such line; drop_bad_points drops them with a warning and a count."""
    rows = _rows()
    rows[1], rows[2] = "0.02 4.0 0.0", "0.03 3.0 -1"
    path = tmp_path / "sig.dat"
    path.write_text("title line\n" + "\n".join(rows) + "\n")
    with pytest.raises(SaxsDataError, match=r"sig\.dat:3: sigma = 0 <= 0 .*\(2 bad lines in all\).*drop_bad_points"):
        read_profile(path)
    with pytest.warns(UserWarning, match=r"dropped 2 bad point\(s\) \(line\(s\) 3-4\)"):
        prof = read_profile(path, drop_bad_points=True)
    assert len(prof) == 10 and 0.02 not in prof.q and 0.03 not in prof.q
    assert prof.info["dropped"]["count"] == 2 and prof.info["dropped"]["lines"] == "3-4"


@pytest.mark.parametrize(
    "content, message",
    [
        ("title\n" + "\n".join(_rows()[:5] + ["0.06 x 0.1"] + _rows()[6:]) + "\n",
         r"bad\.dat:7: not a line of numbers"),
        ("\n".join(_rows()[:3] + ["0.04 1.0"] + _rows()[4:]) + "\n",
         r"bad\.dat:4: 2 number\(s\) where the data have 3"),
        ("\n".join(_rows()[:1] + ["0.02 nan 0.1"] + _rows()[2:]) + "\n", r"bad\.dat:2: non-finite"),
        ("0.01 1.0 0.1\nfooter text\n", r"bad\.dat: only 1 usable data point"),
        ("just a title\n# and a comment\n", r"bad\.dat: no data lines"),
    ],
)
def test_reader_errors_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.dat"
    path.write_text(content)
    with pytest.raises(SaxsDataError, match=message) as info:
        read_profile(path)
    assert "\n" not in str(info.value)


def test_reader_error_for_a_missing_file(tmp_path):
    with pytest.raises(SaxsDataError, match="absent.dat: cannot read"):
        read_profile(tmp_path / "absent.dat")


# ------------------------------------------------------------------------------------------------------------------
# lysozyme against the published numbers (../shared/data/README.md)
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lysozyme(shared_data):
    atoms = atoms_from_structure(shared_data(LYSOZYME_PDB))
    profile = read_profile(shared_data(LYSOZYME_DAT))
    return atoms, profile, jnp.asarray(atoms.coords)


def test_guinier_rg_of_the_lysozyme_data(lysozyme):
    """Guinier fit (q Rg < 1.3) of the experimental profile: Rg = 15.1 +- 0.2 A (published 15.1-15.2 A)."""
    _, profile, _ = lysozyme
    rg, i0, n = guinier_rg(profile.q, profile.intensity, profile.sigma)
    assert rg == pytest.approx(15.1, abs=0.2)
    assert n >= 10 and q_rg_ok(profile.q[:n], rg) and i0 > profile.intensity[0]


def q_rg_ok(q, rg):
    return bool(np.all(q * rg < 1.3))


@pytest.fixture(scope="module")
def lysozyme_reports(lysozyme):
    atoms, profile, x = lysozyme
    w = jnp.ones(1)
    out = {}
    for mode in ("exact", "fast"):
        for fit in (False, True):
            out[mode, fit] = SaxsObservable(atoms, data=profile, mode=mode, fit_c1_c2=fit).report(x, w)
    return out


def test_heavy_atom_radius_of_gyration_of_6lyz(lysozyme, lysozyme_reports):
    """1001 heavy atoms; the report's rg (unweighted heavy atoms) is 13.97 +- 0.05 A (reference 13.966 A)."""
    atoms, _, _ = lysozyme
    assert len(atoms) == 1001
    for rep in lysozyme_reports.values():
        assert rep["rg"] == pytest.approx(13.966, abs=0.05)


def test_lysozyme_chi2_with_default_excluded_volume_and_no_hydration_matches_foxs(lysozyme_reports):
    """Heavy atoms with implicit hydrogens, c1 = 1, c2 = 0: chi^2 within 0.1 of FoXS's 0.29."""
    rep = lysozyme_reports["exact", False]
    assert rep["c1"] == 1.0 and rep["c2"] == 0.0
    assert rep["chi2"] == pytest.approx(0.29, abs=0.1)
    assert rep["log_likelihood"] == pytest.approx(-0.5 * 197 * rep["chi2"], rel=1e-5)


def test_lysozyme_chi2_after_fitting_c1_and_c2(lysozyme_reports):
    """Fitting the excluded volume (c1 in [0.95, 1.05]) and hydration layer (c2 in [-2, 4]) brings chi^2 to <= 0.30
    (FoXS: 0.20), never above the unfitted value."""
    rep = lysozyme_reports["exact", True]
    assert rep["chi2"] <= 0.30
    assert rep["chi2"] <= lysozyme_reports["exact", False]["chi2"]
    assert 0.95 <= rep["c1"] <= 1.05 and -2.0 <= rep["c2"] <= 4.0


def test_fast_mode_chi2_is_within_0p02_of_exact_on_lysozyme(lysozyme, lysozyme_reports):
    """The coarse-q Debye sum + spline gives the exact chi^2 to 0.02, fitted or not, with far fewer q points."""
    atoms, profile, _ = lysozyme
    for fit in (False, True):
        assert abs(lysozyme_reports["fast", fit]["chi2"] - lysozyme_reports["exact", fit]["chi2"]) <= 0.02
    assert len(SaxsObservable(atoms, data=profile, mode="fast").q_model) < len(profile) / 3


def test_exposure_follows_the_solvent_accessible_surface(lysozyme):
    """The smooth neighbour-count exposure correlates with a Shrake-Rupley surface fraction (probe 1.8 A, FoXS radii)
    on lysozyme (r > 0.6), and buried atoms get almost none."""
    atoms, _, x = lysozyme
    xyz = np.asarray(x[0], np.float64)
    volume = {"C": 16.44, "N": 2.49, "O": 9.13, "S": 19.86}
    n_h = np.array([implicit_hydrogens(r, a) for r, a in zip(atoms.res_name, atoms.atom_name)])
    radius = (3 * (np.array([volume[e] for e in atoms.element]) + 5.15 * n_h) / (4 * np.pi)) ** (1 / 3)
    k = np.arange(60) + 0.5  # golden-spiral dots
    phi, theta = np.arccos(1 - 2 * k / 60), np.pi * (1 + 5**0.5) * k
    dots = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)
    sasa = np.zeros(len(xyz))
    for i in range(len(xyz)):
        d = np.linalg.norm(xyz - xyz[i], axis=1)
        nb = np.flatnonzero((d < radius[i] + radius + 3.6) & (d > 0))
        pts = xyz[i] + (radius[i] + 1.8) * dots
        clear = np.linalg.norm(pts[:, None] - xyz[nb][None], axis=-1) >= radius[nb] + 1.8
        sasa[i] = np.mean(np.all(clear, axis=1))
    e = np.asarray(exposure(x[0], np.ones(len(xyz), bool)))
    assert np.corrcoef(e, sasa)[0, 1] > 0.6
    assert e[sasa == 0].mean() < 0.3 * e[sasa > 0.2].mean()


# ------------------------------------------------------------------------------------------------------------------
# form factors and tables
# ------------------------------------------------------------------------------------------------------------------


# residue formulas inside a chain (amino acid minus H2O), hydrogens at pH 7: Asp/Glu deprotonated, Lys/Arg protonated
RESIDUE_H = {"GLY": 3, "ALA": 5, "SER": 5, "CYS": 5, "PRO": 7, "THR": 7, "VAL": 9, "LEU": 11, "ILE": 11, "ASN": 6,
             "GLN": 8, "MET": 9, "HIS": 7, "PHE": 9, "TYR": 9, "TRP": 10, "ASP": 4, "GLU": 6, "LYS": 13, "ARG": 13}
HEAVY_ATOMS = {
    "GLY": "N CA C O", "ALA": "N CA C O CB", "SER": "N CA C O CB OG", "CYS": "N CA C O CB SG",
    "PRO": "N CA C O CB CG CD", "THR": "N CA C O CB OG1 CG2", "VAL": "N CA C O CB CG1 CG2",
    "LEU": "N CA C O CB CG CD1 CD2", "ILE": "N CA C O CB CG1 CG2 CD1", "ASN": "N CA C O CB CG OD1 ND2",
    "GLN": "N CA C O CB CG CD OE1 NE2", "MET": "N CA C O CB CG SD CE", "HIS": "N CA C O CB CG ND1 CD2 CE1 NE2",
    "PHE": "N CA C O CB CG CD1 CD2 CE1 CE2 CZ", "TYR": "N CA C O CB CG CD1 CD2 CE1 CE2 CZ OH",
    "TRP": "N CA C O CB CG CD1 CD2 NE1 CE2 CE3 CZ2 CZ3 CH2", "ASP": "N CA C O CB CG OD1 OD2",
    "GLU": "N CA C O CB CG CD OE1 OE2", "LYS": "N CA C O CB CG CD CE NZ",
    "ARG": "N CA C O CB CG CD NE CZ NH1 NH2",
}


def test_implicit_hydrogens_add_up_to_each_residue_formula():
    """Summed over a residue's heavy atoms, the implicit-hydrogen table gives the residue's hydrogens in a chain (Asp,
    Glu charged -1 H; Lys, Arg +1 H, as FoXS); nucleotides too (e.g. DT: 12 H in a DNA chain without 5'/3' ends)."""
    for res, names in HEAVY_ATOMS.items():
        assert sum(implicit_hydrogens(res, a) for a in names.split()) == RESIDUE_H[res], res
    dt = "P OP1 OP2 O5' C5' C4' O4' C3' O3' C2' C1' N1 C2 O2 N3 C4 O4 C5 C7 C6"
    assert sum(implicit_hydrogens("DT", a) for a in dt.split()) == 12
    assert implicit_hydrogens("XYZ", "C1") is None


def test_debye_kernel_blocks_give_the_unblocked_sum():
    """Any block size (1 block, ragged last block, many blocks) gives the float64 NumPy Debye sum to float32 accuracy,
    self terms (sinc 0 = 1) included."""
    rng = np.random.default_rng(1)
    n, q = 37, np.linspace(0.0, 0.6, 25)  # q = 0 included
    x = rng.uniform(0, 25, size=(n, 3)).astype(np.float32)
    f = rng.normal(size=(len(q), n, 3)).astype(np.float32)
    d = np.linalg.norm(x[:, None].astype(np.float64) - x[None], axis=-1)
    sinc = np.sinc(q[:, None, None] * d[None] / np.pi)
    ref = np.einsum("qic,qij,qjd->qcd", f.astype(np.float64), sinc, f.astype(np.float64))
    for block in (5, 8, 16, 37, 64):
        got = np.asarray(DebyeKernel(q, n, 3, block_size=block)(x, f))
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_debye_kernel_gradient_matches_finite_differences():
    """The custom VJP (blocks recomputed, sin and cos from one range reduction) agrees with float64 central differences
    of the NumPy Debye sum, for the coordinates and for the form factors."""
    rng = np.random.default_rng(2)
    n, q = 29, np.linspace(0.02, 0.5, 30)
    x = (np.cumsum(rng.normal(size=(n, 3)), axis=0) * 1.2).astype(np.float32)
    f = rng.normal(size=(len(q), n, 3)).astype(np.float32)
    weight = rng.normal(size=(len(q), 3, 3))
    kernel = DebyeKernel(q, n, 3, block_size=8)
    gx, gf = jax.grad(lambda a, b: jnp.sum(kernel(a, b) * weight), argnums=(0, 1))(jnp.asarray(x), jnp.asarray(f))

    def loss(a, b):
        d = np.linalg.norm(a[:, None] - a[None], axis=-1)
        return np.sum(np.einsum("qic,qij,qjd->qcd", b, np.sinc(q[:, None, None] * d[None] / np.pi), b) * weight)

    x64, f64 = x.astype(np.float64), f.astype(np.float64)
    dx, df = rng.normal(size=x.shape), rng.normal(size=f.shape)
    eps = 1e-5
    fd_x = (loss(x64 + eps * dx, f64) - loss(x64 - eps * dx, f64)) / (2 * eps)
    fd_f = (loss(x64, f64 + eps * df) - loss(x64, f64 - eps * df)) / (2 * eps)
    assert float(jnp.vdot(gx, dx)) == pytest.approx(fd_x, rel=1e-4)
    assert float(jnp.vdot(gf, df)) == pytest.approx(fd_f, rel=1e-4)
    # channels outside grad_channels are constants
    frozen = DebyeKernel(q, n, 3, block_size=8, grad_channels=(2,))
    gf2 = jax.grad(lambda b: jnp.sum(frozen(jnp.asarray(x), b) * weight))(jnp.asarray(f))
    assert np.all(np.asarray(gf2)[:, :, :2] == 0)
    np.testing.assert_allclose(np.asarray(gf2)[:, :, 2], np.asarray(gf)[:, :, 2], rtol=1e-4, atol=1e-4)


def numpy_model(atoms: AtomInfo, xyz: np.ndarray, q: np.ndarray, c1: float, c2: float) -> np.ndarray:
    """Independent float64 FoXS-style intensity: IT92 (gemmi) + implicit H, Fraser solvent with kappa = 1/(16 pi),
    rho0 = 0.334, G(q; c1) with the mean V^(2/3), hydration e_i w(q), all-pairs Debye sum."""
    vol = {"H": 5.15, "C": 16.44, "N": 2.49, "O": 9.13, "S": 19.86}

    def f_vac(el):
        c = gemmi.Element(el).it92
        s2 = (q / (4 * np.pi)) ** 2
        return c.c + sum(a * np.exp(-b * s2) for a, b in zip(c.a, c.b))

    def f_sol(v):
        return 0.334 * v * np.exp(-(v ** (2 / 3)) * q**2 / (16 * np.pi))

    n_h = np.array([implicit_hydrogens(r, a) for r, a in zip(atoms.res_name, atoms.atom_name)])
    vac = np.array([f_vac(e) + n * f_vac("H") for e, n in zip(atoms.element, n_h)])
    sol = np.array([f_sol(vol[e]) + n * f_sol(vol["H"]) for e, n in zip(atoms.element, n_h)])
    volumes = np.array([vol[e] + 5.15 * n for e, n in zip(atoms.element, n_h)])
    g = c1**3 * np.exp(-(c1**2 - 1) * np.mean(volumes ** (2 / 3)) * q**2 / (16 * np.pi))
    d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
    u = np.clip((7.0 - d) / 2.0, 0, 1)
    count = np.sum(u * u * (3 - 2 * u), axis=1) - 1
    e = 0.38 / (1 + np.exp((count - 19.7) / 6.5))
    water = f_vac("O") + 2 * f_vac("H") - f_sol(vol["O"]) - 2 * f_sol(vol["H"])
    f = vac - g * sol + c2 * e[:, None] * water
    return np.einsum("iq,qij,jq->q", f, np.sinc(q[:, None, None] * d[None] / np.pi), f)


def test_observable_intensity_equals_an_independent_numpy_model():
    """The whole forward model (form factors, implicit H, displaced solvent with c1, hydration layer with c2, exposure)
    agrees with a direct float64 NumPy evaluation, in both modes."""
    atoms = peptide(10, seed=3)
    q = np.linspace(0.03, 0.5, 60)
    xyz = atoms.coords[0].astype(np.float64)
    ref = numpy_model(atoms, xyz, q, 1.03, 1.2)
    for mode in ("exact", "fast"):
        obs = SaxsObservable(atoms, data=flat_profile(q), mode=mode)
        got = model_intensity(obs, jnp.asarray(atoms.coords), [1.0], 1.03, 1.2)
        np.testing.assert_allclose(got, ref, rtol=2e-3 if mode == "fast" else 1e-4)


def test_spline_matrix_interpolates_smooth_profiles():
    knots = np.linspace(0.05, 0.5, 30)
    x = np.linspace(0.05, 0.5, 200)
    y = np.sin(30 * knots) / knots
    np.testing.assert_allclose(spline_matrix(knots, x) @ y, np.sin(30 * x) / x, atol=3e-4 * np.abs(y).max())
    cubic = spline_matrix(knots, x) @ (knots**3 - 2 * knots)  # not-a-knot ends: exact for cubics
    np.testing.assert_allclose(cubic, x**3 - 2 * x, atol=1e-12)
    np.testing.assert_allclose(spline_matrix(knots, knots), np.eye(30), atol=1e-12)


# ------------------------------------------------------------------------------------------------------------------
# fitting, ensembles, gradients
# ------------------------------------------------------------------------------------------------------------------


def generated_profile(atoms, coords, weights, q, c1, c2, scale=7.3, noise=0.0, seed=0):
    probe = SaxsObservable(atoms, data=flat_profile(q), mode="exact")
    i = model_intensity(probe, jnp.asarray(coords), weights, c1, c2)
    sigma = 0.01 * i
    rng = np.random.default_rng(seed)
    return SaxsProfile(q=q, intensity=scale * (i + noise * sigma * rng.normal(size=len(q))), sigma=scale * sigma)


def test_profile_generated_from_a_structure_is_fitted_exactly():
    """Data made from the model itself (arbitrary scale, c1 = 1.02, c2 = 1.5) are fitted with chi^2 ~ 0, recovering
    c1, c2 and the scale."""
    atoms = peptide(8, seed=4)
    q = np.linspace(0.02, 0.5, 80)
    data = generated_profile(atoms, atoms.coords, [1.0], q, c1=1.02, c2=1.5)
    rep = SaxsObservable(atoms, data=data, mode="exact").report(jnp.asarray(atoms.coords), jnp.ones(1))
    assert rep["chi2"] < 1e-3
    assert rep["c1"] == pytest.approx(1.02, abs=1e-3) and rep["c2"] == pytest.approx(1.5, abs=0.02)
    assert rep["scale"] == pytest.approx(7.3, rel=1e-3)


def test_ensemble_intensity_is_the_weighted_mean_of_member_intensities():
    """Intensities, not structures, are averaged; member_predictions reproduce log_likelihood for any weights; data
    made from a 0.7/0.3 ensemble prefer those weights to 0.3/0.7 and to either member alone."""
    atoms = peptide(8, seed=5)
    x1 = atoms.coords[0]
    x2 = x1.copy()
    x2[20:] += np.float32([6.0, -3.0, 2.0])  # a domain moved
    ens = np.stack([x1, x2])
    q = np.linspace(0.02, 0.5, 60)
    data = generated_profile(atoms, ens, [0.7, 0.3], q, c1=1.0, c2=0.5)
    obs = SaxsObservable(atoms, data=data, mode="exact")
    preds = np.asarray(obs.member_predictions(jnp.asarray(ens)), np.float64)  # [E, M * C * C]
    mixed = model_intensity(obs, None, [0.7, 0.3], 1.02, 0.5, partials=preds.reshape(2, len(q), 3, 3))
    members = [numpy_model(atoms, m.astype(np.float64), q, 1.02, 0.5) for m in ens]  # independent, per member
    np.testing.assert_allclose(mixed, 0.7 * members[0] + 0.3 * members[1], rtol=1e-4)
    w = jnp.array([0.7, 0.3])
    direct = float(obs.log_likelihood(jnp.asarray(ens), w))
    preds = jnp.asarray(preds, jnp.float32)
    for weights in ([0.7, 0.3], [0.3, 0.7], [0.5, 0.5]):
        a = float(obs.log_likelihood(jnp.asarray(ens), jnp.asarray(weights)))
        b = float(obs.log_likelihood_from_predictions(preds, jnp.asarray(weights)))
        assert a == pytest.approx(b, rel=1e-4, abs=1e-3)
    for other in ([0.3, 0.7], [1.0, 0.0], [0.0, 1.0]):
        assert direct > float(obs.log_likelihood(jnp.asarray(ens), jnp.asarray(other)))
    assert -2.0 * direct / len(q) < 1e-3  # chi^2 of the true weights ~ 0


def fd_check_data():
    atoms = peptide(8, seed=6)
    q = np.linspace(0.02, 0.5, 70)
    return atoms, generated_profile(atoms, atoms.coords, [1.0], q, c1=1.01, c2=0.8, noise=1.0)


@pytest.fixture(scope="module")
def fast_peptide():
    """A fast-mode observable (c1/c2 fitted) and its jitted value_and_grad, shared by the gradient and vmap checks."""
    atoms, data = fd_check_data()
    obs = SaxsObservable(atoms, data=data, mode="fast")
    return atoms, obs, jax.jit(jax.value_and_grad(obs.log_likelihood))


@pytest.mark.parametrize("mode, fit", [("exact", False), ("exact", True), ("fast", True)])
def test_log_likelihood_gradient_matches_finite_differences(mode, fit, request):
    """d logL / d coords (Debye VJP, exposure, closed-form scale, c1/c2 held at their fitted optimum: the envelope
    theorem) agrees with central differences along the gradient and along random directions."""
    if mode == "fast":
        atoms, obs, value_and_grad = request.getfixturevalue("fast_peptide")
    else:
        atoms, data = fd_check_data()
        obs = SaxsObservable(atoms, data=data, mode=mode, fit_c1_c2=fit, c1=1.0, c2=0.8)
        value_and_grad = jax.jit(jax.value_and_grad(obs.log_likelihood))
    rng = np.random.default_rng(7)
    x = jnp.asarray(atoms.coords + rng.normal(0, 0.5, atoms.coords.shape).astype(np.float32))
    w = jnp.ones(1)
    _, g = value_and_grad(x, w)
    norm = float(jnp.linalg.norm(g))
    for direction in (np.asarray(g), rng.normal(size=x.shape), rng.normal(size=x.shape)):
        direction = (direction / np.linalg.norm(direction)).astype(np.float32)
        # least-squares slope over +-1, 2, 3 x 0.01 A: symmetric, so the curvature cancels, and float32 rounding of
        # the likelihood (~1e-6 relative) is averaged down
        t = 0.01 * np.array([-3, -2, -1, 1, 2, 3], np.float32)
        values = np.array([float(value_and_grad(x + s * direction, w)[0]) for s in t])
        fd = float(np.sum(t * values) / np.sum(t * t))
        assert float(jnp.vdot(g, direction)) == pytest.approx(fd, rel=0.03, abs=0.01 * norm)


def test_fitted_c1_c2_are_the_optimum_in_their_box():
    """The grid + projected Newton fit finds the optimum to float32 precision, on a bound when the data push it there:
    no (c1, c2) in the box does better (checked against a fine float64 scan of the same partial profiles)."""
    atoms = peptide(8, seed=6)
    q = np.linspace(0.02, 0.5, 70)
    data = generated_profile(atoms, atoms.coords, [1.0], q, c1=1.01, c2=0.8, noise=1.0)
    obs = SaxsObservable(atoms, data=data, mode="exact")
    x = jnp.asarray(atoms.coords + np.random.default_rng(99).normal(0, 0.5, atoms.coords.shape).astype(np.float32))
    rep = obs.report(x, jnp.ones(1))
    p = np.asarray(obs.partial_profiles(x), np.float64)[0]
    wt = 1.0 / data.sigma**2

    def chi2(c1, c2):  # float64, vectorised over c1, c2 arrays of one shape
        c1, c2 = np.asarray(c1, np.float64)[..., None], np.asarray(c2, np.float64)[..., None]
        a1 = 1.0 - c1**3 * np.exp(-(c1**2 - 1.0) * obs.mean_v23 * q**2 / (16 * np.pi))
        i = p[:, 0, 0] + 2 * a1 * p[:, 0, 1] + a1**2 * p[:, 1, 1] + 2 * c2 * (p[:, 0, 2] + a1 * p[:, 1, 2]) \
            + c2**2 * p[:, 2, 2]
        scale = np.sum(i * data.intensity * wt, -1) / np.sum(i * i * wt, -1)
        return np.mean((data.intensity - scale[..., None] * i) ** 2 * wt, -1)

    g1, g2 = np.meshgrid(np.linspace(0.95, 1.05, 201), np.linspace(-2, 4, 601), indexing="ij")
    assert rep["chi2"] <= chi2(g1, g2).min() + 1e-5
    l1, l2 = np.meshgrid(np.linspace(-2e-4, 2e-4, 9), np.linspace(-4e-3, 4e-3, 9), indexing="ij")
    assert rep["chi2"] <= chi2(np.clip(rep["c1"] + l1, 0.95, 1.05), rep["c2"] + l2).min() + 2e-6
    assert float(chi2(rep["c1"], rep["c2"])) == pytest.approx(rep["chi2"], rel=1e-5)


def test_exposure_gradient_matches_finite_differences():
    x = peptide(6, seed=8).coords[0]
    heavy = np.ones(len(x), bool)
    weights = jnp.asarray(np.random.default_rng(9).normal(size=len(x)).astype(np.float32))
    loss = jax.jit(lambda a: jnp.sum(exposure(a, heavy, block_size=8) * weights))
    g = jax.grad(loss)(jnp.asarray(x))
    direction = np.random.default_rng(10).normal(size=x.shape).astype(np.float32)
    eps = 1e-2
    fd = (float(loss(x + eps * direction)) - float(loss(x - eps * direction))) / (2 * eps)
    assert float(jnp.vdot(g, direction)) == pytest.approx(fd, rel=1e-2)


def test_vmap_over_particles_equals_a_loop(fast_peptide):
    """Guidance evaluates FK particles with jax.vmap(value_and_grad(log_likelihood), in_axes=(0, None))."""
    atoms, obs, value_and_grad = fast_peptide
    rng = np.random.default_rng(12)
    particles = jnp.asarray(atoms.coords[None] + rng.normal(0, 1.0, (3, 1) + atoms.coords.shape[1:]).astype(np.float32))
    w = jnp.ones(1)
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(obs.log_likelihood), in_axes=(0, None)))(particles, w)
    for p in range(3):
        v, g = value_and_grad(particles[p], w)
        assert float(values[p]) == pytest.approx(float(v), rel=1e-4)
        np.testing.assert_allclose(np.asarray(grads[p]), np.asarray(g), rtol=1e-3, atol=1e-3 * float(jnp.abs(g).max()))


# ------------------------------------------------------------------------------------------------------------------
# the observable's surface
# ------------------------------------------------------------------------------------------------------------------


def test_registry_builds_the_saxs_observable(tmp_path):
    atoms = peptide(4, seed=13)
    q = np.linspace(0.02, 0.4, 30)
    path = tmp_path / "p.dat"
    path.write_text("synthetic\n" + "\n".join(f"{a} {math.exp(-a * a * 50)} 0.01" for a in q))
    obs = build("saxs", atoms, data=str(path), mode="exact")
    assert isinstance(obs, Observable) and obs.name == "saxs"
    x, w = jnp.asarray(atoms.coords), jnp.ones(1)
    assert obs.predict(x, w).shape == (30,)
    rep = obs.report(x, w)
    assert {"chi2", "rg", "c1", "c2", "scale"} <= set(rep)
    assert all(math.isfinite(v) for v in rep.values() if isinstance(v, float))
    assert rep["data"]["n_points"] == 30 and rep["data"]["header"] == ["synthetic"]


def test_observable_errors_are_clear(tmp_path):
    atoms = peptide(3, seed=14)
    q = np.linspace(0.02, 0.4, 30)
    with pytest.raises(SaxsDataError, match="needs data"):
        SaxsObservable(atoms)
    with pytest.raises(SaxsDataError, match="no points with"):
        SaxsObservable(atoms, data=flat_profile(q), q_min=0.6)
    with pytest.raises(ValueError, match="unknown saxs mode"):
        SaxsObservable(atoms, data=flat_profile(q), mode="approximate")
    odd = AtomInfo(np.where(np.arange(len(atoms)) == 4, "Qq", atoms.element), atoms.atom_name, atoms.res_name,
                   atoms.res_seq, atoms.chain_id, atoms.coords)
    with pytest.raises(ValueError, match="CB of ALA A1: unknown element 'Qq'"):
        SaxsObservable(odd, data=flat_profile(q))
    obs = SaxsObservable(atoms, data=flat_profile(q), mode="exact")
    with pytest.raises(ValueError, match=r"coords must be \[E, 15, 3\]"):
        obs.log_likelihood(jnp.zeros((15, 3)), jnp.ones(1))
    unknown = AtomInfo(atoms.element, atoms.atom_name, np.full(len(atoms), "LIG"), atoms.res_seq, atoms.chain_id,
                       atoms.coords)
    with pytest.warns(UserWarning, match="no implicit-hydrogen table for residue"):
        SaxsObservable(unknown, data=flat_profile(q))


def test_waters_do_not_scatter():
    """Crystal waters in the model are bulk solvent: excluded by default, so adding them changes nothing."""
    atoms = peptide(5, seed=15)
    q = np.linspace(0.02, 0.5, 40)
    n = len(atoms)
    wat = AtomInfo(np.append(atoms.element, ["O", "O"]), np.append(atoms.atom_name, ["O", "O"]),
                   np.append(atoms.res_name, ["HOH", "HOH"]), np.append(atoms.res_seq, [101, 102]),
                   np.append(atoms.chain_id, ["A", "A"]),
                   np.concatenate([atoms.coords, np.float32([[[3, 3, 3], [9, 9, 9]]])], axis=1))
    data = generated_profile(atoms, atoms.coords, [1.0], q, 1.0, 0.5)
    a = SaxsObservable(atoms, data=data, mode="exact", c2=0.5, fit_c1_c2=False)
    b = SaxsObservable(wat, data=data, mode="exact", c2=0.5, fit_c1_c2=False)
    a, b = a.report(jnp.asarray(atoms.coords), jnp.ones(1)), b.report(jnp.asarray(wat.coords), jnp.ones(1))
    assert b["chi2"] == pytest.approx(a["chi2"], abs=1e-6) and b["rg"] == pytest.approx(a["rg"], rel=1e-6)
    assert wat.coords.shape[1] == n + 2
