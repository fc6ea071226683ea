"""Physics and I/O checks of the RDC observable (one alignment tensor fitted to the weighted ensemble)."""

from __future__ import annotations

import math
import warnings

import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import enable_x64

import observables.rdc  # noqa: F401  (registers "rdc")
from guidance.fixtures import nerf
from observables.base import AtomInfo, Observable, build
from observables.rdc import (
    AtomRef,
    Coupling,
    RDCError,
    RDCObservable,
    alignment_tensor,
    dipolar_constant,
    read_nmrstar,
    read_pa,
    read_rdc,
    tensor_parameters,
)


# Independent numbers for the checks: gamma (rad s^-1 T^-1, IUPAC 2001) and the bond lengths the module documents.
GAMMA = {"H": 26.7522128e7, "C": 6.728284e7, "N": -2.71261804e7}
R_NH, R_CAHA, R_CN = 1.02, 1.09, 1.329


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def backbone(res_names: list[str], seed: int = 0) -> tuple[AtomInfo, np.ndarray]:
    """A heavy-atom backbone (N, CA, C, O, and CB except for Gly) with random phi/psi: atoms and coords [N, 3] (A)."""
    rng = np.random.default_rng(seed)
    n, ca = np.array([0.0, 0.0, 0.0]), np.array([1.458, 0.0, 0.0])
    c = nerf(np.array([0.0, 1.0, 0.0]), n, ca, 1.525, 111.0, 0.0)
    rows = []
    for i, name in enumerate(res_names):
        if i > 0:
            psi, phi = rng.uniform(-180, 180, size=2)
            n_prev, ca_prev, c_prev = n, ca, c
            n = nerf(n_prev, ca_prev, c_prev, 1.329, 116.2, psi)
            ca = nerf(ca_prev, c_prev, n, 1.458, 121.7, 180.0)
            c = nerf(c_prev, n, ca, 1.525, 111.0, phi)
        o = nerf(n, ca, c, 1.231, 120.5, rng.uniform(-180, 180))
        atoms = [("N", n), ("CA", ca), ("C", c), ("O", o)]
        if name != "GLY":
            atoms.append(("CB", nerf(c, n, ca, 1.530, 110.5, -122.5)))
        rows += [(i + 1, name, a, x) for a, x in atoms]
    coords = np.array([r[3] for r in rows])
    info = AtomInfo(
        element=np.array([r[2][0] for r in rows]),
        atom_name=np.array([r[2] for r in rows]),
        res_name=np.array([r[1] for r in rows]),
        res_seq=np.array([r[0] for r in rows]),
        chain_id=np.full(len(rows), "A"),
        coords=coords[None].astype(np.float32),
    )
    return info, coords


def positions(atoms: AtomInfo, coords: np.ndarray) -> dict[tuple[int, str], np.ndarray]:
    return {(int(r), str(a)): coords[i] for i, (r, a) in enumerate(zip(atoms.res_seq, atoms.atom_name))}


def amide_h_vector(pos, res: int) -> np.ndarray:
    """Unit N->H: the bisector of C(i-1)->N and CA->N (the placement rule of the reference analysis)."""
    n = pos[(res, "N")]
    return unit(unit(n - pos[(res - 1, "C")]) + unit(n - pos[(res, "CA")]))


def ha_vector(pos, res: int) -> np.ndarray:
    ca = pos[(res, "CA")]
    return -unit(sum(unit(pos[(res, a)] - ca) for a in ("N", "C", "CB")))


def dmax(x: str, y: str, r: float) -> float:
    """D_max (Hz) = -(mu0/4pi) gamma_x gamma_y hbar / (pi r^3), written out independently of the module."""
    hbar = 1.054571817e-34
    return -1e-7 * GAMMA[x] * GAMMA[y] * hbar / (math.pi * (r * 1e-10) ** 3)


