"""``ensemble-guide``: the Hydra app that runs guided ensemble sampling (``mode=sample``) or scores a structure
against data (``mode=score``), writing the outputs of DESIGN.md into Hydra's run directory:

    ensemble.cif      multi-model mmCIF, one model per member, member weights recorded
    metrics.json      observables / ensemble / geometry / reference / sampling / runtime_s / config
    trajectory.csv    step, sigma, log-likelihood per observable, ESS/P
    particles.npz     every FK particle and its weight
    plots/*.png       log-likelihood and ESS vs step, a map slice with the model density, member weights
    run.log           the log; Hydra's saved config is in .hydra/

With no arguments it runs the embedded demo: a two-state peptide, a synthetic 2 A map of its 0.6/0.4 mixture and a
prior biased 0.9/0.1 towards state A.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from guidance.structure import atomic_write
from observables.errors import InputError

log = logging.getLogger("ensemble_guide")


def _config_dir() -> str:
    """The config tree: package data in an installed wheel, the checkout's top-level configs/ otherwise."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "run.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"ensemble-guide: cannot find its Hydra configs next to {here}")


class UserError(InputError):
    """A problem with the user's input, reported as one line."""


# ----------------------------------------------------------------------------------------------- small I/O helpers


def write_trajectory(path: Path, rows: list[dict]) -> Path:
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buf.getvalue())


