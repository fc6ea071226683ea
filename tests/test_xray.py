"""X-ray amplitudes: structure factors by FFT against gemmi's direct summation, their gradients against finite
differences, the likelihood's free set, bulk solvent and scaling, and R-work / R-free against cctbx on real data.

Reference R values (cctbx mmtbx.f_model.manager with update_all_scales: flat bulk solvent, anisotropic scaling and a
per-bin isotropic scale, n_gaussian form factors; ../shared/data/README.md, reproduced with cctbx-base 2025 in a
separate venv): 1dur R-work 0.1512 / R-free 0.1354; 5e5z 0.1713 / 0.2015.  cctbx reports each R with the
least-squares scale of its own set; the project's r_work / r_free follow that convention.
"""

from __future__ import annotations

import json
import subprocess
import sys

import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guidance.structures.io import read_fixed_atoms, read_structure
from observables.base import AtomInfo, Crystal, FixedAtoms
from observables.reflections import ReflectionError, read_reflections
from observables.sfcalc import StructureFactorModel, _rfft3, b_range, miller_stol2
from observables.xray import XrayObservable, _ml_terms, r_factor

CCTBX = {"1dur": (0.1512, 0.1354), "5e5z": (0.1713, 0.2015)}
DATA = {"1dur": ("xray/1dur/1dur.pdb", "xray/1dur/1dur.mtz"), "5e5z": ("xray/5e5z/5e5z.pdb", "xray/5e5z/5e5z.mtz")}


def gemmi_atoms(st: gemmi.Structure):
    atoms = [a for ch in st[0] for r in ch for a in r]
    xyz = np.array([a.pos.tolist() for a in atoms], np.float32)
    el = [a.element.name for a in atoms]
    occ = np.array([a.occ for a in atoms], np.float32)
    b = np.array([a.b_iso for a in atoms], np.float32)
    u = np.array([[a.aniso.u11, a.aniso.u22, a.aniso.u33, a.aniso.u12, a.aniso.u13, a.aniso.u23] for a in atoms],
                 np.float32)
    return xyz, el, occ, b, u


def direct_sum(st: gemmi.Structure, hkl: np.ndarray, space_group: str) -> np.ndarray:
    """gemmi's StructureFactorCalculatorX (direct summation over every atom and symmetry copy, IT92)."""
    st = st.clone()
    st.spacegroup_hm = space_group
    st.setup_cell_images()
    calc = gemmi.StructureFactorCalculatorX(st.cell)
    return np.array([calc.calculate_sf_from_model(st[0], [int(v) for v in h]) for h in hkl])


def structure_and_hkl(shared_data, entry, isotropic: bool):
    pdb, mtz = DATA[entry]
    st = gemmi.read_structure(str(shared_data(pdb)))
    st.remove_hydrogens()
    if isotropic:
        for a in (a for ch in st[0] for r in ch for a in r):
            a.aniso = gemmi.SMat33f(0, 0, 0, 0, 0, 0)
    hkl = np.array(gemmi.read_mtz_file(str(shared_data(mtz))).make_miller_array(), np.int64)
    return st, hkl


@pytest.mark.parametrize("entry", ["1dur", "5e5z"])
@pytest.mark.parametrize("symmetry", ["P 1", "own"])
def test_fft_structure_factors_match_gemmi_direct_summation(shared_data, entry, symmetry):
    """F_calc by FFT (per-element Gaussians, symmetry applied in reciprocal space) equals gemmi's direct summation
    over every atom and symmetry copy: relative error |F - F_ref| / |F_ref| below 5e-5 (float32 rounding amplified by
    the deblur exp(blur s^2) at high resolution; measured 5e-6 to 2.2e-5), and the amplitudes correlate above
    0.9999; in P1 and in the crystal's own space group."""
    st, hkl = structure_and_hkl(shared_data, entry, isotropic=True)
    sg = "P 1" if symmetry == "P 1" else st.spacegroup_hm
    xyz, el, occ, b, _ = gemmi_atoms(st)
    ref = direct_sum(st, hkl, sg)
    model = StructureFactorModel(st.cell, sg, hkl, el, b_min=float(b.min()), b_max=float(b.max()))
    f = np.asarray(model(xyz, occ, b))
    rel = np.linalg.norm(f - ref) / np.linalg.norm(ref)
    print(f"{entry} {sg}: relative error {rel:.2e}, grid {model.grid.shape}, blur {model.blur:.1f} A^2")
    assert rel < 5e-5
    assert np.corrcoef(np.abs(f), np.abs(ref))[0, 1] > 0.9999


