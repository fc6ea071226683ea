"""Per-step cost of a Protenix predictor behind the denoising interface, and the share of a guided step spent in the
observable + bridge.

A tiny randomly initialised Protenix (predictors.protenix.tiny_model: the released architecture at toy width) is
conditioned once on the demo's two-state peptide (component cache built offline in a temporary folder unless
``--cache-dir`` is given); then, for each batch size B (= particles x members):

* ``denoise``: one call of the diffusion module on B structures (ms), the trunk excluded (it runs once per run);
* ``denoise + grad``: the same with the gradient of a scalar back to x (what DPS with ``gradient=network`` pays);
* ``guided step``: one FK + DPS step (augmentation, churn, denoise, density log-likelihood and gradient through the
  dlpack bridge, drift, Euler update, reweighting), from which the share spent in the objective is reported.

Real checkpoints are 10-100x wider and deeper (the base model: 48 pairformer blocks, a 24-block diffusion
transformer of width 768); their per-call cost is dominated by the network, so the share of the observable shrinks
accordingly.  ``--released`` times the released base architecture instead (randomly initialised, the same cost as the
weights; about 1.5 GB of memory).  Each measurement is the median of ``--repeats`` after a warm-up.

Prints a table and one JSON line.  Usage:
  python scripts/bench_protenix.py [--batch 1 4 16] [--repeats 10] [--released] [--device cpu] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch
from bench_timing import demo_density, guided_step_ms, median_ms  # scripts/bench_timing.py

from guidance.objective import Objective, Term
from guidance.sampler import initial_noise, plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--members", type=int, default=2, help="ensemble members per particle in the guided step")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--n-cycle", type=int, default=4, help="trunk passes (run once, timed separately)")
    ap.add_argument("--cache-dir", default=None, help="component cache (default: a temporary folder)")
    ap.add_argument("--released", action="store_true",
                    help="the released base architecture (random weights) instead of the tiny model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--torch-threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    from guidance.fixtures import build_two_state_peptide
    from predictors.protenix import DEFAULT_MODEL, ProtenixDenoiser, _build, protenix_configs, tiny_model

    pep = build_two_state_peptide()
    if args.released:
        torch.manual_seed(0)
        model = _build(protenix_configs(DEFAULT_MODEL)).to(args.device)
    else:
        model = tiny_model().to(args.device)
    label = f"{DEFAULT_MODEL} architecture (random weights)" if args.released else "tiny model"
    n_steps = 40
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or tmp
        t0 = time.perf_counter()
        denoiser = ProtenixDenoiser(model, {"A": pep.sequence}, cache_dir=cache, n_cycle=args.n_cycle,
                                    n_steps=n_steps)
        trunk_ms = 1e3 * (time.perf_counter() - t0)
    layout = denoiser.layout
    n = len(layout)
    conformers, observable = demo_density(pep, layout)
    sched = denoiser.schedule
    steps = plan(sched, n_steps)

    table = []
    for b in args.batch:
        gen = torch.Generator().manual_seed(0)
        x = initial_noise((b, n, 3), 10.0, gen).to(args.device)
        sigma = torch.full((b,), 10.0, device=args.device)
        with torch.no_grad():
            denoise_ms = median_ms(lambda: denoiser.denoise(x, sigma), args.repeats, args.device)

        def with_grad():
            xg = x.detach().requires_grad_(True)
            torch.autograd.grad(denoiser.denoise(xg, sigma).square().sum(), xg)

        grad_ms = median_ms(with_grad, args.repeats, args.device)

        e = min(args.members, b)
        p = b // e
        objective = Objective([Term("density", observable)], n_members=e, align=True,
                              reference=torch.as_tensor(conformers[0], device=args.device))
        step_ms, share = guided_step_ms(denoiser.denoise, objective, steps[20:21], sched, gen, particles=p,
                                        members=e, n_atoms=n, n_steps_total=n_steps, repeats=args.repeats,
                                        device=args.device)  # one step mid-run (sigma ~ 5 A)
        table.append({"batch": b, "particles": p, "members": e, "denoise_ms": round(denoise_ms, 2),
                      "denoise_ms_per_structure": round(denoise_ms / b, 3),
                      "denoise_grad_ms": round(grad_ms, 2),
                      "guided_step_ms": round(step_ms, 2),
                      "objective_share": round(share, 3)})

    print(f"protenix {label}, {n} atoms, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs ({platform.machine()}); conditioning once ({args.n_cycle} trunk cycles, incl. "
          f"component cache and featurisation): {trunk_ms:.0f} ms")
    print(f"{'B':>4} {'P x E':>7} {'denoise ms':>11} {'ms/struct':>10} {'+grad ms':>9} {'guided step ms':>15} "
          f"{'objective share':>16}")
    for r in table:
        print(f"{r['batch']:>4} {r['particles']:>3} x {r['members']:<2} {r['denoise_ms']:>11.2f} "
              f"{r['denoise_ms_per_structure']:>10.3f} {r['denoise_grad_ms']:>9.2f} {r['guided_step_ms']:>15.2f} "
              f"{r['objective_share']:>16.1%}")
    print(json.dumps({"predictor": "protenix", "model": label, "atoms": n, "device": args.device,
                      "trunk_ms": round(trunk_ms, 1), "rows": table}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
