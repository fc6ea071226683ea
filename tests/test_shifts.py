"""Physics and I/O checks of the backbone chemical-shift observable (CPU; real data: 2KJR and BMRB 16338)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from backbone_models import load_model, peptide

from observables.base import AtomInfo, Observable, build
from observables.nmr import NmrDataError, backbone, phi_psi
from observables.shifts import (
    BASINS,
    NUCLEI,
    RANDOM_COIL_WISHART_1995,
    SECONDARY_SHIFTS,
    BuiltinShiftPredictor,
    ShiftData,
    ShiftsObservable,
    read_shifts,
    register_shift_predictor,
)

PDB = "nmr/2KJR/2KJR.pdb"
BMRB = "nmr/2KJR/bmrb16338_FR629A.str"

# SPARTA+ RMSEs (ppm) on its validation set: Shen & Bax (2010) J. Biomol. NMR 48, 13.
SPARTA_PLUS_RMSE = {"ca": 0.94, "cb": 1.14, "c": 1.09, "n": 2.45, "h": 0.49, "ha": 0.25}

# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------

def rotate_about(coords, origin, axis_to, moving, angle):
    """Rotate the ``moving`` atoms by ``angle`` (rad) about the axis origin -> axis_to (Rodrigues)."""
    k = (axis_to - origin) / np.linalg.norm(axis_to - origin)
    v = coords[moving] - origin
    rotated = v * np.cos(angle) + np.cross(k, v) * np.sin(angle) + np.outer(v @ k, k) * (1 - np.cos(angle))
    out = coords.copy()
    out[moving] = rotated + origin
    return out


def set_phi_psi(atoms: AtomInfo, coords: np.ndarray, res_seq: int, phi_deg: float, psi_deg: float) -> np.ndarray:
    """Turn residue ``res_seq`` to (phi, psi) by rotating everything C-terminal of the N-CA (phi) and CA-C (psi)
    bonds (atoms in file order: N, CA, C, O, side chain, then the following residues)."""
    bb = backbone(atoms)
    r = int(np.flatnonzero(bb.res_seq == res_seq)[0])
    n, ca, c = bb.n[r], bb.ca[r], bb.c[r]
    later = np.asarray(atoms.res_seq) > res_seq
    same = np.asarray(atoms.res_seq) == res_seq
    names = np.asarray(atoms.atom_name)
    phi, psi = (np.degrees(np.asarray(a, np.float64))[r] for a in phi_psi(jnp.asarray(coords, jnp.float32), bb))
    moving_phi = later | (same & ~np.isin(names, ["N", "CA"]))
    coords = rotate_about(coords, coords[n], coords[ca], moving_phi, np.radians(phi_deg - phi))
    moving_psi = later | (same & (names == "O"))
    return rotate_about(coords, coords[ca], coords[c], moving_psi, np.radians(psi_deg - psi))


@pytest.fixture
def x64():
    """Double precision for this test only (comparisons with finite differences)."""
    with jax.experimental.enable_x64():
        yield


def synthetic_data(values: dict[tuple[int, str], float], res_names: dict[int, str]) -> ShiftData:
    keys = sorted(values)
    return ShiftData(
        res_seq=np.array([k[0] for k in keys]),
        res_name=np.array([res_names[k[0]] for k in keys]),
        nucleus=np.array([k[1] for k in keys]),
        value=np.array([values[k] for k in keys]),
    )


# ------------------------------------------------------------------------------------------------------------------
# Reader
# ------------------------------------------------------------------------------------------------------------------


def test_reader_on_bmrb_16338(shared_data):
    """The _Atom_chem_shift loop of BMRB 16338: backbone nuclei only, H as the amide proton, glycine HA = mean of
    HA2/HA3, author numbering equal to BMRB's Seq_ID for this entry."""
    data = read_shifts(shared_data(BMRB))
    counts = {k: int(np.sum(data.nucleus == k)) for k in NUCLEI}
    assert counts == {"CA": 85, "CB": 78, "C": 82, "N": 83, "H": 84, "HA": 84}
    value = {(s, k): v for s, k, v in zip(data.res_seq.tolist(), data.nucleus.tolist(), data.value.tolist())}
    name = dict(zip(data.res_seq.tolist(), data.res_name.tolist()))
    assert (value[(12, "CA")], value[(12, "N")], value[(12, "H")], value[(12, "HA")]) == (56.4, 120.6, 8.18, 4.32)
    assert value[(11, "C")] == 174.1 and name[11] == "GLY" and name[12] == "LYS"
    assert data.res_seq.min() == 11 and data.res_seq.max() == 95
    seq = read_shifts(shared_data(BMRB), numbering="seq")
    np.testing.assert_array_equal(seq.res_seq, data.res_seq)  # Auth_seq_ID == Seq_ID in this entry
    gly = [s for s, n in name.items() if n == "GLY" and (s, "HA") in value]
    assert gly, "BMRB 16338 has glycine HA2/HA3"


