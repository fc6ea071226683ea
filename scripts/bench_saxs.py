"""Benchmark the SAXS observable (exact and fast Debye sums) against a plain NumPy Debye sum, on CPU.

Atoms: protein-like random chains (1.5 A steps; N, CA, C, O, CB per residue, so implicit hydrogens apply) packed in a
sphere at the heavy-atom density of proteins (0.05 atoms / A^3); the profile has ``--q-points`` q values in
[0.01, 0.5] 1/A (a Guinier-like synthetic curve: its values do not change the cost).

For each size and mode, in a fresh subprocess (so that peak memory is that configuration's own):
- forward:       jit(log_likelihood)            (exposure, Debye sums, c1/c2 fit, chi^2), median of --repeats;
- forward+grad:  jit(value_and_grad(log_likelihood)) w.r.t. the coordinates (what guidance calls at every step);
- compile:       ahead-of-time compilation of forward+grad (``jit(...).lower(...).compile()``);
- XLA temp MB:   the compiled forward+grad's temporary buffers (``memory_analysis().temp_size_in_bytes``);
- peak RSS MB:   the subprocess's peak resident memory (``ru_maxrss``), and its baseline after imports and setup.
The NumPy reference is the same exact physics at c1 = 1, c2 = 0 (one channel F = v - s per atom, q-dependent), in
float32 like the observable (``--numpy-dtype float64``: libm's scalar sin, ~18x slower on this CPU), over the upper
triangle in 256 x 256 atom tiles (memory O(q x 256 x 256)), timed in its own subprocess; the JAX timings include three
channels, the solvent exposure and the c1/c2 fit.  Beyond ``--numpy-max-atoms`` NumPy runs only the first row blocks
holding about ``--numpy-pair-fraction`` of the pairs and its time is extrapolated by pair count (flagged
``extrapolated`` in the table and JSON); there is no NumPy gradient.  Where NumPy ran in full, the JAX exact I(q)
(c1 = 1, c2 = 0) is compared with it (max relative difference).

Prints a table and then one JSON document (a list of rows).  Usage:
    python scripts/bench_saxs.py [--sizes 1000 5000 20000] [--q-points 150] [--modes exact fast] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HEAVY_DENSITY = 0.05  # heavy atoms per A^3 in a protein
RESIDUE = ("N", "CA", "C", "O", "CB")


def protein_like(n_atoms: int, seed: int = 0):
    """AtomInfo-like arrays and coordinates [N, 3] (A): random 1.5-A chains reflected inside a protein-sized sphere."""
    rng = np.random.default_rng(seed)
    radius = (3.0 * n_atoms / (4.0 * np.pi * HEAVY_DENSITY)) ** (1.0 / 3.0)
    coords = np.empty((n_atoms, 3))
    chain = 250
    for start in range(0, n_atoms, chain):
        stop = min(start + chain, n_atoms)
        pos = rng.normal(size=3)
        pos *= radius * rng.uniform() ** (1 / 3) / np.linalg.norm(pos)
        for i in range(start, stop):
            step = rng.normal(size=3)
            pos = pos + 1.5 * step / np.linalg.norm(step)
            norm = np.linalg.norm(pos)
            if norm > radius:  # reflect back inside
                pos *= (2 * radius - norm) / norm
            coords[i] = pos
    names = np.array([RESIDUE[i % len(RESIDUE)] for i in range(n_atoms)])
    elements = np.array([name[0] for name in names])
    return names, elements, coords.astype(np.float32)


def synthetic_profile(q: np.ndarray, rg: float):
    from observables.saxs import SaxsProfile

    intensity = np.exp(-((q * rg) ** 2) / 3.0) + 1e-3
    return SaxsProfile(q=q, intensity=intensity, sigma=0.02 * intensity)


def atom_info(n_atoms: int, seed: int):
    from observables.base import AtomInfo

    names, elements, coords = protein_like(n_atoms, seed)
    return AtomInfo(
        element=elements,
        atom_name=names,
        res_name=np.full(n_atoms, "ALA"),
        res_seq=np.arange(n_atoms) // len(RESIDUE) + 1,
        chain_id=np.full(n_atoms, "A"),
        coords=coords[None],
    )


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # ru_maxrss is in KiB on Linux


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ------------------------------------------------------------------------------------------------------------------
# workers (one configuration per process)
# ------------------------------------------------------------------------------------------------------------------


def worker_jax(args) -> dict:
    import jax
    import jax.numpy as jnp

    from observables.saxs import SaxsObservable

    q = np.linspace(0.01, 0.5, args.q_points)
    atoms = atom_info(args.size, args.seed)
    x = jnp.asarray(atoms.coords)
    rg = float(np.sqrt(np.mean(np.sum((atoms.coords[0] - atoms.coords[0].mean(0)) ** 2, -1))))
    obs = SaxsObservable(atoms, data=synthetic_profile(q, rg), mode=args.mode)
    w = jnp.ones(1, jnp.float32)
    baseline = rss_mb()
    t0 = time.perf_counter()  # ahead-of-time compilation: the compile time, and no warm-up run needed
    value_grad = jax.jit(jax.value_and_grad(obs.log_likelihood)).lower(x, w).compile()
    compile_s = time.perf_counter() - t0
    value = jax.jit(obs.log_likelihood).lower(x, w).compile()
    temp_mb = value_grad.memory_analysis().temp_size_in_bytes / 1e6
    t_grad = median_time(lambda: jax.block_until_ready(value_grad(x, w)), args.repeats)
    t_fwd = median_time(lambda: jax.block_until_ready(value(x, w)), args.repeats)
    out = {
        "n_atoms": args.size, "mode": args.mode, "q_points": args.q_points, "q_model": len(obs.q_model),
        "block": obs.kernel.block_size, "forward_s": t_fwd, "forward_grad_s": t_grad,
        "compile_s": compile_s, "xla_temp_mb": temp_mb, "baseline_rss_mb": baseline,
        "peak_rss_mb": rss_mb(),
    }
    if args.mode == "exact" and args.compare:
        p = np.asarray(obs.partial_profiles(x))[0]
        out["intensity"] = p[:, 0, 0].astype(float).tolist()  # channel v - s: I(q) at c1 = 1, c2 = 0
    return out


def numpy_form_factors(atoms, q: np.ndarray) -> np.ndarray:
    """Per-atom F = v - s [N, Q] (c1 = 1, c2 = 0), the module's tables (IT92 + implicit H, FoXS displaced solvent)."""
    from observables.saxs import form_factor_table, implicit_hydrogens

    groups = [(e, implicit_hydrogens(r, a) or 0) for e, r, a in zip(atoms.element, atoms.res_name, atoms.atom_name)]
    unique = sorted(set(groups))
    vac, sol = form_factor_table(unique, q)
    index = np.array([unique.index(g) for g in groups])
    return (vac - sol)[index]


