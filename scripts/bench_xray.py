"""Benchmark the X-ray likelihood (observables/xray.py) against gemmi's FFT structure factors in the same run.

Crystals: copies of a real protein's atoms (its elements and B-factors; 6NI6 from ../shared/data when present, else
protein-like random chains with B 10-60 A^2) placed in a P2(1)2(1)2(1) cell whose volume gives 2.5 A^3/Da (about
half solvent), as many atoms in the asymmetric unit as asked.  Reflections: the whole asymmetric unit to d_min, with
amplitudes from gemmi plus 5 % noise and a 5 % free set.

Timed (jit warm, median of --repeats):
- gemmi forward: DensityCalculatorX (refmac-compatible blur, rate 1.5) put_model_density_on_grid (all symmetry copies)
  + transform_map_to_f_phi, i.e. F_calc of the whole cell (gemmi's FFT route; one thread);
- jax F_calc: XrayObservable.f_calc (the FFT route of observables/sfcalc.py);
- jax loglik + grad: jax.value_and_grad of the ML log-likelihood in the coordinates (what guidance calls), one member;
  and for an ensemble of --members members.
Ratios are jax time / gemmi forward time measured in the same process.  Peak memory: the growth of the process's
peak resident memory during the JAX calls (compilation included; /proc VmHWM, reset before each case).
Usage: python scripts/bench_xray.py [--cases 2000:2.0 2000:1.2 20000:2.0] [--repeats 5] [--members 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import gemmi
import jax
import numpy as np

from observables.base import AtomInfo, Crystal
from observables.reflections import Reflections
from observables.xray import XrayObservable, atoms_structure

SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "structures" / "altloc" / "6NI6_single_001.pdb"
DALTON_PER_ATOM = 14.0  # heavy atom + its share of hydrogens, Da


def source_atoms(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Elements, coordinates (centred) and B-factors of one protein model."""
    if SOURCE.is_file():
        st = gemmi.read_structure(str(SOURCE))
        st.setup_entities()
        st.remove_hydrogens()
        st.remove_ligands_and_waters()
        atoms = [a for ch in st[0] for r in ch for a in r if not a.has_altloc() or a.altloc == "A"]
        el = np.array([a.element.name for a in atoms])
        xyz = np.array([a.pos.tolist() for a in atoms])
        b = np.array([a.b_iso for a in atoms])
        return el, xyz - xyz.mean(0), b, SOURCE.name
    rng = np.random.default_rng(seed)
    n = 5000
    steps = rng.normal(size=(n, 3))
    xyz = np.cumsum(1.5 * steps / np.linalg.norm(steps, axis=1, keepdims=True), axis=0)
    el = rng.choice(["C", "N", "O", "S"], size=n, p=[0.63, 0.17, 0.19, 0.01])
    return el, xyz - xyz.mean(0), rng.uniform(10, 60, n), "random chains"


