"""Boltz-1 / Boltz-2 behind the denoising interface, checked on tiny randomly initialised Boltz models (CPU, no
downloads): the physics of the interface (padding, gradients, conditioning once) and exact equivalence with Boltz's
own sampler."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("boltz")

from predictors.boltz import (  # noqa: E402
    TINY_MSA,
    TINY_PAIRFORMER,
    Boltz1Denoiser,
    Boltz2Denoiser,
    _steering_off,
    boltz_schedule,
    load_boltz,
    sequences_from_structure,
    tiny_model,
    unmatched_atoms,
)
from guidance.sampler import euler_step, kabsch_align, plan  # noqa: E402
from structures import SEQRES_PDB as PDB, two_state_inputs  # noqa: E402  (tests/structures.py)

# 63 + 34 + 63 = 160 heavy atoms: a multiple of Boltz's 32-atom window, so Boltz pads nothing and its sampler's
# centring (which includes pads) acts on exactly our atoms.  Chains A and C share an entity.
SEQS = {"A": "MKTAYIAK", "B": "GSWH", "C": "MKTAYIAK"}
def save_checkpoint(model, path):
    """A Lightning-style checkpoint (state_dict + hyper-parameters), as load_from_checkpoint reads it."""
    import pytorch_lightning as lightning

    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)


CLASSES = {"boltz1": Boltz1Denoiser, "boltz2": Boltz2Denoiser}


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in CLASSES}


@pytest.fixture(scope="module")
def denoisers(models):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {f: CLASSES[f](models[f], SEQS, cache_dir=None, recycling_steps=1, seed=0) for f in CLASSES}


FAMILIES = pytest.mark.parametrize("family", ["boltz1", "boltz2"])


@FAMILIES
def test_schedule_is_boltz_cli_parameters(family):
    from boltz.main import Boltz2DiffusionParams, BoltzDiffusionParams

    params = BoltzDiffusionParams() if family == "boltz1" else Boltz2DiffusionParams()
    sched = boltz_schedule(family)
    for name in ("sigma_data", "sigma_max", "sigma_min", "rho", "gamma_0", "gamma_min", "noise_scale", "step_scale"):
        assert getattr(sched, name) == pytest.approx(getattr(params, name))


@FAMILIES
def test_layout_groups_chains_by_entity_and_follows_reference_atoms(denoisers, family):
    from boltz.data import const

    d = denoisers[family]
    layout = d.layout
    assert list(dict.fromkeys(layout.chain_id.tolist())) == ["A", "C", "B"]  # identical sequences grouped
    assert "OXT" not in set(layout.atom_name.tolist()) and not any(n.startswith("H") for n in layout.atom_name)
    for chain, seq in SEQS.items():
        for i, letter in enumerate(seq):
            res = const.prot_letter_to_token[letter]
            sel = (layout.chain_id == chain) & (layout.res_seq == i + 1)
            assert layout.atom_name[sel].tolist() == const.ref_atoms[res]
            assert set(layout.res_name[sel]) == {res}
    assert set(layout.element.tolist()) <= {"C", "N", "O", "S"}
    assert len(layout.index()) == len(layout) == 160


@FAMILIES
def test_denoise_shapes_and_gradient_flow_to_x(denoisers, family):
    d = denoisers[family]
    assert d.needs_augmentation and d.needs_alignment
    x = (10 * torch.randn(2, len(d.layout), 3)).requires_grad_(True)
    out = d.denoise(x, torch.tensor([3.0, 40.0]))
    assert out.shape == x.shape
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@FAMILIES
def test_padded_atoms_do_not_influence_real_atoms(models, family):
    # "GSW": 24 real atoms padded to 32.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = CLASSES[family](models[family], {"A": "GSW"}, cache_dir=None, recycling_steps=0)
    assert len(d.layout) == 24 and d.n_padded == 32
    real = d._pad_mask
    torch.manual_seed(1)
    x = 10 * torch.randn(2, 32, 3)
    y = x.clone()
    y[:, ~real] = 100 * torch.randn(2, int((~real).sum()), 3)
    sigma = torch.tensor([2.0, 30.0])
    a, b = d.denoise_padded(x, sigma)[:, real], d.denoise_padded(y, sigma)[:, real]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(d.denoise(x[:, real], sigma), a, rtol=1e-5, atol=1e-4)


@FAMILIES
def test_trunk_runs_once_however_many_denoise_calls(models, family):
    calls = []
    hook = models[family].pairformer_module.register_forward_hook(lambda *a: calls.append(1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = CLASSES[family](models[family], {"A": "GSW"}, cache_dir=None, recycling_steps=2)
        assert len(calls) == 3  # recycling_steps + 1 passes, as Boltz does
        for b in (1, 2, 3, 2):
            d.denoise(torch.randn(b, len(d.layout), 3), torch.full((b,), 5.0))
        assert len(calls) == 3
    finally:
        hook.remove()


def test_boltz1_model_cache_is_keyed_by_batch_size(denoisers):
    d = denoisers["boltz1"]
    sm = d.model.structure_module
    assert sm.use_inference_model_cache
    torch.manual_seed(2)
    for b in (2, 3, 2):
        x = 10 * torch.randn(b, d.n_padded, 3)
        sigma = torch.full((b,), 7.0)
        got = d.denoise_padded(x, sigma)
        kwargs = dict(d.condition, multiplicity=b, model_cache=None)
        want, _ = sm.preconditioned_network_forward(x, sigma, network_condition_kwargs=kwargs, training=False)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert set(d._caches) == {2, 3}


@FAMILIES
def test_our_sampler_steps_reproduce_boltz_atom_diffusion_sample(denoisers, family):
    """Unguided, same random draws: our plan/euler_step/kabsch_align driving our denoiser reproduce Boltz's own
    AtomDiffusion.sample.  Draws are taken from torch's global generator in Boltz's order: initial noise, then per
    step the random rotation + translation (Boltz's helper), centring, churn noise."""
    from boltz.model.modules.utils import compute_random_augmentation

    d = denoisers[family]
    sm = d.model.structure_module
    n_steps, mult, seed = 6, 2, 123
    mask = d.feats["atom_pad_mask"]
    assert int(mask.sum()) == d.n_padded == len(d.layout)  # nothing padded: centring sees the same atoms
    torch.manual_seed(seed)
    with torch.no_grad():
        ref = sm.sample(atom_mask=mask if family == "boltz1" else mask.float(), num_sampling_steps=n_steps,
                        multiplicity=mult, max_parallel_samples=mult, steering_args=_steering_off(),
                        **d.condition)["sample_atom_coords"]

    steps = plan(d.schedule, n_steps)
    torch.manual_seed(seed)
    x = steps[0].sigma * torch.randn(mult, len(d.layout), 3)
    with torch.no_grad():
        for step in steps:
            rot, shift = compute_random_augmentation(mult)
            x = x - x.mean(dim=-2, keepdim=True)
            x = torch.einsum("bmd,bds->bms", x, rot) + shift
            x_hat = x + step.noise_std * torch.randn(x.shape)
            x0 = d.denoise(x_hat, torch.full((mult,), step.t_hat))
            x_hat = kabsch_align(x_hat, x0)
            x = euler_step(x_hat, x0, step, d.schedule.step_scale)
    rel = (x - ref).norm() / ref.norm()
    print(f"{family}: relative error vs AtomDiffusion.sample {float(rel):.2e}")
    assert rel < 1e-4, f"relative error {rel:.2e}"


def test_unknown_residue_is_named(models):
    with pytest.raises(ValueError, match=r"'X' at position 3"):
        Boltz2Denoiser(models["boltz2"], {"A": "GSXW"}, cache_dir=None)


def test_missing_checkpoint_names_path_and_how_to_get_weights(tmp_path):
    missing = tmp_path / "boltz2_conf.ckpt"
    with pytest.raises(FileNotFoundError) as err:
        load_boltz("boltz2", missing)
    assert str(missing) in str(err.value) and "boltz predict" in str(err.value)


@FAMILIES
def test_checkpoint_round_trip_through_cli_loading(models, tmp_path, family):
    path = tmp_path / f"{family}.ckpt"
    save_checkpoint(models[family], path)
    pair = dict(TINY_PAIRFORMER, v2=family == "boltz2")
    loaded = load_boltz(family, path, pairformer_args=pair, msa_args=dict(TINY_MSA), recycling_steps=0)
    assert loaded.structure_module.gamma_0 == pytest.approx(boltz_schedule(family).gamma_0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = CLASSES[family](models[family], {"A": "GSW"}, cache_dir=None, recycling_steps=0)
        b = CLASSES[family](loaded, {"A": "GSW"}, cache_dir=None, recycling_steps=0)
    x = 10 * torch.randn(2, len(a.layout), 3)
    sigma = torch.tensor([1.0, 20.0])
    torch.testing.assert_close(a.denoise(x, sigma), b.denoise(x, sigma), rtol=0, atol=0)




def test_structure_input_uses_seqres_and_file_numbering(models, tmp_path):
    path = tmp_path / "small.pdb"
    path.write_text(PDB)
    seqs, numbers = sequences_from_structure(path)
    assert seqs == {"A": "MGSWK"} and numbers == {"A": [None, 11, 12, None, None]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = Boltz2Denoiser(models["boltz2"], path, cache_dir=None, recycling_steps=0)
    assert d.layout.residues() == [("A", r) for r in (10, 11, 12, 13, 14)]

    from predictors.base import AtomLayout

    file_atoms = AtomLayout(np.array(["A"] * 11), np.array([11] * 4 + [12] * 7), np.array(["GLY"] * 4 + ["SER"] * 7),
                            np.array(["N", "CA", "C", "O", "N", "CA", "C", "O", "CB", "OG", "OXT"]),
                            np.array(list("NCCONCCOCOO")))
    missing_in_file, extra_in_file = unmatched_atoms(d.layout, file_atoms)
    assert extra_in_file == [("A", 12, "OXT")]
    assert ("A", 10, "SD") in missing_in_file and ("A", 11, "CA") not in missing_in_file
    assert len(missing_in_file) == len(d.layout) - 10


def test_ligands_in_the_file_are_reported_as_not_modelled(tmp_path, caplog):
    path = tmp_path / "with_ligand.pdb"
    het = "HETATM   12  C1  GOL A 101       9.000   9.000   9.000  1.00  0.00           C\n"
    water = "HETATM   13  O   HOH A 201       8.000   8.000   8.000  1.00  0.00           O\n"
    path.write_text(PDB.replace("END\n", "TER\n" + het + water + "END\n"))
    with caplog.at_level("WARNING", logger="predictors.boltz"):
        seqs, _ = sequences_from_structure(path)
    assert seqs == {"A": "MGSWK"}
    assert "not modelled" in caplog.text and "GOL" in caplog.text and "HOH" not in caplog.text


def test_nonstandard_residue_in_file_is_named(models, tmp_path):
    path = tmp_path / "mse.pdb"
    path.write_text(PDB.replace("SEQRES   1 A    5  MET GLY", "SEQRES   1 A    5  MET GLY")
                    .replace("SER A  12", "MSE A  12"))
    with pytest.raises(ValueError, match="MSE A12"):
        sequences_from_structure(path)


@pytest.fixture(scope="module")
def e2e_inputs(tmp_path_factory, models):
    """The demo's two-state peptide, a synthetic map of its 0.6/0.4 mixture, and a tiny Boltz-2 checkpoint."""
    root = tmp_path_factory.mktemp("boltz_e2e")
    pep, structure, map_path = two_state_inputs(root)
    ckpt = root / "tiny_boltz2.ckpt"
    save_checkpoint(models["boltz2"], ckpt)
    return root, structure, map_path, ckpt


@pytest.mark.parametrize("method", ["dps", "fk"])
def test_ensemble_guide_runs_with_a_boltz2_checkpoint(e2e_inputs, tmp_path, method):
    import json
    import subprocess
    import sys

    root, structure, map_path, ckpt = e2e_inputs
    out = tmp_path / "run"
    pair = ",".join(f"{k}:{v}" for k, v in dict(TINY_PAIRFORMER, v2=True).items())
    msa = ",".join(f"{k}:{v}" for k, v in TINY_MSA.items())
    args = ["predictor=boltz2", f"predictor.checkpoint={ckpt}", f"predictor.cache_dir={root / 'no_cache'}",
            "predictor.recycling_steps=0", f"predictor.pairformer_args={{{pair}}}", f"predictor.msa_args={{{msa}}}",
            f"structure={structure}", f"observables.density.map={map_path}", f"guidance={method}",
            "sampler.steps=5", "ensemble_size=2", "output.plots=false", f"hydra.run.dir={out}", "potentials=[boltz]"]
    if method == "fk":
        args.append("guidance.particles=2")
    proc = subprocess.run([sys.executable, "-m", "guidance.app", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("ensemble.cif", "metrics.json", "trajectory.csv", "run.log"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ensemble"]["size"] == 2 and "density" in metrics["observables"]
    # the demo peptide has every heavy atom Boltz models (no OXT): nothing unmatched either way
    assert metrics["predictor"]["unmatched_atoms"] == {"not_in_structure": [], "not_in_predictor": []}
    log = (out / "run.log").read_text()
    assert "boltz2" in log and "x-ray diffraction" in log and "approximate" in log
    # Boltz's steering energies took part (one chain: no inter-chain clash or chain-COM energy, so they are zero)
    assert "potential boltz" in log and metrics["potentials"]["boltz"]["energy_mean"] == 0.0
    assert "loglik_boltz" in (out / "trajectory.csv").read_text().splitlines()[0]


def _clashing_chains(denoiser, shift=0.0):
    """Chains laid out along x, 6 A apart per residue; chain B moved onto chain A by ``shift`` A."""
    lay = denoiser.layout
    x = np.zeros((len(lay), 3), np.float32)
    for c, chain in enumerate(["A", "B", "C"]):
        m = lay.chain_id == chain
        x[m, 0] = np.arange(m.sum()) * 0.6
        x[m, 1] = 20.0 * c
    x[lay.chain_id == "B", 1] -= shift
    return torch.as_tensor(x)[None]


@FAMILIES
def test_boltz_potentials_are_boltzs_fk_energy_with_exact_gradient(denoisers, family):
    """The energy is Boltz's own resampling-weighted sum; its gradient is the exact derivative (finite differences),
    equal to Boltz's analytic gradient for the clash term and to Boltz's chain-COM gradient divided by (the chain's
    atom count + 1) (Boltz spreads the COM gradient unscaled over the atoms)."""
    d = denoisers[family]
    pots = d.potentials()
    assert {"vdw_overlap", "chain_com", "connections"} <= set(pots.names)
    gen = torch.Generator().manual_seed(1)
    x = _clashing_chains(d, shift=19.0) + 0.3 * torch.randn(1, len(d.layout), 3, generator=gen)
    x[0, d.layout.chain_id == "C", 1] = 1.0  # chains A and C (one entity) with nearly the same centre of mass
    t = 0.5
    energy, grad, parts = pots.energy_and_grad(x, t)
    assert parts["vdw_overlap"] > 0 and parts["chain_com"] > 0
    xp = pots._pad(x)
    expected = 0.0
    for name, pot in pots.potentials.items():
        params = pot.compute_parameters(t)
        expected += params["resampling_weight"] * float(pot.compute(xp, d.feats, params)[0])
    assert float(energy[0]) == pytest.approx(expected, rel=1e-6)
    # finite differences on a few coordinates (the energy is piecewise linear: central differences are exact
    # away from the kinks)
    xd = x.double()
    for atom, k in [(int(np.flatnonzero(d.layout.chain_id == "B")[3]), 1), (0, 0), (5, 2)]:
        h = 1e-3
        plus, minus = xd.clone(), xd.clone()
        plus[0, atom, k] += h
        minus[0, atom, k] -= h
        fd = (float(pots.energy(plus.float(), t)[0][0]) - float(pots.energy(minus.float(), t)[0][0])) / (2 * h)
        assert fd == pytest.approx(float(grad[0, atom, k]), abs=2e-2, rel=2e-2)
    real = d._real
    vdw, com = pots.potentials["vdw_overlap"], pots.potentials["chain_com"]
    g_vdw = vdw.compute_gradient(xp, d.feats, vdw.compute_parameters(t))[:, real]
    _, g_ours, _ = d.potentials(["vdw_overlap"]).energy_and_grad(x, t)
    w_vdw = vdw.compute_parameters(t)["resampling_weight"]
    assert torch.allclose(g_ours, w_vdw * g_vdw, atol=1e-5)
    g_com = com.compute_gradient(xp, d.feats, com.compute_parameters(t))[:, real]
    _, g_ours, _ = d.potentials(["chain_com"]).energy_and_grad(x, t)
    sizes = torch.as_tensor([float((d.layout.chain_id == c).sum()) for c in d.layout.chain_id])
    w_com = com.compute_parameters(t)["resampling_weight"]
    # Boltz's centre of mass is scatter_reduce("mean") with include_self: sum / (n + 1), so d COM / d x = 1 / (n + 1)
    assert torch.allclose(g_ours * (sizes + 1)[None, :, None], w_com * g_com, atol=1e-5)


def test_boltz_potential_term_tilts_the_objective_and_its_gradient_separates_clashing_chains(denoisers):
    """In the objective the potential adds -weight * (sum over members of E) to each particle's log-likelihood; a
    few ascent steps along the objective's gradient pull overlapping chains apart."""
    from guidance.objective import Objective, PotentialTerm, Term
    from observables.base import AtomInfo
    from observables.linear import LinearGaussian

    d = denoisers["boltz2"]
    n = len(d.layout)
    obs = LinearGaussian(AtomInfo.from_layout(d.layout), np.zeros((1, 3 * n)), np.zeros(1), noise=1.0)
    pots = d.potentials(["vdw_overlap"])
    weight = 2.0
    objective = Objective([Term("flat", obs)], n_members=2, potentials=[PotentialTerm("boltz", pots.energy_and_grad,
                                                                                       weight)])
    x = torch.cat([_clashing_chains(d, shift=19.0), _clashing_chains(d, shift=0.0)])  # member 2 has no clash
    total, grad, terms = objective(x, t=0.0)
    e, _ = pots.energy(x, 0.0)
    assert e[0] > 0 and e[1] == 0
    assert float(terms["boltz"][0]) == pytest.approx(-weight * float(e.sum()), rel=1e-6)
    assert float(total[0]) == pytest.approx(float(terms["flat"][0] + terms["boltz"][0]), rel=1e-6)
    value, _ = objective.value(x, t=0.0)
    assert float(value[0]) == pytest.approx(float(total[0]), rel=1e-6)
    y = x.clone()
    for _ in range(150):
        _, grad, _ = objective(y, t=0.0)
        y = y + 0.05 * grad
    after, _ = pots.energy(y, 0.0)
    assert float(after[0]) < 0.5 * float(e[0])
    reports = objective.potential_reports(x.numpy())
    assert reports["boltz"]["energy_mean"] == pytest.approx(float(e.mean()), rel=1e-6)


def test_unknown_boltz_potential_is_named(denoisers):
    with pytest.raises(ValueError, match="unknown Boltz potential.*available"):
        denoisers["boltz1"].potentials(["clash"])


@FAMILIES
def test_component_files_in_cache_dir_are_used_without_warning(models, tmp_path, family):
    from rdkit import Chem

    from predictors.boltz import _rdkit_amino_acid

    Chem.SetDefaultPickleProperties(Chem.PropertyPickleOptions.AllProps)  # as Boltz pickles its components
    mols = {res: _rdkit_amino_acid(res) for res in ("GLY", "SER", "TRP")}
    if family == "boltz1":
        import pickle

        (tmp_path / "ccd.pkl").write_bytes(pickle.dumps(mols))
    else:
        import pickle

        (tmp_path / "mols").mkdir()
        for res in ("ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "HIS", "ILE", "LEU", "LYS", "MET", "PHE", "PRO",
                    "THR", "TYR", "VAL"):
            mols.setdefault(res, mols["GLY"])  # unused by this input; load_molecules wants every amino acid
        for res, mol in mols.items():
            (tmp_path / "mols" / f"{res}.pkl").write_bytes(pickle.dumps(mol))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        d = CLASSES[family](models[family], {"A": "GSW"}, cache_dir=tmp_path, recycling_steps=0)
    assert not d.approximate_conformers and len(d.layout) == 24


def test_wrong_checkpoint_file_is_named(tmp_path):
    bad = tmp_path / "boltz1_conf.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be loaded as a boltz1 checkpoint"):
        load_boltz("boltz1", bad)


@FAMILIES
def test_a3m_msa_reaches_the_features(models, tmp_path, family):
    a3m = tmp_path / "gsw.a3m"
    a3m.write_text(">query\nGSW\n>hit1\nGTW\n>hit2\nASW\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = CLASSES[family](models[family], {"A": "GSW"}, cache_dir=None, msa=a3m, recycling_steps=0)
    assert d.feats["msa"].shape[1] == 3  # query + 2 hits (single-sequence mode has 1 row)
    with pytest.raises(ValueError, match="one MSA file for chains with different sequences"), \
            pytest.warns(UserWarning, match="reference conformers are approximate"):
        CLASSES[family](models[family], {"A": "GSW", "B": "GS"}, cache_dir=None, msa=a3m)
