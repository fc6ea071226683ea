"""A linear-Gaussian observable: y = A vec(<x>) + noise, noise ~ N(0, s^2 I), where <x> is the weight-averaged
ensemble coordinates [N, 3] flattened to 3N.  With a Gaussian prior the posterior is Gaussian in closed form, which
makes this the reference problem for checking that the samplers are correct (scripts/validate_posterior.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from observables.base import AtomInfo, register


@register("linear_gaussian")
class LinearGaussian:
    name = "linear_gaussian"

    def __init__(self, atoms: AtomInfo, matrix, data, noise: float = 1.0):
        self.matrix = jnp.asarray(np.asarray(matrix, dtype=np.float32))  # [M, 3N]
        self.data = jnp.asarray(np.asarray(data, dtype=np.float32))  # [M]
        if self.matrix.shape != (self.data.shape[0], 3 * len(atoms)):
            raise ValueError(f"matrix must be [M, 3N] = [{self.data.shape[0]}, {3 * len(atoms)}], got {self.matrix.shape}")
        if noise <= 0:
            raise ValueError("noise must be positive")
        self.noise = float(noise)

    def predict(self, coords, weights):
        mean = jnp.einsum("e,enk->nk", weights, coords)
        return self.matrix @ mean.reshape(-1)

    def log_likelihood(self, coords, weights):
        r = (self.data - self.predict(coords, weights)) / self.noise
        return -0.5 * jnp.sum(r * r)

    def report(self, coords, weights):
        r = (self.data - self.predict(coords, weights)) / self.noise
        return {"chi2": jnp.mean(r * r)}