def crystal(n_atoms: int, seed: int):
    """A P2(1)2(1)2(1) crystal with ``n_atoms`` atoms in the asymmetric unit."""
    el, xyz, b, what = source_atoms(seed)
    rng = np.random.default_rng(seed)
    volume = 4 * n_atoms * DALTON_PER_ATOM * 2.5
    edges = np.array([0.8, 1.0, 1.25]) * (volume / 1.0) ** (1 / 3)
    reps = -(-n_atoms // len(el))
    parts = [xyz + rng.uniform(0, 1, 3) * edges for _ in range(reps)]
    coords = np.concatenate(parts)[:n_atoms].astype(np.float32)
    elements = np.tile(el, reps)[:n_atoms]
    b_iso = np.tile(b, reps)[:n_atoms].astype(np.float32)
    cell = gemmi.UnitCell(*edges, 90, 90, 90)
    return cell, gemmi.SpaceGroup("P 21 21 21"), elements, coords, b_iso, what


def gemmi_forward(st: gemmi.Structure, d_min: float):
    from guidance.structures.maps import structure_factors

    return structure_factors(st, d_min)


def _peak_rss() -> int | None:
    """Peak resident memory of this process (kB), from /proc (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> int | None:
    """Reset the peak to the current resident memory (Linux: clear_refs 5) and return it (kB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _peak_rss()


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def run_case(n_atoms: int, d_min: float, repeats: int, members: int, seed: int) -> dict:
    cell, sg, elements, coords, b_iso, what = crystal(n_atoms, seed)
    st = atoms_structure(elements, coords, None, b_iso, cell=cell, space_group=sg)
    gemmi_forward(st, d_min)  # warm
    t_gemmi = median_ms(lambda: gemmi_forward(st, d_min), repeats)
    sf, dc = gemmi_forward(st, d_min)
    hkl = np.array(gemmi.make_miller_array(cell, sg, d_min), dtype=np.int64)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    f_calc = np.array([abs(sf.get_value(*map(int, h))) for h in hkl]) * np.exp(dc.blur * cell.calculate_1_d2_array(hkl.astype(float)) / 4)
    rng = np.random.default_rng(seed)
    f_obs = np.abs(f_calc * (1 + 0.05 * rng.normal(size=len(hkl)))) + 1e-3
    free = rng.uniform(size=len(hkl)) < 0.05
    refl = Reflections(hkl, f_obs, 0.05 * f_obs + 1.0, free, cell, sg, Path("synthetic"), ["F", "SIGF"], "random 5 %")
    atoms = AtomInfo(elements, np.array(["X"] * n_atoms), np.array(["UNK"] * n_atoms), np.zeros(n_atoms, int),
                     np.array(["A"] * n_atoms), coords=coords[None], weights=np.ones(1), b_iso=b_iso,
                     crystal=Crystal(tuple(cell.parameters), sg.xhm()))
    obs = XrayObservable(atoms, data=refl)
    x1 = jax.numpy.asarray(coords[None])
    w1 = jax.numpy.ones(1)
    ens = jax.numpy.asarray(np.stack([coords + rng.normal(0, 0.3, coords.shape).astype(np.float32)
                                      for _ in range(members)]))
    we = jax.numpy.full(members, 1.0 / members)
    fc = jax.jit(obs.f_calc)
    vg = jax.jit(jax.value_and_grad(lambda x, w: obs.log_likelihood(x, w)))
    rss0 = _reset_peak_rss()
    for f in (lambda: fc(x1, w1), lambda: vg(x1, w1), lambda: vg(ens, we)):
        jax.block_until_ready(f())  # compile
    t_fc = median_ms(lambda: fc(x1, w1), repeats)
    t_vg = median_ms(lambda: vg(x1, w1), repeats)
    t_ens = median_ms(lambda: vg(ens, we), repeats)
    rss1 = _peak_rss()
    report = obs.report(np.asarray(x1), np.ones(1))
    return {
        "atoms": n_atoms, "d_min": d_min, "reflections": len(hkl), "source": what, "cell": list(cell.parameters)[:3],
        "jax_grid": list(obs.sf.grid.shape), "gemmi_grid": [dc.grid.nu, dc.grid.nv, dc.grid.nw],
        "window_values": obs.sf.spreader.values_per_atom(), "gemmi_forward_ms": t_gemmi, "jax_fcalc_ms": t_fc,
        "jax_loglik_grad_ms": t_vg, f"jax_loglik_grad_{members}_members_ms": t_ens,
        "ratio_fcalc": t_fc / t_gemmi, "ratio_loglik_grad": t_vg / t_gemmi,
        f"ratio_loglik_grad_{members}_members": t_ens / t_gemmi,
        "peak_rss_growth_mb": (rss1 - rss0) / 1024.0 if rss0 is not None else None, "r_work_of_truth": report["r_work"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["2000:2.0", "2000:1.2", "20000:2.0"], help="atoms:d_min")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, jax {jax.__version__} on {jax.default_backend()}, "
          f"gemmi {gemmi.__version__}", file=sys.stderr)
    header = "atoms  d_min  refl    gemmi fwd ms  jax F ms  jax LL+grad ms  ens LL+grad ms  ratio LL+grad  peak MB"
    print(header)
    for case in args.cases:
        n, d = case.split(":")
        row = run_case(int(n), float(d), args.repeats, args.members, args.seed)
        print(f"{row['atoms']:>5}  {row['d_min']:>5.2f}  {row['reflections']:>6}  {row['gemmi_forward_ms']:>12.1f}  "
              f"{row['jax_fcalc_ms']:>8.1f}  {row['jax_loglik_grad_ms']:>14.1f}  "
              f"{row[f'jax_loglik_grad_{args.members}_members_ms']:>14.1f}  {row['ratio_loglik_grad']:>13.2f}  "
              f"{row['peak_rss_growth_mb']:>7.0f}")
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
