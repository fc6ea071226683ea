"""What the predictor benchmarks (scripts/bench_boltz.py, scripts/bench_protenix.py) share: medians of wall-clock
milliseconds, with CUDA synchronised around each call, an objective wrapper that adds up the time spent in the
observables and the torch <-> JAX bridge, the timed guided step, and the demo peptide's density data on a
predictor's atoms."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from guidance import fk as fk_mod
from guidance.dps import DPS, Strength
from guidance.sampler import Sampling, initial_noise
from observables.base import AtomInfo
from observables.density import DensityObservable, synthetic_map


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


class TimedObjective:
    """The objective with a stopwatch (JAX has finished when the dlpack hand-over returns)."""

    def __init__(self, objective, device: str):
        self.objective, self.device, self.seconds = objective, device, 0.0

    def __call__(self, x, t=0.0):
        sync(self.device)
        t0 = time.perf_counter()
        out = self.objective(x, t=t)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out

    def value(self, x, t=0.0):
        return self.objective.value(x, t=t)


def guided_step_ms(denoise, objective, step, schedule, generator, *, particles: int, members: int, n_atoms: int,
                   n_steps_total: int, repeats: int, device: str) -> tuple[float, float]:
    """Median wall time (ms) of one FK + DPS step (``step``: a one-element plan) for ``particles`` x ``members``
    structures, and the median share of it spent in ``objective`` (observables + bridge).  The step time includes
    steer's closing value-only evaluation of the sample, which is not counted as objective time."""
    timed = TimedObjective(objective, device)
    fk = fk_mod.FK(particles=particles, lam=1.0, twist_sigma=3.0)
    dps = DPS(strength=Strength(1.0), max_step=0.5)
    xs = initial_noise((particles * members, n_atoms, 3), step[0].sigma, generator).to(device)

    def guided():
        fk_mod.steer(denoise, xs, step, schedule, generator, n_particles=particles, n_members=members,
                     objective=timed, dps=dps, fk=fk,
                     sampling=Sampling(augmentation=True, align=True, n_steps_total=n_steps_total))

    guided()  # warm-up (JIT)
    step_times, shares = [], []
    for _ in range(repeats):
        timed.seconds = 0.0
        sync(device)
        t0 = time.perf_counter()
        guided()
        sync(device)
        total = time.perf_counter() - t0
        step_times.append(1e3 * total)
        shares.append(timed.seconds / total)
    return statistics.median(step_times), statistics.median(shares)


def demo_density(pep, layout) -> tuple[np.ndarray, DensityObservable]:
    """The two-state demo peptide ``pep`` on the predictor's ``layout`` ([2, N, 3]: atoms the peptide lacks, such as
    a C-terminal OXT, sit on their residue's C) and the density observable of a synthetic 2 A map of its 0.6/0.4
    mixture."""
    index = pep.layout.index()
    rows = [index.get(k, index.get((k[0], k[1], "C"))) for k in layout.keys()]
    conformers = np.stack([pep.coords_a[rows], pep.coords_b[rows]]).astype(np.float32)
    atoms = AtomInfo.from_layout(layout, coords=conformers)
    dmap = synthetic_map(atoms, conformers, [0.6, 0.4], resolution=2.0)
    return conformers, DensityObservable(atoms, map=dmap, resolution=2.0)
