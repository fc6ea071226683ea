"""The output contract of a run, written here and nowhere else (``ensemble-guide`` and every ``ensemble-bench`` job
write the same job directory):

    ensemble.cif      multi-model mmCIF, one model per member, member weights recorded       (sample mode)
    metrics.json      observables / ensemble / geometry / reference / sampling / structure / runtime_s / config
    trajectory.csv    step, sigma, log-likelihood per observable, ESS/P; rewritten every 10 steps (sample mode)
    particles.npz     every FK particle and its weight (output.particles)                      (sample mode)
    multiconformer.pdb / .cif   the weighted ensemble as one model with altlocs A, B, ... (occupancies from the member
                      weights, members within ``multiconformer.threshold`` A of each other merged), per-atom B, the
                      input's cell, space group, waters, ligands and ions; refined against X-ray amplitudes
                      (``refine.*``: coordinates, B, occupancies) when the run has them            (sample mode)
    plots/*.png       log-likelihood and ESS vs step, member weights, and each observable's own plots (output.plots)
    run.log           the log; Hydra's saved config is in .hydra/

Every file is written atomically (a reader never sees half a file; an interrupted job leaves the previous one).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path

import numpy as np

from guidance.structures.io import atomic_write
from observables.errors import InputError

log = logging.getLogger("ensemble_guide")

TRAJECTORY_EVERY = 10  # steps between rewrites of trajectory.csv during sampling


def jsonable(obj):
    """``obj`` as JSON-ready Python: numpy scalars and arrays as numbers and lists, Paths as strings, non-finite
    floats as None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return jsonable(obj.item())
    return obj


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, json.dumps(jsonable(obj), indent=2))


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


def write_metrics(out_dir: Path, metrics: dict, cfg) -> Path:
    """metrics.json: the run's metrics and the composed config it ran with."""
    from omegaconf import OmegaConf

    metrics["config"] = OmegaConf.to_container(cfg, resolve=True)
    return write_json(out_dir / "metrics.json", metrics)


def headline(metrics: dict) -> dict:
    """Each observable's headline figures (its factory's ``headline`` keys) for the final log line."""
    import observables

    out = {}
    for name, rep in metrics.get("observables", {}).items():
        try:
            keys = tuple(getattr(observables.factory(name), "headline", ()))
        except InputError:  # a name no longer registered (an in-process plugin of another process): nothing shown
            keys = ()
        out[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in rep.items() if k in keys}
    return out


def log_summary(metrics: dict, out_dir: Path) -> None:
    for name, rep in metrics["observables"].items():
        if rep.get("warning"):
            log.warning("%s: %s", name, rep["warning"])
    ref = metrics.get("reference", {}).get("altlocs", {})
    log.info("done in %.1f s: %s%s -> %s", metrics["runtime_s"], headline(metrics),
             "; assigned fractions " + str({k: round(v["assigned_fraction"], 3) for k, v in ref.items()}) if ref else "",
             out_dir)


# ----------------------------------------------------------------------------------------------- sample mode


def write_ensemble(out_dir: Path, layout, members: np.ndarray, weights: np.ndarray, metadata: dict, *,
                   b_factors=None, crystal=None) -> Path:
    from guidance.structures.io import write_ensemble_cif

    return write_ensemble_cif(out_dir / "ensemble.cif", layout, members, weights, metadata=metadata,
                              b_factors=b_factors, crystal=crystal)


def write_multiconformer(out_dir: Path, model, options: dict, *, crystal=None, fixed_from=None) -> dict:
    """multiconformer.pdb and multiconformer.cif of ``model`` (a structures.multiconf.MulticonfModel, made with
    ``options``); returns what metrics.json says of them."""
    from guidance.structures.multiconf import write_multiconf

    files = [write_multiconf(out_dir / f"multiconformer.{ext}", model, crystal=crystal, fixed_from=fixed_from)
             for ext in ("pdb", "cif")]
    per_residue = model.altlocs()
    split = {k: v for k, v in per_residue.items() if len(v) > 1}
    return {"files": [f.name for f in files], "residues": len(per_residue), "residues_with_altlocs": len(split),
            "max_altlocs": max([1, *(len(v) for v in per_residue.values())]),
            "altlocs": {f"{c}{r}": {a: round(float(o), 4) for a, o in v.items()} for (c, r), v in split.items()},
            "options": options}


def write_particles(out_dir: Path, particles: np.ndarray, weights: np.ndarray) -> Path:
    return write_npz(out_dir / "particles.npz", particles=particles, weights=weights)


class TrajectoryWriter:
    """The sampler's callback side of trajectory.csv: rows kept as they come, the file rewritten every
    ``TRAJECTORY_EVERY`` steps and on interruption, with the particles of the last step beside it then."""

    def __init__(self, path: Path, n_particles: int):
        self.path, self.n_particles = path, n_particles
        self.rows: list[dict] = []
        self.latest_x = None

    def add(self, row: dict, x) -> None:
        self.rows.append(row)
        self.latest_x = x
        if len(self.rows) % TRAJECTORY_EVERY == 0:
            write_trajectory(self.path, self.rows)

    def interrupted(self) -> str:
        """Write what there is; returns where it went (for the message)."""
        write_trajectory(self.path, self.rows)
        where = f"the trajectory so far is in {self.path}"
        if self.latest_x is not None:
            partial = self.path.with_name("particles_interrupted.npz")
            x = self.latest_x.reshape(self.n_particles, -1, *self.latest_x.shape[1:]).cpu().numpy()
            write_npz(partial, particles=x, step=self.rows[-1]["step"])
            where += f" and the particles at that step in {partial}"
        return where

    def finish(self, rows: list[dict]) -> Path:
        return write_trajectory(self.path, rows)


# ----------------------------------------------------------------------------------------------- plots


def write_data_plots(plots: Path, objective, members: np.ndarray, weights: np.ndarray, reports: dict) -> list[Path]:
    """Each observable's plots of its fit (its ``plots(coords, weights, report) -> [PlotSpec]``), drawn by
    guidance.app.plots."""
    from guidance.app.plots import draw

    plots.mkdir(parents=True, exist_ok=True)
    out = []
    for t in objective.terms:
        specs = getattr(t.observable, "plots", None)
        if not callable(specs):
            continue
        for spec in specs(members, weights, reports.get(t.name, {})):
            out.append(draw(spec, plots))
    return out


def write_sample_plots(plots: Path, trajectory, objective, members, uniform, weights, refined: bool,
                       reports: dict) -> None:
    from guidance.app.plots import plot_trajectory, plot_weights

    plot_trajectory(trajectory, plots / "trajectory.png")
    if refined:
        plot_weights(uniform, weights, plots / "weights.png")
    write_data_plots(plots, objective, members, weights, reports)
