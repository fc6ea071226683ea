"""Protenix behind the denoising interface, checked on a tiny randomly initialised Protenix (CPU, no downloads, the
component cache built offline from biotite's CCD): the physics of the interface (batch/padding independence,
gradients, conditioning once), Protenix's own noise levels, checkpoint loading, and exact equivalence of our
sampler's steps with Protenix's ``sample_diffusion`` under the same random draws."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("protenix", reason="Protenix is an optional extra: bash scripts/install_protenix.sh")
pytest.importorskip("ml_collections", reason="Protenix's dependencies: bash scripts/install_protenix.sh")

from guidance.sampler import euler_step, plan  # noqa: E402
from predictors.protenix import (  # noqa: E402
    COMPONENTS_CIF,
    COMPONENTS_PKL,
    TINY_ARCH,
    ProtenixDenoiser,
    ensure_components,
    load_protenix,
    protenix_configs,
    protenix_schedule,
    save_checkpoint,
    tiny_model,
    unmatched_atoms,
)
from structures import SEQRES_PDB as PDB, two_state_inputs  # noqa: E402  (tests/structures.py)

REPO = Path(__file__).resolve().parents[1]
# Chains A and C share an entity; 54 + 34 + 54 heavy atoms + one OXT per chain = 145, not a multiple of Protenix's
# 32-atom query window, so its internal atom padding is exercised.
SEQS = {"A": "MKTAYIA", "B": "GSWH", "C": "MKTAYIA"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return ensure_components(tmp_path_factory.mktemp("protenix_components"))


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def denoiser(model, cache):
    return ProtenixDenoiser(model, SEQS, cache_dir=cache, n_cycle=1, seed=0)


def test_schedule_is_protenix_inference_defaults():
    configs = protenix_configs()
    sched = protenix_schedule(configs)
    assert (sched.sigma_data, sched.sigma_max, sched.sigma_min, sched.rho) == (16.0, 160.0, 4e-4, 7.0)
    assert (sched.gamma_0, sched.gamma_min, sched.noise_scale, sched.step_scale) == (0.8, 1.0, 1.003, 1.5)
    # the distilled mini/tiny models sample without churn, as Protenix's model configs say
    mini = protenix_schedule(protenix_configs("protenix_mini_default_v0.5.0"))
    assert (mini.gamma_0, mini.step_scale) == (0.0, 1.0)


@pytest.mark.parametrize("n_steps", [2, 5, 40, 200])
def test_plan_hits_protenix_noise_levels(model, n_steps):
    """Protenix spaces N steps at i/N then 0 (AF3/Boltz: i/(N-1)); with n_steps our plan reproduces its levels and
    its churn decisions (gamma_0 while the next level exceeds gamma_min)."""
    theirs = model.inference_noise_scheduler(N_step=n_steps, dtype=torch.float64)
    sched = protenix_schedule(model.configs, n_steps)
    steps = plan(sched, n_steps)
    ours = torch.tensor([s.sigma for s in steps] + [steps[-1].sigma_next], dtype=torch.float64)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    gamma_min, gamma_0 = model.configs.sample_diffusion.gamma_min, model.configs.sample_diffusion.gamma0
    assert [s.gamma for s in steps] == [gamma_0 if float(t) > gamma_min else 0.0 for t in theirs[1:]]


def test_layout_follows_protenix_atom_array(denoiser):
    d = denoiser
    layout = d.layout
    assert list(dict.fromkeys(layout.chain_id.tolist())) == ["A", "C", "B"]  # identical sequences: one entity
    assert len(layout) == int(d.feats["atom_to_token_idx"].shape[0]) == 145
    assert len(layout.index()) == len(layout)
    oxt = [k for k in layout.keys() if k[2] == "OXT"]
    assert oxt == [("A", 7, "OXT"), ("C", 7, "OXT"), ("B", 4, "OXT")]  # C-terminal residues keep their OXT
    assert not any(name.startswith("H") for name in layout.atom_name)
    sel = (layout.chain_id == "B") & (layout.res_seq == 3)
    assert set(layout.res_name[sel]) == {"TRP"} and sel.sum() == 14
    assert set(layout.element.tolist()) == {"C", "N", "O", "S"}


def test_denoise_shapes_and_gradient_flow_to_x(denoiser):
    d = denoiser
    assert d.needs_augmentation and d.needs_alignment
    x = (10 * torch.randn(2, len(d.layout), 3)).requires_grad_(True)
    out = d.denoise(x, torch.tensor([3.0, 40.0]))
    assert out.shape == x.shape and out.dtype == x.dtype
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="must have shape"):
        d.denoise(x[:, :-1], torch.tensor([3.0, 40.0]))


def test_each_structure_is_denoised_independently_of_batch_and_padding(denoiser):
    """x0_hat of one structure does not depend on which other structures share the batch, nor on the batch size:
    Protenix's internal window padding (145 atoms in 32-atom windows) and batching do not leak between samples."""
    d = denoiser
    gen = torch.Generator().manual_seed(3)
    x = 12 * torch.randn(3, len(d.layout), 3, generator=gen)
    sigma = torch.tensor([2.0, 15.0, 80.0])
    with torch.no_grad():
        together = d.denoise(x, sigma)
        alone = torch.cat([d.denoise(x[i:i + 1], sigma[i:i + 1]) for i in range(3)])
        swapped = d.denoise(torch.stack([x[0], 30 * torch.randn(len(d.layout), 3, generator=gen)]), sigma[:2])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(swapped[0], together[0], rtol=1e-5, atol=1e-4)
    # a scalar sigma applies to every structure
    torch.testing.assert_close(d.denoise(x[:2], 15.0), d.denoise(x[:2], torch.tensor([15.0, 15.0])))