def couplings_from_tensor(atoms, members, weights, t_hz, kinds=("N-H",), skip=()) -> list[Coupling]:
    """Noise-free couplings of the weighted ensemble ``members [E, N, 3]`` for tensor ``t_hz`` (Hz, N-H normalised)."""
    res_ids = sorted({int(r) for r in atoms.res_seq})
    names = dict(zip((int(r) for r in atoms.res_seq), (str(n) for n in atoms.res_name)))
    ratio = {
        "N-H": 1.0,
        "CA-HA": dmax("C", "H", R_CAHA) / dmax("N", "H", R_NH),
        "C-N": dmax("C", "N", R_CN) / dmax("N", "H", R_NH),
    }
    out = []
    for kind in kinds:
        for res in res_ids:
            if res in skip:
                continue
            values = []
            for coords in members:
                pos = positions(atoms, coords)
                if kind == "N-H":
                    if res == res_ids[0] or names[res] == "PRO":
                        break
                    u, pair = amide_h_vector(pos, res), (AtomRef(None, res, "N"), AtomRef(None, res, "H"))
                elif kind == "CA-HA":
                    if names[res] == "GLY":
                        break
                    u, pair = ha_vector(pos, res), (AtomRef(None, res, "CA"), AtomRef(None, res, "HA"))
                else:  # C(i) - N(i+1)
                    if res == res_ids[-1]:
                        break
                    u = unit(pos[(res + 1, "N")] - pos[(res, "C")])
                    pair = (AtomRef(None, res, "C"), AtomRef(None, res + 1, "N"))
                values.append(ratio[kind] * u @ t_hz @ u)
            else:
                out.append(Coupling(*pair, value=float(np.dot(weights, values)), source=f"synthetic {kind} {res}"))
    return out


@pytest.fixture(scope="module")
def ubiquitin(shared_data):
    """1UBQ chain A, protein residues 1-76, heavy atoms only (waters dropped): AtomInfo and coords [N, 3]."""
    st = gemmi.read_structure(str(shared_data("rdc/ubiquitin/1ubq.pdb")))
    st.setup_entities()
    st.remove_ligands_and_waters()
    st.remove_hydrogens()
    rows = [(r.seqid.num, r.name, a.name, a.element.name, a.pos.tolist()) for r in st[0]["A"] for a in r]
    assert rows[0][0] == 1 and rows[-1][0] == 76
    coords = np.array([r[4] for r in rows])
    atoms = AtomInfo(
        element=np.array([r[3] for r in rows]),
        atom_name=np.array([r[2] for r in rows]),
        res_name=np.array([r[1] for r in rows]),
        res_seq=np.array([r[0] for r in rows]),
        chain_id=np.full(len(rows), "A"),
        coords=coords[None].astype(np.float32),
    )
    return atoms, coords, shared_data("rdc/ubiquitin/ubq_bicelle_hn-n.pa")


def one(coords):
    return jnp.asarray(np.asarray(coords, np.float32)[None]), jnp.ones(1, jnp.float32)


# ------------------------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------------------------


def test_pa_reader_keeps_nh_rdcs_and_ignores_csa_lines(shared_data):
    path = shared_data("rdc/ubiquitin/ubq_bicelle_hn-n.pa")
    couplings = read_pa(path)
    assert len(couplings) == 63  # the 63 "<res>N-H" lines; the 63 "<res>N <value>" CSA lines are not RDCs
    assert all(c.atom1.name == "N" and c.atom2.name == "H" and c.atom1.res_seq == c.atom2.res_seq for c in couplings)
    assert (couplings[0].atom1.res_seq, couplings[0].value) == (2, 13.2)
    assert couplings[-1].source.startswith(str(path))
    assert len(read_rdc(path)) == 63  # format auto -> pa


def test_pa_reader_label_forms_and_errors(tmp_path):
    path = tmp_path / "mixed.pa"
    path.write_text(
        "# Interaction  Value (Hz)  Error\n"
        "14N-H   -14.5  0.1\n"
        "15N-15H   3.5       # same residue written twice\n"
        "A.16H-A.15C  0.5  0.2\n"
        "16N-C-1   1.25\n"
        "17CA-HA  -20.0\n"
        "\n"
        "5C   112  1\n"
    )
    c = read_pa(path)
    assert [x.label for x in c] == ["14N-H", "15N-H", "A.16H-A.15C", "16N-15C", "17CA-HA"]
    assert c[0].error == 0.1 and c[1].error is None and c[2].atom2 == AtomRef("A", 15, "C")
    assert c[4].source == f"{path}:6"

    bad = tmp_path / "bad.pa"
    bad.write_text("2N-H 13.2\n3N-H eight\n")
    with pytest.raises(RDCError, match=r"bad\.pa:2"):
        read_pa(bad)
    bad.write_text("2N-H 13.2\n\nN-H 1.0\n")
    with pytest.raises(RDCError, match=r"bad\.pa:3.*label"):
        read_pa(bad)
    bad.write_text("2N-H 13.2\n2N-H 1.0\n")
    with pytest.raises(RDCError, match=r"bad\.pa:2.*already given at line 1"):
        read_pa(bad)
    with pytest.raises(RDCError, match="not found"):
        read_rdc(tmp_path / "absent.pa")