def test_numbering_mismatch_is_refused_with_a_hint(shared_data):
    """A model numbered one higher than the data is refused, naming the residues and the offset that would fit."""
    atoms, _ = load_model(shared_data(PDB))
    shifted = dataclasses.replace(atoms, res_seq=np.asarray(atoms.res_seq) + 1)
    with pytest.raises(NmrDataError, match="residue_offset=1"):
        ShiftsObservable(shifted, data=shared_data(BMRB))
    obs = ShiftsObservable(shifted, data=shared_data(BMRB), residue_offset=1)
    assert obs.counts["CA"] == 85 and not obs.dropped


def test_star_reader_errors(tmp_path):
    with pytest.raises(NmrDataError, match="not found"):
        read_shifts(tmp_path / "missing.str")
    old = tmp_path / "old.str"
    old.write_text("data_x\nloop_\n_Residue_seq_code\n_Atom_name\n_Chem_shift_value\n1 CA 50.0\nstop_\n")
    with pytest.raises(NmrDataError, match="2.1"):
        read_shifts(old)


# ------------------------------------------------------------------------------------------------------------------
# Real data: 2KJR model 1 against BMRB 16338
# ------------------------------------------------------------------------------------------------------------------


def test_2kjr_model1_agrees_with_bmrb_16338(shared_data):
    """The builtin predictor on 2KJR model 1 (heavy atoms): CA RMSE <= 1.6 ppm (SPARTA+ reaches 0.94); no nucleus
    shows a referencing-size bias.  The per-nucleus table is printed next to SPARTA+'s published RMSEs."""
    atoms, xyz = load_model(shared_data(PDB))
    obs = ShiftsObservable(atoms, data=shared_data(BMRB))
    rep = obs.report(jnp.asarray(xyz[None]), jnp.ones(1))
    print("\nnucleus  n   RMSE (ppm)  bias  SPARTA+ RMSE")
    for k in ("ca", "cb", "c", "n", "h", "ha"):
        n, rmse, bias = rep["n_" + k], rep["rmse_" + k], rep["bias_" + k]
        print(f"{k:7s} {n:3.0f}  {rmse:6.2f}  {bias:+6.2f}  {SPARTA_PLUS_RMSE[k]:6.2f}")
    assert rep["n_ca"] == 85 and rep["n_h"] == 84
    assert rep["rmse_ca"] <= 1.6
    assert abs(rep["bias_ca"]) < 0.5 and abs(rep["bias_c"]) < 0.5 and abs(rep["bias_h"]) < 0.2
    # the secondary-shift model helps: random coil alone is worse for CA
    no_secondary = {"secondary_shifts": dict.fromkeys(NUCLEI, (0.0, 0.0))}
    rc_only = ShiftsObservable(atoms, data=shared_data(BMRB), predictor_options=no_secondary)
    assert rc_only.report(jnp.asarray(xyz[None]), jnp.ones(1))["rmse_ca"] > rep["rmse_ca"] + 0.3


