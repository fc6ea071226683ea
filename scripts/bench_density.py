"""Benchmark the JAX density kernel against gemmi's DensityCalculatorX on the same grid and B-factors.

Atoms: random chains (1.5 A steps, C/N/O/S in protein proportions) packed into a cube at a given number density of
heavy atoms per A^3 (default 0.0125), so consecutive atoms are neighbours as in a real structure.  Grid: the box around
them plus 5 A at spacing resolution / 4; every atom has B = b_factor + resolution_blur(resolution).

Timed (jit warm, median of --repeats):
- gemmi:      DensityCalculatorX.put_model_density_on_grid on a P1 cell equal to the box, with the same grid size;
- forward:    DensityKernel -> the full model map [nx, ny, nz];
- loglik:     DensityObservable.log_likelihood (model map in the mask, CC fit);
- loglik+grad: jax.value_and_grad of log_likelihood w.r.t. the coordinates (what guidance calls);
- vmap:       the same for --particles FK particles of 2 members each, jax.vmap over particles.
Prints a table and one JSON line per size.  Usage: python scripts/bench_density.py [--sizes 2000 20000]
"""

from __future__ import annotations

import argparse
import json
import time

import gemmi
import jax
import jax.numpy as jnp
import numpy as np

from guidance.structures.maps import p1_density
from observables.base import AtomInfo
from observables.density import DensityKernel, DensityObservable, atom_density, resolution_blur, synthetic_map

# heavy-atom composition of proteins (fractions of C, N, O, S)
COMPOSITION = {"C": 0.63, "N": 0.17, "O": 0.19, "S": 0.01}


