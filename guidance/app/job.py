"""``ensemble-guide``: the Hydra app that runs guided ensemble sampling (``mode=sample``) or scores a structure
against data (``mode=score``), writing the job directory of guidance.app.outputs into Hydra's run directory.

With no arguments it runs the embedded demo: a two-state peptide, a synthetic 2 A map of its 0.6/0.4 mixture and a
prior biased 0.9/0.1 towards state A.

``run(cfg, out_dir)`` is the whole job (``ensemble-bench`` calls it for each of its jobs); ``main`` adds Hydra and
the one-line report of a user's mistake.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from guidance.app import outputs
from guidance.app.build import (
    UserError,
    build_objective,
    build_potentials,
    build_predictor,
    container,
    guidance_of,
    prepare_demo,
    refinement_data,
    sampling_of,
    schedule_of,
    structure_atoms,
)
from guidance.app.config import config_dir, register_configs
from observables.errors import InputError

log = logging.getLogger("ensemble_guide")

__all__ = ["UserError", "config_dir", "main", "run", "sample", "score"]

register_configs()  # the ConfigStore nodes (guidance, weights, observables, predictors, potentials) before any compose


# ----------------------------------------------------------------------------------------------- the two modes


def run(cfg, out_dir: Path) -> dict:
    """One job: read (or generate) the inputs, then score or sample; writes the job directory (metrics.json last)
    and returns metrics.json's content."""
    from guidance.structures.io import read_structure

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
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
    outputs.write_metrics(out_dir, metrics, cfg)
    return metrics


def _reference(cfg, layout, members, weights, truth) -> dict:
    from guidance.structures.altlocs import parse_regions, reference_block

    regions = parse_regions(list(cfg.reference_regions) if cfg.get("reference_regions") else None,
                            "reference_regions: ")
    return reference_block(layout, members, weights, truth, regions)


def score(cfg, conf, demo_data, truth, out_dir: Path | None = None) -> dict:
    """Evaluate the structure's own conformers (models / altlocs at their weights) against the observables; the data
    plots go to ``out_dir/plots`` when ``output.plots`` is on."""
    from guidance.objective import Objective
    from guidance.structures.metrics import geometry_report

    terms = build_objective(cfg, conf.layout, conf.coords, demo_data, structure_atoms(conf))
    if cfg.get("potentials"):
        log.warning("mode=score builds no predictor: potentials %s are not evaluated", list(cfg.potentials))
    objective = Objective(terms, n_members=len(conf.ids), member_weights=conf.weights)
    members, mweights = conf.coords, np.asarray(conf.weights)
    metrics = {"observables": objective.reports(members, mweights),
               "ensemble": {"size": len(conf.ids), "weights": mweights, "ids": list(conf.ids)},
               "geometry": geometry_report(conf.layout, members)}
    if truth is not None:
        metrics["reference"] = _reference(cfg, conf.layout, members, mweights, truth)
    if out_dir is not None and cfg.output.plots:
        outputs.write_data_plots(out_dir / "plots", objective, members, mweights, metrics["observables"])
    return metrics


