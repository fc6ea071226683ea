"""ensemble-bench: how well does predictor X, guided by method Y at strength Z, recover the alternate conformations of
PDB entries, and at what cost in geometry?

    ensemble-bench manifest=benchmarks/altloc_small.csv out_dir=bench/run1            # the grid in configs/bench.yaml
    ensemble-bench manifest=... grid.guidance=[none,dps,fk] grid.strength=[0.5,1,2] hydra/launcher=joblib
    ensemble-bench manifest=... "grid.observables=[density,xray,density+xray]"      # guided by amplitudes too

One *job* is one cell of the grid  entry x predictor x guidance x observables x ensemble size x strength x occupancy x
potentials x seed.  Jobs are independent Hydra multirun jobs (``job.*`` keys), so Hydra's launchers scale them out:
``hydra/launcher=joblib`` runs them in parallel on this machine, ``hydra/launcher=submitit_slurm`` on a cluster.  The
``ensemble-bench`` command expands the manifest and ``grid.*`` into that sweep, runs it, then aggregates every result
into ``results.csv``, ``report.md`` and ``plots/``.

Per entry (cached under ``<out_dir>/entries/<name>/``): the altloc structure is read; the altloc regions are taken from
the manifest or detected (contiguous residues with alternate conformers, at least ``regions.min_span`` long); the first
two conformers are the states A and B; the structure is carved to the residues within ``carve`` A of the regions.  The
carved model (``model.pdb``) carries a crystal: the entry's own cell and space group when its file has a real one,
else a P1 orthogonal cell around the model plus ``synthetic.box_padding`` A (none for an entry with an experimental
map, which gets no synthetic amplitudes).  Waters are not part of it (the reader drops them; the amplitudes' bulk
solvent stands in for them); ligands and ions are, as atoms the predictor models: the synthetic data are made from
exactly the carved model's atoms, and the structure file holds no atom the predictor lacks, so the xray observable's
fixed atoms (``AtomInfo.environment``) are empty and nothing is seen twice or missed.
Per occupancy b of B, unless the entry gives an experimental map, the synthetic data of the mixture (A at 1 - b, B at
b) are made with gemmi -- forward models independent of the ones guidance uses:
- a map (``synthetic_map``): gemmi's DensityCalculatorX, optionally with Gaussian noise at a signal-to-noise ratio;
- amplitudes (``synthetic_amplitudes``): |F_calc + k_sol exp(-B_sol s^2 / 4) F_mask| in the carved model's crystal,
  F_calc by gemmi's DensityCalculatorX and FFT (IT92 form factors), F_mask the Fourier transform of gemmi's flat
  solvent mask (``K_SOL``, ``B_SOL``), relative Gaussian noise ``synthetic.f_noise`` on |F| (the sigma column), a
  seeded free set of ``synthetic.free_fraction``, written as MTZ (FP, SIGFP, FreeR_flag; free = 0).

Per job: the guided run (guidance/run.py, composed from configs/run.yaml plus the job's overrides) writes its outputs
under ``<out_dir>/jobs/<key>/``; the metrics below go to ``<out_dir>/results/<key>.json``, written atomically.  A job
whose result exists is skipped (``force=true`` redoes it); a job that raises is recorded as failed with its error and
the others go on.  The grid's predictors are labels of ``predictors.<label>`` (override lists that may pick the
predictor config themselves, ``predictor=reference``).  Two single-state baselines come with the config, built from
altloc A only so that guidance has to find B: ``reference`` (A with its ANM flexibility) and ``rotamers`` (the same
with every side chain over a rotamer library, predictors/rotamers.py).  ``grid.observables`` chooses the data a job is
guided by: ``density`` (the map), ``xray`` (the amplitudes) or ``density+xray``; ``grid.strength`` is the weight of
each of them.

Metrics (``bench_metrics``, ``xray_metrics``): RSCC over the altloc regions (+2 A) and CC over the box against the map
(the synthetic map of the job's occupancy, whatever the job was guided by); R-work and R-free of the final ensemble
against the synthetic amplitudes (the project's xray observable in score fashion: bulk solvent and scales refitted to
the ensemble; empty for an entry with an experimental map, which has no amplitudes); per altloc, the best member RMSD
over the regions after superposition on the rest of the carved chain, and recovery (some member within 1.0 A);
member-weighted assigned fractions against the true occupancies (absolute error); all-atom LDDT of the best member to
each altloc; clashes per 1000 atoms; bond-length and bond-angle RMSZ against Engh & Huber; wall time.
"""


