"""Member-weight (occupancy) refinement with optax.

After sampling, the ensemble's members are fixed and only their weights ``w`` (``[E]``, summing to 1) are refined to
maximise the data log-likelihood, optionally plus an entropy regulariser that keeps the weights from collapsing
onto a few members:

    maximise  log p(data | coords, w) + entropy * H(w),     H(w) = -sum_e w_e log w_e

The weights live on the simplex through a softmax, with an optional floor ``min_weight`` per member:

    w = min_weight + (1 - E * min_weight) * softmax(logits)

so every iterate is a valid weight vector and the optimiser (Adam by default) works on unconstrained ``logits``.
The best iterate (by the objective above) is kept, so the result is never worse than the starting point when that
point satisfies the floor, and a non-finite step ends the optimisation instead of poisoning the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guidance.structures.io import as_ensemble

LogLikelihood = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (coords [E,N,3], weights [E]) -> scalar


@dataclass
class WeightFit:
    """Result of :func:`refine_weights`.

    ``history`` holds the log-likelihood (without the entropy term) at the iterate each optimisation step started
    from; its length is the number of steps actually taken (shorter than ``steps`` if a step went non-finite).
    """

    weights: np.ndarray  # [E] refined, sums to 1
    initial_weights: np.ndarray  # [E]
    log_likelihood_before: float
    log_likelihood_after: float
    history: np.ndarray  # [steps_taken]


def _entropy(w: jnp.ndarray) -> jnp.ndarray:
    """Shannon entropy in nats; 0 log 0 = 0."""
    return jnp.sum(jax.scipy.special.entr(w))


def _make_optimizer(optimizer, learning_rate: float) -> optax.GradientTransformation:
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    factory = getattr(optax, str(optimizer), None)
    if factory is None or not callable(factory):
        raise ValueError(f"unknown optimizer {optimizer!r}: give the name of an optax optimizer that takes a "
                         "learning rate ('adam', 'sgd', 'adamw', ...) or an optax.GradientTransformation")
    return factory(learning_rate)


def _check_initial(init_weights, n_members: int, min_weight: float) -> np.ndarray:
    if init_weights is None:
        return np.full(n_members, 1.0 / n_members)
    w = np.asarray(init_weights, dtype=np.float64).reshape(-1)
    if w.shape != (n_members,):
        raise ValueError(f"init_weights has {w.size} entries but the ensemble has {n_members} members")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"init_weights must be finite, non-negative and not all zero; got {w}")
    return w / w.sum()


def refine_weights(
    log_likelihood: LogLikelihood,
    coords,
    init_weights=None,
    *,
    steps: int = 300,
    learning_rate: float = 0.05,
    entropy: float = 0.0,
    min_weight: float = 0.0,
    optimizer: str | optax.GradientTransformation = "adam",
) -> WeightFit:
    """Refine the member weights of a fixed ensemble to maximise ``log_likelihood(coords, w) + entropy * H(w)``.

    ``log_likelihood`` is a pure JAX function of coordinates ``[E, N, 3]`` and weights ``[E]`` returning a scalar
    (e.g. an ``Observable.log_likelihood`` or a sum of them).  ``init_weights`` defaults to uniform and is
    normalised.  ``min_weight`` is a floor on every weight (must satisfy ``E * min_weight <= 1``); starting weights
    below the floor are lifted onto it.  ``optimizer`` is an optax optimizer name taking the learning rate
    (``"adam"``, ``"sgd"``, ``"adamw"``, ...) or a ready ``optax.GradientTransformation``.
    """
    coords = jnp.asarray(as_ensemble(coords, name="coords", single=False), dtype=jnp.float32)
    n_members = int(coords.shape[0])
    if n_members < 1:
        raise ValueError("the ensemble has no members")
    if min_weight < 0 or n_members * min_weight > 1 + 1e-9:
        raise ValueError(f"min_weight={min_weight} is impossible for {n_members} members (need 0 <= E*min_weight <= 1)")
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")

    w_init = _check_initial(init_weights, n_members, min_weight)
    free_mass = max(1.0 - n_members * min_weight, 0.0)

    def to_weights(logits):
        return min_weight + free_mass * jax.nn.softmax(logits)

    def objective(logits, x):
        w = to_weights(logits)
        ll = log_likelihood(x, w)
        return -(ll + entropy * _entropy(w)), ll

    opt = _make_optimizer(optimizer, learning_rate)

    @jax.jit
    def step(logits, opt_state, x):
        (loss, ll), grads = jax.value_and_grad(objective, has_aux=True)(logits, x)
        updates, opt_state = opt.update(grads, opt_state, logits)
        return optax.apply_updates(logits, updates), opt_state, loss, ll, grads

    evaluate = jax.jit(objective)

    # Starting point in logit space: the (floored) initial weights.
    if free_mass > 0:
        p0 = np.clip((w_init - min_weight) / free_mass, 1e-12, None)
    else:
        p0 = np.ones(n_members)
    logits = jnp.asarray(np.log(p0 / p0.sum()), dtype=jnp.float32)
    opt_state = opt.init(logits)

    ll_before = float(log_likelihood(coords, jnp.asarray(w_init, dtype=jnp.float32)))

    best_loss, best_logits = np.inf, logits
    history: list[float] = []
    for _ in range(steps):
        new_logits, new_state, loss, ll, grads = step(logits, opt_state, coords)
        loss, ll = float(loss), float(ll)
        if not (np.isfinite(loss) and np.isfinite(ll)):
            break
        history.append(ll)
        if loss < best_loss:
            best_loss, best_logits = loss, logits
        if not (np.all(np.isfinite(np.asarray(grads))) and np.all(np.isfinite(np.asarray(new_logits)))):
            break
        logits, opt_state = new_logits, new_state
    else:
        # The last update's result has not been scored yet.
        loss, _ = evaluate(logits, coords)
        if np.isfinite(float(loss)) and float(loss) < best_loss:
            best_loss, best_logits = float(loss), logits

    # Score the candidates exactly as they will be returned (float64-normalised, evaluated in float32): the best
    # optimiser iterate and, when it respects the floor, the starting point itself.
    def score(w: np.ndarray) -> tuple[float, float]:
        ll = float(log_likelihood(coords, jnp.asarray(w, dtype=jnp.float32)))
        return ll + entropy * float(np.sum(jax.scipy.special.entr(w))), ll

    candidates = []
    if np.all(w_init >= min_weight - 1e-9):
        candidates.append((score(w_init), w_init.copy()))
    if np.isfinite(best_loss):
        w_best = np.clip(np.asarray(to_weights(best_logits), dtype=np.float64), 0.0, None)
        w_best /= w_best.sum()
        candidates.append((score(w_best), w_best))
    candidates = [c for c in candidates if np.isfinite(c[0][0])]
    if candidates:
        (_, ll_after), weights = max(candidates, key=lambda c: c[0][0])
    else:  # nothing finite was ever seen: hand back the starting weights untouched
        weights, ll_after = w_init.copy(), ll_before

    return WeightFit(
        weights=weights,
        initial_weights=w_init,
        log_likelihood_before=ll_before,
        log_likelihood_after=ll_after,
        history=np.asarray(history, dtype=np.float64),
    )