def test_trunk_runs_once_however_many_denoise_calls(model, cache):
    calls = []
    hook = model.pairformer_stack.register_forward_hook(lambda *a: calls.append(1))
    try:
        d = ProtenixDenoiser(model, {"A": "GSW"}, cache_dir=cache, n_cycle=3)
        assert len(calls) == 3 == d.trunk_calls  # N_cycle passes, as Protenix does
        for b in (1, 2, 3):
            d.denoise(torch.randn(b, len(d.layout), 3), torch.full((b,), 5.0))
        assert len(calls) == 3
    finally:
        hook.remove()


def test_our_sampler_steps_reproduce_protenix_sample_diffusion(denoiser):
    """Unguided, same random draws: our plan/euler_step driving our denoiser reproduce Protenix's own
    ``sample_diffusion`` with its own noise levels (``InferenceNoiseScheduler``) and sampling parameters.  Draws come
    from torch's and NumPy's global generators in Protenix's order: initial noise, then per step the centring +
    random rotation (scipy, NumPy's generator) + translation (Protenix's helper), then the churn noise.  Protenix
    does not align x_hat onto x0_hat (our sampler.align=false)."""
    from protenix.model.utils import centre_random_augmentation

    d = denoiser
    m, c = d.model, d.condition
    n_steps, mult, seed = 8, 2, 123
    assert mult <= m.configs.infer_setting.sample_diffusion_chunk_size  # one chunk: draws in one sequence
    torch.manual_seed(seed)
    np.random.seed(seed)
    with torch.no_grad():
        ref = m.sample_diffusion(
            denoise_net=m.diffusion_module, input_feature_dict=d.feats, s_inputs=c["s_inputs"], s_trunk=c["s_trunk"],
            z_trunk=None, pair_z=c["pair_z"], p_lm=c["p_lm"], c_l=c["c_l"], N_sample=mult,
            noise_schedule=m.inference_noise_scheduler(N_step=n_steps), inplace_safe=True,
            enable_efficient_fusion=m.enable_efficient_fusion)

    sched = protenix_schedule(m.configs, n_steps)
    steps = plan(sched, n_steps)
    torch.manual_seed(seed)
    np.random.seed(seed)
    x = steps[0].sigma * torch.randn(mult, len(d.layout), 3)
    with torch.no_grad():
        for step in steps:
            x = centre_random_augmentation(x, N_sample=1).squeeze(-3)
            x_hat = x + step.noise_std * torch.randn(x.shape)
            x0 = d.denoise(x_hat, torch.full((mult,), step.t_hat))
            x = euler_step(x_hat, x0, step, sched.step_scale)
    rel = (x - ref).norm() / ref.norm()
    print(f"protenix: relative error vs sample_diffusion {float(rel):.2e} ({n_steps} steps, {mult} samples)")
    assert rel < 1e-4, f"relative error {rel:.2e}"