def write_npz(path: Path, **arrays) -> Path:
    """A compressed .npz written atomically."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write(path, buf.getvalue())


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _jsonable(obj.item())
    return obj


# ----------------------------------------------------------------------------------------------- building blocks


DATA_KEY = {"density": "map", "noe": "restraints"}  # the key naming an observable's data file (default "data")


def prepare_demo(cfg, out_dir: Path) -> tuple[Path, dict[str, Path]]:
    """Generate the embedded two-state case: the altloc structure and synthetic data of the mixture for each selected
    observable that has a generator (density map, SAXS profile, N-H RDCs) -> (structure, {observable: data file})."""
    from guidance.demo import build_two_state_peptide, demo_rdcs, write_two_state_structure
    from observables.base import AtomInfo
    from observables.density import synthetic_map, write_ccp4

    occ = [float(v) for v in cfg.demo.occupancies]
    pep = build_two_state_peptide()
    inputs = out_dir / "inputs"
    structure = write_two_state_structure(inputs / "two_state.pdb", pep, occupancies=tuple(occ))
    atoms = AtomInfo.from_layout(pep.layout)
    states = np.stack([pep.coords_a, pep.coords_b])
    selected = list(cfg.observables or [])
    data: dict[str, Path] = {}
    if "density" in selected:
        dmap = synthetic_map(atoms, states, occ, resolution=float(cfg.demo.resolution))
        data["density"] = write_ccp4(inputs / f"two_state_{cfg.demo.resolution}A.ccp4", dmap)
    if "rdc" in selected:
        data["rdc"] = demo_rdcs(pep, occ, inputs / "two_state_nh.pa", seed=int(cfg.seed))
    if "saxs" in selected:
        from guidance.demo import demo_saxs

        data["saxs"] = demo_saxs(pep, occ, inputs / "two_state_saxs.dat", seed=int(cfg.seed))
    log.info("demo: %d-residue peptide, loop %s-%s in two states, synthetic data of the %.1f/%.1f mixture (%s) -> %s",
             len(pep.sequence), pep.loop[0], pep.loop[1], occ[0], occ[1], ", ".join(data) or "none", inputs)
    return Path(structure), {k: Path(v) for k, v in data.items()}


def build_predictor(cfg, conf):
    """The prior named by ``predictor.name``, built for the input structure ``conf``."""
    pcfg = cfg.predictor
    name = pcfg.name
    if name == "reference":
        from predictors.reference import ReferencePrior

        ids = list(conf.ids)
        chosen = list(pcfg.conformers) if pcfg.get("conformers") else ids
        unknown = [c for c in chosen if str(c) not in ids]
        if unknown:
            raise UserError(f"predictor.conformers {unknown} not in the structure's conformers {ids}")
        idx = [ids.index(str(c)) for c in chosen]
        if pcfg.get("weights"):
            wmap = {str(k): float(v) for k, v in dict(pcfg.weights).items()}
            missing = [ids[i] for i in idx if ids[i] not in wmap]
            if missing:
                raise UserError(f"predictor.weights gives no weight for conformer(s) {missing}")
            weights = np.array([wmap[ids[i]] for i in idx])
        else:
            weights = np.asarray(conf.weights)[idx]
        log.info("reference prior: conformers %s with weights %s, tau %.2f A, %d ANM modes",
                 [ids[i] for i in idx], np.round(weights / weights.sum(), 3).tolist(), pcfg.tau, pcfg.n_modes)
        if pcfg.get("rotamers"):
            from predictors.rotamers import RotamerPrior

            if len(idx) != 1:
                raise UserError(f"predictor.rotamers=true builds on one conformer; pick one with predictor.conformers "
                                f"(the structure has {ids})")
            prior = RotamerPrior(conf.layout, conf.coords[idx[0]], tau=float(pcfg.tau), n_modes=int(pcfg.n_modes),
                                 mode_rms=float(pcfg.mode_rms), anm_cutoff=float(pcfg.anm_cutoff),
                                 self_weight=float(pcfg.get("rotamer_self_weight", 0.8)))
            log.info("rotamer prior: %d side chains expanded over %d library rotamers (own weight %.2f)",
                     len(prior.blocks), prior.n_components - len(prior.blocks), pcfg.get("rotamer_self_weight", 0.8))
            return prior
        return ReferencePrior(conf.layout, conf.coords[idx], weights, tau=float(pcfg.tau), n_modes=int(pcfg.n_modes),
                              mode_rms=float(pcfg.mode_rms), anm_cutoff=float(pcfg.anm_cutoff))
    if name in ("boltz1", "boltz2"):
        return _build_boltz(pcfg, conf, list(cfg.observables or []), int(cfg.seed))
    if name == "protenix":
        return _build_protenix(pcfg, conf, int(cfg.seed), int(cfg.sampler.steps))
    raise UserError(f"unknown predictor {name!r}; available: reference, boltz1, boltz2, protenix")


def _build_boltz(pcfg, conf, observable_names: list[str], seed: int):
    """Boltz-1/2 loaded from ``predictor.checkpoint`` as Boltz's CLI loads it, conditioned once on the protein
    chains of the run's structure file."""
    import torch

    from predictors.boltz import load_boltz, make_denoiser, method_for_observables

    name = pcfg.name
    if conf.path is None:
        raise UserError(f"predictor={name} needs a structure file (structure=...) to take its sequences from")
    if str(pcfg.get("dtype", "float32")) != "float32":
        raise UserError(f"predictor.dtype={pcfg.dtype}: Boltz predictors run in float32 only")
    method = None
    if name == "boltz2":
        method = pcfg.get("method")
        if method is None:  # chosen from the data type
            method = method_for_observables(observable_names)
    try:
        model = load_boltz(name, pcfg.checkpoint, device=str(pcfg.get("device", "cpu")),
                           recycling_steps=int(pcfg.recycling_steps), **_boltz_arch_args(pcfg))
        predictor = make_denoiser(name, model, conf.path, cache_dir=pcfg.get("cache_dir"), msa=pcfg.get("msa", "none"),
                                  recycling_steps=int(pcfg.recycling_steps), method=method,
                                  seed=seed, dtype=torch.float32)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    log.info("%s: %s, %d chains %s, %d atoms (%d padded), %d recycling steps, msa %s%s", name, pcfg.checkpoint,
             len(predictor.sequences), list(predictor.sequences), len(predictor.layout), predictor.n_padded,
             int(pcfg.recycling_steps), pcfg.get("msa", "none"), f", method {method!r}" if name == "boltz2" else "")
    if predictor.approximate_conformers:
        log.warning("%s: no Boltz component files in cache_dir=%s: reference conformers built with RDKit are "
                    "approximate (run `boltz predict` once to download them)", name, pcfg.get("cache_dir"))
    return predictor


def _build_protenix(pcfg, conf, seed: int, n_steps: int):
    """Protenix loaded from ``predictor.checkpoint`` as its inference runner loads it, conditioned once on the protein
    chains of the run's structure file; with ``noise_levels=protenix`` the schedule hits Protenix's own noise levels
    for ``sampler.steps``."""
    import torch
    from omegaconf import OmegaConf

    name = pcfg.name
    if conf.path is None:
        raise UserError(f"predictor={name} needs a structure file (structure=...) to take its sequences from")
    if str(pcfg.get("dtype", "float32")) != "float32":
        raise UserError(f"predictor.dtype={pcfg.dtype}: Protenix predictors run in float32 only")
    levels = str(pcfg.get("noise_levels", "protenix"))
    if levels not in ("protenix", "af3"):
        raise UserError(f"predictor.noise_levels={levels}: use protenix or af3")
    arch = pcfg.get("arch")
    arch = OmegaConf.to_container(arch, resolve=True) if arch is not None else None
    try:
        from predictors.protenix import ProtenixDenoiser, load_protenix

        model = load_protenix(pcfg.checkpoint, model_name=pcfg.get("model_name"), arch=arch,
                              device=str(pcfg.get("device", "cpu")))
        n_cycle = pcfg.get("n_cycle")
        predictor = ProtenixDenoiser(model, conf.path, cache_dir=pcfg.cache_dir, msa=pcfg.get("msa", "none"),
                                     n_cycle=None if n_cycle is None else int(n_cycle),
                                     n_steps=n_steps if levels == "protenix" else None, seed=seed, dtype=torch.float32)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise UserError(str(exc)) from exc
    log.info("%s: %s, %d chains %s, %d atoms, %d trunk cycles, msa %s, noise levels %s (sigma_min %.3g)", name,
             pcfg.checkpoint, len(predictor.sequences), list(predictor.sequences), len(predictor.layout),
             predictor.n_cycle, pcfg.get("msa", "none"), levels, predictor.schedule.sigma_min)
    return predictor