def sample(cfg, conf, demo_data, truth, out_dir: Path) -> dict:
    """Guided sampling, member-weight refinement and the outputs of guidance.app.outputs."""
    import torch

    from guidance import fk as fk_mod
    from guidance.objective import Objective
    from guidance.sampler import initial_noise, plan
    from guidance.structures.io import match_layouts
    from guidance.structures.matching import fill_missing
    from guidance.structures.metrics import geometry_report
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
    ref_coords = fill_missing(predictor.layout, ref_coords, known)  # an InputError when no atom is shared
    prior_conformers = list(cfg.predictor.get("conformers") or []) if cfg.predictor.name == "reference" else []
    extras = structure_atoms(conf, predictor.layout, match, prior_conformers)
    terms = build_objective(cfg, predictor.layout, ref_coords, demo_data, extras)

    scfg, gcfg = cfg.sampler, cfg.guidance
    schedule = schedule_of(predictor, scfg)
    sampling = sampling_of(predictor, scfg)
    e = int(cfg.ensemble_size)
    if e < 1:
        raise UserError("ensemble_size must be >= 1")
    dps, fk = guidance_of(gcfg)
    p = int(gcfg.get("particles", 1))
    align_to_input = bool(getattr(predictor, "needs_alignment", False))
    objective = Objective(terms, n_members=e, reference=torch.as_tensor(ref_coords[0]) if align_to_input else None,
                          align=align_to_input, potentials=build_potentials(cfg, predictor),
                          reference_weights=None if known.all() else torch.as_tensor(known, dtype=torch.float32))

    steps = plan(schedule, sampling.n_steps_total, start_step=int(scfg.start_step))
    gen = torch.Generator().manual_seed(int(cfg.seed))
    torch.manual_seed(int(cfg.seed))
    n_atoms = len(predictor.layout)
    if steps[0].index == 0:
        x = initial_noise((p * e, n_atoms, 3), steps[0].sigma, gen)
    else:  # partial diffusion: start from the input's conformers (cycled over members), noised to the start level
        start = torch.as_tensor(ref_coords)[torch.arange(p * e) % len(conf.ids)]
        x = start + initial_noise(start.shape, steps[0].sigma, gen)
    log.info("sampling: guidance=%s, %d particle(s) x %d member(s), %d steps from sigma %.3g A, solver %s",
             gcfg.method, p, e, len(steps), steps[0].sigma, sampling.solver)
    guide = fk_mod.Guide(predictor.denoise, schedule, n_particles=p, n_members=e,
                         objective=objective if gcfg.method != "none" else None, dps=dps, fk=fk, sampling=sampling)
    result = _steer(guide, x, steps, gen, out_dir, gcfg.method)
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
    wcfg = cfg.weights
    if wcfg.refine:
        fit = refine_weights(objective.ensemble_log_likelihood(members), members, uniform, steps=int(wcfg.steps),
                             learning_rate=float(wcfg.learning_rate), entropy=float(wcfg.entropy),
                             min_weight=float(wcfg.min_weight), optimizer=str(wcfg.optimizer))
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
        metrics["reference"] = _reference(cfg, predictor.layout, members, mweights, truth)

    b_factors = extras.get("b_iso")  # the input's per-atom B on the predictor's atoms (None: the file has none)
    outputs.write_ensemble(out_dir, predictor.layout, members, mweights, b_factors=b_factors, crystal=conf.crystal,
                           metadata={"guidance": gcfg.method, "seed": int(cfg.seed)})
    mcfg = container(cfg.multiconformer)
    if mcfg.pop("write"):
        metrics["multiconformer"] = _multiconformer(cfg, out_dir, objective, predictor.layout, members, mweights,
                                                    mcfg, b_factors, conf)
    if cfg.output.particles:
        outputs.write_particles(out_dir, particles, pw)
    if cfg.output.plots:
        outputs.write_sample_plots(out_dir / "plots", result.trajectory, objective, members, uniform, mweights,
                                   fit is not None, metrics["observables"])
    return metrics


