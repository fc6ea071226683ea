"""ensemble-bench: manifests, the grid, synthetic maps and amplitudes from independent forward models, the metrics
(R-free beside RSCC), and the bench as a whole on the altloc entries in ../shared/data (density- and xray-guided jobs,
resume after a kill, failed jobs, the joblib launcher)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from guidance.bench.app import run_overrides
from guidance.bench.entries import K_SOL, prepare_entry, synthetic_amplitudes, synthetic_map
from guidance.bench.manifest import BenchError, Cell, Entry, _decode, _encode, expand_grid, parse_regions, read_manifest
from guidance.bench.scoring import _map_correlations, xray_metrics

ROOT = Path(__file__).resolve().parents[1]
FAST = ["run=['sampler.steps=8']", "methods.fk=['guidance.particles=2']", "grid.ensemble_size=[2]",
        "grid.predictor=[reference]"]


def bench(*args, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guidance.bench", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


def write_manifest(path: Path, rows: list[str]) -> Path:
    path.write_text("name,structure,map,resolution,region\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def peptides():
    data = ROOT.parent / "shared" / "data" / "structures" / "multiconf-peptides"
    if not data.is_dir():
        pytest.skip(f"reference data not found: {data} (../shared/data is not part of a fresh clone)")
    return data


def test_regions_and_manifest_rows_are_checked(tmp_path, peptides):
    assert parse_regions("A:180-184; B:60") == (("A", 180, 184), ("B", 60, 60))
    with pytest.raises(BenchError, match="CHAIN:FIRST-LAST"):
        parse_regions("180-184")
    m = write_manifest(tmp_path / "m.csv", [f"awa,{peptides / 'AWA_2conf.pdb'},,1.5,A:2",
                                             f"gnn,{os.path.relpath(peptides / 'GNNAFNS_multiconf.pdb', tmp_path)},,,"])
    entries = read_manifest(m)
    assert [e.name for e in entries] == ["awa", "gnn"] and entries[1].structure.is_file()
    assert entries[0].regions == (("A", 2, 2),) and entries[1].regions == ()
    yaml_manifest = tmp_path / "m.yaml"
    yaml_manifest.write_text(f"entries:\n  - name: awa\n    structure: {peptides / 'AWA_2conf.pdb'}\n    region: A:2\n")
    assert read_manifest(yaml_manifest)[0].regions == (("A", 2, 2),)
    bad = write_manifest(tmp_path / "bad.csv", [f"awa,{peptides / 'AWA_2conf.pdb'},,1.5,A:2", "x,/nope.pdb,,,"])
    with pytest.raises(BenchError, match="row 3: structure not found"):
        read_manifest(bad)


def test_grid_expands_every_combination_with_unique_keys():
    grid = {"predictor": ["reference"], "guidance": ["none", "fk"], "ensemble_size": [2, 4], "strength": [1.0],
            "occupancy": [0.25, 0.75], "potentials": ["none", "geometry"], "seed": [0]}
    cells = expand_grid(["e1", "e2"], grid)
    assert len(cells) == 2 * 2 * 2 * 2 * 2 and len({c.key for c in cells}) == len(cells)
    cell = Cell("6b8x", "boltz2", "fk", 8, 2.5, 0.25, "geometry+boltz", 3)
    assert _decode(_encode(cell)) == cell and cell.observables == "density"


def test_the_observables_axis_makes_distinct_jobs_and_defaults_to_density():
    """grid.observables multiplies the jobs; the guiding data are part of every job's key, so density- and
    xray-guided results never collide; a grid without the axis is guided by the density alone."""
    grid = {"predictor": ["reference"], "guidance": ["fk"], "ensemble_size": [4], "strength": [1.0],
            "occupancy": [0.5], "potentials": ["none"], "seed": [0]}
    assert [c.observables for c in expand_grid(["e"], grid)] == ["density"]
    cells = expand_grid(["e"], {**grid, "observables": ["density", "xray", "density+xray"]})
    assert [c.observables for c in cells] == ["density", "xray", "density+xray"]
    assert len({c.key for c in cells}) == 3 and "__density-xray__" in cells[2].key
    assert _decode(_encode(cells[2])) == cells[2] and cells[2].guided_by == ["density", "xray"]
    with pytest.raises(BenchError, match="grid.observables"):
        expand_grid(["e"], {**grid, "observables": ["saxs"]})


def test_synthetic_map_is_the_mixture_and_the_metric_sees_it(tmp_path, peptides):
    """gemmi's DensityCalculator makes the map of the A/B mixture; the same mixture correlates perfectly, one state
    alone clearly less, and in the altloc region less than over the box."""
    (entry,) = read_manifest(write_manifest(tmp_path / "m.csv", [f"awa,{peptides / 'AWA_2conf.pdb'},,1.5,A:2"]))
    prep = prepare_entry(entry, tmp_path / "awa")
    path = synthetic_map(prep, 0.3, 1.5, tmp_path / "awa" / "map.ccp4")
    element = np.asarray(prep.layout.element).astype(str)
    region = np.concatenate([s[prep.region] for s in prep.states])
    mix = _map_correlations(prep.states, [0.7, 0.3], element, path, 1.5, region)
    a_only = _map_correlations(prep.states[:1], [1.0], element, path, 1.5, region)
    b_only = _map_correlations(prep.states[1:], [1.0], element, path, 1.5, region)
    assert mix["rscc_region"] > 0.9999 and mix["cc_box"] > 0.9999
    assert b_only["rscc_region"] < a_only["rscc_region"] < 0.95  # B carries 0.3 of the region's density
    assert a_only["rscc_region"] < a_only["cc_box"]


def test_synthetic_amplitudes_are_the_mixture_measured_in_the_entry_crystal(tmp_path, peptides):
    """The MTZ reads back with the project's reader in the entry's own crystal, to the entry's resolution, with 5 %
    free reflections and sigma = f_noise |F|; its amplitudes at occupancy 0.5 correlate with gemmi's own direct
    summation of the 0.5/0.5 altloc model (where bulk solvent is small, d < 3 A); scored by the project's xray
    observable the true mixture reaches R at the noise level with the synthetic k_sol, altloc A alone does not."""
    import gemmi

    from guidance.structures.io import read_structure
    from observables.reflections import read_reflections

    (entry,) = read_manifest(write_manifest(tmp_path / "m.csv", [f"awa,{peptides / 'AWA_2conf.pdb'},,1.5,A:2"]))
    prep = prepare_entry(entry, tmp_path / "awa")
    assert prep.crystal == read_structure(entry.structure).crystal == read_structure(prep.structure).crystal
    path = synthetic_amplitudes(prep, 0.5, 1.5, tmp_path / "awa" / "f.mtz", f_noise=0.05, free_fraction=0.05)
    refl = read_reflections(path)
    assert refl.columns == ["FP", "SIGFP"] and abs(refl.free.mean() - 0.05) < 0.005
    assert 1.5 <= refl.d_min < 1.55 and refl.space_group.xhm() == prep.crystal[1]
    assert np.allclose(refl.cell.parameters, prep.crystal[0])
    model = gemmi.read_structure(str(prep.structure))  # A and B at 0.5 each, B 20 A^2: the mixture at b = 0.5
    calc = gemmi.StructureFactorCalculatorX(model.cell)
    f_mix = np.abs([calc.calculate_sf_from_model(model[0], [int(i) for i in h]) for h in refl.hkl])
    high = refl.d_spacing < 3.0
    assert np.corrcoef(refl.f_obs[high], f_mix[high])[0, 1] > 0.99
    assert np.median(refl.sigma / refl.f_obs) == pytest.approx(0.05, rel=0.05)
    mixture = xray_metrics(prep, prep.states, np.array([0.5, 0.5]), path)
    a_only = xray_metrics(prep, prep.states[:1], np.array([1.0]), path)
    print("R-work/R-free: mixture", mixture["r_work"], mixture["r_free"], "A only", a_only["r_work"], a_only["r_free"])
    assert mixture["r_work"] < 0.06 and mixture["r_free"] < 0.08  # 5 % noise on |F|: R ~ 0.05 sqrt(2/pi) = 0.04
    assert mixture["k_sol"] == pytest.approx(K_SOL, abs=0.05)
    assert a_only["r_work"] > 3 * mixture["r_work"] and a_only["r_free"] > 2 * mixture["r_free"]


def test_a_model_without_a_cell_gets_a_p1_box_that_the_xray_observable_accepts(tmp_path, peptides):
    """A structure without CRYST1: the carved model is written in a P1 orthogonal cell spanning A and B plus the
    padding, the amplitudes are in that cell, and the xray observable's crystal check passes on the model."""
    from guidance.structures.io import read_structure

    source = (peptides / "GNNAFNS_multiconf.pdb").read_text().splitlines(keepends=True)
    bare = tmp_path / "gnn_nocell.pdb"
    bare.write_text("".join(line for line in source if not line.startswith("CRYST1")))
    prep = prepare_entry(Entry("gnn", bare, resolution=2.0), tmp_path / "gnn", box_padding=8.0)
    span = prep.states.reshape(-1, 3).max(0) - prep.states.reshape(-1, 3).min(0)
    assert prep.crystal[1] == "P 1" and np.allclose(prep.crystal[0][:3], span + 16.0, atol=2e-3)
    assert read_structure(prep.structure).crystal == prep.crystal
    path = synthetic_amplitudes(prep, 0.5, 2.0, tmp_path / "gnn" / "f.mtz")
    r = xray_metrics(prep, prep.states, np.array([0.5, 0.5]), path)
    assert r["r_work"] < 0.06 and np.isfinite(r["r_free"])