def test_helix_turned_extended_scores_worse(shared_data):
    """On the 2KJR helix (residues 40-50), setting phi/psi of residues 42-48 to a strand (-120, 130) makes the shifts
    of that stretch fit worse: lower log-likelihood and higher CA, C' and HA RMSE."""
    atoms, xyz = load_model(shared_data(PDB))
    bb = backbone(atoms)
    stretch_res = (bb.res_seq >= 42) & (bb.res_seq <= 48)
    phi, psi = (np.degrees(np.asarray(a))[stretch_res] for a in phi_psi(jnp.asarray(xyz), bb))
    assert np.all(np.abs(phi + 63) < 15) and np.all(np.abs(psi + 43) < 15), "residues 42-48 of 2KJR are helical"
    full = read_shifts(shared_data(BMRB))
    keep = (full.res_seq >= 42) & (full.res_seq <= 48)
    stretch = ShiftData(full.res_seq[keep], full.res_name[keep], full.nucleus[keep], full.value[keep])
    obs = ShiftsObservable(atoms, data=stretch)
    extended = xyz.astype(np.float64)
    for rs in range(42, 49):
        extended = set_phi_psi(atoms, extended, rs, -120.0, 130.0)
    ext_phi, ext_psi = (np.degrees(np.asarray(a))[stretch_res] for a in phi_psi(jnp.asarray(extended), bb))
    np.testing.assert_allclose(ext_phi, -120.0, atol=0.05)
    np.testing.assert_allclose(ext_psi, 130.0, atol=0.05)
    helix = obs.report(jnp.asarray(xyz[None]), jnp.ones(1))
    strand = obs.report(jnp.asarray(extended[None], jnp.float32), jnp.ones(1))
    assert strand["log_likelihood"] < helix["log_likelihood"] - 20
    for k in ("ca", "c", "ha"):
        assert strand["rmse_" + k] > helix["rmse_" + k]


# ------------------------------------------------------------------------------------------------------------------
# Physics of the forward model
# ------------------------------------------------------------------------------------------------------------------


def _von_mises_weight(phi, psi, basin):
    """The module docstring's basin weight, written out in numpy (degrees in)."""
    phi0, psi0, width = BASINS[basin]
    kappa = 1.0 / math.radians(width) ** 2
    return math.exp(kappa * (math.cos(math.radians(phi - phi0)) - 1 + math.cos(math.radians(psi - psi0)) - 1))


def test_shifts_are_random_coil_plus_basin_weighted_secondary_shifts():
    """delta = RC(aa) + DSS_helix w_helix + DSS_strand w_strand: at the helix centre w_helix = 1 (the strand basin
    adds < 0.2 %), at the strand centre w_strand = 1, and in the left-handed region (a loop) both are < 0.1 %,
    leaving the random coil of Wishart et al. (1995).  Chain ends (no phi or psi) keep their random-coil value."""
    dss = np.array([SECONDARY_SHIFTS[k] for k in NUCLEI]).T  # [2, K]
    for phi, psi in ((-63.0, -43.0), (-120.0, 130.0), (60.0, 40.0), (-90.0, 0.0)):
        atoms, xyz = peptide([phi] * 3, [psi] * 3, res_names=["ALA", "LEU", "ALA"])
        shifts = np.asarray(BuiltinShiftPredictor(atoms)(jnp.asarray(xyz, jnp.float32)))
        w = np.array([_von_mises_weight(phi, psi, "helix"), _von_mises_weight(phi, psi, "strand")])
        np.testing.assert_allclose(shifts[1], np.array(RANDOM_COIL_WISHART_1995["LEU"]) + w @ dss, atol=2e-3)
        np.testing.assert_allclose(shifts[0], RANDOM_COIL_WISHART_1995["ALA"], atol=1e-4)  # no phi: random coil
        np.testing.assert_allclose(shifts[2], RANDOM_COIL_WISHART_1995["ALA"], atol=1e-4)  # no psi: random coil
    assert _von_mises_weight(-63, -43, "helix") == 1.0 and _von_mises_weight(-63, -43, "strand") < 2e-3
    assert _von_mises_weight(60, 40, "helix") < 1e-3 and _von_mises_weight(60, 40, "strand") < 1e-3


