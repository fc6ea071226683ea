"""Time one guided FK run against the number of particles: P particles x E ensemble members are denoised and scored
in one batch per step, so the cost should grow no faster than the batch size P*E (sub-linearly while per-call
overheads dominate).

Setup: the embedded two-state peptide (guidance/fixtures.py) as a reference prior over its two conformers, a synthetic
X-ray map of the two states at occupancies 0.6/0.4 (observables.density.synthetic_map), the density observable, FK
steering (difference potentials, systematic resampling) plus DPS drift, AF3 sampler defaults (Euler steps).
Each P is warmed up first (JIT compilation of the batched likelihood for that shape), then timed ``--repeats`` times,
interleaved over P; the fastest run of each P is reported (the least disturbed by other load on the machine).

Prints a table and one JSON line:
  {"P": [...], "time_s": [...], "time_per_structure_ms": [...], "ratio_vs_P1": [...], ...}
time_per_structure_ms is per structure per step (time / (steps * P * E)).

Usage: python scripts/bench_fk.py [--particles 1 4 16] [--members 4] [--steps 20] [--repeats 5] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from guidance import fk as fk_mod
from guidance.dps import DPS, Strength
from guidance.objective import Objective, Term
from guidance.sampler import Sampling, initial_noise, plan
from observables.base import AtomInfo
from observables.density import DensityObservable, synthetic_map
from predictors.reference import ReferencePrior

RESOLUTION = 2.0  # A
OCCUPANCIES = (0.6, 0.4)


def two_states():
    """(layout, conformers [2, N, 3]) of the demo peptide (helix-loop-helix with two loop conformations)."""
    try:
        from guidance.fixtures import build_two_state_peptide
    except ImportError:  # demo module without the two-state builder: a plain helix and a crankshafted middle
        from guidance.fixtures import ALPHA_HELIX, build_peptide, crankshaft

        seq = "SAEELLKKAEELLKRGDGSAEELAKKALEL"
        layout, a = build_peptide(seq, np.tile(ALPHA_HELIX, (len(seq), 1)))
        ca = np.flatnonzero(layout.atom_name == "CA")
        mask = (layout.res_seq >= 14) & (layout.res_seq <= 18)
        b = crankshaft(a, a[ca[12]], a[ca[18]], mask, 60.0)
        return layout, np.stack([a, b]).astype(np.float32)
    peptide = build_two_state_peptide()
    return peptide.layout, np.stack([peptide.coords_a, peptide.coords_b]).astype(np.float32)


def build(members: int):
    layout, conformers = two_states()
    atoms = AtomInfo.from_layout(layout, coords=conformers)
    density_map = synthetic_map(atoms, conformers, OCCUPANCIES, resolution=RESOLUTION, noise_snr=10.0, seed=0)
    observable = DensityObservable(atoms, map=density_map, resolution=RESOLUTION)
    prior = ReferencePrior(layout, conformers, weights=[0.5, 0.5], tau=0.3, dtype=torch.float32)
    objective = Objective([Term("density", observable)], n_members=members)
    return prior, objective, len(layout)


class TimedObjective:
    """The objective with a stopwatch: wall time spent in the batched likelihood (JAX finishes the computation before
    the dlpack hand-over returns, so the call's wall time is the evaluation's)."""

    def __init__(self, objective):
        self.objective = objective
        self.seconds = 0.0

    def __call__(self, x, t=0.0):
        t0 = time.perf_counter()
        out = self.objective(x, t=t)
        self.seconds += time.perf_counter() - t0
        return out

    def value(self, x, t=0.0):
        t0 = time.perf_counter()
        out = self.objective.value(x, t=t)
        self.seconds += time.perf_counter() - t0
        return out


def run_once(prior, objective, n_atoms: int, particles: int, members: int, steps: int,
             seed: int = 0) -> tuple[float, float]:
    """(wall time of the guided run, of which in the likelihood) in seconds."""
    objective = TimedObjective(objective)
    sched = prior.schedule
    pl = plan(sched, steps)
    gen = torch.Generator().manual_seed(seed)
    x = initial_noise((particles * members, n_atoms, 3), pl[0].sigma, gen)
    t0 = time.perf_counter()
    res = fk_mod.steer(prior.denoise, x, pl, sched, gen, n_particles=particles, n_members=members,
                       objective=objective, fk=fk_mod.FK(particles=particles, lam=1.0, twist_sigma=None),
                       dps=DPS(strength=Strength(0.5), max_step=1.0), sampling=Sampling(n_steps_total=steps))
    elapsed = time.perf_counter() - t0
    if not torch.isfinite(res.particles).all():
        raise RuntimeError(f"P={particles}: the guided run produced non-finite coordinates")
    return elapsed, objective.seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice); 1 is steadier on a shared machine")
    args = ap.parse_args(argv)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    prior, objective, n_atoms = build(args.members)
    for p in args.particles:
        run_once(prior, objective, n_atoms, p, args.members, steps=2)  # JIT warm-up for this batch shape
    # repeats interleaved over P, fastest kept: a burst of load from elsewhere on the machine hits one run of one P,
    # not all runs of it
    runs = {p: [] for p in args.particles}
    for r in range(args.repeats):
        for p in args.particles:
            runs[p].append(run_once(prior, objective, n_atoms, p, args.members, args.steps, seed=r))
    best = [min(runs[p]) for p in args.particles]  # (total, likelihood) of the fastest run
    times = [b[0] for b in best]
    likelihood_share = [b[1] / b[0] for b in best]

    base = times[0] / args.particles[0]  # per-particle time of the smallest run
    per_structure = [1e3 * t / (args.steps * p * args.members) for t, p in zip(times, args.particles)]
    ratios = [t / (base * args.particles[0]) for t in times]
    print(f"guided FK+DPS, density observable, {n_atoms} atoms, E={args.members} members, {args.steps} steps, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs ({platform.machine()})")
    print(f"{'P':>4} {'P*E':>5} {'time (s)':>9} {'ms/structure/step':>18} {'ratio vs P1':>12} {'bound (P)':>10} "
          f"{'in likelihood':>14}")
    for p, t, ms, r, sh in zip(args.particles, times, per_structure, ratios, likelihood_share):
        bound = p / args.particles[0]
        print(f"{p:>4} {p * args.members:>5} {t:>9.3f} {ms:>18.3f} {r:>12.2f} {bound:>10.0f} {sh:>13.0%}")
    print(json.dumps({
        "P": args.particles,
        "time_s": [round(t, 4) for t in times],
        "time_per_structure_ms": [round(v, 4) for v in per_structure],
        "ratio_vs_P1": [round(r, 3) for r in ratios],
        "likelihood_share": [round(v, 3) for v in likelihood_share],
        "members": args.members,
        "steps": args.steps,
        "atoms": n_atoms,
    }))
    within = all(r <= p / args.particles[0] for r, p in zip(ratios, args.particles))
    if not within:
        print("time grew faster than the number of particles (see likelihood share: the batched likelihood)",
              file=sys.stderr)
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