def _boltz_arch_args(pcfg) -> dict:
    """Optional ``predictor.pairformer_args`` / ``predictor.msa_args`` overrides (for non-released architectures,
    e.g. tiny test models); absent = Boltz's CLI defaults."""
    from omegaconf import OmegaConf

    out = {}
    for key in ("pairformer_args", "msa_args"):
        if pcfg.get(key) is not None:
            out[key] = OmegaConf.to_container(pcfg[key], resolve=True)
    return out


def structure_atoms(conf, layout=None, match=None, conformers=None) -> dict:
    """What the input structure says about the atoms beyond their positions, as ``AtomInfo`` fields: the conformers'
    weights, B-factors, occupancies, the crystal and the fixed atoms (waters, ligands, anything ``layout`` lacks).

    Score mode (``layout`` None: the structure's own atoms, evaluated as its K conformers): per-conformer B [K, N],
    anisotropic U [K, N, 6] and occupancies relative to the conformer weights [K, N], so that the weighted conformers
    are exactly the file's multiconformer model.  Sample mode (the predictor's ``layout`` and the ``match`` of the
    structure onto it): every sampled member carries the input's B per atom (the conformers' weighted mean;
    atoms the structure lacks take their residue's mean, else the overall mean) and the atom's total occupancy;
    members are moved, so anisotropic U does not apply.  ``conformers`` (ids) restricts the conformers' weights to
    those the prior is built from, so that nothing fitted to the reference coordinates (the X-ray observable's first
    bulk-solvent, scale and sigma_A fit) sees conformers the prior was not given (a benchmark's hidden altloc B)."""
    from guidance.structure import read_fixed_atoms
    from observables.base import Crystal, FixedAtoms

    weights = np.asarray(conf.weights, np.float64)
    if conformers:
        keep = np.isin(np.asarray(conf.ids), [str(c) for c in conformers])
        if keep.any():
            weights = np.where(keep, weights, 0.0) / np.sum(weights[keep])
    extras: dict = {"weights": weights.astype(np.float32)}
    if conf.crystal is not None:
        extras["crystal"] = Crystal(tuple(float(v) for v in conf.crystal[0]), str(conf.crystal[1]))
    target = conf.layout if layout is None else layout
    if conf.path is not None:
        fixed = read_fixed_atoms(conf.path, target.keys())
        counts = fixed.pop("counts")
        if len(fixed["element"]):
            extras["environment"] = FixedAtoms(**fixed)
            log.info("fixed atoms (not moved, seen by the data): %d waters and %d other atoms (ligands, ions, atoms the "
                     "model lacks), hydrogens left out", counts["water"], counts["other"])
    if conf.b_iso is None:
        return extras
    if layout is None:
        extras.update(b_iso=conf.b_iso, occupancy=conf.relative_occupancies(),
                      u_aniso=conf.u_aniso if conf.u_aniso is not None and np.any(conf.u_aniso) else None)
        return extras
    w = np.asarray(conf.weights, np.float64)
    b_conf = (w[:, None] * conf.b_iso).sum(0)
    b = np.full(len(layout), np.nan)
    b[match.dst_index] = b_conf[match.src_index]
    occ = np.ones(len(layout))
    if conf.occupancies is not None:
        occ[match.dst_index] = conf.occupancies.sum(0)[match.src_index]
    if np.isnan(b).any():
        residues = list(zip(layout.chain_id.tolist(), layout.res_seq.tolist()))
        known_b = {}
        for r, v in zip(residues, b):
            if np.isfinite(v):
                known_b.setdefault(r, []).append(v)
        overall = float(np.nanmean(b)) if np.isfinite(b).any() else 20.0
        b = np.array([v if np.isfinite(v) else float(np.mean(known_b.get(r, [overall]))) for r, v in zip(residues, b)])
    extras.update(b_iso=b.astype(np.float32), occupancy=occ.astype(np.float32))
    return extras


