"""Physics and I/O checks of the 3J(HN,HA) observable and of the shared backbone-dihedral code (CPU, small systems)."""

from __future__ import annotations

import dataclasses
import math

import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from backbone_models import load_model, peptide

from observables.base import Observable, build
from observables.jcoupling import (
    KARPLUS_HU_BAX_1997,
    KARPLUS_VUISTER_BAX_1993,
    JCouplingObservable,
    karplus_j,
    read_jcouplings,
)
from observables.nmr import NmrDataError, backbone, dihedral, phi_psi

# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------

def random_rotation(seed: int) -> np.ndarray:
    q = np.random.default_rng(seed).normal(size=4)
    a, b, c, d = q / np.linalg.norm(q)
    return np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
        ]
    )


@pytest.fixture
def x64():
    """Double precision for this test only (comparisons with finite differences)."""
    with jax.experimental.enable_x64():
        yield


def _j(phi_deg, params):
    phi = math.radians(phi_deg)
    return float(karplus_j(math.cos(phi), math.sin(phi), params))


# ------------------------------------------------------------------------------------------------------------------
# Karplus relation
# ------------------------------------------------------------------------------------------------------------------


def test_karplus_check_values_of_vuister_bax_and_hu_bax():
    """The README's check values: VB93 4.11 Hz (phi -60) and 9.87 Hz (phi -120); Hu & Bax 4.03 and 10.06 Hz."""
    assert round(_j(-60, KARPLUS_VUISTER_BAX_1993), 2) == 4.11
    assert round(_j(-120, KARPLUS_VUISTER_BAX_1993), 2) == 9.87
    assert round(_j(-60, KARPLUS_HU_BAX_1997), 2) == 4.03
    assert round(_j(-120, KARPLUS_HU_BAX_1997), 2) == 10.06


@pytest.mark.parametrize(("karplus", "expected"), [("vuister_bax_1993", (4.11, 9.87)), ("hu_bax_1997", (4.03, 10.06)),
                                                   # 8.40/4 + 1.36/2 + 0.33 and 8.40 + 1.36 + 0.33 (by hand)
                                                   ("vogeli_2007", (3.11, 10.09))])
def test_observable_reproduces_check_values_on_built_peptides(karplus, expected):
    """Through the whole path (coordinates -> heavy-atom phi -> J): peptides built with phi = -60 and -120 deg."""
    for phi, j_expected in zip((-60.0, -120.0), expected):
        atoms, xyz = peptide([phi] * 4, [140.0] * 4)
        obs = JCouplingObservable(atoms, data=[(2, 5.0), (3, 5.0), (4, 5.0)], karplus=karplus)
        j = np.asarray(obs.predict(jnp.asarray(xyz[None], jnp.float32), jnp.ones(1)))
        np.testing.assert_allclose(j, j_expected, atol=0.006)


def test_custom_parameters_and_unknown_set():
    atoms, xyz = peptide([-90.0] * 3, [120.0] * 3)
    obs = JCouplingObservable(atoms, data=[(2, 7.0)], karplus=[6.51, -1.76, 1.60])
    ref = JCouplingObservable(atoms, data=[(2, 7.0)])
    c = jnp.asarray(xyz[None], jnp.float32)
    assert float(obs.predict(c, jnp.ones(1))[0]) == pytest.approx(float(ref.predict(c, jnp.ones(1))[0]))
    with pytest.raises(ValueError, match="unknown Karplus"):
        JCouplingObservable(atoms, data=[(2, 7.0)], karplus="pardi_1984")


# ------------------------------------------------------------------------------------------------------------------
# Ensemble, invariance, gradients
# ------------------------------------------------------------------------------------------------------------------


