"""ensemble-bench's metrics of one job's ensemble: RSCC and CC against the map (gemmi's model map,
guidance.structures.maps), R-work/R-free against the amplitudes (the project's xray observable in score fashion),
best RMSD, recovery, assigned fractions (from the run's own metrics.json:reference), LDDT and geometry."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from guidance.bench.entries import Prepared
from guidance.bench.manifest import BenchError

log = logging.getLogger("ensemble_bench")


def _map_correlations(members, weights, element, map_path: Path, resolution: float, region_points: np.ndarray,
                      b_factor: float = 20.0, radius: float = 2.0) -> dict:
    """RSCC within ``radius`` A of ``region_points`` and CC over the box, between the map and the weighted ensemble's
    model map (gemmi DensityCalculatorX on the map's grid)."""
    from guidance.structures.maps import atoms_density, correlation
    from observables.density import read_map

    target = read_map(map_path)
    shape = np.array(target.shape)
    spacing = np.asarray(target.spacing)
    margin = np.ceil(8.0 / spacing).astype(int)
    size = shape + 2 * margin
    size = size + size % 2
    start = np.round(np.asarray(target.origin) / spacing).astype(int) - margin
    xyz = np.concatenate([np.asarray(c) for c in members]) - start * spacing  # shifted into the cell
    occ = np.repeat(np.asarray(weights, dtype=np.float64), len(element))
    grid = atoms_density(xyz, np.tile(element, len(members)), occ, b_factor, resolution, size, spacing)
    model_map = np.array(grid.get_subarray(margin.tolist(), shape.tolist()), dtype=np.float64)
    values = np.asarray(target.values, dtype=np.float64)
    axes = [np.asarray(target.origin)[k] + np.arange(shape[k]) * spacing[k] for k in range(3)]
    grid_points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    from scipy.spatial import cKDTree

    near = cKDTree(region_points).query(grid_points, distance_upper_bound=radius)[0] <= radius

    return {"rscc_region": correlation(values.reshape(-1)[near], model_map.reshape(-1)[near]),
            "cc_box": correlation(values, model_map), "region_grid_points": int(near.sum())}


def bench_metrics(prep: Prepared, members: np.ndarray, weights: np.ndarray, occupancy_b: float, map_path: Path,
                  resolution: float, reference: dict, *, recovery_threshold: float = 1.0) -> dict:
    """The per-job metrics of the module docstring for an ensemble ``members [E, N, 3]`` on ``prep.layout``;
    ``reference`` is the run's metrics.json:reference over the entry's regions (best RMSD and assigned fraction per
    altloc: guidance.structures.altlocs, the one definition)."""
    from guidance.structures.metrics import geometry_report, lddt, region_rmsd, symmetric_swaps

    members = np.asarray(members, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    region = prep.region
    fit = ~region if (~region).sum() >= 3 else region  # a region covering (almost) everything: fit on itself
    swaps = symmetric_swaps(prep.layout)  # Asp/Glu/Phe/Tyr/Arg terminal atoms under their better naming
    out: dict = {"n_atoms": int(len(region)), "n_region_atoms": int(region.sum()),
                 "ab_region_rmsd": float(region_rmsd(prep.states[1], prep.states[0], region, fit, swaps))}
    true_occ = {"A": 1.0 - occupancy_b, "B": occupancy_b}
    residues = prep.layout.residue_index()  # LDDT leaves out pairs within a residue
    assign = reference.get("altlocs", {})
    if sorted(assign) != sorted(prep.ids):
        raise BenchError(f"{prep.entry.name}: the run's metrics.json:reference has altlocs {sorted(assign)}, "
                         f"expected {list(prep.ids)}")
    for k, alt in enumerate(prep.ids):
        out[f"best_rmsd_{alt}"] = float(assign[alt]["best_rmsd"])
        out[f"recovered_{alt}"] = bool(assign[alt]["best_rmsd"] <= recovery_threshold)
        try:
            out[f"lddt_{alt}"] = float(max(lddt(m, prep.states[k], residue_ids=residues) for m in members))
        except ValueError as exc:  # e.g. a one-residue entry (a ligand): inter-residue LDDT is undefined
            log.info("%s: LDDT to %s undefined (%s)", prep.entry.name, alt, exc)
            out[f"lddt_{alt}"] = float("nan")
        out[f"fraction_{alt}"] = assign[alt]["assigned_fraction"]
        out[f"fraction_error_{alt}"] = abs(assign[alt]["assigned_fraction"] - true_occ[alt])
    geo = geometry_report(prep.layout, members)
    out.update({"bond_rmsz": geo["bond_rmsz"], "angle_rmsz": geo["angle_rmsz"],
                "clashes_per_1000_atoms": geo["clashes_per_1000_atoms"]})
    element = np.asarray(prep.layout.element).astype(str)
    region_points = np.concatenate([s[region] for s in prep.states])
    out.update(_map_correlations(members, weights, element, map_path, resolution, region_points))
    return out


XRAY_KEYS = ("r_work", "r_free", "n_work", "n_free", "k_sol", "b_sol", "d_min")


@lru_cache(maxsize=4)
def _xray_scorer(structure: str, amplitudes: str, stamps: tuple):
    """The xray observable on the atoms of the carved model ``structure`` as a guided run builds it (B-factors,
    occupancies, crystal and fixed atoms from the file: guidance.app.build.structure_atoms) with data ``amplitudes`` ->
    (observable, layout).  Kept for the next jobs of the same entry and occupancy (``report`` leaves it unchanged;
    ``stamps``, the files' mtime and size, make a rewritten file a new key): building and compiling it costs more
    than scoring."""
    from guidance.app.build import structure_atoms
    from guidance.structures.io import match_layouts, read_structure
    from observables.base import AtomInfo
    from observables.xray import XrayObservable

    conf = read_structure(structure)
    extras = structure_atoms(conf, conf.layout, match_layouts(conf.layout, conf.layout))
    if extras.get("environment") is not None:  # the carved model holds the model's atoms only (module docstring)
        raise BenchError(f"{structure} has {len(extras['environment'])} atoms besides the model's; the synthetic "
                         "amplitudes do not contain them")
    atoms = AtomInfo.from_layout(conf.layout, coords=conf.coords, **extras)
    return XrayObservable(atoms, data=amplitudes), conf.layout


def xray_metrics(prep: Prepared, members: np.ndarray, weights: np.ndarray, amplitudes: Path | None) -> dict:
    """R-work and R-free (with n_work, n_free, k_sol, b_sol, d_min) of the ensemble ``members [E, N, 3]`` (on
    ``prep.layout``) at ``weights`` against ``amplitudes``, by the project's xray observable in score fashion
    (``_xray_scorer``): its ``report`` refits bulk solvent and scales to the ensemble.  Without amplitudes every
    value is None (empty in the tables, never 0)."""
    if amplitudes is None:
        return {k: None for k in XRAY_KEYS}
    from guidance.structures.io import match_layouts

    files = (Path(prep.structure), Path(amplitudes))
    stamps = tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    obs, layout = _xray_scorer(str(files[0]), str(files[1]), stamps)
    match = match_layouts(prep.layout, layout)
    if match.missing_in_src or match.missing_in_dst:
        raise BenchError(f"{prep.entry.name}: the carved model {prep.structure} does not hold the entry's atoms; "
                         "delete it to have it rewritten")
    x = np.zeros((len(members), len(layout), 3), np.float32)
    x[:, match.dst_index] = np.asarray(members, np.float32)[:, match.src_index]
    report = obs.report(x, np.asarray(weights, np.float32))
    return {k: report[k] for k in XRAY_KEYS}


def multiconformer_metrics(prep: Prepared, job_dir: Path, run_metrics: dict, occupancy_b: float,
                           amplitudes: Path | None) -> dict:
    """What the job's multiconformer.cif says against the truth: ``mc_r_work`` / ``mc_r_free`` (the run's own report
    of the refined model), ``true_r_free`` (the true A/B mixture at ``occupancy_b``) and ``start_r_free`` (state A
    alone), all by the same scorer (``xray_metrics``); ``mc_occupancy_B``, the occupancy the model gives state B
    over the region (per region residue, the summed occupancy of its altlocs nearer B than A, by RMSD over the
    residue's atoms; mean over the region's residues) and ``mc_occupancy_error_B`` against ``occupancy_b``."""
    from guidance.structures.multiconf import read_multiconf

    path = job_dir / "multiconformer.cif"
    out: dict = {"mc_r_work": None, "mc_r_free": None, "true_r_free": None, "start_r_free": None,
                 "mc_occupancy_B": None, "mc_occupancy_error_B": None}
    if not path.is_file():
        return out
    block = run_metrics.get("multiconformer", {})
    xr = block.get("observables", {}).get("xray", {})
    out["mc_r_work"], out["mc_r_free"] = xr.get("r_work"), xr.get("r_free")
    if amplitudes is not None:
        out["true_r_free"] = xray_metrics(prep, prep.states, np.array([1.0 - occupancy_b, occupancy_b]),
                                          amplitudes)["r_free"]
        out["start_r_free"] = xray_metrics(prep, prep.states[:1], np.ones(1), amplitudes)["r_free"]
    model = read_multiconf(path)
    index = {k: i for i, k in enumerate(prep.layout.keys())}
    region_residues = sorted({(c, r) for (c, r, _), inside in zip(prep.layout.keys(), prep.region) if inside})
    model_keys = model.layout.keys()
    shares = []
    for chain, res in region_residues:
        try:
            ids, x, occ, atoms = model.conformations(chain, res)
        except KeyError:
            continue
        keys = [model_keys[i] for i in atoms]
        mine = [j for j, k in enumerate(keys) if k in index]
        if not mine:
            continue
        theirs = [index[keys[j]] for j in mine]
        d_a = np.sqrt(((x[:, mine] - prep.states[0][theirs]) ** 2).sum(-1).mean(-1))
        d_b = np.sqrt(((x[:, mine] - prep.states[1][theirs]) ** 2).sum(-1).mean(-1))
        shares.append(float(np.sum(occ[d_b < d_a])))
    if shares:
        out["mc_occupancy_B"] = float(np.mean(shares))
        out["mc_occupancy_error_B"] = abs(out["mc_occupancy_B"] - occupancy_b)
    return out