def build_objective(cfg, layout, ref_coords, demo_data: dict[str, Path] | None = None, extras: dict | None = None):
    """The observables selected in ``cfg.observables``, built on the atoms of ``layout`` (the predictor's, or the
    structure's in score mode) with the input structure's conformers ``ref_coords [K, N, 3]`` in that order and the
    ``extras`` of ``structure_atoms`` (B-factors, occupancies, crystal, fixed atoms)."""
    import observables
    from guidance.objective import Term
    from observables.base import AtomInfo
    from omegaconf import OmegaConf

    atoms = AtomInfo.from_layout(layout, coords=ref_coords, **(extras or {}))
    terms = []
    for name in cfg.observables or {}:
        params = OmegaConf.to_container(cfg.observables[name], resolve=True)
        weight = float(params.pop("weight", 1.0))
        key = DATA_KEY.get(name, "data")
        if key in params and params[key] is None:
            if name not in (demo_data or {}):
                raise UserError(f"observables.{name}.{key} is required: give the data file")
            params[key] = demo_data[name]
        try:
            obs = observables.build(name, atoms, **params)
        except InputError as exc:  # a bad data file or option value: the reader's message names it
            text = str(exc)
            raise UserError(text if text.startswith(f"observables.{name}") else f"observables.{name}: {text}") from exc
        except OSError as exc:  # unreadable file (permissions, a directory, ...)
            raise UserError(f"observables.{name}: {exc}") from exc
        except TypeError as exc:  # an option the observable does not take
            if "unexpected keyword argument" not in str(exc):
                raise
            option = str(exc).split("unexpected keyword argument")[-1].strip(" '\"")
            raise UserError(f"observables.{name}.{option} is not an option of the {name} observable; its options "
                            f"are in `ensemble-guide --cfg job observables=[{name}]`") from exc
        terms.append(Term(name, obs, weight))
        log.info("observable %s (weight %.3g): %s", name, weight, {k: (str(v) if isinstance(v, Path) else v) for k, v in params.items()})
        _log_observable(name, obs)
    if not terms:
        raise UserError("no observables selected: use e.g. observables=[density]")
    return terms


def _log_observable(name: str, obs) -> None:
    """What an observable took from the data and the structure, as a user checks first."""
    if name == "xray":
        refl = obs.reflections
        log.info("xray: %s, columns %s, %d reflections (%d work, %d free: %s), %.2f-%.2f A; %s; F_calc grid %s, "
                 "blur %.1f A^2", refl.path, ",".join(refl.columns), len(refl), obs.n_work, len(refl) - obs.n_work,
                 refl.free_rule, refl.d_max, refl.d_min, obs.crystal_data.describe(), list(obs.sf.grid.shape),
                 obs.sf.blur)
        log.info("xray: first fit to the input structure: k_sol %.3f e/A^3, B_sol %.1f A^2, solvent %.0f %% of the "
                 "cell, sigma_A %s", obs.fit["k_sol"], obs.fit["b_sol"], 100 * obs.fit["solvent_fraction"],
                 obs.fit["sigmaa_bins"])
    elif name == "density":
        log.info("density: resolution %.2f A (%s), B from %s, %d fixed atoms in the box", obs.resolution,
                 obs.resolution_source, obs.b_source, obs.n_environment)
    for note in getattr(obs, "notes", []) or []:
        log.info("%s: %s", name, note)


def build_potentials(cfg, predictor) -> list:
    """The prior-side potentials selected in ``cfg.potentials`` (e.g. ``potentials=[boltz]``), built for ``predictor``."""
    from guidance.objective import PotentialTerm
    from omegaconf import OmegaConf

    out = []
    for name in cfg.get("potentials") or {}:
        params = OmegaConf.to_container(cfg.potentials[name], resolve=True)
        weight = float(params.pop("weight", 1.0))
        if name == "geometry":
            from guidance.geometry import GeometryPotential

            try:
                pot = GeometryPotential(predictor.layout, **params)
            except TypeError as exc:
                raise UserError(f"potentials.geometry: {exc}") from exc
            out.append(PotentialTerm(name, pot.energy_and_grad, weight))
            log.info("potential geometry (weight %.3g): Engh & Huber bonds and angles + clash wall, %s", weight, params)
            continue
        if name != "boltz":
            raise UserError(f"unknown potential {name!r}; available: boltz, geometry")
        if not callable(getattr(predictor, "potentials", None)):
            raise UserError(f"potentials=[boltz] needs a Boltz predictor (predictor=boltz1 or boltz2), "
                            f"not predictor={cfg.predictor.name}")
        try:
            pot = predictor.potentials(params.get("terms"))
        except ValueError as exc:
            raise UserError(f"potentials.boltz.terms: {exc}") from exc
        out.append(PotentialTerm(name, pot.energy_and_grad, weight))
        log.info("potential boltz (weight %.3g): Boltz steering energies %s", weight, pot.names)
    return out