def test_unknown_residue_is_named(model, cache):
    with pytest.raises(ValueError, match=r"'X' at position 3"):
        ProtenixDenoiser(model, {"A": "GSXW"}, cache_dir=cache)


def test_missing_checkpoint_names_path_and_how_to_get_weights(tmp_path):
    missing = tmp_path / "protenix_base_default_v1.0.0.pt"
    with pytest.raises(FileNotFoundError) as err:
        load_protenix(missing)
    assert str(missing) in str(err.value) and "protenix pred" in str(err.value)


def test_wrong_checkpoint_file_is_named(tmp_path):
    bad = tmp_path / "protenix_base_default_v1.0.0.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be loaded as a Protenix protenix_base_default_v1.0.0 checkpoint"):
        load_protenix(bad)


def test_checkpoint_round_trip(model, cache, tmp_path):
    path = save_checkpoint(model, tmp_path / "tiny.pt")
    loaded = load_protenix(path, arch=TINY_ARCH)
    a = ProtenixDenoiser(model, {"A": "GSW"}, cache_dir=cache, n_cycle=1)
    b = ProtenixDenoiser(loaded, {"A": "GSW"}, cache_dir=cache, n_cycle=1)
    x = 10 * torch.randn(2, len(a.layout), 3)
    sigma = torch.tensor([1.0, 20.0])
    torch.testing.assert_close(a.denoise(x, sigma), b.denoise(x, sigma), rtol=0, atol=0)
    with pytest.raises(ValueError, match="could not be loaded"):  # another architecture does not fit (strict)
        load_protenix(path, arch=dict(TINY_ARCH, n_blocks=3))


def test_component_cache_is_offline_complete_and_reproducible(cache, tmp_path):
    """Built from biotite's CCD by Protenix's own builder with a seeded conformer: two builds give the same reference
    conformers, and a built cache is reused as it is."""
    import pickle

    other = ensure_components(tmp_path / "again")
    mols = [pickle.loads((c / COMPONENTS_PKL).read_bytes()) for c in (cache, other)]
    assert {"GLY", "TRP", "MET", "UNK"} <= set(mols[0]) and set(mols[0]) == set(mols[1])
    for code in ("TRP", "LYS"):
        a, b = (m[code] for m in mols)
        np.testing.assert_array_equal(a.GetConformer(a.ref_conf_id).GetPositions(),
                                      b.GetConformer(b.ref_conf_id).GetPositions())
    stamp = (other / COMPONENTS_CIF).stat().st_mtime_ns
    ensure_components(other)
    assert (other / COMPONENTS_CIF).stat().st_mtime_ns == stamp


def test_a3m_msa_reaches_the_features(model, cache, tmp_path):
    a3m = tmp_path / "query.a3m"
    a3m.write_text(">query\nGSWAK\n>hit1\nGTWAK\n>hit2\nASWAR\n")
    d = ProtenixDenoiser(model, {"A": "GSWAK"}, cache_dir=cache, msa=a3m, n_cycle=1)
    # Protenix stacks its paired block (here just the query) over the unpaired rows (query + 2 hits); it ignores the
    # MSAs of chains of <= 4 residues
    assert d.msa_depth == 1 + 3
    assert ProtenixDenoiser(model, {"A": "GSWAK"}, cache_dir=cache, n_cycle=1).msa_depth == 1  # single sequence
    with pytest.raises(ValueError, match="one MSA file for chains with different sequences"):
        ProtenixDenoiser(model, {"A": "GSWAK", "B": "GS"}, cache_dir=cache, msa=a3m)
    with pytest.raises(FileNotFoundError, match="MSA for chain A not found"):
        ProtenixDenoiser(model, {"A": "GSWAK"}, cache_dir=cache, msa=tmp_path / "missing.a3m")