def protein_like_atoms(n_atoms: int, density: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Elements [N] and coordinates [N, 3] (A): random 1.5-A-step chains reflected inside a cube of N/density A^3."""
    rng = np.random.default_rng(seed)
    side = (n_atoms / density) ** (1.0 / 3.0)
    chain_length = 250
    coords = np.empty((n_atoms, 3))
    for start in range(0, n_atoms, chain_length):
        stop = min(start + chain_length, n_atoms)
        steps = rng.normal(size=(stop - start, 3))
        steps *= 1.5 / np.linalg.norm(steps, axis=1, keepdims=True)
        walk = rng.uniform(0, side, 3) + np.cumsum(steps, axis=0)
        walk = np.abs(walk) % (2 * side)  # reflect into [0, side]
        coords[start:stop] = np.where(walk > side, 2 * side - walk, walk)
    elements = rng.choice(list(COMPOSITION), size=n_atoms, p=list(COMPOSITION.values()))
    return elements, coords.astype(np.float32)


def gemmi_model(elements: np.ndarray, coords: np.ndarray, b_factor: float, shift: np.ndarray) -> gemmi.Structure:
    st = gemmi.Structure()
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    for i, (el, xyz) in enumerate(zip(elements, coords - shift)):
        res = gemmi.Residue()
        res.name = "UNK"
        res.seqid = gemmi.SeqId(i + 1, " ")
        atom = gemmi.Atom()
        atom.name = el
        atom.element = gemmi.Element(el)
        atom.pos = gemmi.Position(*map(float, xyz))
        atom.b_iso = b_factor
        atom.occ = 1.0
        res.add_atom(atom)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    return st


def median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench(n_atoms: int, args) -> dict:
    elements, coords = protein_like_atoms(n_atoms, args.density, args.seed)
    atoms = AtomInfo(
        element=elements,
        atom_name=elements,
        res_name=np.full(n_atoms, "UNK"),
        res_seq=np.arange(n_atoms),
        chain_id=np.full(n_atoms, "A"),
        coords=coords[None],
    )
    b_total = args.b_factor + resolution_blur(args.resolution)
    target = synthetic_map(atoms, coords[None], [1.0], resolution=args.resolution, b_factor=args.b_factor)
    grid_shape, spacing = target.shape, target.spacing

    # gemmi on the same grid: P1 cell = the box, grid points at the same positions (origin shifted to 0)
    st = gemmi_model(elements, coords, args.b_factor, shift=target.origin)
    dc = p1_density(st, grid_shape, spacing, args.resolution)  # guidance.structures.maps: the bench's set-up
    t_gemmi = median_time(lambda: dc.put_model_density_on_grid(st[0]), args.repeats)
    reference = np.array(dc.grid, copy=True)

    kernel = DensityKernel(elements, grid_shape, target.origin, spacing, b_total)
    # gemmi again with its (absolute, e/A^3) density cutoff set to where our truncation radius lies
    dc.cutoff = float(min(atom_density(kernel.radius, el, b_total) for el in COMPOSITION))
    t_gemmi_same_radius = median_time(lambda: dc.put_model_density_on_grid(st[0]), args.repeats)
    x = jnp.asarray(coords[None] + np.random.default_rng(1).normal(0, 0.3, coords.shape).astype(np.float32)[None])
    w = jnp.ones(1, jnp.float32)
    forward = jax.jit(kernel)
    t_forward = median_time(lambda: forward(x, w), args.repeats)
    ours = np.asarray(forward(jnp.asarray(coords[None]), w))
    cc_gemmi = float(np.corrcoef(ours.ravel(), reference.ravel())[0, 1])

    obs = DensityObservable(atoms, map=target, resolution=args.resolution, b_factor=args.b_factor)
    loglik = jax.jit(obs.log_likelihood)
    grad = jax.jit(jax.value_and_grad(obs.log_likelihood))
    t_loglik = median_time(lambda: loglik(x, w), args.repeats)
    t_grad = median_time(lambda: grad(x, w), args.repeats)
    # FK-style batch: P particles of E = 2 members each, vmapped over particles (total time of the batch)
    p, e = args.particles, 2
    noise = np.random.default_rng(2).normal(0, 0.3, (p, e, *coords.shape)).astype(np.float32)
    xs = jnp.asarray(coords[None, None] + noise)
    batched = jax.jit(jax.vmap(jax.value_and_grad(obs.log_likelihood), in_axes=(0, None)))
    t_batched = median_time(lambda: batched(xs, jnp.full(e, 1.0 / e, jnp.float32)), max(1, args.repeats // 2))
    return {
        "n_atoms": n_atoms,
        "grid": list(grid_shape),
        "spacing_A": float(spacing[0]),
        "B_A2": b_total,
        "voxels_per_atom": kernel.voxels_per_atom,
        "gemmi_forward_s": t_gemmi,
        "gemmi_forward_same_radius_s": t_gemmi_same_radius,
        "forward_s": t_forward,
        "loglik_s": t_loglik,
        "loglik_grad_s": t_grad,
        f"vmap_loglik_grad_{p}x{e}_s": t_batched,
        "ratio_forward": t_forward / t_gemmi,
        "ratio_loglik_grad": t_grad / t_gemmi,
        "ratio_loglik_grad_vs_gemmi_same_radius": t_grad / t_gemmi_same_radius,
        "cc_vs_gemmi": cc_gemmi,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--b-factor", type=float, default=20.0)
    parser.add_argument("--density", type=float, default=0.0125, help="heavy atoms per A^3")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--particles", type=int, default=4, help="FK particles in the vmapped timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [bench(n, args) for n in args.sizes]
    header = ("atoms", "grid", "gemmi", "gemmi(R)", "forward", "loglik", "ll+grad", "vmap", "fwd/g", "grad/g", "CC")
    print("{:>6} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>9}".format(*header))
    ms = lambda t: f"{t * 1e3:7.1f}ms"  # noqa: E731
    for r in rows:
        vmap_key = next(k for k in r if k.startswith("vmap_"))
        print(
            f"{r['n_atoms']:>6} {'x'.join(map(str, r['grid'])):>12} {ms(r['gemmi_forward_s'])} "
            f"{ms(r['gemmi_forward_same_radius_s'])} {ms(r['forward_s'])} {ms(r['loglik_s'])} "
            f"{ms(r['loglik_grad_s'])} {ms(r[vmap_key])} {r['ratio_forward']:>6.2f} {r['ratio_loglik_grad']:>6.2f} "
            f"{r['cc_vs_gemmi']:>9.6f}"
        )
    print(
        "gemmi: DensityCalculatorX, default cutoff; gemmi(R): cutoff at our truncation radius; vmap: value+grad "
        f"of {args.particles} particles x 2 members; ratios: ours / gemmi (default cutoff)"
    )
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