def _schedule(predictor, scfg):
    overrides = {k: float(scfg[k]) for k in ("sigma_max", "sigma_min", "rho", "gamma_0", "gamma_min", "noise_scale",
                                             "step_scale") if scfg.get(k) is not None}
    return predictor.schedule.replace(**overrides) if overrides else predictor.schedule


def _guidance_objects(gcfg):
    from guidance.dps import DPS, Strength
    from guidance.fk import FK

    method = gcfg.method
    if method not in ("none", "dps", "fk"):
        raise UserError(f"unknown guidance method {method!r}; use guidance=none, dps or fk")
    dps = fk = None
    if method in ("dps", "fk") and gcfg.get("dps") is not None and float(gcfg.dps.strength) > 0:
        d = gcfg.dps
        dps = DPS(strength=Strength(float(d.strength), d.schedule, float(d.start), float(d.end)), gradient=d.gradient,
                  scale=d.scale, max_step=float(d.max_step), inner_steps=int(d.inner_steps), inner_lr=float(d.inner_lr))
    if method == "fk":
        f = gcfg.fk
        fk = FK(particles=int(gcfg.particles), potential=f.potential, lam=float(f.lam), resampling=f.resampling,
                ess_threshold=float(f.ess_threshold), resample_every=int(f.resample_every),
                twist_sigma=None if f.twist_sigma is None else float(f.twist_sigma),
                correct_proposal=bool(f.correct_proposal))
    return dps, fk


def reference_block(layout, members, member_weights, truth) -> dict:
    """metrics.json:reference — per altloc of the truth: best member RMSD and assigned fraction over the altloc region."""
    from guidance.metrics import altloc_assignment
    from guidance.structure import match_layouts

    match = match_layouts(truth.layout, layout)
    region = np.zeros(len(layout), bool)
    region[match.dst_index] = truth.varying[match.src_index]
    if not region.any():
        return {}
    refs = np.full((len(truth.ids), len(layout), 3), np.nan, np.float32)
    refs[:, match.dst_index] = truth.coords[:, match.src_index]
    keep = np.zeros(len(layout), bool)
    keep[match.dst_index] = True
    assignment = altloc_assignment(members[:, keep], member_weights, refs[:, keep], list(truth.ids), region[keep])
    return {"altlocs": assignment, "region_atoms": int(region.sum()),
            "true_weights": dict(zip(truth.ids, np.round(truth.weights, 4).tolist()))}


# ----------------------------------------------------------------------------------------------- the two modes


def run(cfg, out_dir: Path) -> dict:
    """One run: read (or generate) the inputs, then score or sample; returns metrics.json's content."""
    from guidance.structure import read_structure

    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    demo_data = None
    structure = cfg.structure
    if structure is None:
        structure, demo_data = prepare_demo(cfg, out_dir)
        if cfg.predictor.name == "reference" and not cfg.predictor.get("weights"):
            from omegaconf import open_dict

            with open_dict(cfg):
                cfg.predictor.weights = dict(cfg.demo.prior_weights)
    conf = read_structure(structure)
    log.info("structure %s: %d atoms, %d conformer(s) %s (%s), weights %s", structure, len(conf.layout),
             len(conf.ids), list(conf.ids), conf.kind, np.round(conf.weights, 3).tolist())
    if conf.contents.get("chains"):
        log.info("the observables see chain(s) %s of %s", ", ".join(conf.contents["chains"]),
                 f"models {conf.contents['models_read'][0]}-{conf.contents['models_read'][-1]}"
                 if len(conf.contents.get("models_read", [])) > 1 else f"model {conf.contents['model']}")
    truth = read_structure(cfg.reference) if cfg.get("reference") else (conf if len(conf.ids) > 1 else None)
    if cfg.mode == "score":
        metrics = score(cfg, conf, demo_data, truth if cfg.get("reference") else None, out_dir)
    elif cfg.mode == "sample":
        metrics = sample(cfg, conf, demo_data, truth, out_dir)
    else:
        raise UserError(f"unknown mode {cfg.mode!r}; use mode=sample or mode=score")
    if conf.contents:  # what of the input file the run used: model, chains, atoms, ligands; what it ignored
        metrics["structure"] = {"file": str(structure), "conformers": list(conf.ids), "kind": conf.kind,
                                **conf.contents}
    metrics["runtime_s"] = time.perf_counter() - t0
    return metrics