def test_structure_input_uses_seqres_file_numbering_and_reports_unmatched_atoms(model, cache, tmp_path):
    from predictors.base import AtomLayout

    path = tmp_path / "small.pdb"
    path.write_text(PDB)
    d = ProtenixDenoiser(model, path, cache_dir=cache, n_cycle=1)
    assert d.sequences == {"A": "MGSWK"}
    assert d.layout.residues() == [("A", r) for r in (10, 11, 12, 13, 14)]
    file_atoms = AtomLayout(np.array(["A"] * 11), np.array([11] * 4 + [12] * 7), np.array(["GLY"] * 4 + ["SER"] * 7),
                            np.array(["N", "CA", "C", "O", "N", "CA", "C", "O", "CB", "OG", "OXT"]),
                            np.array(list("NCCONCCOCOO")))
    missing_in_file, extra_in_file = unmatched_atoms(d.layout, file_atoms)
    assert extra_in_file == [("A", 12, "OXT")]  # the file's chain ends at 12; Protenix's OXT sits on LYS 14
    assert ("A", 14, "OXT") in missing_in_file and ("A", 10, "SD") in missing_in_file
    assert len(missing_in_file) == len(d.layout) - 10


def test_protenix_packages_and_ours_coexist():
    """Protenix's wheel installs top-level `configs`, `scripts`, `tests`, `runner`; our `configs/`, `scripts/` and
    `tests/` are no importable packages, so from the checkout Protenix's resolve, and ours still work; importing
    Protenix leaves the root logger (Hydra's handlers) as it was."""
    code = (
        "import logging, sys\n"
        "fmt = logging.Formatter('OURS %(message)s')\n"
        "h = logging.StreamHandler(sys.stdout); h.setFormatter(fmt)\n"
        "root = logging.getLogger(); root.addHandler(h); root.setLevel(logging.WARNING)\n"
        "from predictors.protenix import _protenix\n"
        "_protenix()\n"
        "import configs.configs_base, scripts.gen_ccd_cache, runner, guidance.app.job\n"
        "assert 'site-packages' in configs.configs_base.__file__\n"
        "assert 'site-packages' in scripts.gen_ccd_cache.__file__\n"
        "assert root.level == logging.WARNING and root.handlers == [h] and h.formatter is fmt\n"
        "print('ok', guidance.app.job.config_dir())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok") and proc.stdout.strip().endswith("configs")


def _hydra_dict(d: dict) -> str:
    return "{" + ",".join(f"{k}:{_hydra_dict(v) if isinstance(v, dict) else v}" for k, v in d.items()) + "}"


@pytest.fixture(scope="module")
def e2e_inputs(tmp_path_factory, model):
    """The demo's two-state peptide, a synthetic map of its 0.6/0.4 mixture, and a tiny Protenix checkpoint."""
    root = tmp_path_factory.mktemp("protenix_e2e")
    pep, structure, map_path = two_state_inputs(root)
    ckpt = save_checkpoint(model, root / "tiny_protenix.pt")
    return root, structure, map_path, ckpt, pep


@pytest.mark.parametrize("method", ["dps", "fk"])
def test_ensemble_guide_runs_with_a_protenix_checkpoint(e2e_inputs, cache, tmp_path, method):
    _, structure, map_path, ckpt, pep = e2e_inputs
    out = tmp_path / "run"
    args = ["predictor=protenix", f"predictor.checkpoint={ckpt}", f"predictor.cache_dir={cache}",
            f"predictor.arch={_hydra_dict(TINY_ARCH)}", "predictor.n_cycle=1", f"structure={structure}",
            f"observables.density.map={map_path}", f"guidance={method}", "sampler.steps=5", "ensemble_size=2",
            "output.plots=false", f"hydra.run.dir={out}"]
    if method == "fk":
        args.append("guidance.particles=2")
    proc = subprocess.run([sys.executable, "-m", "guidance.app", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("ensemble.cif", "metrics.json", "trajectory.csv", "run.log"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ensemble"]["size"] == 2 and "density" in metrics["observables"]
    assert metrics["predictor"]["name"] == "protenix"
    # Protenix models the C-terminal OXT, which the demo peptide does not have: reported, nothing else unmatched
    last = max(int(r) for r in pep.layout.res_seq)
    assert metrics["predictor"]["unmatched_atoms"] == {"not_in_structure": [["A", last, "OXT"]],
                                                       "not_in_predictor": []}
    log = (out / "run.log").read_text()
    assert "protenix:" in log and "noise levels protenix" in log
    assert "1 predictor atoms are not in the structure" in log