def test_ensemble_shift_is_weighted_mean_of_members():
    """Fast exchange: a helix/strand ensemble predicts the weighted mean of the members' shifts."""
    atoms, helix = peptide([-63.0] * 4, [-43.0] * 4)
    _, strand = peptide([-120.0] * 4, [130.0] * 4)
    values = {(r, k): RANDOM_COIL_WISHART_1995["ALA"][j] for r in (2, 3) for j, k in enumerate(NUCLEI)}
    obs = ShiftsObservable(atoms, data=synthetic_data(values, dict.fromkeys(range(1, 5), "ALA")))
    coords = jnp.asarray(np.stack([helix, strand]), jnp.float32)
    single = [np.asarray(obs.predict(coords[e : e + 1], jnp.ones(1))) for e in range(2)]
    for w in (0.5, 0.2):
        mixed = np.asarray(obs.predict(coords, jnp.array([w, 1 - w])))
        np.testing.assert_allclose(mixed, w * single[0] + (1 - w) * single[1], atol=1e-4)
    ca = np.asarray(obs.predict(coords, jnp.array([0.5, 0.5])))[obs.nucleus == "CA"]
    np.testing.assert_allclose(ca, 52.5 + 0.5 * 2.6 - 0.5 * 1.4, atol=1e-3)


def test_gradient_matches_finite_differences(x64):
    """d logL / d coords and / d weights equal central differences (float64), two-member ensemble."""
    atoms, a = peptide([-70.0, -100.0, -60.0, -65.0, -150.0, -80.0], [130.0, -30.0, -40.0, 150.0, 140.0, 120.0])
    _, b = peptide([-55.0, -80.0, -110.0, -140.0, -90.0, -60.0], [-45.0, 140.0, 130.0, 120.0, 150.0, -40.0])
    rng = np.random.default_rng(2)
    rc = RANDOM_COIL_WISHART_1995["ALA"]
    values = {(r, k): rc[j] + rng.normal(0, 1.0) for r in range(2, 6) for j, k in enumerate(NUCLEI)}
    obs = ShiftsObservable(atoms, data=synthetic_data(values, dict.fromkeys(range(1, 7), "ALA")))
    coords = jnp.asarray(np.stack([a, b]) + rng.normal(0, 0.05, (2, len(a), 3)))
    weights = jnp.array([0.4, 0.6])
    g_x, g_w = jax.grad(obs.log_likelihood, argnums=(0, 1))(coords, weights)
    for _ in range(3):
        d = jnp.asarray(rng.normal(size=coords.shape))
        h = 1e-5
        fd = (obs.log_likelihood(coords + h * d, weights) - obs.log_likelihood(coords - h * d, weights)) / (2 * h)
        assert float(jnp.sum(g_x * d)) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)
    dw = jnp.array([1.0, -1.0])
    fd_w = (obs.log_likelihood(coords, weights + 1e-6 * dw) - obs.log_likelihood(coords, weights - 1e-6 * dw)) / 2e-6
    assert float(jnp.sum(g_w * dw)) == pytest.approx(float(fd_w), rel=1e-6)


