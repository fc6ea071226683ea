"""Timing helpers shared by the predictor benchmarks (scripts/bench_boltz.py, scripts/bench_protenix.py): medians of
wall-clock milliseconds, with CUDA synchronised around each call, and an objective wrapper that adds up the time
spent in the observables and the torch <-> JAX bridge."""

from __future__ import annotations

import statistics
import time

import torch


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