STAR = """data_rdc_test

save_RDC_list_{lid}
   _RDC_list.Sf_category    RDC_constraints
   _RDC_list.ID             {lid}

   loop_
      _RDC.ID
      _RDC.Entity_assembly_ID_1
      _RDC.Comp_index_ID_1
      _RDC.Comp_ID_1
      _RDC.Atom_ID_1
      _RDC.Atom_type_1
      _RDC.Entity_assembly_ID_2
      _RDC.Comp_index_ID_2
      _RDC.Comp_ID_2
      _RDC.Atom_ID_2
      _RDC.Atom_type_2
      _RDC.Val
      _RDC.Val_err
      _RDC.RDC_list_ID

      1   1   2   GLN   N   N   1   2   GLN   H   H   13.2    0.5   {lid}
      2   1   3   ILE   N   N   1   3   ILE   H   H   -8.78   .     {lid}
      3   1   5   VAL   CA  C   1   5   VAL   HA  H   21.4    1.0   {lid}
      4   1   5   VAL   C   C   1   6   LYS   N   N   -1.05   0.1   {lid}
   stop_
save_
"""


def test_nmrstar_rdc_loop_reads_back(tmp_path):
    path = tmp_path / "rdc.str"
    path.write_text(STAR.format(lid=1))
    c = read_nmrstar(path)
    assert [(x.atom1.res_seq, x.atom1.name, x.atom2.res_seq, x.atom2.name) for x in c] == [
        (2, "N", 2, "H"), (3, "N", 3, "H"), (5, "CA", 5, "HA"), (5, "C", 6, "N")
    ]
    assert [x.value for x in c] == [13.2, -8.78, 21.4, -1.05]
    assert [x.error for x in c] == [0.5, None, 1.0, 0.1]
    assert "_RDC.ID 3" in c[2].source and str(path) in c[2].source
    assert [x.value for x in read_rdc(path)] == [x.value for x in c]  # format auto -> star (suffix)
    sniffed = tmp_path / "rdc.txt"
    sniffed.write_text(STAR.format(lid=1))
    assert len(read_rdc(sniffed)) == 4  # format auto -> star (content)

    two = tmp_path / "two.str"
    two.write_text(STAR.format(lid=1) + STAR.format(lid=2).split("\n", 1)[1])
    with pytest.raises(RDCError, match="2 RDC lists"):
        read_nmrstar(two)
    assert len(read_nmrstar(two, list_id="2")) == 4

    bad = tmp_path / "bad.str"
    bad.write_text(STAR.format(lid=1).replace("-8.78", "x8"))
    with pytest.raises(RDCError, match=r"bad\.str.*row 2.*_RDC.ID 2.*not a number"):
        read_nmrstar(bad)
    nothing = tmp_path / "nothing.str"
    nothing.write_text("data_x\n_Entry.ID 1\n")
    with pytest.raises(RDCError, match="no _RDC loop"):
        read_nmrstar(nothing)


# ------------------------------------------------------------------------------------------------------------------
# physics on ubiquitin
# ------------------------------------------------------------------------------------------------------------------


def test_dipolar_constant_of_amide_nh():
    # D_max(15N-1H) = 21.66 kHz at 1.04 A (the textbook ~21.7 kHz) and scales as r^-3; gamma_N < 0 makes it positive
    assert dipolar_constant("N", "H", 1.04) == pytest.approx(21.66e3, rel=1e-3)
    assert dipolar_constant("N", "H", 1.02) == pytest.approx(21.66e3 * (1.04 / 1.02) ** 3, rel=1e-3)
    assert dipolar_constant("C", "H", 1.09) < 0