from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np

from guidance.app.job import config_dir
from guidance.app.outputs import write_json
from guidance.bench.entries import Prepared, prepare_entry, synthetic_amplitudes, synthetic_map
from guidance.bench.manifest import BenchError, Cell, _decode, cell_list, expand_grid, read_manifest
from guidance.bench.report import collect, write_report
from guidance.bench.scoring import bench_metrics, multiconformer_metrics, xray_metrics
from observables.errors import InputError

log = logging.getLogger("ensemble_bench")


def _potential_overrides(potentials: str) -> list[str]:
    names = [p for p in potentials.split("+") if p and p != "none"]
    return [f"potentials=[{','.join(names)}]"] if names else ["geometry_potential=false"]  # none means none


def run_overrides(cfg, cell: Cell, prep: Prepared, map_path: Path, resolution: float, job_dir: Path,
                  amplitudes: Path | None = None) -> list[str]:
    """The overrides of configs/run.yaml that make one job's guided run: the observables of ``cell.observables``
    with their data (``map_path``, ``amplitudes``), each weighted by ``cell.strength``."""
    from omegaconf import OmegaConf

    entry = prep.entry
    predictors = OmegaConf.to_container(cfg.predictors, resolve=True) if cfg.get("predictors") else {}
    predictor_over = [str(o) for o in (predictors.get(cell.predictor) or [])]
    # a grid label may name a variant of a predictor: its overrides then choose the config (predictor=reference)
    if not any(o.startswith("predictor=") for o in predictor_over):
        predictor_over.insert(0, f"predictor={cell.predictor}")
    guided_by = cell.guided_by
    over = [f"structure={prep.structure}", f"observables=[{','.join(guided_by)}]",
            f"reference_regions=[{','.join(repr(f'{c}:{a}-{b}') for c, a, b in prep.regions)}]"]
    if "density" in guided_by:
        over += [f"observables.density.map={map_path}", f"observables.density.resolution={resolution}",
                 f"observables.density.weight={cell.strength}"]
    if "xray" in guided_by:
        if amplitudes is None:
            raise BenchError(f"{entry.name}: an xray-guided job needs amplitudes; the entry has an experimental map "
                             "and no amplitudes (synthetic amplitudes are made only for entries without a map)")
        over += [f"observables.xray.data={amplitudes}", f"observables.xray.weight={cell.strength}"]
    over += [f"guidance={cell.guidance}", f"ensemble_size={cell.ensemble_size}",
             f"seed={cell.seed}", "output.plots=false", "output.particles=false", "mode=sample"]
    if entry.mtz_columns and "density" in guided_by:
        over.append(f"observables.density.mtz_columns={entry.mtz_columns}")
    over += _potential_overrides(cell.potentials)
    over += predictor_over
    methods = OmegaConf.to_container(cfg.methods, resolve=True) if cfg.get("methods") else {}
    over += [str(o) for o in (methods.get(cell.guidance) or [])]
    over += [str(o) for o in (cfg.get("run") or [])]
    return over


