"""Where every default of a run comes from, once.

Hydra composes a run from two sources that never repeat each other:

* the YAML tree in ``configs/`` (``run.yaml``, ``bench.yaml``, the ``experiment`` presets, logging): the choices that
  belong to the app alone -- mode, structure, ensemble size, seed, the demo, outputs, the sampler's step count;
* nodes registered here in Hydra's ConfigStore, built from the code that takes the values: the guidance settings
  from the library dataclasses (``guidance.dps.DPS``, ``guidance.fk.FK``), the member-weight refinement from
  ``guidance.weights.refine_weights``, each observable from its factory's signature, each predictor and potential
  from its builder's signature.  A plugin installed from another package (entry points ``ensemble_guide.observables``
  and ``ensemble_guide.predictors``) gets its node the same way, so ``observables=[name]`` works with its own
  defaults and command-line overrides, and no file is added to this repository.

``ensemble-guide --cfg job`` prints the composed values: the ones the code uses.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Callable

from omegaconf import MISSING

SAMPLER_STEPS = 40  # the app's default number of sampler steps (the AF3 schedule is the predictor's own)


def config_dir() -> str:
    """The YAML tree: package data in an installed wheel (guidance/configs), the checkout's top-level configs/."""
    here = Path(__file__).resolve().parent  # guidance/app
    for candidate in (here.parent / "configs", here.parent.parent / "configs"):
        if (candidate / "run.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"ensemble-guide: cannot find its Hydra configs near {here}")


def _plain(value: Any) -> Any:
    """A default as OmegaConf stores it: tuples as lists, Paths as strings."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def signature_defaults(fn: Callable, skip: int = 0, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keyword parameters of ``fn`` (a function or class) after its first ``skip`` positional ones, with their
    defaults (``???``, Hydra's MISSING, where there is none): a plugin's options as the config shows them."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    out = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in exclude:
            continue
        out[p.name] = MISSING if p.default is inspect.Parameter.empty else _plain(p.default)
    return out


def _fields(cls, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    return {f.name: _plain(f.default) for f in dataclasses.fields(cls) if f.name not in exclude}


def dps_node() -> dict:
    """``guidance.dps``: the DPS dataclass with its Strength flattened (strength, schedule, start, end)."""
    from guidance.dps import DPS, Strength

    s = Strength()
    return {"strength": s.value, "schedule": s.kind, "start": s.start, "end": s.end, **_fields(DPS, ("strength",))}


def guidance_nodes() -> dict[str, dict]:
    """The ``guidance`` group: none (the prior alone), dps (the likelihood gradient in every step's drift) and fk
    (Feynman-Kac steering over P particles, each a whole ensemble, with DPS proposals)."""
    from guidance.fk import FK

    return {"none": {"method": "none", "particles": 1},
            "dps": {"method": "dps", "particles": 1, "dps": dps_node()},
            "fk": {"method": "fk", "particles": FK().particles, "fk": _fields(FK, ("particles",)), "dps": dps_node()}}


def weights_node() -> dict:
    """``weights``: member-weight refinement after sampling (``refine``, then refine_weights' own options)."""
    from guidance.weights import refine_weights

    return {"refine": True, **signature_defaults(refine_weights, skip=2, exclude=("init_weights",))}


def sampler_node() -> dict:
    """``sampler`` (option af3): the AF3/EDM sampler.  ``steps``; ``start_step`` > 0 starts part-way from the input
    structure noised to that step's level (partial diffusion); ``solver``, euler (AF3, Boltz) | heun;
    ``augmentation`` (a random rigid motion of each structure before each step) and ``align`` (superpose x_hat onto
    x0_hat, Boltz's alignment_reverse_diff): auto = as the predictor was trained; the noise-schedule parameters
    (guidance.sampler / predictors.base.NoiseSchedule) default to the predictor's own (null) and may be set."""
    from guidance.sampler import Sampling
    from predictors.base import NoiseSchedule

    schedule = {f.name: None for f in dataclasses.fields(NoiseSchedule) if f.name != "sigma_data"}
    return {"steps": SAMPLER_STEPS, "start_step": 0, "solver": Sampling().solver, "augmentation": "auto",
            "align": "auto", **schedule}


def multiconformer_node() -> dict:
    """``multiconformer``: how the weighted ensemble becomes multiconformer.pdb/.cif (``write``, then
    guidance.structures.multiconf.ensemble_to_multiconf's own options)."""
    from guidance.structures.multiconf import ensemble_to_multiconf

    return {"write": True, **signature_defaults(ensemble_to_multiconf, skip=3,
                                                exclude=("segments", "fit", "b_factors"))}


def refine_node() -> dict:
    """``refine``: restrained refinement of multiconformer.pdb after sampling (``enabled``: auto = when an observable
    can be refined against, i.e. has ``atoms()`` -- the X-ray amplitudes; true / false), then the options of
    ``guidance.refine.Refine``."""
    from guidance.refine import Refine

    return {"enabled": "auto", **_fields(Refine)}


def observable_node(name: str, factory: Callable) -> dict:
    """``observables.<name>``: ``weight`` (of the term in the total log-likelihood) and the factory's options."""
    return {name: {"weight": 1.0, **signature_defaults(factory, skip=1)}}


def register_configs() -> None:
    """Store the nodes of the module docstring in Hydra's ConfigStore (again on every call: an observable
    registered in-process since gets its node too)."""
    from hydra.core.config_store import ConfigStore

    import observables
    from guidance.app import potentials as potential_builders
    from guidance.app import predictors as predictor_registry

    cs = ConfigStore.instance()
    cs.store(group="sampler", name="af3", node=sampler_node())
    for name, node in guidance_nodes().items():
        cs.store(group="guidance", name=name, node=node)
    cs.store(group="weights", name="default", node=weights_node())
    cs.store(group="multiconformer", name="default", node=multiconformer_node())
    cs.store(group="refine", name="default", node=refine_node())
    for name in observables.available():
        cs.store(group="observables", name=name, node=observable_node(name, observables.factory(name)))
    for name, builder in predictor_registry.available().items():
        cs.store(group="predictor", name=name, node={"name": name, **signature_defaults(builder, skip=2)})
    for name, builder in potential_builders.BUILDERS.items():
        cs.store(group="potentials", name=name, node={name: {"weight": 1.0, **builder.options()}})