def _multiconformer(cfg, out_dir: Path, objective, layout, members, weights, options: dict, b_factors, conf) -> dict:
    """The ensemble as one multiconformer model, refined against the data (``refine``) where it can be, written as
    multiconformer.pdb/.cif; returns metrics.json's ``multiconformer`` block: the model, its R values (the numbers
    ``mode=score`` of the file gives back), the refinement's before / after / history and the validation."""
    from guidance.refine import Refine, geometry_summary, record_geometry, refine
    from guidance.structures.multiconf import ensemble_to_multiconf
    from guidance.structures.validation import summary_line, validate_multiconf

    model = ensemble_to_multiconf(layout, members, weights, b_factors=b_factors, **options)
    rcfg = container(cfg.refine)
    enabled = rcfg.pop("enabled")
    if enabled not in ("auto", True, False):
        raise UserError(f"refine.enabled must be auto, true or false, got {enabled!r}")
    rcfg["weight_scan"] = tuple(int(k) for k in rcfg["weight_scan"])
    try:
        options_r = Refine(**rcfg)
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    data = refinement_data(objective, model)
    if enabled is True and data is None:
        raise UserError("refine.enabled=true, but no observable of this run can be refined against (the X-ray "
                        "amplitudes can: observables=[xray]); use refine.enabled=auto or false")
    block: dict = {}
    if data is not None and enabled is not False and options_r.cycles > 0:
        result = refine(model, data, options_r)
        model = result.model
        block["refinement"] = {"data_weight": result.data_weight, "weight_rule": result.weight_rule,
                               "before": result.before, "after": result.after, "history": result.history,
                               "seconds": round(result.seconds, 1), "options": rcfg}
        log.info("refined multiconformer model in %.0f s: R-work %.4f -> %.4f, R-free %.4f -> %.4f, bond/angle RMSZ "
                 "%.2f/%.2f -> %.2f/%.2f", result.seconds, result.before.get("r_work", float("nan")),
                 result.after.get("r_work", float("nan")), result.before.get("r_free", float("nan")),
                 result.after.get("r_free", float("nan")), result.before["bond_rmsz"], result.before["angle_rmsz"],
                 result.after["bond_rmsz"], result.after["angle_rmsz"])
    if data is not None:
        report = data.report(model.coords, model.occupancy, model.b_factor)
        block["observables"] = report["observables"]
    block["geometry"] = geometry_summary(record_geometry(model), model.coords)
    block["validation"] = validate_multiconf(model)
    log.info("multiconformer model: %s", summary_line(block["validation"]["model"]))
    written = outputs.write_multiconformer(out_dir, model, options, crystal=conf.crystal, fixed_from=conf.path)
    return {**written, **block}


def _steer(guide, x, steps, gen, out_dir: Path, method: str):
    """fk.run with a progress bar, the nuisance-parameter refits the observables ask for, and trajectory.csv
    written as it goes (outputs.TrajectoryWriter: every few steps, and on interruption)."""
    from tqdm.auto import tqdm

    from guidance import fk as fk_mod

    objective = guide.objective
    writer = outputs.TrajectoryWriter(out_dir / "trajectory.csv", guide.n_particles)
    refits: list[str] = []

    def on_step(info):
        if objective is not None:
            done = objective.refit_during_sampling(info["i"], info["sigma"], info["denoised"], info["log_likelihood"])
            if done:
                info["row"]["refit"] = "+".join(done)
                refits.append(f"step {info['i']}: {'+'.join(done)}")
        writer.add(info["row"], info["x"])

    def bar(it):
        return tqdm(it, desc=f"{method} sampling", unit="step", file=sys.stderr, leave=False)

    try:
        result = fk_mod.run(guide, x, steps, gen, progress=bar, callback=on_step)
    except KeyboardInterrupt:
        where = writer.interrupted()
        raise UserError(f"interrupted after {len(writer.rows)} steps; {where}") from None
    writer.finish(result.trajectory)
    result.refits = refits
    return result


# ----------------------------------------------------------------------------------------------- entry point


def _app(cfg) -> int:
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        metrics = run(cfg, out_dir)
    except InputError as exc:  # the user's file, value or option: one line, exit 1, no metrics.json
        log.debug("details", exc_info=True)
        log.error("%s", " ".join(str(exc).split()))
        return 1
    # anything else is a bug: it propagates with its traceback
    outputs.log_summary(metrics, out_dir)
    return 0


def main() -> None:
    import hydra

    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
    status = {"code": 0}

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name="run")
    def entry(cfg) -> None:
        status["code"] = _app(cfg)

    entry()
    sys.exit(status["code"])


if __name__ == "__main__":
    main()
