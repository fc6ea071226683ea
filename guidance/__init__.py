"""ensemble-guide: steer diffusion structure predictors with experimental data so that the sampled ensemble agrees
with it.  The library's public surface (the rest is reached through its modules; see ARCHITECTURE.md):

    plan, sample, Sampling              the AF3/EDM sampler (guidance.sampler)
    DPS, Strength                       diffusion posterior sampling settings (guidance.dps)
    FK, steer                           Feynman-Kac steering: Guide, init / step / finish, run (guidance.fk)
    Objective, Term, PotentialTerm      the ensemble log-likelihood guidance climbs (guidance.objective)
    refine_weights                      member-weight refinement with optax (guidance.weights)
    run                                 one ensemble-guide job from a composed config (guidance.app)

Names are imported on first use, so ``import guidance.structures.io`` does not load torch or JAX.
"""

from importlib import import_module

_PUBLIC = {
    "plan": "guidance.sampler", "sample": "guidance.sampler", "Sampling": "guidance.sampler",
    "DPS": "guidance.dps", "Strength": "guidance.dps",
    "FK": "guidance.fk", "steer": "guidance.fk",
    "Objective": "guidance.objective", "Term": "guidance.objective", "PotentialTerm": "guidance.objective",
    "refine_weights": "guidance.weights",
    "run": "guidance.app",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'guidance' has no attribute {name!r}")