def test_anisotropic_displacements_match_gemmi(shared_data):
    """5e5z's atoms carry anisotropic U (ANISOU): the general (non-separable) window reproduces gemmi's direct
    summation with those U's, and differs from the isotropic-equivalent model by more than that error."""
    st, hkl = structure_and_hkl(shared_data, "5e5z", isotropic=False)
    xyz, el, occ, b, u = gemmi_atoms(st)
    assert np.any(u != 0)
    ref = direct_sum(st, hkl, st.spacegroup_hm)
    b_add = np.where(np.any(u != 0, axis=1), 0.0, b).astype(np.float32)
    lo, hi = b_range(b_add, u)
    model = StructureFactorModel(st.cell, st.spacegroup_hm, hkl, el, b_min=lo, b_max=hi, anisotropic=True)
    f = np.asarray(model(xyz, occ, b_add, u))
    rel = np.linalg.norm(f - ref) / np.linalg.norm(ref)
    iso = StructureFactorModel(st.cell, st.spacegroup_hm, hkl, el, b_min=float(b.min()), b_max=float(b.max()))
    rel_iso = np.linalg.norm(np.asarray(iso(xyz, occ, b)) - ref) / np.linalg.norm(ref)
    print(f"anisotropic relative error {rel:.2e}; isotropic model vs anisotropic truth {rel_iso:.2e}")
    assert rel < 5e-5 and 100 * rel < rel_iso
    with pytest.raises(ValueError, match="anisotropic=True"):
        iso(xyz, occ, b, u)


def test_transpose_of_the_real_fft_matches_jax():
    """The hand-written transpose of rfftn (one inverse real FFT) equals JAX's own vjp, for even and odd sizes."""
    rng = np.random.default_rng(0)
    for shape in ((6, 8, 10), (5, 7, 9)):
        x = jnp.asarray(rng.normal(size=(2, *shape)).astype(np.float32))
        y, vjp = jax.vjp(lambda v: jnp.fft.rfftn(v, axes=(-3, -2, -1)), x)
        c = jnp.asarray((rng.normal(size=y.shape) + 1j * rng.normal(size=y.shape)).astype(np.complex64))
        _, mine = jax.vjp(_rfft3(shape), x)
        np.testing.assert_allclose(np.asarray(mine(c)[0]), np.asarray(vjp(c)[0]), atol=2e-4 * float(jnp.abs(y).max()))