def score(cfg, conf, demo_data, truth, out_dir: Path | None = None) -> dict:
    """Evaluate the structure's own conformers (models / altlocs at their weights) against the observables; the data
    plots (SAXS fit, R by resolution, map slice) go to ``out_dir/plots`` when ``output.plots`` is on."""
    from guidance.metrics import geometry_report
    from guidance.objective import Objective

    terms = build_objective(cfg, conf.layout, conf.coords, demo_data, structure_atoms(conf))
    if cfg.get("potentials"):
        log.warning("mode=score builds no predictor: potentials %s are not evaluated", list(cfg.potentials))
    objective = Objective(terms, n_members=len(conf.ids), member_weights=conf.weights)
    members, mweights = conf.coords, np.asarray(conf.weights)
    metrics = {"observables": objective.reports(members, mweights),
               "ensemble": {"size": len(conf.ids), "weights": mweights, "ids": list(conf.ids)},
               "geometry": geometry_report(conf.layout, members)}
    if truth is not None:
        metrics["reference"] = reference_block(conf.layout, members, mweights, truth)
    if out_dir is not None and cfg.output.plots:
        _data_plots(out_dir / "plots", objective, members, mweights, metrics["observables"])
    return metrics


def fill_missing(layout, coords: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Reference coordinates [K, N, 3] for predictor atoms the input structure lacks (``known`` False): the centroid of
    the known atoms of the same residue, else of the nearest residue in layout order that has some.  They only keep
    an observable's box and mask local (a placeholder at the origin would stretch both); the rigid fit onto the input
    leaves them out."""
    if known.all():
        return coords
    if not known.any():
        raise UserError("none of the predictor's atoms is in the structure: nothing to place the data around")
    out = coords.copy()
    residues = list(zip(layout.chain_id.tolist(), layout.res_seq.tolist()))
    order = {r: i for i, r in enumerate(dict.fromkeys(residues))}
    res_index = np.array([order[r] for r in residues])
    have = np.unique(res_index[known])
    for r in np.unique(res_index[~known]):
        source = r if r in have else have[np.argmin(np.abs(have - r))]
        centre = coords[:, known & (res_index == source)].mean(axis=1)  # [K, 3]
        out[:, ~known & (res_index == r)] = centre[:, None]
    return out


def sample(cfg, conf, demo_data, truth, out_dir: Path) -> dict:
    """Guided sampling, member-weight refinement and the outputs of DESIGN.md."""
    import torch

    from guidance import fk as fk_mod
    from guidance.metrics import geometry_report
    from guidance.objective import Objective
    from guidance.sampler import initial_noise, plan
    from guidance.structure import match_layouts, write_ensemble_cif
    from guidance.weights import refine_weights

    predictor = build_predictor(cfg, conf)
    match = match_layouts(conf.layout, predictor.layout)
    if match.missing_in_src:
        log.warning("%d predictor atoms are not in the structure (e.g. %s)", len(match.missing_in_src),
                    match.missing_in_src[:3])
    if match.missing_in_dst:
        log.warning("%d structure atoms are not modelled by the predictor (e.g. %s)", len(match.missing_in_dst),
                    match.missing_in_dst[:3])
    known = np.zeros(len(predictor.layout), bool)
    known[match.dst_index] = True
    ref_coords = np.zeros((len(conf.ids), len(predictor.layout), 3), np.float32)
    ref_coords[:, match.dst_index] = conf.coords[:, match.src_index]
    ref_coords = fill_missing(predictor.layout, ref_coords, known)
    prior_conformers = list(cfg.predictor.get("conformers") or []) if cfg.predictor.name == "reference" else []
    terms = build_objective(cfg, predictor.layout, ref_coords, demo_data,
                            structure_atoms(conf, predictor.layout, match, prior_conformers))

    scfg, gcfg = cfg.sampler, cfg.guidance
    schedule = _schedule(predictor, scfg)
    n_steps, e = int(scfg.steps), int(cfg.ensemble_size)
    if e < 1:
        raise UserError("ensemble_size must be >= 1")
    dps, fk = _guidance_objects(gcfg)
    p = int(gcfg.get("particles", 1))
    augmentation = (bool(getattr(predictor, "needs_augmentation", False)) if scfg.augmentation == "auto"
                    else bool(scfg.augmentation))
    align_to_input = bool(getattr(predictor, "needs_alignment", False))
    align_step = align_to_input if scfg.align == "auto" else bool(scfg.align)
    ref_frame = torch.as_tensor(ref_coords[0]) if align_to_input else None
    objective = Objective(terms, n_members=e, reference=ref_frame, align=align_to_input,
                          potentials=build_potentials(cfg, predictor),
                          reference_weights=None if known.all() else torch.as_tensor(known, dtype=torch.float32))

    steps = plan(schedule, n_steps, start_step=int(scfg.start_step))
    gen = torch.Generator().manual_seed(int(cfg.seed))
    torch.manual_seed(int(cfg.seed))
    n_atoms = len(predictor.layout)
    if steps[0].index == 0:
        x = initial_noise((p * e, n_atoms, 3), steps[0].sigma, gen)
    else:  # partial diffusion: start from the input's conformers (cycled over members), noised to the start level
        start = torch.as_tensor(ref_coords)[torch.arange(p * e) % len(conf.ids)]
        x = start + initial_noise(start.shape, steps[0].sigma, gen)
    log.info("sampling: guidance=%s, %d particle(s) x %d member(s), %d steps from sigma %.3g A, solver %s",
             gcfg.method, p, e, len(steps), steps[0].sigma, scfg.solver)
    result = _steer(predictor, x, steps, schedule, gen, p, e, objective if gcfg.method != "none" else None, dps, fk,
                    n_steps, augmentation, align_step, scfg, gcfg.method, out_dir / "trajectory.csv")
    if result.refits:
        log.info("refitted during sampling: %s", result.refits)

    particles = result.particles.detach().cpu().numpy()
    if not np.isfinite(particles).all():
        raise RuntimeError("sampling produced non-finite coordinates; nothing written")
    final_ll = result.final_log_likelihood
    if final_ll is None:
        final_ll, _ = objective.value(result.particles.reshape(p * e, n_atoms, 3))
    pw = result.weights.detach().cpu().numpy()
    best = int(np.argmax(pw))
    # in the data's frame from here on (superposed onto the input when the predictor was trained with random
    # rotations): what the observables saw, what the reports, the reference metrics and ensemble.cif hold
    members = objective.data_frame(particles[best])
    uniform = np.full(e, 1.0 / e)
    refit = objective.refit(members, uniform)  # nuisance parameters (X-ray scales) for the final ensemble
    if refit:
        log.info("refitted %s to the final ensemble before weight refinement", ", ".join(refit))
    fit = None
    mweights = uniform
    if cfg.weights.refine:
        fit = refine_weights(objective.ensemble_log_likelihood(members), members, uniform, steps=int(cfg.weights.steps),
                             learning_rate=float(cfg.weights.learning_rate), entropy=float(cfg.weights.entropy))
        mweights = np.asarray(fit.weights)
        log.info("member weights refined: log-likelihood %.3f -> %.3f, weights %s", fit.log_likelihood_before,
                 fit.log_likelihood_after, np.round(mweights, 3).tolist())

    metrics: dict = {
        "observables": objective.reports(members, mweights),
        "observables_before_weight_refinement": objective.reports(members, uniform),
        "ensemble": {"size": e, "weights": mweights, "particle": best},
        "potentials": objective.potential_reports(members),
        "geometry": geometry_report(predictor.layout, members),
        "predictor": {
            "name": cfg.predictor.name, "atoms": n_atoms,
            "unmatched_atoms": {"not_in_structure": [list(k) for k in match.missing_in_src],
                                "not_in_predictor": [list(k) for k in match.missing_in_dst]},
        },
        "sampling": {
            "guidance": gcfg.method, "particles": p, "steps": len(steps), "particle_weights": pw,
            "particle_log_likelihood": final_ll.detach().cpu().numpy(),
            "ess_final": fk_mod.ess(result.log_weights) if fk is not None else None,
            "resampled_at": result.resampled_at, "uncorrected_drift_steps": result.uncorrected_drift_steps,
            "skipped_guidance_steps": result.skipped_guidance_steps,
        },
    }
    if truth is not None:
        metrics["reference"] = reference_block(predictor.layout, members, mweights, truth)

    write_ensemble_cif(out_dir / "ensemble.cif", predictor.layout, members, mweights,
                       metadata={"guidance": gcfg.method, "seed": int(cfg.seed)})
    if cfg.output.particles:
        write_npz(out_dir / "particles.npz", particles=particles, weights=pw)
    if cfg.output.plots:
        _plots(out_dir / "plots", result.trajectory, objective, members, uniform, mweights, fit is not None,
               metrics["observables"])
    return metrics


def _steer(predictor, x, steps, schedule, gen, p, e, objective, dps, fk, n_steps, augmentation, align, scfg, method,
           traj_path: Path):
    """fk.steer with a progress bar and the trajectory written as it goes (every 10 steps, and on interruption)."""
    from tqdm.auto import tqdm

    from guidance import fk as fk_mod

    rows: list[dict] = []
    latest: dict = {}

    refits: list[str] = []

    def on_step(info):
        rows.append(info["row"])
        latest["x"] = info["x"]
        if objective is not None:
            done = objective.refit_during_sampling(info["i"], info["sigma"], info["denoised"], info["log_likelihood"])
            if done:
                info["row"]["refit"] = "+".join(done)
                refits.append(f"step {info['i']}: {'+'.join(done)}")
        if len(rows) % 10 == 0:
            write_trajectory(traj_path, rows)

    def bar(it):
        return tqdm(it, desc=f"{method} sampling", unit="step", file=sys.stderr, leave=False)

    try:
        result = fk_mod.steer(predictor.denoise, x, steps, schedule, gen, n_particles=p, n_members=e,
                              objective=objective, dps=dps, fk=fk, n_steps_total=n_steps, augmentation=augmentation,
                              solver=scfg.solver, align=align, progress=bar, callback=on_step)
    except KeyboardInterrupt:
        write_trajectory(traj_path, rows)
        saved = ""
        if "x" in latest:
            partial = traj_path.with_name("particles_interrupted.npz")
            write_npz(partial, particles=latest["x"].reshape(p, e, *latest["x"].shape[1:]).cpu().numpy(),
                                step=rows[-1]["step"])
            saved = f" and the particles at that step in {partial}"
        raise UserError(f"interrupted after {len(rows)} steps; the trajectory so far is in {traj_path}{saved}") from None
    write_trajectory(traj_path, result.trajectory)
    result.refits = refits
    return result


def _plots(plots: Path, trajectory, objective, members, uniform, mweights, refined: bool, reports: dict) -> None:
    from guidance.report import plot_trajectory, plot_weights

    plot_trajectory(trajectory, plots / "trajectory.png")
    if refined:
        plot_weights(uniform, mweights, plots / "weights.png")
    _data_plots(plots, objective, members, mweights, reports)


def _data_plots(plots: Path, objective, members, mweights, reports: dict) -> None:
    """The plots of the fit to each observable's data: R by resolution (xray), map slice (density), SAXS fit."""
    from guidance.report import plot_map_slice

    plots.mkdir(parents=True, exist_ok=True)
    if "xray" in reports:
        from guidance.report import plot_r_by_resolution

        plot_r_by_resolution(reports["xray"]["bins"], plots / "r_by_resolution.png",
                             title=f"R-work {reports['xray']['r_work']:.3f}, R-free {reports['xray']['r_free']:.3f}")
    for t in objective.terms:
        if t.name == "density":
            obs = t.observable
            model = np.asarray(obs.predict(members, mweights))
            plot_map_slice(obs.grid.values, model, obs.grid.origin, obs.grid.spacing, plots / "map_slice.png",
                           atoms_xyz=members.reshape(-1, 3), title="map (grey) and ensemble density (contours)")
        elif t.name == "saxs":
            from guidance.report import plot_saxs_fit

            obs, rep = t.observable, reports.get("saxs", {})
            prof = obs.profile
            title = f"chi2 {rep['chi2']:.3g}, model Rg {rep['rg']:.1f} A" if "chi2" in rep else ""
            plot_saxs_fit(prof.q, prof.intensity, prof.sigma, np.asarray(obs.predict(members, mweights)),
                          plots / "saxs_fit.png", title=title, guinier=rep.get("guinier"))


# ----------------------------------------------------------------------------------------------- entry point


def _app(cfg) -> int:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        metrics = run(cfg, out_dir)
    except InputError as exc:  # the user's file, value or option: one line, exit 1, no metrics.json
        log.debug("details", exc_info=True)
        log.error("%s", " ".join(str(exc).split()))
        return 1
    # anything else is a bug: it propagates with its traceback
    metrics["config"] = OmegaConf.to_container(cfg, resolve=True)
    atomic_write(out_dir / "metrics.json", json.dumps(_jsonable(metrics), indent=2))
    for name, rep in metrics["observables"].items():
        if rep.get("warning"):
            log.warning("%s: %s", name, rep["warning"])
    headline = ("rscc", "cc_box", "chi2", "q_factor", "rg", "violations", "rms_violation", "rmse_ca", "rmsd", "r_work",
                "r_free")
    summary = {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in rep.items() if k in headline}
               for name, rep in metrics["observables"].items()}
    ref = metrics.get("reference", {}).get("altlocs", {})
    log.info("done in %.1f s: %s%s -> %s", metrics["runtime_s"], summary,
             "; assigned fractions " + str({k: round(v["assigned_fraction"], 3) for k, v in ref.items()}) if ref else "",
             out_dir)
    return 0


def main() -> None:
    import hydra

    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
    status = {"code": 0}

    @hydra.main(version_base="1.3", config_path=_config_dir(), config_name="run")
    def entry(cfg) -> None:
        status["code"] = _app(cfg)

    entry()
    sys.exit(status["code"])


if __name__ == "__main__":
    main()