def run_job(cfg, cell: Cell, out_dir: Path) -> dict:
    """One cell: prepare (cached), run the guided sampling, compute the metrics, write ``results/<key>.json``."""
    from hydra import compose

    from guidance.app.job import run as run_one
    from guidance.structures.io import match_layouts, read_structure

    result_path = out_dir / "results" / f"{cell.key}.json"
    if result_path.is_file() and not cfg.force:
        previous = json.loads(result_path.read_text())
        if previous.get("status") == "ok" or not cfg.retry_failed:
            log.info("skip %s (finished: %s)", cell.key, previous.get("status"))
            return previous
    t0 = time.perf_counter()
    record = {"key": cell.key, "cell": asdict(cell), "status": "failed", "pid": os.getpid()}
    try:
        entries = {e.name: e for e in read_manifest(cfg.manifest)}
        if cell.entry not in entries:
            raise BenchError(f"entry {cell.entry!r} is not in the manifest {cfg.manifest}")
        entry = entries[cell.entry]
        syn = cfg.synthetic
        prep = prepare_entry(entry, out_dir / "entries" / entry.name, min_span=int(cfg.regions.min_span),
                             carve=cfg.regions.carve, box_padding=float(syn.get("box_padding", 8.0)))
        resolution = float(entry.resolution or syn.resolution)
        amplitudes = None
        if entry.map is not None:
            map_path = entry.map
        else:
            snr = syn.snr
            name = f"map_b{cell.occupancy:g}_{resolution:g}A" + (f"_snr{snr:g}" if snr else "") + ".ccp4"
            map_path = synthetic_map(prep, cell.occupancy, resolution, out_dir / "entries" / entry.name / name,
                                     b_factor=float(syn.b_factor), snr=snr, seed=int(syn.seed))
            f_noise, free = float(syn.get("f_noise", 0.05)), float(syn.get("free_fraction", 0.05))
            name = f"amplitudes_b{cell.occupancy:g}_{resolution:g}A_noise{f_noise:g}_free{free:g}_seed{syn.seed}.mtz"
            amplitudes = synthetic_amplitudes(prep, cell.occupancy, resolution, out_dir / "entries" / entry.name / name,
                                              b_factor=float(syn.b_factor), f_noise=f_noise, free_fraction=free,
                                              seed=int(syn.seed))
        job_dir = out_dir / "jobs" / cell.key
        run_cfg = compose(config_name="run",
                          overrides=run_overrides(cfg, cell, prep, map_path, resolution, job_dir, amplitudes))
        t_run = time.perf_counter()
        run_metrics = run_one(run_cfg, job_dir)  # writes the job directory, metrics.json included
        sampling_s = time.perf_counter() - t_run
        ens = read_structure(job_dir / "ensemble.cif")
        match = match_layouts(prep.layout, ens.layout)
        if match.missing_in_src:  # predictor atoms absent from the structure are dropped; the reverse is an error
            log.info("%s: %d ensemble atoms not in the structure (ignored)", cell.key, len(match.missing_in_src))
        if match.missing_in_dst:
            raise BenchError(f"{cell.key}: {len(match.missing_in_dst)} structure atoms are not in the sampled "
                             f"ensemble (e.g. {match.missing_in_dst[:3]}): the predictor does not model them")
        members = np.zeros((len(ens.ids), len(prep.layout), 3))
        members[:, match.src_index] = ens.coords[:, match.dst_index]
        metrics = bench_metrics(prep, members, np.asarray(ens.weights), cell.occupancy, map_path, resolution,
                                run_metrics["reference"], recovery_threshold=float(cfg.recovery_threshold))
        t_x = time.perf_counter()
        metrics.update(xray_metrics(prep, members, np.asarray(ens.weights), amplitudes))
        metrics.update(multiconformer_metrics(prep, job_dir, run_metrics, cell.occupancy, amplitudes))
        metrics["xray_metrics_s"] = time.perf_counter() - t_x
        metrics["sampling_s"] = sampling_s
        run_obs = run_metrics["observables"]
        metrics["density_rscc_run"] = run_obs.get("density", {}).get("rscc")
        metrics["xray_r_free_run"] = run_obs.get("xray", {}).get("r_free")
        metrics["xray_r_work_run"] = run_obs.get("xray", {}).get("r_work")
        record.update(status="ok", metrics=metrics, map=str(map_path), regions=[list(r) for r in prep.regions],
                      amplitudes=None if amplitudes is None else str(amplitudes),
                      crystal=None if prep.crystal is None else {
                          "cell": list(prep.crystal[0]), "space_group": prep.crystal[1], "source": prep.crystal_source})
    except Exception as exc:  # a crashed job is a result too: record it and let the others run
        record.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=8))
        log.error("job %s failed: %s: %s", cell.key, type(exc).__name__, exc)
    record["wall_s"] = time.perf_counter() - t0
    write_json(result_path, record)
    _progress(out_dir)
    return record