def test_gradients_match_finite_differences(shared_data):
    """d/dx, d/d(occupancy) and d/dB of a least-squares |F| loss (custom VJP of the Gaussian spreading, FFT, symmetry)
    agree with central finite differences, for isotropic atoms in a monoclinic cell."""
    st, hkl = structure_and_hkl(shared_data, "5e5z", isotropic=True)
    xyz, el, occ, b, _ = gemmi_atoms(st)
    model = StructureFactorModel(st.cell, st.spacegroup_hm, hkl, el, b_min=1.0, b_max=40.0)
    target = np.abs(np.asarray(model(xyz + 0.2, occ, b))) * 1.1

    @jax.jit
    def loss(x, w, bb):
        a = jnp.abs(model(x, w, bb))
        return jnp.sum((target - a) ** 2) / 1e3

    gx, gw, gb = jax.grad(loss, argnums=(0, 1, 2))(xyz, occ, b)
    for i in (3, 20, 41):
        for j in range(3):
            xp, xm = xyz.copy(), xyz.copy()
            xp[i, j] += 1e-2
            xm[i, j] -= 1e-2
            fd = (loss(xp, occ, b) - loss(xm, occ, b)) / 2e-2
            assert float(gx[i, j]) == pytest.approx(float(fd), rel=2e-3, abs=2e-3 * float(jnp.abs(gx).max()))
        wp, wm = occ.copy(), occ.copy()
        wp[i] += 2e-2
        wm[i] -= 2e-2
        fd_w = (loss(xyz, wp, b) - loss(xyz, wm, b)) / 4e-2
        assert float(gw[i]) == pytest.approx(float(fd_w), rel=5e-3, abs=2e-3 * float(jnp.abs(gw).max()))
        bp, bm = b.copy(), b.copy()
        bp[i] += 0.5
        bm[i] -= 0.5
        fd_b = (loss(xyz, occ, bp) - loss(xyz, occ, bm)) / 1.0
        assert float(gb[i]) == pytest.approx(float(fd_b), rel=1e-2, abs=2e-3 * float(jnp.abs(gb).max()))


def test_ml_target_is_a_normalised_probability_density():
    """The Rice (acentric) and folded-Gaussian (centric) amplitude likelihoods integrate to 1 over F_obs >= 0 and the
    JAX and NumPy versions agree."""
    fo = np.linspace(1e-4, 60.0, 60001)
    for centric in (False, True):
        for d, fm, var in ((0.9, 20.0, 30.0), (0.5, 5.0, 80.0)):
            p = np.exp(_ml_terms(fo, fm, d, var, centric, xp=np))
            assert np.trapz(p, fo) == pytest.approx(1.0, abs=2e-3)
            j = np.asarray(_ml_terms(jnp.asarray(fo[::500], jnp.float32), fm, d, var, centric))
            np.testing.assert_allclose(j, _ml_terms(fo[::500], fm, d, var, centric, xp=np), rtol=1e-4, atol=1e-4)


def score_observable(shared_data, entry: str, per_conformer: bool = True, **options) -> tuple[XrayObservable, object]:
    """The observable as score mode builds it: the structure's atoms (waters fixed) at their B and occupancies
    (``per_conformer`` False: one occupancy per atom for any number of members, as in sample mode)."""
    pdb, mtz = DATA[entry]
    conf = read_structure(shared_data(pdb))
    fixed = read_fixed_atoms(conf.path, conf.layout.keys())
    fixed.pop("counts")
    if per_conformer:
        extra = {"b_iso": conf.b_iso, "u_aniso": conf.u_aniso, "occupancy": conf.relative_occupancies()}
    else:
        extra = {"b_iso": conf.b_iso[0], "occupancy": conf.occupancies.sum(0)}
    atoms = AtomInfo.from_layout(conf.layout, coords=conf.coords, weights=conf.weights, crystal=Crystal(*conf.crystal),
                                 environment=FixedAtoms(**fixed), **extra)
    return XrayObservable(atoms, data=shared_data(mtz), **options), conf


@pytest.mark.parametrize("entry", ["1dur", "5e5z"])
def test_r_values_agree_with_cctbx(shared_data, entry):
    """Score mode's R-work and R-free of the deposited model against the measured amplitudes land within 0.01
    (R-work) and 0.02 (R-free) of cctbx's mmtbx.f_model with bulk solvent and anisotropic scaling."""
    obs, conf = score_observable(shared_data, entry)
    rep = obs.report(conf.coords, conf.weights)
    r_work, r_free = CCTBX[entry]
    print(f"{entry}: R-work {rep['r_work']:.4f} (cctbx {r_work}), R-free {rep['r_free']:.4f} (cctbx {r_free}), "
          f"k_sol {rep['k_sol']:.3f}, B_sol {rep['b_sol']:.1f}, n_work {rep['n_work']}, n_free {rep['n_free']}")
    assert abs(rep["r_work"] - r_work) < 0.01
    assert abs(rep["r_free"] - r_free) < 0.02
    assert rep["n_free"] == (271 if entry == "1dur" else 18)
    for key in ("r_work", "r_free", "n_work", "n_free", "k_sol", "b_sol", "d_min", "target_work"):
        assert np.isfinite(rep[key])