def test_ensemble_averages_the_coupling_not_the_angle():
    """<J> = sum w J(phi_e): a 50:50 mix of phi -60 and -120 gives (4.11 + 9.87)/2 = 6.99 Hz, not J(-90) = 8.01 Hz."""
    a_atoms, a = peptide([-60.0] * 3, [140.0] * 3)
    _, b = peptide([-120.0] * 3, [140.0] * 3)
    obs = JCouplingObservable(a_atoms, data=[(2, 7.0), (3, 7.0)])
    coords = jnp.asarray(np.stack([a, b]), jnp.float32)
    for w in (0.5, 0.25):
        j = np.asarray(obs.predict(coords, jnp.array([w, 1 - w])))
        expected = w * _j(-60, KARPLUS_VUISTER_BAX_1993) + (1 - w) * _j(-120, KARPLUS_VUISTER_BAX_1993)
        np.testing.assert_allclose(j, expected, atol=1e-4)
    j_mean_phi = _j(-90, KARPLUS_VUISTER_BAX_1993)
    assert abs(float(obs.predict(coords, jnp.array([0.5, 0.5]))[0]) - j_mean_phi) > 0.9
    members = np.asarray(obs.member_predictions(coords))
    ll = obs.log_likelihood_from_predictions(jnp.asarray(members), jnp.array([0.3, 0.7]))
    assert float(ll) == pytest.approx(float(obs.log_likelihood(coords, jnp.array([0.3, 0.7]))), rel=1e-6)


def test_rigid_motion_leaves_couplings_unchanged(shared_data):
    """J depends on dihedrals only: a rotation plus translation of the whole model changes nothing."""
    atoms, xyz = load_model(shared_data("nmr/2KJR/2KJR.pdb"))
    bb = backbone(atoms)
    rows = [(int(s), 7.0) for s, ok, name in zip(bb.res_seq, bb.has_phi, bb.res_name) if ok and name != "GLY"]
    obs = JCouplingObservable(atoms, data=rows)
    moved = xyz @ random_rotation(3).T.astype(np.float32) + np.array([5.0, -12.0, 30.0], np.float32)
    j0 = np.asarray(obs.predict(jnp.asarray(xyz[None]), jnp.ones(1)))
    j1 = np.asarray(obs.predict(jnp.asarray(moved[None]), jnp.ones(1)))
    np.testing.assert_allclose(j1, j0, atol=2e-4)


def test_gradient_matches_finite_differences(x64):
    """d logL / d coords (and / d weights) equal central differences (float64), for an ensemble of two members."""
    atoms, a = peptide([-70.0, -100.0, -130.0, -65.0, -150.0], [130.0, 120.0, -40.0, 150.0, 140.0])
    _, b = peptide([-55.0, -80.0, -110.0, -140.0, -90.0], [-45.0, 140.0, 130.0, 120.0, 150.0])
    obs = JCouplingObservable(atoms, data=[(2, 8.0, 0.3), (3, 6.5), (4, 9.1), (5, 4.2, 0.5)], sigma=0.7)
    coords = jnp.asarray(np.stack([a, b]) + np.random.default_rng(0).normal(0, 0.05, (2, len(a), 3)))
    weights = jnp.array([0.35, 0.65])
    g_x, g_w = jax.grad(obs.log_likelihood, argnums=(0, 1))(coords, weights)
    rng = np.random.default_rng(1)
    for _ in range(3):
        d = jnp.asarray(rng.normal(size=coords.shape))
        h = 1e-5
        fd = (obs.log_likelihood(coords + h * d, weights) - obs.log_likelihood(coords - h * d, weights)) / (2 * h)
        assert float(jnp.sum(g_x * d)) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)
    dw = jnp.array([1.0, -1.0])
    fd_w = (obs.log_likelihood(coords, weights + 1e-6 * dw) - obs.log_likelihood(coords, weights - 1e-6 * dw)) / 2e-6
    assert float(jnp.sum(g_w * dw)) == pytest.approx(float(fd_w), rel=1e-6)


def test_gradient_is_finite_for_degenerate_geometry():
    """Collapsed (all atoms on one point) or collinear backbones give finite values and gradients, never NaN."""
    atoms, xyz = peptide([-60.0] * 3, [140.0] * 3)
    obs = JCouplingObservable(atoms, data=[(2, 7.0), (3, 7.0)])
    for coords in (np.zeros_like(xyz), np.outer(np.arange(len(xyz)), [1.0, 0.0, 0.0])):
        c = jnp.asarray(coords[None], jnp.float32)
        value, grad = jax.value_and_grad(obs.log_likelihood)(c, jnp.ones(1))
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