def _progress(out_dir: Path) -> None:
    plan = out_dir / "plan.json"
    keys = json.loads(plan.read_text())["jobs"] if plan.is_file() else []
    done = failed = 0
    for k in keys:
        p = out_dir / "results" / f"{k}.json"
        if p.is_file():
            done += 1
            try:
                failed += json.loads(p.read_text()).get("status") != "ok"
            except json.JSONDecodeError:
                pass
    if keys:
        log.info("progress: %d/%d jobs finished (%d failed), %d left", done, len(keys), failed, len(keys) - done)


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(overrides for the bench config, hydra-only arguments such as hydra/launcher=joblib)."""
    ours, hydra_args = [], []
    for a in argv:
        (hydra_args if a.startswith(("hydra", "--")) or a == "-m" else ours).append(a)
    return ours, hydra_args


def plan(argv: list[str]):
    """Compose configs/bench.yaml with the user's overrides and expand the grid -> (cfg, cells)."""
    from hydra import compose, initialize_config_dir

    ours, _ = _split_overrides(argv)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="bench", overrides=[o for o in ours if not o.startswith("job.")])
    if cfg.manifest is None:
        raise BenchError("manifest=<file.csv|yaml> is required (see README: ensemble-bench)")
    entries = [e.name for e in read_manifest(cfg.manifest)]
    if cfg.get("entries"):
        unknown = [e for e in cfg.entries if e not in entries]
        if unknown:
            raise BenchError(f"entries {unknown} are not in the manifest ({entries})")
        entries = [e for e in entries if e in set(cfg.entries)]
    return cfg, expand_grid(entries, cfg.grid)


def main(argv: list[str] | None = None) -> int:
    """``ensemble-bench``: plan the grid, run it as one Hydra multirun, aggregate."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(levelname)s] %(message)s", datefmt="%H:%M:%S")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg, cells = plan(argv)
    except InputError as exc:  # a bad manifest, structure or option: one line
        log.error("%s", " ".join(str(exc).split()))
        return 1
    except (HydraException, OmegaConfBaseException) as exc:
        log.error("%s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return 1
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = [c.key for c in cells]
    write_json(out_dir / "plan.json", {"jobs": keys, "manifest": str(Path(cfg.manifest).resolve())})
    status = [_status(out_dir, k) for k in keys]
    finished = sum(s is not None for s in status)
    log.info("ensemble-bench: %d jobs (%d entries), %d already finished%s -> %s", len(keys),
             len({c.entry for c in cells}), finished, " (force: redoing them)" if cfg.force else "", out_dir)
    todo = cfg.force or any(s is None or (s != "ok" and cfg.retry_failed) for s in status)
    if todo:
        # the sweep: one Hydra job per cell (each finished one skips itself)
        ours, hydra_args = _split_overrides(argv)
        sweep = [f"job.cell={cell_list(cells)}"]
        sys_argv = sys.argv
        sys.argv = [sys_argv[0], "-m", *[o for o in ours if not o.startswith("job.")], *sweep,
                    *[a for a in hydra_args if a != "-m"]]
        GlobalHydra.instance().clear()
        try:
            hydra.main(version_base="1.3", config_path=config_dir(), config_name="bench")(_job_from_key)()
        finally:
            sys.argv = sys_argv
    rows = collect(out_dir, keys)
    paths = write_report(rows, out_dir)
    ok = sum(r["status"] == "ok" for r in rows)
    log.info("ensemble-bench: %d/%d jobs ok; %s, %s", ok, len(keys), paths["csv"], paths["report"])
    return 0 if rows else 1


def _status(out_dir: Path, key: str) -> str | None:
    path = out_dir / "results" / f"{key}.json"
    try:
        return json.loads(path.read_text()).get("status") if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _job_from_key(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    cell = _decode(cfg.job.cell)
    log.info("job %s (hydra job %s)", cell.key, HydraConfig.get().job.get("num", "-"))
    run_job(cfg, cell, Path(cfg.out_dir).expanduser().resolve())