def test_without_amplitudes_r_is_empty_and_xray_guidance_is_refused(tmp_path, peptides):
    """An entry with an experimental map has no amplitudes: its carved model gets no made-up cell, its R values are
    None (empty cells, not 0) and an xray-guided job of it fails with a message instead of guessing data; the
    overrides of a density+xray job give each observable its data and the grid's strength."""
    from omegaconf import OmegaConf

    from guidance.structures.io import read_structure

    entry = Entry("awa", peptides / "AWA_2conf.pdb", tmp_path / "map.ccp4", 1.5, (("A", 2, 2),))
    prep = prepare_entry(entry, tmp_path / "awa")
    assert prep.crystal is None and read_structure(prep.structure).crystal is None
    with pytest.raises(BenchError, match="experimental map"):
        synthetic_amplitudes(prep, 0.5, 1.5, tmp_path / "f.mtz")
    assert all(v is None for v in xray_metrics(prep, prep.states, np.array([0.5, 0.5]), None).values())
    cfg = {"predictors": {}, "methods": {}, "run": []}
    cell = Cell("awa", "reference", "fk", observables="xray")
    with pytest.raises(BenchError, match="needs amplitudes"):
        run_overrides(OmegaConf.create(cfg), cell, prep, tmp_path / "map.ccp4", 1.5, tmp_path / "job", None)
    over = run_overrides(OmegaConf.create(cfg), Cell("awa", "reference", "fk", strength=2.0,
                                                     observables="density+xray"),
                         prep, tmp_path / "map.ccp4", 1.5, tmp_path / "job", tmp_path / "f.mtz")
    assert "observables=[density,xray]" in over and f"observables.xray.data={tmp_path / 'f.mtz'}" in over
    assert "observables.xray.weight=2.0" in over and "observables.density.weight=2.0" in over