def test_ubiquitin_nh_q_factor_matches_reference(ubiquitin):
    """1UBQ (amide H placed on the C(i-1)-N / CA-N bisector at 1.02 A) vs the 63 bicelle N-H RDCs: Q = 0.18."""
    atoms, coords, pa = ubiquitin
    obs = RDCObservable(atoms, data=pa, sigma=1.0)
    assert isinstance(obs, Observable)
    rep = obs.report(*one(coords))
    print("1UBQ:", rep)
    assert rep["n"] == 63 and rep["n_missing"] == 0 and rep["n_skipped"] == 0
    assert rep["q_factor"] == pytest.approx(0.18, abs=0.02)
    assert 0.0 <= rep["rhombicity"] <= 2.0 / 3.0
    # the likelihood is the chi^2 of the best-fit tensor; rmsd/Q are consistent with each other
    ll = float(obs.log_likelihood(*one(coords)))
    assert ll == pytest.approx(-0.5 * rep["chi2"] * rep["n"], rel=1e-4)
    assert rep["rmsd"] == pytest.approx(rep["q_factor"] * np.sqrt(np.mean(obs.observed**2)), rel=1e-6)


def test_q_factor_is_invariant_under_global_rotation(ubiquitin):
    """The tensor absorbs a rigid rotation of the molecule: Q, Da and R are unchanged and T turns into R T R^T."""
    atoms, coords, pa = ubiquitin
    obs = RDCObservable(atoms, data=pa)
    rot = random_rotation(7)
    moved = (coords - coords.mean(0)) @ rot.T + np.array([30.0, -12.0, 5.0])
    a, b = obs.report(*one(coords)), obs.report(*one(moved))
    for key in ("q_factor", "da", "rhombicity", "rmsd"):
        assert b[key] == pytest.approx(a[key], rel=2e-4, abs=1e-5), key
    t0, t1 = obs.tensor(*one(coords)), obs.tensor(*one(moved))
    np.testing.assert_allclose(t1, rot @ t0 @ rot.T, atol=2e-3 * np.abs(t0).max())


# ------------------------------------------------------------------------------------------------------------------
# physics on synthetic data with a known tensor
# ------------------------------------------------------------------------------------------------------------------

SEQ = ["MET", "ALA", "SER", "GLY", "LEU", "PRO", "VAL", "GLU", "LYS", "THR", "ASP", "ILE", "GLY", "ASN", "ALA",
       "PHE", "ARG", "GLN", "TYR", "ALA", "LEU", "SER", "HIS", "TRP", "ALA"]