def test_rigid_motion_and_vmap_over_particles(shared_data):
    """Shifts depend on dihedrals only (rigid motion changes nothing); log_likelihood jits and vmaps over particles."""
    atoms, xyz = load_model(shared_data(PDB))
    obs = build("shifts", atoms, data=shared_data(BMRB))
    assert isinstance(obs, Observable) and obs.name == "shifts"
    q = np.linalg.qr(np.random.default_rng(4).normal(size=(3, 3)))[0]
    q *= np.sign(np.linalg.det(q))
    moved = (xyz @ q.T + np.array([3.0, -7.0, 11.0])).astype(np.float32)
    p0 = np.asarray(obs.predict(jnp.asarray(xyz[None]), jnp.ones(1)))
    p1 = np.asarray(obs.predict(jnp.asarray(moved[None]), jnp.ones(1)))
    np.testing.assert_allclose(p1, p0, atol=1e-3)
    parts = jnp.asarray(np.stack([np.stack([xyz, moved]), np.stack([moved, xyz])]))
    w = jnp.array([[0.5, 0.5], [0.9, 0.1]])
    vals = jax.jit(jax.vmap(obs.log_likelihood))(parts, w)
    np.testing.assert_allclose(np.asarray(vals), float(obs.log_likelihood(parts[0], w[0])), rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Plugging in another predictor
# ------------------------------------------------------------------------------------------------------------------


class _ConstantPredictor:
    """A stand-in predictor: the random-coil value of alanine for every residue and nucleus."""

    nuclei = NUCLEI

    def __init__(self, atoms, offset: float = 0.0):
        bb = backbone(atoms)
        self.residue_ids = [(str(c), int(s)) for c, s in zip(bb.chain_id, bb.res_seq)]
        self.res_names = bb.res_name
        self.defined = np.ones((len(bb), len(NUCLEI)), dtype=bool)
        self.values = jnp.asarray(np.array(RANDOM_COIL_WISHART_1995["ALA"], np.float32) + offset)

    def __call__(self, coords):
        return jnp.broadcast_to(self.values, (len(self.residue_ids), len(NUCLEI))) + 0.0 * jnp.sum(coords)


def test_other_predictors_plug_in():
    """A predictor can be a registered name, a factory, or a 'module:factory' path; options reach the factory."""
    atoms, xyz = peptide([-63.0] * 4, [-43.0] * 4)
    values = {(2, "CA"): 55.0, (3, "HA"): 4.0}
    data = synthetic_data(values, dict.fromkeys(range(1, 5), "ALA"))
    c = jnp.asarray(xyz[None], jnp.float32)
    obs = ShiftsObservable(atoms, data=data, predictor=_ConstantPredictor, predictor_options={"offset": 1.0})
    np.testing.assert_allclose(np.asarray(obs.predict(c, jnp.ones(1))), [53.5, 5.32], atol=1e-5)
    register_shift_predictor("constant-test")(_ConstantPredictor)
    obs = ShiftsObservable(atoms, data=data, predictor="constant-test")
    np.testing.assert_allclose(np.asarray(obs.predict(c, jnp.ones(1))), [52.5, 4.32], atol=1e-5)
    by_path = ShiftsObservable(atoms, data=data, predictor="observables.shifts:BuiltinShiftPredictor")
    builtin = ShiftsObservable(atoms, data=data)
    np.testing.assert_allclose(np.asarray(by_path.predict(c, jnp.ones(1))), np.asarray(builtin.predict(c, jnp.ones(1))))
    with pytest.raises(ValueError, match="unknown shift predictor"):
        ShiftsObservable(atoms, data=data, predictor="sparta-plus")


def test_shifts_the_model_cannot_take_are_counted_and_listed(shared_data):
    """A model that lacks the data's last residues: their shifts are not used, a warning names them, and the report
    counts and lists them by reason (never dropped silently)."""
    atoms, coords = load_model(shared_data(PDB))
    keep = np.asarray(atoms.res_seq) <= 93
    trimmed = AtomInfo(*(np.asarray(getattr(atoms, f))[keep] for f in ("element", "atom_name", "res_name", "res_seq",
                                                                       "chain_id")), coords=coords[None, keep])
    with pytest.warns(UserWarning, match=r"shift\(s\) cannot be mapped onto the model .*residue absent: 94 H, 94 HA"):
        obs = ShiftsObservable(trimmed, data=shared_data(BMRB))
    rep = obs.report(jnp.asarray(coords[None, keep]), jnp.ones(1))
    data = read_shifts(shared_data(BMRB))
    absent = int(np.sum((data.res_seq > 93) & np.isin(data.nucleus, list(NUCLEI))))
    assert absent > 0 and rep["unmapped_reasons"]["residue absent"] == absent
    assert rep["n_unmapped"] == len(obs.dropped) >= absent
    assert rep["unmapped"][0].startswith("94 ") and "residue absent" in rep["unmapped"][0]
    assert rep["n_other_nuclei"] == float(np.sum(~np.isin(data.nucleus, list(NUCLEI))))