def test_density_and_xray_guided_jobs_both_report_r_free(tmp_path, peptides):
    """One small entry, FK guided by the map and by the amplitudes: both jobs finish with a finite R-free against the
    synthetic amplitudes beside RSCC; the xray-guided job's R-free is the one its own run reported for the same
    ensemble; the report has the R-free column; a second run skips both jobs."""
    manifest = write_manifest(tmp_path / "m.csv", [f"awa,{peptides / 'AWA_2conf.pdb'},,1.5,A:2"])
    out = tmp_path / "out"
    args = [f"manifest={manifest}", f"out_dir={out}", *FAST, "grid.guidance=[fk]", "grid.observables=[density,xray]",
            "run=['sampler.steps=8','refine.cycles=2','refine.weight_scan=[-4,-2]']"]
    proc = bench(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["observables"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert sorted(rows) == ["density", "xray"] and all(r["status"] == "ok" for r in rows.values())
    for r in rows.values():
        assert np.isfinite(float(r["r_free"])) and np.isfinite(float(r["r_work"])) and r["rscc_region"] != ""
    record = json.loads((out / "results" / f"{rows['xray']['key']}.json").read_text())
    assert record["metrics"]["r_free"] == pytest.approx(record["metrics"]["xray_r_free_run"], abs=1e-3)
    assert "mean R-free" in (out / "report.md").read_text()
    # the xray-guided job's multiconformer model was refined against the amplitudes (refine.enabled=auto), the
    # density-guided one was not (a map cannot be refined against yet); mode=score of the written file gives back
    # the R values the run reported for it
    job = out / "jobs" / rows["xray"]["key"]
    mc = json.loads((job / "metrics.json").read_text())["multiconformer"]
    assert "refinement" not in json.loads((out / "jobs" / rows["density"]["key"] / "metrics.json").read_text())[
        "multiconformer"]
    ref = mc["refinement"]
    # (8 sampler steps here: the members are far from a structure, so only "better" is asked of the geometry)
    assert ref["after"]["bond_rmsz"] < ref["before"]["bond_rmsz"] and "automatic" in ref["weight_rule"]
    assert ref["after"]["ml_free"] >= ref["before"]["ml_free"] or ref["before"]["bond_rmsz"] > 1.0
    assert record["metrics"]["mc_r_free"] == mc["observables"]["xray"]["r_free"]
    assert set(mc["validation"]["model"]) >= {"ramachandran", "rotamers", "clashes"}
    from hydra import compose, initialize_config_dir

    from guidance.app.job import config_dir, run

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for ext in ("pdb", "cif"):
            cfg = compose("run", overrides=["mode=score", f"structure={job / f'multiconformer.{ext}'}",
                                            "observables=[xray]", f"observables.xray.data={record['amplitudes']}"])
            score = run(cfg, tmp_path / f"score_{ext}")["observables"]["xray"]
            for key in ("r_work", "r_free"):
                assert score[key] == pytest.approx(mc["observables"]["xray"][key], abs=0.002), ext
    again = bench(*args)
    assert again.returncode == 0 and "2 already finished" in again.stderr, again.stderr[-3000:]


@pytest.fixture(scope="module")
def ci_bench(tmp_path_factory):
    """The CI-sized bench: benchmarks/altloc_small.csv (6b8x 180-184, 1vme 326-339, the eight multiconformer
    peptides), the single-state reference prior with rotamers (predictors.rotamers: altloc A only), guidance none and
    fk."""
    manifest = ROOT / "benchmarks" / "altloc_small.csv"
    data = ROOT.parent / "shared" / "data" / "structures"
    if not data.is_dir():
        pytest.skip(f"reference data not found: {data} (../shared/data is not part of a fresh clone)")
    out = tmp_path_factory.mktemp("bench")
    t0 = time.perf_counter()
    proc = bench(f"manifest={manifest}", f"out_dir={out}", "grid.predictor=[rotamers]", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, time.perf_counter() - t0


@pytest.mark.slow  # the 20-job CI bench, about 210 s: python -m pytest -q -m slow
def test_ci_bench_writes_results_report_and_plots(ci_bench):
    out, wall = ci_bench
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 20 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    report = (out / "report.md").read_text()
    assert "Recovery of altloc B" in report and "| 6b8x |" in report and "| 1vme |" in report
    assert (out / "plots" / "tradeoff.png").stat().st_size > 0 and (out / "plots" / "recovery.png").stat().st_size > 0
    for r in rows:  # every metric of the issue is there
        for k in ("rscc_region", "cc_box", "r_work", "r_free", "best_rmsd_A", "best_rmsd_B", "recovered_B",
                  "fraction_error_B", "lddt_A", "lddt_B", "clashes_per_1000_atoms", "bond_rmsz", "angle_rmsz",
                  "wall_s"):
            if r["entry"] == "TRS" and k in ("bond_rmsz", "angle_rmsz", "lddt_A", "lddt_B"):
                # Tris, one non-protein residue: no Engh & Huber geometry, no inter-residue pair for LDDT
                assert r[k] in ("", "nan"), (r["key"], k)
                continue
            assert r[k] not in ("", "nan"), (r["key"], k)
        # the job directory is a run's: the same metrics.json, whose reference block the bench's figures come from
        metrics = json.loads((out / "jobs" / r["key"] / "metrics.json").read_text())
        assert {"observables", "ensemble", "geometry", "reference", "sampling", "config"} <= set(metrics)
        assert metrics["config"]["mode"] == "sample" and "density" in metrics["observables"]
        ref = metrics["reference"]
        assert float(r["fraction_B"]) == pytest.approx(ref["altlocs"]["B"]["assigned_fraction"], abs=1e-9)
        assert float(r["best_rmsd_B"]) == pytest.approx(ref["altlocs"]["B"]["best_rmsd"], abs=1e-9)
        assert ref["region"] == ";".join(f"{c}:{a}-{b}" for c, a, b in
                                          json.loads((out / "results" / f"{r['key']}.json").read_text())["regions"])
    print(f"CI bench: 20 jobs in {wall:.0f} s")


@pytest.mark.slow  # the 20-job CI bench, about 210 s: python -m pytest -q -m slow
def test_fk_guidance_fits_the_map_better_than_no_guidance_in_every_entry(ci_bench):
    out, _ = ci_bench
    rows = list(csv.DictReader((out / "results.csv").open()))
    by = {(r["entry"], r["guidance"]): float(r["rscc_region"]) for r in rows}
    for entry in {r["entry"] for r in rows}:
        assert by[(entry, "fk")] > by[(entry, "none")], entry


@pytest.mark.slow  # the 20-job CI bench, about 210 s: python -m pytest -q -m slow
def test_fk_recovers_b_in_more_entries_than_no_guidance(ci_bench):
    """The issue's acceptance point: from a prior built on altloc A alone, FK guidance by the map of the A/B mixture
    brings some member within 1.0 A of B in more entries than unguided sampling, and the report says so."""
    out, _ = ci_bench
    rows = list(csv.DictReader((out / "results.csv").open()))
    recovered = {g: sorted(r["entry"] for r in rows if r["guidance"] == g and r["recovered_B"] == "True")
                 for g in ("none", "fk")}
    print("entries with B recovered:", recovered)
    assert len(recovered["fk"]) > len(recovered["none"]), recovered
    report = (out / "report.md").read_text()
    n = len({r["entry"] for r in rows})
    for g in ("none", "fk"):
        assert (f"| rotamers | {g} | density | 1 | none | {len(recovered[g])}/{n} ({', '.join(recovered[g]) or '-'}) |"
                in report)


def test_a_killed_bench_resumes_without_redoing_finished_jobs(tmp_path, peptides):
    manifest = write_manifest(tmp_path / "m.csv", [f"awa,{peptides / 'AWA_2conf.pdb'},,1.5,A:2",
                                                    f"gnn,{peptides / 'GNNAFNS_multiconf.pdb'},,1.5,"])
    out = tmp_path / "out"
    args = [sys.executable, "-m", "guidance.bench", f"manifest={manifest}", f"out_dir={out}", *FAST]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    results = out / "results"
    deadline = time.time() + 300
    while time.time() < deadline and not (results.is_dir() and len(list(results.glob("*.json"))) >= 1):
        assert proc.poll() is None, f"the bench stopped before any job finished: {proc.stderr.read()[-2000:]}"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in results.glob("*.json")}
    assert 1 <= len(first) < 4, "the kill came too late to test resuming"
    again = bench(f"manifest={manifest}", f"out_dir={out}", *FAST)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(first)} already finished" in again.stderr
    final = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in results.glob("*.json")}
    assert len(final) == 4
    for name, before in first.items():
        assert final[name] == before, f"{name} was redone"
    assert all(json.loads(v[1])["status"] == "ok" for v in final.values())


def test_a_failing_job_is_recorded_and_the_others_run_in_parallel_with_joblib(tmp_path, peptides):
    """An entry without altlocs fails with its error in the results; the other entry's jobs finish; the jobs run
    through Hydra's joblib launcher."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    manifest = write_manifest(tmp_path / "m.csv", [f"awa,{peptides / 'AWA_2conf.pdb'},,1.5,A:2",
                                                    f"single,{peptides / 'AWA_single.pdb'},,1.5,A:2"])
    out = tmp_path / "out"
    proc = bench(f"manifest={manifest}", f"out_dir={out}", *FAST, "hydra/launcher=joblib",
                 "hydra.launcher.n_jobs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout
    pids = {json.loads(p.read_text())["pid"] for p in (out / "results").glob("*.json")}
    assert len(pids) >= 1 and os.getpid() not in pids  # the jobs ran in joblib's worker processes
    rows = {r["key"]: r for r in csv.DictReader((out / "results.csv").open())}
    failed = [r for r in rows.values() if r["status"] != "ok"]
    assert len(rows) == 4 and len(failed) == 2 and all(r["entry"] == "single" for r in failed)
    assert all("no alternate conformations" in r["error"] for r in failed)
    assert "Failed jobs" in (out / "report.md").read_text()