def test_fit_recovers_a_known_tensor_with_mixed_bond_types():
    """Couplings computed from a known tensor (N-H with placed H, CA-HA with placed HA, C-N heavy atoms, each with
    its own gamma/bond-length prefactor) are fitted exactly and give back Da, R and the tensor matrix."""
    atoms, coords = backbone(SEQ, seed=3)
    rot = random_rotation(11)
    t_true = alignment_tensor(-9.5, 0.41, rot)
    data = couplings_from_tensor(atoms, coords[None], np.ones(1), t_true, kinds=("N-H", "CA-HA", "C-N"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the synthetic data only name buildable couplings
        obs = RDCObservable(atoms, data=data, sigma={"N-H": 1.0, "CA-HA": 2.0, "C-N": 0.2})
    assert set(obs.bond_types) == {"N-H", "CA-HA", "C-N"}
    rep = obs.report(*one(coords))
    t_fit = obs.tensor(*one(coords))
    fitted = tensor_parameters(t_fit)
    print(f"recovered: Da {fitted['da']:.5f} (true -9.5), R {fitted['rhombicity']:.5f} (true 0.41), "
          f"max |dT| {np.abs(t_fit - t_true).max():.2e} Hz, Q {rep['q_factor']:.2e}")
    assert rep["q_factor"] < 1e-4
    assert fitted["da"] == pytest.approx(-9.5, rel=1e-4)
    assert fitted["rhombicity"] == pytest.approx(0.41, abs=1e-4)
    np.testing.assert_allclose(t_fit, t_true, atol=1e-4 * 19.0)
    assert rep["da"] == pytest.approx(-9.5, rel=1e-4) and rep["rhombicity"] == pytest.approx(0.41, abs=1e-4)
    assert obs.scale_by_type["CA-HA"] == pytest.approx(dmax("C", "H", R_CAHA) / dmax("N", "H", R_NH), rel=1e-6)


def test_one_tensor_for_the_ensemble_averages_design_rows():
    """Two members (a structure and a rotated copy, i.e. two orientations of every bond) with weights 0.3/0.7, the
    data the weighted average of the members' couplings under ONE tensor T.  The observable averages the members'
    design rows with the weights and fits one tensor, so it recovers T itself.  (A rigid copy alone cannot be told
    apart by Q: sum_m w_m u^T R_m^T T R_m u is again a traceless tensor, so other weights also fit -- with a
    different tensor.)  Two different conformers, in turn, are fitted only as the weighted ensemble."""
    atoms, coords = backbone(SEQ, seed=5)
    rot = random_rotation(2)
    members = np.stack([coords, (coords - coords.mean(0)) @ rot.T + coords.mean(0)])
    weights = np.array([0.3, 0.7])
    t_true = alignment_tensor(12.0, 0.25, random_rotation(4))
    obs = RDCObservable(atoms, data=couplings_from_tensor(atoms, members, weights, t_true))
    x, w = jnp.asarray(members, jnp.float32), jnp.asarray(weights, jnp.float32)
    w_swapped = jnp.asarray(weights[::-1].copy(), jnp.float32)
    good = obs.report(x, w)
    t_fit, t_swapped = obs.tensor(x, w), obs.tensor(x, w_swapped)
    print(f"rotated copy: Q {good['q_factor']:.2e}, max |T_fit - T| {np.abs(t_fit - t_true).max():.2e} Hz; "
          f"swapped weights: max |T_fit - T| {np.abs(t_swapped - t_true).max():.2f} Hz")
    assert good["q_factor"] < 1e-4
    np.testing.assert_allclose(t_fit, t_true, atol=1e-3)
    assert np.abs(t_swapped - t_true).max() > 1.0
    # the ensemble's design matrix is the weighted sum of the members' rows
    rows = obs.member_predictions(x)
    assert rows.shape == (2, obs.n, 5)
    assert float(obs.log_likelihood_from_predictions(rows, w)) == pytest.approx(
        float(obs.log_likelihood(x, w)), rel=1e-5, abs=1e-6
    )

    # two different conformers (same atoms, other backbone angles): only the weighted ensemble explains the data
    _, other = backbone(SEQ, seed=6)
    pair = np.stack([coords, other])
    obs2 = RDCObservable(atoms, data=couplings_from_tensor(atoms, pair, weights, t_true))
    x2 = jnp.asarray(pair, jnp.float32)
    q_ens = obs2.report(x2, w)["q_factor"]
    q_first, q_second = (obs2.report(x2[k : k + 1], jnp.ones(1))["q_factor"] for k in (0, 1))
    print(f"two conformers: Q ensemble {q_ens:.2e}, member 1 alone {q_first:.3f}, member 2 alone {q_second:.3f}")
    assert q_ens < 1e-4 and q_first > 0.1 and q_second > 0.1
    np.testing.assert_allclose(obs2.tensor(x2, w), t_true, atol=1e-3)


def test_gradient_matches_finite_differences():
    """d logL / d coords and d logL / d weights (tensor re-fitted inside) agree with central differences (float64)."""
    atoms, coords = backbone(SEQ, seed=9)
    rng = np.random.default_rng(0)
    members = np.stack([coords, coords + rng.normal(scale=0.3, size=coords.shape)])
    t_true = alignment_tensor(10.0, 0.3, random_rotation(5))
    data = couplings_from_tensor(atoms, members, np.array([0.5, 0.5]), t_true)
    data = [Coupling(c.atom1, c.atom2, c.value + float(rng.normal(scale=2.0))) for c in data]  # residuals != 0
    obs = RDCObservable(atoms, data=data, sigma=1.5)
    with enable_x64():
        x = jnp.asarray(members, jnp.float64)
        w = jnp.asarray([0.4, 0.6], jnp.float64)
        f = obs.log_likelihood
        gx, gw = jax.grad(f, argnums=(0, 1))(x, w)
        assert gx.dtype == jnp.float64 and np.all(np.isfinite(np.asarray(gx)))
        direction = jnp.asarray(rng.normal(size=members.shape))
        h = 1e-5
        fd = (f(x + h * direction, w) - f(x - h * direction, w)) / (2 * h)
        an = jnp.sum(gx * direction)
        print(f"grad check: analytic {float(an):.8f}, finite difference {float(fd):.8f}")
        assert float(an) == pytest.approx(float(fd), rel=1e-6)
        dw = jnp.asarray([1.0, -1.0])
        fd_w = (f(x, w + h * dw) - f(x, w - h * dw)) / (2 * h)
        assert float(jnp.sum(gw * dw)) == pytest.approx(float(fd_w), rel=1e-6)


def test_jit_grad_vmap_over_particles():
    atoms, coords = backbone(SEQ[:12], seed=1)
    data = couplings_from_tensor(atoms, coords[None], np.ones(1), alignment_tensor(8.0, 0.5, random_rotation(3)))
    obs = build("rdc", atoms, data=data)
    rng = np.random.default_rng(1)
    particles = jnp.asarray(coords[None, None] + rng.normal(scale=0.2, size=(3, 2) + coords.shape), jnp.float32)
    w = jnp.asarray([0.5, 0.5], jnp.float32)
    batched = jax.jit(jax.vmap(jax.value_and_grad(obs.log_likelihood), in_axes=(0, None)))(particles, w)
    for p in range(3):
        assert float(batched[0][p]) == pytest.approx(float(obs.log_likelihood(particles[p], w)), rel=1e-5, abs=1e-5)
    assert batched[1].shape == particles.shape and np.all(np.isfinite(np.asarray(batched[1])))


# ------------------------------------------------------------------------------------------------------------------
# matching the data to the model
# ------------------------------------------------------------------------------------------------------------------


def test_unbuildable_couplings_are_skipped_with_reasons_and_missing_residues_counted():
    atoms, coords = backbone(SEQ, seed=3)
    data = couplings_from_tensor(atoms, coords[None], np.ones(1), alignment_tensor(9.0, 0.3, random_rotation(1)))
    extra = [
        Coupling(AtomRef(None, 1, "N"), AtomRef(None, 1, "H"), 3.0),  # first residue: NH3+
        Coupling(AtomRef(None, 6, "N"), AtomRef(None, 6, "H"), 3.0),  # proline
        Coupling(AtomRef(None, 5, "CA"), AtomRef(None, 5, "HA2"), 3.0),  # leucine has no HA2
        Coupling(AtomRef(None, 5, "CB"), AtomRef(None, 5, "HB2"), 3.0),  # HB2 is neither in the model nor placed
        Coupling(AtomRef(None, 90, "N"), AtomRef(None, 90, "H"), 3.0),  # not in the model
        Coupling(AtomRef(None, 91, "N"), AtomRef(None, 91, "HN"), 3.0),  # not in the model
    ]
    with pytest.warns(UserWarning) as record:
        obs = RDCObservable(atoms, data=data + extra)
    messages = " | ".join(str(r.message) for r in record)
    assert "2 RDC(s) name residues that are not in the model" in messages and "90N-H" in messages
    reasons = dict(obs.skipped)
    assert "first residue" in reasons["1N-H"]
    assert "proline" in reasons["6N-H"]
    assert reasons["5CA-HA2"].startswith("unknown atom name") and reasons["5CB-HB2"].startswith("atom absent")
    rep = obs.report(*one(coords))
    assert (rep["n"], rep["n_missing"], rep["n_skipped"]) == (len(data), 2, 4)
    assert rep["n_unmapped"] == 6 and len(rep["unmapped"]) == 6 and rep["unmapped"][0].startswith("90N-H: residue absent")
    assert rep["unmapped_reasons"] == {"residue absent": 2, "no amide H": 2, "unknown atom name": 1, "atom absent": 1}
    assert rep["q_factor"] < 1e-4

    with pytest.raises(RDCError, match=r"x:3: unknown atom name 'OD1'"):
        RDCObservable(atoms, data=data + [Coupling(AtomRef(None, 11, "CA"), AtomRef(None, 11, "OD1"), 1.0, source="x:3")])
    with pytest.raises(RDCError, match="at least 6"):
        RDCObservable(atoms, data=data[:4])
    with pytest.raises(RDCError, match="needs data"):
        RDCObservable(atoms)


def test_model_hydrogens_are_used_when_present():
    """A model that carries its amide H (named H or HN) is used as is; the couplings follow those H positions."""
    atoms, coords = backbone(SEQ, seed=4)
    pos = positions(atoms, coords)
    rng = np.random.default_rng(3)
    extra_names, extra_xyz, extra_res = [], [], []
    for k, res in enumerate(range(2, len(SEQ) + 1)):
        if SEQ[res - 1] == "PRO":
            continue
        tilt = unit(amide_h_vector(pos, res) + rng.normal(scale=0.3, size=3))  # deliberately off the bisector
        extra_names.append("HN" if k % 2 else "H")
        extra_xyz.append(pos[(res, "N")] + 1.02 * tilt)
        extra_res.append(res)
    n_extra = len(extra_names)
    with_h = AtomInfo(
        element=np.concatenate([atoms.element, np.full(n_extra, "H")]),
        atom_name=np.concatenate([atoms.atom_name, np.array(extra_names)]),
        res_name=np.concatenate([atoms.res_name, np.array([SEQ[r - 1] for r in extra_res])]),
        res_seq=np.concatenate([atoms.res_seq, np.array(extra_res)]),
        chain_id=np.full(len(atoms) + n_extra, "A"),
    )
    xyz = np.concatenate([coords, np.array(extra_xyz)])
    t_true = alignment_tensor(-11.0, 0.5, random_rotation(8))
    data = []
    for res, x in zip(extra_res, extra_xyz):
        u = unit(x - pos[(res, "N")])
        data.append(Coupling(AtomRef(None, res, "N"), AtomRef(None, res, "H"), float(u @ t_true @ u)))
    model_h = RDCObservable(with_h, data=data).report(*one(xyz))
    placed = RDCObservable(with_h, data=data, model_hydrogens=False).report(*one(xyz))
    assert model_h["q_factor"] < 1e-4
    assert placed["q_factor"] > 0.05


def test_sigma_per_bond_type_and_from_the_file():
    atoms, coords = backbone(SEQ, seed=3)
    data = couplings_from_tensor(atoms, coords[None], np.ones(1), alignment_tensor(9.0, 0.3), kinds=("N-H", "CA-HA"))
    data = [Coupling(c.atom1, c.atom2, c.value, 0.7 if k % 2 else None) for k, c in enumerate(data)]
    obs = RDCObservable(atoms, data=data, sigma={"N-H": 1.0, "CA-HA": 3.0}, file_errors=True)
    expected = [0.7 if k % 2 else (1.0 if t == "N-H" else 3.0) for k, t in enumerate(obs.bond_types)]
    np.testing.assert_allclose(obs.sigma, expected)
    with pytest.raises(RDCError, match="no entry for bond type CA-HA"):
        RDCObservable(atoms, data=data, sigma={"N-H": 1.0})
    with pytest.raises(RDCError, match="sigma must be"):
        RDCObservable(atoms, data=data, sigma=0.0)


def test_config_keys_are_the_factory_options(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from guidance.app.job import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        composed = compose("run", overrides=["observables=[rdc]"])
    cfg = OmegaConf.to_container(composed.observables.rdc, resolve=True)  # the app's options: the factory's own
    assert cfg.pop("weight") == 1.0 and cfg["data"] is None and cfg["format"] == "auto"
    atoms, coords = backbone(SEQ[:12], seed=2)
    data = couplings_from_tensor(atoms, coords[None], np.ones(1), alignment_tensor(8.0, 0.1, random_rotation(6)))
    path = tmp_path / "d.pa"
    path.write_text("".join(f"{c.atom1.res_seq}N-H {c.value:.6f}\n" for c in data))
    obs = build("rdc", atoms, **{**cfg, "data": str(path)})
    assert obs.report(*one(coords))["q_factor"] < 1e-4