def test_jit_grad_vmap_over_particles_and_registry():
    """Registered as "jcoupling"; log_likelihood vmaps over FK particles [P, E, N, 3] like every observable."""
    atoms, a = peptide([-60.0, -120.0, -90.0, -70.0], [140.0] * 4)
    obs = build("jcoupling", atoms, data=[(2, 9.0), (3, 7.0), (4, 5.0)])
    assert isinstance(obs, Observable) and obs.name == "jcoupling"
    parts = jnp.asarray(np.stack([np.stack([a, a + 1.0]), np.stack([a * 1.01, a])]), jnp.float32)  # [2, 2, N, 3]
    w = jnp.array([[0.5, 0.5], [0.2, 0.8]])
    vals = jax.jit(jax.vmap(obs.log_likelihood))(parts, w)
    grads = jax.vmap(jax.grad(obs.log_likelihood))(parts, w)
    assert vals.shape == (2,) and grads.shape == parts.shape
    assert float(vals[0]) == pytest.approx(float(obs.log_likelihood(parts[0], w[0])), rel=1e-6)
    rep = obs.report(parts[0], w[0])
    assert set(rep) >= {"rmsd", "q_factor", "n", "chi2"} and rep["n"] == 3


# ------------------------------------------------------------------------------------------------------------------
# Dihedrals against gemmi
# ------------------------------------------------------------------------------------------------------------------


def test_phi_psi_match_gemmi_on_2kjr(shared_data):
    """Heavy-atom phi/psi of every residue of 2KJR model 1 equal gemmi's calculate_phi_psi (and the dihedral
    function equals gemmi's calculate_dihedral on arbitrary points)."""
    path = shared_data("nmr/2KJR/2KJR.pdb")
    atoms, xyz = load_model(path)
    bb = backbone(atoms)
    phi, psi = (np.degrees(np.asarray(a, np.float64)) for a in phi_psi(jnp.asarray(xyz, jnp.float32), bb))
    chain = gemmi.read_structure(str(path))[0][0]
    residues = [None, *chain, None]
    ref = np.array([gemmi.calculate_phi_psi(*residues[i : i + 3]) for i in range(len(chain))])
    ref = np.degrees(ref)
    assert len(ref) == len(bb) == 95
    np.testing.assert_array_equal(np.isnan(phi), np.isnan(ref[:, 0]))
    np.testing.assert_array_equal(np.isnan(psi), np.isnan(ref[:, 1]))
    def wrap(d):
        return (d + 180.0) % 360.0 - 180.0

    ok = ~np.isnan(phi)
    assert np.max(np.abs(wrap(phi[ok] - ref[ok, 0]))) < 0.01
    ok = ~np.isnan(psi)
    assert np.max(np.abs(wrap(psi[ok] - ref[ok, 1]))) < 0.01
    pts = np.random.default_rng(5).normal(size=(20, 4, 3))
    ours = np.asarray(dihedral(*(jnp.asarray(pts[:, k]) for k in range(4))))
    theirs = [gemmi.calculate_dihedral(*(gemmi.Position(*p) for p in quad)) for quad in pts]
    np.testing.assert_allclose(wrap(np.degrees(ours - np.array(theirs))), 0.0, atol=1e-3)


def test_chain_break_ends_phi_and_drops_the_coupling():
    """A C(i-1)-N(i) gap longer than a peptide bond (in the reference coordinates) leaves residue i without phi;
    its coupling is dropped with a warning, the others are kept."""
    atoms, xyz = peptide([-60.0] * 5, [140.0] * 5)
    broken = xyz.copy()
    broken[9:] += np.array([4.0, 0.0, 0.0])  # residue 4 (atoms 9..11) and after moved 4 A away
    atoms_broken = dataclasses.replace(atoms, coords=broken[None].astype(np.float32))
    assert list(backbone(atoms_broken).has_phi) == [False, True, True, False, True]
    with pytest.warns(UserWarning, match=r"no phi: A4"):
        obs = JCouplingObservable(atoms_broken, data=[(2, 4.0), (3, 4.0), (4, 4.0), (5, 4.0)])
    assert list(obs.residues) == [1, 2, 4]
    rep = obs.report(jnp.asarray(broken[None]), jnp.ones(1))
    assert rep["n"] == 3 and rep["n_unmapped"] == 1 and rep["unmapped"] == ["A4: no phi (chain start or break)"]
    # a coupling for a residue the model lacks is counted and listed, the rest are used
    with pytest.warns(UserWarning, match=r"2 coupling\(s\) cannot be mapped .*residue absent: A40"):
        obs = JCouplingObservable(atoms, data=[(1, 4.0), (2, 4.0), (3, 4.0), (40, 7.0)])
    rep = obs.report(jnp.asarray(xyz[None]), jnp.ones(1))
    assert rep["n"] == 2 and rep["unmapped_reasons"] == {"residue absent": 1, "no phi": 1}
    # without reference coordinates the numbering decides: consecutive numbers are linked
    no_ref = dataclasses.replace(atoms, coords=None)
    assert backbone(no_ref).has_phi.tolist() == [False, True, True, True, True]