def test_the_free_set_never_enters_the_likelihood(shared_data):
    """Changing the measured amplitudes of the free reflections leaves the guidance log-likelihood and its gradient
    unchanged (sigma_A and the scales are fitted on the working set), while it changes R-free."""
    obs, conf = score_observable(shared_data, "5e5z")
    refl = obs.reflections
    altered = refl.select(np.ones(len(refl), bool))
    noise = np.random.default_rng(5).uniform(0.5, 1.5, len(refl))
    altered.f_obs = np.where(refl.free, refl.f_obs * noise, refl.f_obs)
    atoms = AtomInfo.from_layout(conf.layout, coords=conf.coords, weights=conf.weights, b_iso=conf.b_iso,
                                 crystal=Crystal(*conf.crystal))
    a = XrayObservable(atoms, data=refl)
    b = XrayObservable(atoms, data=altered)
    x, w = jnp.asarray(conf.coords + 0.1), jnp.asarray(conf.weights, jnp.float32)
    (va, ga), (vb, gb) = (jax.value_and_grad(o.log_likelihood)(x, w) for o in (a, b))
    assert float(va) == pytest.approx(float(vb), rel=1e-6)
    np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), rtol=1e-5, atol=1e-6 * float(jnp.abs(ga).max()))
    assert a.report(conf.coords, conf.weights)["r_free"] != pytest.approx(b.report(conf.coords, conf.weights)["r_free"])


def test_ensemble_structure_factors_add_with_weights_not_amplitudes(shared_data):
    """An ensemble's F_calc is the weighted sum of its members' complex F (one multiconformer crystal), not a mean
    of |F|; and the model with its refitted scales fits the data better than a shifted copy."""
    obs, conf = score_observable(shared_data, "5e5z", per_conformer=False)
    x0 = conf.coords[0]
    shift = np.random.default_rng(1).normal(0, 0.4, x0.shape).astype(np.float32)
    members = np.stack([x0, x0 + shift])
    w = np.array([0.7, 0.3], np.float32)
    f_ens = np.asarray(obs.f_calc(members, w))
    f0 = np.asarray(obs.f_calc(members[:1], np.ones(1, np.float32)))
    f1 = np.asarray(obs.f_calc(members[1:], np.ones(1, np.float32)))
    np.testing.assert_allclose(f_ens, 0.7 * f0 + 0.3 * f1, rtol=1e-4, atol=1e-4 * np.abs(f0).max())
    mean_abs = 0.7 * np.abs(f0) + 0.3 * np.abs(f1)
    assert np.abs(np.abs(f_ens) - mean_abs).max() > 10 * 1e-4 * np.abs(f0).max()
    preds = obs.member_predictions(members)
    assert float(obs.log_likelihood_from_predictions(preds, w)) == pytest.approx(float(obs.log_likelihood(members, w)),
                                                                                 rel=1e-5)
    r_true = obs.report(members[:1], np.ones(1))["r_work"]
    r_shift = obs.report(members[1:], np.ones(1))["r_work"]
    assert r_true < r_shift


