"""Predictors by name: the entry-point group ``ensemble_guide.predictors`` is the registry.

A builder is ``builder(structure, run, **options) -> Denoiser``: ``structure`` is the run's input
(``guidance.structures.io.Conformers``: layout, conformers, weights, the file's path), ``run`` a ``RunContext`` (seed,
sampler steps, the selected observables), and its keyword options with their defaults are the ``predictor.*`` keys of
the config (guidance.app.config registers them; no YAML repeats them).  A package adds a predictor with

    [project.entry-points."ensemble_guide.predictors"]
    mymodel = "mypkg.build:mymodel"

and ``ensemble-guide predictor=mymodel predictor.<option>=...`` runs it.  The builders here are this project's four.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from observables.errors import InputError, unknown_option

log = logging.getLogger("ensemble_guide")

GROUP = "ensemble_guide.predictors"


class PredictorError(InputError):
    """A predictor option or checkpoint the user has to fix (one line from the app)."""


@dataclass(frozen=True)
class RunContext:
    """What a predictor builder may need of the run besides its own options."""

    seed: int = 0
    steps: int = 40
    observables: tuple[str, ...] = field(default_factory=tuple)


def available() -> dict[str, Callable]:
    """{name: builder} of every installed predictor (entry points)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.load() for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name)}


def build(name: str, structure, run: RunContext, options: dict):
    """The predictor ``name`` built for ``structure`` with ``options`` (the ``predictor.*`` keys but ``name``)."""
    builders = available()
    if name not in builders:
        raise PredictorError(f"unknown predictor {name!r}; available: {', '.join(builders)}")
    try:
        return builders[name](structure, run, **options)
    except TypeError as exc:  # an option the builder does not take
        option = unknown_option(exc)
        if option is None:
            raise
        raise PredictorError(f"predictor.{option} is not an option of predictor {name}; its options are in "
                             f"`ensemble-guide --cfg job predictor={name}`") from exc


# ----------------------------------------------------------------------------------------------- the four built in


def reference(structure, run: RunContext, *, conformers: list | None = None, weights: dict | None = None,
              tau: float = 0.3, n_modes: int = 8, mode_rms: float = 0.5, anm_cutoff: float = 15.0,
              rotamers: bool = False, rotamer_self_weight: float = 0.8):
    """Weight-free exact prior: a Gaussian mixture over the input structure's conformers (altlocs or models).

    ``conformers``: which altloc ids / model names become components (e.g. [A]; None = all); ``weights``: prior weight
    per conformer (e.g. {A: 0.9, B: 0.1}; None = occupancies / model weights); ``tau`` (A): isotropic width of each
    component; ``n_modes``: softest ANM modes added to each component's covariance (0 = isotropic), carrying
    ``mode_rms`` A RMS per atom, ANM cutoff ``anm_cutoff`` A; ``rotamers``: expand every side chain over the
    Penultimate Rotamer Library (Lovell et al. 2000; one conformer only), the conformer's own side chain keeping
    prior weight ``rotamer_self_weight``."""
    from predictors.reference import ReferencePrior

    ids = list(structure.ids)
    chosen = [str(c) for c in conformers] if conformers else ids
    unknown = [c for c in chosen if c not in ids]
    if unknown:
        raise PredictorError(f"predictor.conformers {unknown} not in the structure's conformers {ids}")
    idx = [ids.index(c) for c in chosen]
    if weights:
        wmap = {str(k): float(v) for k, v in dict(weights).items()}
        missing = [ids[i] for i in idx if ids[i] not in wmap]
        if missing:
            raise PredictorError(f"predictor.weights gives no weight for conformer(s) {missing}")
        w = np.array([wmap[ids[i]] for i in idx])
    else:
        w = np.asarray(structure.weights)[idx]
    log.info("reference prior: conformers %s with weights %s, tau %.2f A, %d ANM modes",
             [ids[i] for i in idx], np.round(w / w.sum(), 3).tolist(), tau, n_modes)
    if rotamers:
        from predictors.rotamers import RotamerPrior

        if len(idx) != 1:
            raise PredictorError(f"predictor.rotamers=true builds on one conformer; pick one with "
                                 f"predictor.conformers (the structure has {ids})")
        prior = RotamerPrior(structure.layout, structure.coords[idx[0]], tau=float(tau), n_modes=int(n_modes),
                             mode_rms=float(mode_rms), anm_cutoff=float(anm_cutoff),
                             self_weight=float(rotamer_self_weight))
        log.info("rotamer prior: %d side chains expanded over %d library rotamers (own weight %.2f)",
                 len(prior.blocks), prior.n_components - len(prior.blocks), rotamer_self_weight)
        return prior
    return ReferencePrior(structure.layout, structure.coords[idx], w, tau=float(tau), n_modes=int(n_modes),
                          mode_rms=float(mode_rms), anm_cutoff=float(anm_cutoff))


def _float32_only(name: str, dtype: str) -> None:
    if str(dtype) != "float32":
        raise PredictorError(f"predictor.dtype={dtype}: {name} runs in float32 only")


def _needs_file(name: str, structure) -> None:
    if structure.path is None:
        raise PredictorError(f"predictor={name} needs a structure file (structure=...) to take its sequences from")