def numpy_debye(x: np.ndarray, f: np.ndarray, q: np.ndarray, block: int, row_blocks: int | None,
                chunk: int = 256) -> np.ndarray:
    """sum_ij F_i F_j sin(q r_ij) / (q r_ij) in the dtype of x, f and q: rows in blocks of ``block`` atoms against the
    atoms from the block's start on, in chunks of ``chunk`` columns (memory O(q x block x chunk)); only the first
    ``row_blocks`` row blocks."""
    n = len(x)
    n_blocks = -(-n // block)
    fq = np.ascontiguousarray(f.T)  # [Q, N]
    out = np.zeros(len(q), np.float64)
    for b in range(n_blocks if row_blocks is None else row_blocks):
        i0, i1 = b * block, min((b + 1) * block, n)
        for j0 in range(i0, n, chunk):
            j1 = min(j0 + chunk, n)
            d = np.sqrt(np.sum((x[i0:i1, None, :] - x[None, j0:j1, :]) ** 2, axis=-1))  # [B, C]
            qr = q[:, None, None] * d[None]
            with np.errstate(invalid="ignore", divide="ignore"):
                s = np.where(qr > 0, np.sin(qr) / qr, 1.0).astype(x.dtype)  # [Q, B, C]
            t = np.matmul(s, fq[:, j0:j1, None])[:, :, 0]  # [Q, B]: sum_j sinc_ij F_j
            weight = 2.0  # pairs i < j twice; in the diagonal block both orders are in the matrix: once
            if j0 == i0:
                diag = np.matmul(s[:, :, : i1 - i0], fq[:, i0:i1, None])[:, :, 0]
                out += np.sum(fq[:, i0:i1] * (2.0 * t - diag), axis=1)
                continue
            out += weight * np.sum(fq[:, i0:i1] * t, axis=1)
    return out


def worker_numpy(args) -> dict:
    dtype = np.dtype(args.numpy_dtype)
    q = np.linspace(0.01, 0.5, args.q_points)
    atoms = atom_info(args.size, args.seed)
    x = atoms.coords[0].astype(dtype)
    f = numpy_form_factors(atoms, q).astype(dtype)
    q = q.astype(dtype)
    baseline = rss_mb()
    block = 256
    n_blocks = -(-args.size // block)
    extrapolated = args.size > args.numpy_max_atoms
    row_blocks, fraction = None, 1.0
    if extrapolated:  # the first row blocks holding about the requested fraction of the pairs
        pairs = np.array([(args.size - b * block) * min(block, args.size - b * block) for b in range(n_blocks)])
        cum = np.cumsum(pairs) / pairs.sum()
        row_blocks = int(np.searchsorted(cum, args.numpy_pair_fraction) + 1)  # the largest rows come first
        fraction = float(cum[row_blocks - 1])
    t0 = time.perf_counter()
    intensity = numpy_debye(x, f, q, block, row_blocks)
    elapsed = time.perf_counter() - t0
    out = {
        "n_atoms": args.size, "mode": "numpy", "q_points": args.q_points, "q_model": args.q_points, "block": block,
        "forward_s": elapsed / fraction, "forward_grad_s": None, "compile_s": None, "xla_temp_mb": None,
        "baseline_rss_mb": baseline, "peak_rss_mb": rss_mb(), "extrapolated": extrapolated,
        "pair_fraction_run": fraction, "measured_s": elapsed, "dtype": dtype.name,
    }
    if not extrapolated:
        out["intensity"] = intensity.tolist()
    return out


# ------------------------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------------------------


def run_worker(size: int, mode: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--size", str(size), "--mode", mode,
           "--q-points", str(args.q_points), "--seed", str(args.seed),
           "--repeats", str(args.repeats if size <= 5000 else 1),
           "--numpy-max-atoms", str(args.numpy_max_atoms), "--numpy-pair-fraction", str(args.numpy_pair_fraction),
           "--numpy-dtype", args.numpy_dtype]
    if size <= args.numpy_max_atoms and "numpy" in args.modes:
        cmd.append("--compare")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {size} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--q-points", type=int, default=150)
    parser.add_argument("--modes", nargs="+", default=["exact", "fast", "numpy"], choices=["exact", "fast", "numpy"])
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats (1 above 5000 atoms)")
    parser.add_argument("--numpy-max-atoms", type=int, default=5000, help="larger: NumPy runs a subset, extrapolated")
    parser.add_argument("--numpy-pair-fraction", type=float, default=0.05)
    parser.add_argument("--numpy-dtype", default="float32", choices=["float32", "float64"],
                        help="NumPy reference precision (float64's sin is scalar libm on this CPU, ~18x slower)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the JSON rows to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        out = worker_numpy(args) if args.mode == "numpy" else worker_jax(args)
        print(json.dumps(out))
        return

    import jax

    rows = []
    for size in args.sizes:
        results = {mode: run_worker(size, mode, args) for mode in args.modes}
        reference = results.get("numpy")
        for mode, row in results.items():
            if reference is not None and mode != "numpy":
                row["speedup_forward_vs_numpy"] = reference["forward_s"] / row["forward_s"]
                row["numpy_extrapolated"] = reference["extrapolated"]
                if "intensity" in row and "intensity" in reference:
                    a, b = np.array(row.pop("intensity")), np.array(reference["intensity"])
                    row["max_rel_diff_vs_numpy"] = float(np.max(np.abs(a - b) / np.abs(b)))
            row.pop("intensity", None)
            rows.append(row)
        if reference is not None:
            reference.pop("intensity", None)

    print(f"SAXS observable benchmark (jax {jax.__version__}, {os.cpu_count()} CPU cores, float32; NumPy "
          f"{args.numpy_dtype}), {args.q_points} q points")
    header = (f"{'atoms':>6} {'mode':>6} {'q_model':>7} {'block':>5} {'fwd s':>8} {'fwd+grad s':>10} {'compile s':>9} "
              f"{'XLA temp MB':>11} {'peak RSS MB':>11} {'base RSS MB':>11} {'numpy/fwd':>9} {'max rel diff':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        speed = r.get("speedup_forward_vs_numpy")
        note = " (numpy extrapolated)" if r.get("numpy_extrapolated") else ""
        if r["mode"] == "numpy" and r.get("extrapolated"):
            note = f" (extrapolated from {100 * r['pair_fraction_run']:.0f} % of the pairs, {r['measured_s']:.1f} s)"
        print(f"{r['n_atoms']:>6} {r['mode']:>6} {r['q_model']:>7} {r['block']:>5} {fmt(r['forward_s'], '8.3f')} "
              f"{fmt(r['forward_grad_s'], '10.3f')} {fmt(r['compile_s'], '9.2f')} {fmt(r['xla_temp_mb'], '11.1f')} "
              f"{r['peak_rss_mb']:11.0f} {r['baseline_rss_mb']:11.0f} {fmt(speed, '9.1f')} "
              f"{fmt(r.get('max_rel_diff_vs_numpy'), '12.1e')}{note}")
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
