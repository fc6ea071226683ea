"""Member-weight refinement: the data decide the occupancies when the ensemble's members are fixed."""

import jax.numpy as jnp
import numpy as np
import pytest

from guidance.weights import WeightFit, refine_weights

# Four members whose single atom sits at affinely independent positions: the weighted mean position is then a
# one-to-one function of the weights, so data made from known weights pin them down.
POSITIONS = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]], dtype=np.float32)
COORDS = POSITIONS[:, None, :]  # [E=4, N=1, 3]
TRUE_WEIGHTS = np.array([0.5, 0.3, 0.15, 0.05])


def gaussian_mean_position_loglik(data: np.ndarray, sigma: float = 0.05):
    """Toy linear observable: the ensemble-averaged atom position, Gaussian noise of width sigma (A)."""
    data = jnp.asarray(data, dtype=jnp.float32)

    def log_likelihood(coords, weights):
        predicted = jnp.einsum("e,enk->nk", weights, coords)
        return -0.5 * jnp.sum(((predicted - data) / sigma) ** 2)

    return log_likelihood


def test_recovers_true_weights_from_uniform():
    data = np.einsum("e,enk->nk", TRUE_WEIGHTS, COORDS)
    fit = refine_weights(gaussian_mean_position_loglik(data), COORDS)
    assert isinstance(fit, WeightFit)
    np.testing.assert_allclose(fit.initial_weights, 0.25)
    np.testing.assert_allclose(fit.weights, TRUE_WEIGHTS, atol=0.02)
    assert fit.weights.sum() == pytest.approx(1.0, abs=1e-9)
    assert fit.log_likelihood_after > fit.log_likelihood_before
    assert len(fit.history) == 300 and np.all(np.isfinite(fit.history))  # the default steps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_likelihood_never_decreases(seed):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(1, 3)) * 3.0  # data no weighting can fit exactly
    init = rng.dirichlet(np.ones(4))
    for lr in (0.05, 5.0):  # a wild learning rate must not make the result worse than the start
        fit = refine_weights(gaussian_mean_position_loglik(data), COORDS, init, steps=50, learning_rate=lr)
        assert fit.log_likelihood_after >= fit.log_likelihood_before
        assert np.all(np.isfinite(fit.weights))


def test_entropy_pulls_toward_uniform():
    data = np.einsum("e,enk->nk", TRUE_WEIGHTS, COORDS)
    loglik = gaussian_mean_position_loglik(data, sigma=1.0)
    plain = refine_weights(loglik, COORDS, steps=300)
    smooth = refine_weights(loglik, COORDS, steps=300, entropy=50.0)

    def entropy(w):
        return -np.sum(w * np.log(w))

    assert entropy(smooth.weights) > entropy(plain.weights)
    assert np.abs(smooth.weights - 0.25).max() < np.abs(plain.weights - 0.25).max()


def test_min_weight_is_respected():
    data = POSITIONS[0][None]  # the data sit on member 0: unconstrained, all weight goes there
    fit = refine_weights(gaussian_mean_position_loglik(data), COORDS, min_weight=0.1)
    assert fit.weights.min() >= 0.1 - 1e-6
    assert fit.weights.argmax() == 0


def test_single_member_ensemble():
    data = POSITIONS[:1] + 0.3
    fit = refine_weights(gaussian_mean_position_loglik(data), COORDS[:1], steps=10)
    np.testing.assert_allclose(fit.weights, [1.0])
    assert fit.log_likelihood_after == pytest.approx(fit.log_likelihood_before)


def test_non_finite_likelihood_stops_and_keeps_the_best():
    data = np.einsum("e,enk->nk", TRUE_WEIGHTS, COORDS)
    base = gaussian_mean_position_loglik(data)

    def explodes_near_member_0(coords, weights):
        # finite at the start, NaN once member 0 gets more than 40 % of the weight
        return jnp.where(weights[0] > 0.4, jnp.nan, base(coords, weights))

    fit = refine_weights(explodes_near_member_0, COORDS)
    assert np.all(np.isfinite(fit.weights)) and np.isfinite(fit.log_likelihood_after)
    assert fit.weights[0] <= 0.4
    assert fit.log_likelihood_after >= fit.log_likelihood_before
    assert len(fit.history) < 200


def test_rejects_bad_input():
    loglik = gaussian_mean_position_loglik(POSITIONS[:1])
    with pytest.raises(ValueError, match="init_weights"):
        refine_weights(loglik, COORDS, np.ones(3))
    with pytest.raises(ValueError, match="min_weight"):
        refine_weights(loglik, COORDS, min_weight=0.3)