# ------------------------------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------------------------------


def test_text_reader(tmp_path):
    path = tmp_path / "j.txt"
    path.write_text("# resnum J error\n2  8.1 0.4\n\n3 6.0   # no error\nA 4 5.5 0.2\n")
    data = read_jcouplings(path)
    assert data.res_seq.tolist() == [2, 3, 4]
    assert data.value.tolist() == [8.1, 6.0, 5.5] and data.error.tolist() == [0.4, 0.0, 0.2]
    assert data.chain.tolist() == ["", "", "A"]
    bad = tmp_path / "bad.txt"
    bad.write_text("2 8.1\n3 six\n")
    with pytest.raises(NmrDataError, match="bad.txt:2"):
        read_jcouplings(bad)


STAR_J = """data_test
save_entity_1
   _Entity.Sf_category  entity
   _Entity.Name         'test $protein'
save_

save_coupling_constants_1
   _Coupling_constant_list.Sf_category   coupling_constants
   _Coupling_constant_list.Entity_label  $entity_1

   loop_
      _Coupling_constant.ID
      _Coupling_constant.Code
      _Coupling_constant.Seq_ID_1
      _Coupling_constant.Comp_ID_1
      _Coupling_constant.Atom_ID_1
      _Coupling_constant.Seq_ID_2
      _Coupling_constant.Comp_ID_2
      _Coupling_constant.Atom_ID_2
      _Coupling_constant.Val
      _Coupling_constant.Val_err
      _Coupling_constant.Auth_seq_ID_1

      1 3JHNHA 1 ALA H  1 ALA HA  7.5 0.3 11
      2 3JHNHA 2 GLY H  2 GLY HA2 6.0 0.3 12
      3 3JHAHB 3 ALA HA 3 ALA HB  4.2 .   13
      4 3JHNHA 3 ALA H  3 ALA HA  9.1 .   13
   stop_
save_
"""


def test_star_reader_numbering_glycine_and_name_check(tmp_path):
    """NMR-STAR _Coupling_constant loop: only 3JHNHA rows, author numbering by default (Seq_ID on request), $frame
    references are read, glycines are dropped with a warning, and a residue-type mismatch is an error."""
    path = tmp_path / "j.str"
    path.write_text(STAR_J)
    auth = read_jcouplings(path)
    assert auth.res_seq.tolist() == [11, 12, 13] and auth.value.tolist() == [7.5, 6.0, 9.1]
    assert auth.res_name.tolist() == ["ALA", "GLY", "ALA"] and auth.error.tolist() == [0.3, 0.3, 0.0]
    assert read_jcouplings(path, numbering="seq").res_seq.tolist() == [1, 2, 3]

    atoms, _ = peptide([-60.0, -120.0, -90.0, -70.0], [140.0] * 4, res_names=["ALA", "ALA", "GLY", "ALA"], start=10)
    with pytest.warns(UserWarning, match="glycine"):
        obs = JCouplingObservable(atoms, data=path)
    assert obs.observed.tolist() == pytest.approx([7.5, 9.1]) and list(obs.residues) == [1, 3]
    with pytest.raises(NmrDataError, match="numbering"):
        JCouplingObservable(atoms, data=path, numbering="seq")  # Seq_ID 1-3 are not the model's numbers
    with pytest.raises(NmrDataError, match="not in the model"):
        JCouplingObservable(atoms, data=[(40, 7.0)])
