"""The reference-conformer prior: its denoiser is the exact posterior mean of a Gaussian mixture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from predictors import reference
from predictors.base import AtomLayout, Denoiser
from predictors.reference import ReferencePrior

BACKBONE = ("N", "CA", "C", "O")
# Backbone atom offsets from CA (A) in a residue-local frame; only roughly protein-like, which is all the ANM needs.
OFFSETS = np.array([[-1.2, 0.6, -0.5], [0.0, 0.0, 0.0], [1.3, 0.4, 0.5], [1.6, 1.5, 0.9]])


def helix(n_res: int = 6, chains: tuple[str, ...] = ("A", "B"), bend: float = 0.0) -> tuple[AtomLayout, np.ndarray]:
    """Helix-like chains of N/CA/C/O atoms (rise 1.5 A, 100 deg per residue, radius 2.3 A); chain c sits 10c A along x.

    Every chain numbers its residues 1..n_res, so atoms can only be matched to their CA by (chain_id, res_seq).
    ``bend`` (A) curves the helix axis, giving a second, distinct conformer.
    """
    chain_id, res_seq, atom_name, coords = [], [], [], []
    for c, chain in enumerate(chains):
        for i in range(n_res):
            turn = math.radians(100.0 * i)
            rot = np.array([[math.cos(turn), -math.sin(turn), 0.0], [math.sin(turn), math.cos(turn), 0.0], [0, 0, 1]])
            axis_x = 10.0 * c + bend * (1.5 * i / 5.0) ** 2
            ca = np.array([2.3 * math.cos(turn) + axis_x, 2.3 * math.sin(turn), 1.5 * i])
            for name, off in zip(BACKBONE, OFFSETS):
                chain_id.append(chain)
                res_seq.append(i + 1)
                atom_name.append(name)
                coords.append(ca + rot @ off)
    n = len(chain_id)
    layout = AtomLayout(
        np.array(chain_id),
        np.array(res_seq),
        np.array(["ALA"] * n),
        np.array(atom_name),
        np.array([a[0] for a in atom_name]),
    )
    return layout, np.array(coords)


def brute_force_anm_factor(layout: AtomLayout, coords: np.ndarray, n_modes: int, mode_rms: float, cutoff: float):
    """V [3N, m] written straight from the definitions with loops and a dense eigh (Atilgan et al. 2001)."""
    ca_atoms = [i for i, name in enumerate(layout.atom_name) if name == "CA"]
    n = len(ca_atoms)
    hessian = np.zeros((3 * n, 3 * n))
    for a in range(n):
        for b in range(n):
            r = coords[ca_atoms[b]] - coords[ca_atoms[a]]
            if a != b and np.linalg.norm(r) <= cutoff:
                block = -np.outer(r, r) / (r @ r)
                hessian[3 * a : 3 * a + 3, 3 * b : 3 * b + 3] = block
                hessian[3 * a : 3 * a + 3, 3 * a : 3 * a + 3] -= block
    lam, vec = np.linalg.eigh(hessian)
    lam, vec = lam[6 : 6 + n_modes], vec[:, 6 : 6 + n_modes]
    ca_of = {(layout.chain_id[i], layout.res_seq[i]): j for j, i in enumerate(ca_atoms)}
    v = np.zeros((len(layout), 3, n_modes))
    for atom in range(len(layout)):
        j = ca_of[(layout.chain_id[atom], layout.res_seq[atom])]
        v[atom] = vec[3 * j : 3 * j + 3] / np.sqrt(lam)
    v *= mode_rms / math.sqrt((v**2).sum() / len(layout))
    return v.reshape(-1, n_modes), lam


def brute_force_posterior_mean(x, sigma, means, covs, weights):
    """E[x0 | x] for a Gaussian mixture, from dense matrices, explicit Gaussian densities and np.linalg.solve."""
    out, resp = [], []
    dim = means.shape[1]
    for xb, s in zip(x, sigma):
        logs, post = [], []
        for mu, cov, w in zip(means, covs, weights):
            a = cov + s**2 * np.eye(dim)
            d = xb - mu
            sign, logdet = np.linalg.slogdet(a)
            assert sign > 0
            logs.append(math.log(w) - 0.5 * (d @ np.linalg.solve(a, d) + logdet + dim * math.log(2 * math.pi)))
            post.append(mu + cov @ np.linalg.solve(a, d))
        r = np.exp(np.array(logs) - logsumexp(logs))
        out.append(r @ np.array(post))
        resp.append(r)
    return np.array(out), np.array(resp)


@pytest.fixture(scope="module")
def two_state():
    """K=2 helices (straight and bent), two chains, ANM modes on, unequal weights."""
    layout, straight = helix()
    _, bent = helix(bend=1.0)
    return layout, np.stack([straight, bent]), np.array([0.35, 0.65])


def make_prior(two_state, dtype=torch.float64, **kw):
    layout, confs, w = two_state
    kw = {"tau": 0.4, "n_modes": 5, "mode_rms": 0.8, "anm_cutoff": 13.0, **kw}
    return ReferencePrior(layout, confs, w, dtype=dtype, **kw)


def brute_force_reference(two_state, x, sigma, **kw):
    layout, confs, w = two_state
    kw = {"tau": 0.4, "n_modes": 5, "mode_rms": 0.8, "anm_cutoff": 13.0, **kw}
    covs = []
    for c in confs:
        v, _ = brute_force_anm_factor(layout, c, kw["n_modes"], kw["mode_rms"], kw["anm_cutoff"])
        covs.append(kw["tau"] ** 2 * np.eye(v.shape[0]) + v @ v.T)
    flat = confs.reshape(len(confs), -1)
    return brute_force_posterior_mean(x.reshape(len(x), -1), sigma, flat, np.array(covs), w)


def noisy_inputs(prior, sigma, seed=0):
    """x = x0 + sigma eps with x0 drawn from the prior, one noise level per sample."""
    g = torch.Generator().manual_seed(seed)
    x0 = prior.sample(len(sigma), generator=g)
    sig = torch.as_tensor(sigma, dtype=x0.dtype)
    return x0 + sig[:, None, None] * torch.randn(x0.shape, generator=g, dtype=x0.dtype), sig


SIGMAS = [1e-3, 0.1, 0.7, 2.0, 5.0, 30.0, 300.0]


# ---------------------------------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------------------------------


def test_denoiser_is_the_exact_gaussian_mixture_posterior_mean_float64(two_state):
    """D(x, sigma) = sum_k r_k [mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k)], r_k ∝ pi_k N(x; mu_k, Sigma_k +
    sigma^2 I), against a dense float64 brute force that also rebuilds the ANM covariance from its definition; one
    noise level per sample in the batch.  Also the prior density log p(x0) against the dense mixture density."""
    prior = make_prior(two_state)
    x, sigma = noisy_inputs(prior, SIGMAS)
    ref, ref_r = brute_force_reference(two_state, x.numpy(), sigma.numpy())
    got = prior.denoise(x, sigma).reshape(len(x), -1).numpy()
    rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 1e-10, rel
    np.testing.assert_allclose(prior.responsibilities(x, sigma).numpy(), ref_r, atol=1e-10)
    # the test is only telling if both components carry weight somewhere in the batch
    assert ((ref_r > 0.05) & (ref_r < 0.95)).any()

    layout, confs, w = two_state
    covs = [prior.covariance(k).numpy() for k in range(2)]
    x0 = x.reshape(len(x), -1).numpy()
    dense = [
        logsumexp(
            [
                math.log(w[k])
                - 0.5 * ((xb - confs[k].ravel()) @ np.linalg.solve(covs[k], xb - confs[k].ravel()))
                - 0.5 * np.linalg.slogdet(2 * math.pi * covs[k])[1]
                for k in range(2)
            ]
        )
        for xb in x0
    ]
    np.testing.assert_allclose(prior.log_prob(x).numpy(), dense, rtol=1e-11)


def test_denoiser_is_the_exact_posterior_mean_float32(two_state):
    """The same in float32, to 1e-5 relative (observed ~2e-6).  Error budget: unit roundoff 6e-8; the offsets
    x - mu_k carry ~eps |x|, and |x| / |D| reaches ~10 at sigma = 300 (-> 6e-7); the log densities reach ~1e3 in
    magnitude, so log r_k is off by ~6e-5, which moves D by ~6e-5 r (1 - r) |mu_1 - mu_2| (~1e-6 of |D| here)."""
    prior64 = make_prior(two_state)
    prior32 = make_prior(two_state, dtype=torch.float32)
    x, sigma = noisy_inputs(prior64, SIGMAS)
    ref, _ = brute_force_reference(two_state, x.numpy(), sigma.numpy())
    got = prior32.denoise(x.float(), sigma.float())
    assert got.dtype == torch.float32
    rel = np.linalg.norm(got.reshape(len(x), -1).double().numpy() - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 1e-5, rel


def test_tweedie_identity_denoiser_equals_x_plus_sigma2_score(two_state):
    """Tweedie: E[x0 | x] = x + sigma^2 grad_x log p_sigma(x), with the score from autograd through log_marginal."""
    prior = make_prior(two_state)
    x, sigma = noisy_inputs(prior, SIGMAS, seed=1)
    x.requires_grad_(True)
    (score,) = torch.autograd.grad(prior.log_marginal(x, sigma).sum(), x)
    tweedie = x + sigma[:, None, None] ** 2 * score
    d = prior.denoise(x, sigma)
    rel = (tweedie - d).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
    assert rel.max() < 1e-9, rel


def test_large_noise_returns_the_prior_mean_and_small_noise_returns_the_input(two_state):
    """sigma -> inf: r_k -> pi_k and each component mean -> mu_k, so D -> sum_k pi_k mu_k, with an error O(1/sigma).
    sigma -> 0: D(x) = x - sigma^2 (Sigma + sigma^2 I)^-1 (x - mu) -> x, with an error O(sigma^2 / tau^2)."""
    prior = make_prior(two_state)
    prior_mean = torch.einsum("k,kna->na", prior.weights, prior.means)
    g = torch.Generator().manual_seed(2)
    for big in (1e3, 1e5):
        x = big * torch.randn((3, *prior_mean.shape), generator=g, dtype=torch.float64)
        err = (prior.denoise(x, torch.full((3,), big, dtype=torch.float64)) - prior_mean).norm(dim=(1, 2))
        assert err.max() < 50.0 / big, err  # the O(1/sigma) constant is ~ |x / sigma| * spread of the prior

    x, _ = noisy_inputs(prior, [0.0] * 3, seed=3)
    x = x + 2.0 * torch.randn(x.shape, generator=g, dtype=x.dtype)
    for small in (1e-3, 1e-5):
        d = prior.denoise(x, torch.full((3,), small, dtype=torch.float64))
        dist = (x[:, None] - prior.means[None]).norm(dim=(2, 3)).max()
        bound = small**2 / prior.tau**2 * dist  # ||A^-1|| <= 1 / c <= 1 / tau^2
        assert (d - x).norm(dim=(1, 2)).max() <= bound


def test_far_away_inputs_and_tiny_noise_stay_finite_in_float32(two_state):
    """x 1e3 A from every conformer and sigma = 1e-4: log densities reach ~ -1e9, yet logsumexp keeps the
    responsibilities a proper distribution (no NaN / inf), D stays finite (and ≈ x, since sigma << tau), and so does
    the gradient.  The full AF3 range (sigma up to 2560 A) is finite too."""
    prior = make_prior(two_state, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    direction = torch.randn((4, *prior.means.shape[1:]), generator=g)
    x = (prior.means[0] + 1e3 * direction / direction.norm(dim=(1, 2), keepdim=True) * math.sqrt(direction[0].numel()))
    x.requires_grad_(True)
    for sigma in (1e-4, 1.0, 2560.0):
        s = torch.full((4,), sigma)
        r = prior.responsibilities(x, s)
        assert torch.isfinite(r).all() and torch.allclose(r.sum(-1), torch.ones(4))
        d = prior.denoise(x, s)
        assert torch.isfinite(d).all()
        assert torch.isfinite(prior.log_marginal(x, s)).all()
        (grad,) = torch.autograd.grad(d.sum(), x)
        assert torch.isfinite(grad).all()
        if sigma == 1e-4:
            assert ((d - x).norm(dim=(1, 2)) / x.norm(dim=(1, 2))).max() < 1e-5
    # exactly at a conformer, sigma = 0: the posterior is x itself
    at = prior.means[:1].clone()
    assert torch.allclose(prior.denoise(at, torch.zeros(1)), at)


def test_zero_weight_component_never_gets_responsibility(two_state):
    """pi_k = 0 removes component k from the mixture: r_k = 0 and D equals the single-component posterior mean."""
    layout, confs, _ = two_state
    kw = {"tau": 0.4, "n_modes": 5, "mode_rms": 0.8, "anm_cutoff": 13.0, "dtype": torch.float64}
    both = ReferencePrior(layout, confs, [0.0, 1.0], **kw)
    only = ReferencePrior(layout, confs[1:], **kw)
    x, sigma = noisy_inputs(only, [0.3, 3.0, 30.0], seed=5)
    assert (both.responsibilities(x, sigma)[:, 0] == 0).all()
    torch.testing.assert_close(both.denoise(x, sigma), only.denoise(x, sigma))


# ---------------------------------------------------------------------------------------------------------------------
# Anisotropic network model
# ---------------------------------------------------------------------------------------------------------------------


def rigid_body_basis(ca: np.ndarray) -> np.ndarray:
    """[3n, 6]: translations along x, y, z and infinitesimal rotations about the centroid."""
    centred = ca - ca.mean(axis=0)
    cols = []
    for axis in np.eye(3):
        cols.append(np.tile(axis, len(ca)))
        cols.append(np.cross(axis, centred).ravel())
    return np.array(cols).T


def test_anm_modes_are_orthogonal_to_rigid_body_motions_at_the_ca_level(two_state):
    """Internal (non-trivial) ANM modes are eigenvectors of a Hessian whose null space holds the six rigid-body
    motions, so they neither translate nor rotate the CA trace."""
    prior = make_prior(two_state, n_modes=8)
    layout, confs, _ = two_state
    is_ca = layout.atom_name == "CA"
    for k in range(2):
        ca_modes = prior.modes[k].numpy()[is_ca].reshape(-1, 8)
        ca_modes = ca_modes / np.linalg.norm(ca_modes, axis=0)
        q, _ = np.linalg.qr(rigid_body_basis(confs[k][is_ca]))
        assert np.abs(q.T @ ca_modes).max() < 1e-8


def test_anm_atoms_move_with_their_residue_ca_and_modes_are_thermally_scaled(two_state):
    """Every atom copies its own residue's CA displacement (matched by chain and residue number: both chains number
    residues 1..6); the RMS fluctuation over all atoms from the modes, sqrt(tr(V V^T) / N), is mode_rms; and V V^T
    equals the brute-force ANM covariance with variance along mode j ∝ 1 / lambda_j."""
    prior = make_prior(two_state, mode_rms=0.8)
    layout, confs, _ = two_state
    v = prior.modes.numpy()
    ca_index = {(c, r): i for i, (c, r, a) in enumerate(layout.keys()) if a == "CA"}
    for atom, (c, r, _) in enumerate(layout.keys()):
        np.testing.assert_array_equal(v[:, atom], v[:, ca_index[(c, r)]])
    for k in range(2):
        vk = v[k].reshape(-1, v.shape[-1])
        assert math.sqrt((vk**2).sum() / len(layout)) == pytest.approx(0.8, rel=1e-12)
        ref, lam = brute_force_anm_factor(layout, confs[k], 5, 0.8, 13.0)
        np.testing.assert_allclose(vk @ vk.T, ref @ ref.T, atol=1e-10)
        np.testing.assert_allclose(prior.mode_eigenvalues[k].numpy(), lam, rtol=1e-10)
        # variance along mode j is kT / lambda_j: every residue has 4 atoms, so each extended unit mode has squared
        # norm 4 and |v_j|^2 lambda_j must be the same for every j
        ratio = (vk**2).sum(0) * lam
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-10)


def test_covariance_is_symmetric_positive_definite(two_state):
    """Sigma_k = tau^2 I + V_k V_k^T is symmetric with every eigenvalue >= tau^2."""
    prior = make_prior(two_state)
    for k in range(2):
        cov = prior.covariance(k).numpy()
        np.testing.assert_array_equal(cov, cov.T)
        assert np.linalg.eigvalsh(cov).min() >= prior.tau**2 * (1 - 1e-10)


def test_sparse_and_dense_anm_eigensolvers_agree(two_state, monkeypatch):
    """The shift-invert Lanczos path used for large structures finds the same soft-mode covariance as dense eigh."""
    dense = make_prior(two_state, n_modes=4)
    monkeypatch.setattr(reference, "_DENSE_EIGH_LIMIT", 0)
    sparse = make_prior(two_state, n_modes=4)
    for k in range(2):
        np.testing.assert_allclose(sparse.covariance(k).numpy(), dense.covariance(k).numpy(), atol=1e-8)


def test_disconnected_network_skips_the_extra_zero_modes_and_warns():
    """Two chains 40 A apart with a 13 A cutoff form two rigid pieces: 12 zero modes; all are skipped (the pieces'
    relative rigid motion has no restoring force) and the user is told to raise the cutoff."""
    layout, coords = helix(chains=("A", "B"))
    coords = coords.copy()
    coords[layout.chain_id == "B", 0] += 30.0
    with pytest.warns(UserWarning, match="falls apart"):
        prior = ReferencePrior(layout, coords, n_modes=3, anm_cutoff=13.0, dtype=torch.float64)
    assert (prior.mode_eigenvalues > 1e-6).all()


def test_structures_without_ca_use_an_all_atom_network():
    """No CA atoms (here: atoms renamed): every atom becomes a network node, and the modes are still internal
    motions, orthogonal to the six rigid-body motions of the atoms."""
    layout, coords = helix(n_res=3, chains=("A",))
    names = np.array([f"X{i}" for i in range(len(layout))])
    renamed = AtomLayout(layout.chain_id, layout.res_seq, layout.res_name, names, layout.element)
    prior = ReferencePrior(renamed, coords, n_modes=4, dtype=torch.float64)
    modes = prior.modes[0].numpy().reshape(-1, 4)
    q, _ = np.linalg.qr(rigid_body_basis(coords))
    assert np.abs(q.T @ (modes / np.linalg.norm(modes, axis=0))).max() < 1e-8


# ---------------------------------------------------------------------------------------------------------------------
# Sampling, interface, gradients
# ---------------------------------------------------------------------------------------------------------------------


def test_samples_have_the_mixture_mean_and_covariance():
    """Monte Carlo with n = 40000 draws: mean = sum pi mu, covariance = sum pi (Sigma + mu mu^T) - m m^T, and the
    component frequencies are pi.  Every entry must lie within 6 of its own standard error (estimated from the sample,
    which accounts for the mixture's heavy tails); over ~2000 entries a union bound puts a false alarm below 1e-5."""
    layout, straight = helix(n_res=5, chains=("A",))
    _, bent = helix(n_res=5, chains=("A",), bend=1.5)
    w = np.array([0.3, 0.7])
    prior = ReferencePrior(layout, np.stack([straight, bent]), w, tau=0.3, n_modes=3, mode_rms=1.0, dtype=torch.float64)
    n = 40_000
    x = prior.sample(n, generator=torch.Generator().manual_seed(6)).reshape(n, -1).numpy()
    mus = prior.means.reshape(2, -1).numpy()
    mean = w @ mus
    cov = sum(w[k] * (prior.covariance(k).numpy() + np.outer(mus[k], mus[k])) for k in range(2)) - np.outer(mean, mean)

    z_mean = (x.mean(0) - mean) / (x.std(0) / math.sqrt(n))
    assert np.abs(z_mean).max() < 6
    centred = x - mean
    second = centred.T @ centred / n  # mean of the products z_i z_j
    fourth = (centred**2).T @ (centred**2) / n  # mean of (z_i z_j)^2
    z_cov = (second - cov) / np.sqrt((fourth - second**2) / n)
    assert np.abs(z_cov).max() < 6

    # component frequencies: E_{x0 ~ p}[r_k(x0)] = pi_k exactly, so the mean posterior responsibility of the samples
    # must match the weights within 6 standard errors
    r = prior.responsibilities(torch.from_numpy(x).reshape(n, -1, 3), 0.0)[:, 1].numpy()
    assert abs(r.mean() - w[1]) < 6 * r.std() / math.sqrt(n)


def test_prior_implements_the_denoiser_protocol_and_shapes(two_state):
    """A ReferencePrior is a Denoiser: layout, schedule (AF3 defaults) and denoise(x [B,N,3], sigma [B]) -> [B,N,3];
    a scalar sigma broadcasts over the batch."""
    prior = make_prior(two_state, dtype=torch.float32)
    assert isinstance(prior, Denoiser)
    assert prior.schedule.sigma_data == 16.0
    x = torch.randn(5, len(prior.layout), 3)
    assert prior.denoise(x, torch.full((5,), 2.0)).shape == x.shape
    torch.testing.assert_close(prior.denoise(x, 2.0), prior.denoise(x, torch.full((5,), 2.0)))
    assert prior.sample(2).shape == (2, len(prior.layout), 3)
    with pytest.raises(ValueError, match="sigma"):
        prior.denoise(x, torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        prior.denoise(x[:, :-1], torch.ones(5))


def test_denoiser_gradient_wrt_x_is_correct_gradcheck():
    """Through-the-network guidance differentiates D(x, sigma) in x: autograd matches finite differences (float64)."""
    layout, straight = helix(n_res=3, chains=("A",))
    _, bent = helix(n_res=3, chains=("A",), bend=1.0)
    prior = ReferencePrior(layout, np.stack([straight, bent]), [0.4, 0.6], tau=0.5, n_modes=2, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    x = (prior.means[1] + torch.randn((2, len(layout), 3), generator=g, dtype=torch.float64)).requires_grad_(True)
    sigma = torch.tensor([0.8, 3.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda y: prior.denoise(y, sigma), (x,))
    assert torch.autograd.gradcheck(lambda y: prior.log_marginal(y, sigma), (x,))


def test_invalid_inputs_are_reported_clearly():
    """Wrong conformer shape, negative weights, tau = 0 and too many modes are rejected with a readable message."""
    layout, coords = helix(n_res=3, chains=("A",))
    with pytest.raises(ValueError, match=r"\[K, 12, 3\]"):
        ReferencePrior(layout, coords[:-1])
    with pytest.raises(ValueError, match="weights"):
        ReferencePrior(layout, np.stack([coords, coords]), [1.0, -0.5])
    with pytest.raises(ValueError, match="tau"):
        ReferencePrior(layout, coords, tau=0.0)
    with pytest.raises(ValueError, match="n_modes"):
        ReferencePrior(layout, coords, n_modes=100)