def test_multiconformer_model_reproduces_the_files_occupancies(shared_data):
    """Score mode of an altloc file: the conformers at their weights with per-atom occupancies relative to those
    weights give gemmi's direct-summation F of the file's atoms at their own occupancies (AWA, 2 conformers, P21)."""
    path = shared_data("structures/multiconf-peptides/AWA_2conf.pdb")
    conf = read_structure(path)
    assert conf.kind == "altloc" and conf.crystal is not None
    np.testing.assert_allclose((conf.weights[:, None] * conf.relative_occupancies()).sum(0),
                               conf.occupancies.sum(0), rtol=1e-6)
    st = gemmi.read_structure(str(path))
    st.remove_hydrogens()
    st.remove_waters()
    hkl = np.array(gemmi.make_miller_array(st.cell, gemmi.SpaceGroup(st.spacegroup_hm), 2.0), np.int64)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    ref = direct_sum(st, hkl, st.spacegroup_hm)
    b = conf.b_iso
    model = StructureFactorModel(st.cell, st.spacegroup_hm, hkl, conf.layout.element, b_min=float(b.min()),
                                 b_max=float(b.max()))
    w_atoms = conf.weights[:, None] * conf.relative_occupancies()
    f = np.asarray(model.ensemble(conf.coords, w_atoms, b))
    assert np.linalg.norm(f - ref) / np.linalg.norm(ref) < 5e-5


def test_structure_from_another_crystal_is_refused_in_one_line(shared_data):
    """A structure whose cell and space group differ from the data's is refused, naming both; the option allows it."""
    conf = read_structure(shared_data("xray/1dur/1dur.pdb"))
    atoms = AtomInfo.from_layout(conf.layout, coords=conf.coords, weights=conf.weights, b_iso=conf.b_iso,
                                 crystal=Crystal(*conf.crystal))
    with pytest.raises(ReflectionError) as err:
        XrayObservable(atoms, data=shared_data("xray/5e5z/5e5z.mtz"))
    message = str(err.value)
    assert "\n" not in message and "P 21 21 21" in message and "P 1 21 1" in message and "allow_other_crystal" in message
    obs = XrayObservable(atoms, data=shared_data("xray/5e5z/5e5z.mtz"), allow_other_crystal=True)
    assert any("allowed" in n for n in obs.notes)


def test_map_coefficients_are_refused_with_a_pointer_to_density(tmp_path):
    """An MTZ with only map coefficients (F + phase) is not measured data: the message points to observables=[density]."""
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi.SpaceGroup("P 1")
    mtz.set_cell_for_all(gemmi.UnitCell(20, 20, 20, 90, 90, 90))
    mtz.add_dataset("d")
    mtz.add_column("FWT", "F")
    mtz.add_column("PHWT", "P")
    mtz.set_data(np.array([[1, 0, 0, 10.0, 0.0], [0, 1, 0, 5.0, 90.0]], np.float32))
    path = tmp_path / "coefficients.mtz"
    mtz.write_to_file(str(path))
    with pytest.raises(ReflectionError, match=r"observables=\[density\]"):
        read_reflections(path)


def test_refit_updates_the_state_without_retracing(shared_data):
    """A refit to new coordinates changes the likelihood's constants (bulk solvent, scales, sigma_A) to those a fresh
    observable built on those coordinates has, and a jitted caller that takes the state as an argument is not
    recompiled by it."""
    obs, conf = score_observable(shared_data, "5e5z")
    moved = conf.coords + np.random.default_rng(3).normal(0, 0.3, conf.coords.shape).astype(np.float32)
    traces = []

    @jax.jit
    def value(state, x, w):
        traces.append(1)
        return obs.log_likelihood_with(state, x, w)

    w = jnp.asarray(conf.weights, jnp.float32)
    before = float(value(obs.state, moved, w))
    obs.refit(moved, conf.weights)
    after = float(value(obs.state, moved, w))
    assert len(traces) == 1 and before != pytest.approx(after)
    fresh, _ = score_observable(shared_data, "5e5z")
    fresh.refit(moved, conf.weights)
    assert after == pytest.approx(float(fresh.log_likelihood(moved, w)), rel=1e-5)


def test_r_factor_with_its_own_scale_is_scale_free():
    """R with the least-squares scale of the set does not change when the model is multiplied by a constant."""
    rng = np.random.default_rng(0)
    fo = rng.uniform(10, 100, 500)
    fm = fo * rng.normal(1, 0.2, 500)
    assert r_factor(fo, fm, scale=True) == pytest.approx(r_factor(fo, 3.7 * fm, scale=True))
    assert r_factor(fo, fo) == 0.0