def _boltz(name: str, structure, run: RunContext, *, checkpoint, cache_dir, msa, recycling_steps, device, dtype,
           method=None, pairformer_args=None, msa_args=None):
    import torch

    from predictors.boltz import load_boltz, make_denoiser, method_for_observables

    _needs_file(name, structure)
    _float32_only(name, dtype)
    if name == "boltz2" and method is None:  # chosen from the data type
        method = method_for_observables(list(run.observables))
    arch = {k: dict(v) for k, v in (("pairformer_args", pairformer_args), ("msa_args", msa_args)) if v is not None}
    try:
        model = load_boltz(name, checkpoint, device=str(device), recycling_steps=int(recycling_steps), **arch)
        predictor = make_denoiser(name, model, structure.path, cache_dir=cache_dir, msa=msa,
                                  recycling_steps=int(recycling_steps), method=method if name == "boltz2" else None,
                                  seed=run.seed, dtype=torch.float32)
    except (FileNotFoundError, ValueError) as exc:
        raise PredictorError(str(exc)) from exc
    log.info("%s: %s, %d chains %s, %d atoms (%d padded), %d recycling steps, msa %s%s", name, checkpoint,
             len(predictor.sequences), list(predictor.sequences), len(predictor.layout), predictor.n_padded,
             int(recycling_steps), msa, f", method {method!r}" if name == "boltz2" else "")
    if predictor.approximate_conformers:
        log.warning("%s: no Boltz component files in cache_dir=%s: reference conformers built with RDKit are "
                    "approximate (run `boltz predict` once to download them)", name, cache_dir)
    return predictor


def boltz1(structure, run: RunContext, *, checkpoint: str = "~/.boltz/boltz1_conf.ckpt", cache_dir: str = "~/.boltz",
           msa: str = "none", recycling_steps: int = 3, device: str = "cpu", dtype: str = "float32",
           pairformer_args: dict | None = None, msa_args: dict | None = None):
    """Boltz-1 (the pinned boltz==2.2.1 package's model), conditioned once on the structure's protein sequences
    (SEQRES / entity sequence, else the modelled residues).  ``checkpoint``: ``boltz predict`` downloads
    boltz1_conf.ckpt to ~/.boltz; ``cache_dir`` holds Boltz's component files (ccd.pkl / mols/; without them
    RDKit-built amino acids are used); ``msa``: none (single-sequence) or an .a3m used for every chain;
    ``recycling_steps``: trunk passes - 1, run once per run; ``pairformer_args`` / ``msa_args``: architecture
    overrides for non-released models (tiny test models), None = Boltz's CLI defaults."""
    return _boltz("boltz1", structure, run, checkpoint=checkpoint, cache_dir=cache_dir, msa=msa,
                  recycling_steps=recycling_steps, device=device, dtype=dtype, pairformer_args=pairformer_args,
                  msa_args=msa_args)


def boltz2(structure, run: RunContext, *, checkpoint: str = "~/.boltz/boltz2_conf.ckpt", cache_dir: str = "~/.boltz",
           msa: str = "none", recycling_steps: int = 3, method: str | None = None, device: str = "cpu",
           dtype: str = "float32", pairformer_args: dict | None = None, msa_args: dict | None = None):
    """Boltz-2, as ``boltz1``; ``method``: Boltz-2's method conditioning (e.g. "X-RAY DIFFRACTION"), None = chosen
    from the data type (density/xray -> X-RAY DIFFRACTION, saxs -> SOLUTION SCATTERING, NMR data -> SOLUTION NMR)."""
    return _boltz("boltz2", structure, run, checkpoint=checkpoint, cache_dir=cache_dir, msa=msa,
                  recycling_steps=recycling_steps, device=device, dtype=dtype, method=method,
                  pairformer_args=pairformer_args, msa_args=msa_args)


def protenix(structure, run: RunContext, *, checkpoint: str = "~/checkpoint/protenix_base_default_v1.0.0.pt",
             model_name: str | None = None, arch: dict | None = None,
             cache_dir: str = "~/.cache/ensemble-guide/protenix", msa: str = "none", n_cycle: int | None = None,
             noise_levels: str = "protenix", device: str = "cpu", dtype: str = "float32"):
    """Protenix (ByteDance's AlphaFold-3 reproduction, protenix==2.0.0, installed beside Boltz with
    ``bash scripts/install_protenix.sh``), conditioned once on the structure's protein sequences.
    ``checkpoint``: Protenix's CLI downloads <model_name>.pt to $PROTENIX_ROOT_DIR/checkpoint; ``model_name``: the
    architecture (None = from the checkpoint's file name when that is a released model's, else
    protenix_base_default_v1.0.0); ``arch``: nested overrides of Protenix's config (tiny test models);
    ``cache_dir``: components.cif + its RDKit pickle, built offline from biotite's CCD on first use, or a Protenix
    $PROTENIX_ROOT_DIR/common folder; ``n_cycle``: trunk passes (None = the model's own); ``noise_levels``: protenix
    (Protenix's own levels for sampler.steps) or af3 (AF3/Boltz).  Protenix samples with random rotations and no
    alignment of x_hat onto x0_hat: guidance superposes each denoised member onto the input (needs_alignment)."""
    import torch

    _needs_file("protenix", structure)
    _float32_only("protenix", dtype)
    if noise_levels not in ("protenix", "af3"):
        raise PredictorError(f"predictor.noise_levels={noise_levels}: use protenix or af3")
    try:
        from predictors.protenix import ProtenixDenoiser, load_protenix

        model = load_protenix(checkpoint, model_name=model_name, arch=None if arch is None else dict(arch),
                              device=str(device))
        predictor = ProtenixDenoiser(model, structure.path, cache_dir=cache_dir, msa=msa,
                                     n_cycle=None if n_cycle is None else int(n_cycle),
                                     n_steps=run.steps if noise_levels == "protenix" else None, seed=run.seed,
                                     dtype=torch.float32)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise PredictorError(str(exc)) from exc
    log.info("protenix: %s, %d chains %s, %d atoms, %d trunk cycles, msa %s, noise levels %s (sigma_min %.3g)",
             checkpoint, len(predictor.sequences), list(predictor.sequences), len(predictor.layout),
             predictor.n_cycle, msa, noise_levels, predictor.schedule.sigma_min)
    return predictor
