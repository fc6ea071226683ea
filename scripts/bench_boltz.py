"""Per-step cost of a Boltz predictor behind the denoising interface, and the share of a guided step spent in the
observable + bridge.

A tiny randomly initialised Boltz model (predictors.boltz.tiny_model: the released architecture at toy width) is
conditioned once on the demo's two-state peptide; then, for each batch size B (= particles x members):

* ``denoise``: one call of the score network on B structures (ms), the trunk excluded (it runs once per run);
* ``guided step``: one FK + DPS step (churn, denoise, density log-likelihood and gradient through the dlpack bridge,
  drift, Euler update, reweighting), from which the share spent in the objective is reported;
* Boltz's physical steering energies with their gradient (``potentials=[boltz]``), ms per call.

Real checkpoints are 10-100x wider and deeper; their per-call cost is dominated by the network, so the share of the
observable shrinks accordingly.  Each measurement is the median of ``--repeats`` after a warm-up (JIT compilation of the
batched likelihood for that shape).  With ``--device cuda`` (and jax[cuda12]) the same runs on a GPU, where the
bridge is zero-copy.

Prints a table and one JSON line.  Usage:
  python scripts/bench_boltz.py [--family boltz2] [--batch 1 4 16] [--repeats 10] [--device cpu] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import torch
from bench_timing import demo_density, guided_step_ms, median_ms  # scripts/bench_timing.py

from guidance.objective import Objective, PotentialTerm, Term
from guidance.sampler import initial_noise, plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="boltz2", choices=["boltz1", "boltz2"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--members", type=int, default=2, help="ensemble members per particle in the guided step")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--torch-threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    from guidance.fixtures import build_two_state_peptide
    from predictors.boltz import make_denoiser, tiny_model

    pep = build_two_state_peptide()
    seq = {"A": pep.sequence}
    model = tiny_model(args.family).to(args.device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        denoiser = make_denoiser(args.family, model, seq, cache_dir=None, recycling_steps=3)
    trunk_ms = 1e3 * (time.perf_counter() - t0)
    layout = denoiser.layout
    n = len(layout)
    conformers, observable = demo_density(pep, layout)  # the map and the observable on the predictor's atoms
    pots = denoiser.potentials()
    sched = denoiser.schedule
    steps = plan(sched, 40)

    table = []
    for b in args.batch:
        gen = torch.Generator().manual_seed(0)
        x = initial_noise((b, n, 3), 10.0, gen).to(args.device)
        sigma = torch.full((b,), 10.0, device=args.device)
        with torch.no_grad():
            denoise_ms = median_ms(lambda: denoiser.denoise(x, sigma), args.repeats, args.device)
        potential_ms = median_ms(lambda: pots.energy_and_grad(x, 0.5), args.repeats, args.device)

        e = min(args.members, b)
        p = b // e
        objective = Objective([Term("density", observable)], n_members=e, align=True,
                              reference=torch.as_tensor(conformers[0], device=args.device),
                              potentials=[PotentialTerm("boltz", pots.energy_and_grad, 1.0)])
        step_ms, share = guided_step_ms(denoiser.denoise, objective, steps[20:21], sched, gen, particles=p,
                                        members=e, n_atoms=n, n_steps_total=40, repeats=args.repeats,
                                        device=args.device)  # one step mid-run (sigma ~ 5 A)
        table.append({"batch": b, "particles": p, "members": e, "denoise_ms": round(denoise_ms, 2),
                      "denoise_ms_per_structure": round(denoise_ms / b, 3),
                      "guided_step_ms": round(step_ms, 2),
                      "objective_share": round(share, 3),
                      "boltz_potentials_ms": round(potential_ms, 2)})

    print(f"{args.family} tiny model, {n} atoms ({denoiser.n_padded} padded), device {args.device}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs ({platform.machine()}); "
          f"trunk once: {trunk_ms:.0f} ms (incl. featurisation)")
    print(f"{'B':>4} {'P x E':>7} {'denoise ms':>11} {'ms/struct':>10} {'guided step ms':>15} {'objective share':>16} "
          f"{'potentials ms':>14}")
    for r in table:
        print(f"{r['batch']:>4} {r['particles']:>3} x {r['members']:<2} {r['denoise_ms']:>11.2f} "
              f"{r['denoise_ms_per_structure']:>10.3f} {r['guided_step_ms']:>15.2f} {r['objective_share']:>16.1%} "
              f"{r['boltz_potentials_ms']:>14.2f}")
    print(json.dumps({"family": args.family, "atoms": n, "device": args.device, "trunk_ms": round(trunk_ms, 1),
                      "rows": table}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