def test_miller_resolution_matches_gemmi():
    """(sin theta / lambda)^2 = 1 / (4 d^2) for a monoclinic cell, as gemmi computes d."""
    cell = gemmi.UnitCell(9.643, 9.609, 19.029, 90, 101.224, 90)
    hkl = np.array([[1, 2, 3], [-4, 0, 7], [0, 5, -2]])
    np.testing.assert_allclose(miller_stol2(cell, hkl), [cell.calculate_1_d2(h.tolist()) / 4 for h in hkl], rtol=1e-12)


# ----------------------------------------------------------------------------------------------- the app


def run_app(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guidance.app", *args], capture_output=True, text=True, timeout=timeout)


def test_score_mode_reports_r_values_and_guided_runs_use_the_amplitudes(shared_data, tmp_path):
    """`mode=score observables=[xray]` reports R-work/R-free in metrics.json; a DPS and an FK run on the same data
    finish with finite R values, the trajectory has the X-ray log-likelihood and the written ensemble keeps the
    crystal's cell."""
    pdb, mtz = (str(shared_data(p)) for p in DATA["5e5z"])
    proc = run_app("mode=score", f"structure={pdb}", "observables=[xray]", f"observables.xray.data={mtz}",
                   f"hydra.run.dir={tmp_path / 'score'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    score = json.loads((tmp_path / "score" / "metrics.json").read_text())["observables"]["xray"]
    assert abs(score["r_work"] - CCTBX["5e5z"][0]) < 0.01 and abs(score["r_free"] - CCTBX["5e5z"][1]) < 0.02
    for method in ("dps", "fk"):
        d = tmp_path / method
        proc = run_app(f"structure={pdb}", "observables=[xray]", f"observables.xray.data={mtz}", f"guidance={method}",
                       "sampler.steps=12", "ensemble_size=2", "guidance.particles=2", "weights.steps=20",
                       "observables.xray.refit_every=4", "observables.xray.refit_below_sigma=1e9",
                       "refine.enabled=false",  # the sampling is what is checked here (refinement: test_refine, bench)
                       f"hydra.run.dir={d}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = json.loads((d / "metrics.json").read_text())
        rep = metrics["observables"]["xray"]
        assert np.isfinite(rep["r_work"]) and np.isfinite(rep["r_free"]) and rep["n_free"] == 18
        header = (d / "trajectory.csv").read_text().splitlines()[0].split(",")
        assert "loglik_xray" in header and "refit" in header
        assert "refitted" in (d / "run.log").read_text()
        assert (d / "plots" / "r_by_resolution.png").stat().st_size > 0
        assert sum(b["n_free"] for b in rep["bins"]) == rep["n_free"]


def test_sampling_sets_up_the_data_model_from_the_priors_conformers_only(shared_data):
    """In sample mode the conformer weights handed to the observables keep only the conformers the prior is built
    from (a benchmark's hidden altloc B gets weight 0), so the X-ray observable's first bulk-solvent and scale fit
    does not see the answer; without a choice every conformer keeps its weight."""
    from guidance.app.build import structure_atoms
    from guidance.structures.io import match_layouts

    conf = read_structure(shared_data("structures/multiconf-peptides/AWA_2conf.pdb"))
    match = match_layouts(conf.layout, conf.layout)
    only_a = structure_atoms(conf, conf.layout, match, ["A"])
    np.testing.assert_allclose(only_a["weights"], [1.0, 0.0])
    np.testing.assert_allclose(structure_atoms(conf, conf.layout, match)["weights"], conf.weights, rtol=1e-6)
    atoms = AtomInfo.from_layout(conf.layout, coords=conf.coords, **only_a)
    assert atoms.b_iso.shape == (len(conf.layout),) and atoms.occupancy.shape == (len(conf.layout),)
