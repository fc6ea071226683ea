"""The rotamer-expanded single-conformer prior: chi geometry, the library against real alternate rotamers, and the
exactness of its factorised denoiser."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from guidance.fixtures import build_peptide
from predictors.reference import ReferencePrior
from predictors.rotamers import (
    CHI_ATOMS,
    RotamerPrior,
    dihedral,
    library,
    remoteness,
    set_chis,
    side_chain_blocks,
)

PEPTIDES = Path(__file__).resolve().parents[2] / "shared" / "data" / "structures" / "multiconf-peptides"
HELIX = (-57.0, -47.0)


def wrapped(angles, target):
    """Differences of angles (degrees) to target, wrapped into [-180, 180)."""
    return (np.asarray(angles) - np.asarray(target) + 180.0) % 360.0 - 180.0


def residue(layout, coords, index):
    keys = layout.residues()
    sel = (layout.chain_id == keys[index][0]) & (layout.res_seq == keys[index][1])
    return layout.atom_name[sel].tolist(), coords[sel], str(layout.res_name[sel][0])


def test_library_covers_the_chi_definitions():
    lib = library()
    assert set(lib) == set(CHI_ATOMS)  # every residue with free chis, proline left out
    for res, rows in lib.items():
        assert all(len(chis) == len(CHI_ATOMS[res]) for _, _, chis in rows), res
    assert len(lib["ARG"]) == 34 and len(lib["LYS"]) == 27 and len(lib["TRP"]) == 7
    assert remoteness("CG") == 2 and remoteness("HD21") == 3 and remoteness("OH") == 6 and remoteness("CA") == 0
    assert remoteness("N") == -1 and remoteness("OXT") == -1


@pytest.mark.parametrize("letter", ["Y", "K", "F", "N", "I", "M", "R", "E"])
def test_set_chis_matches_an_independent_nerf_build(letter):
    """Turning the chis of a NeRF-built residue to a library rotamer gives the same atoms as building that rotamer
    directly (guidance.fixtures.build_peptide places side chains from internal coordinates, independently)."""
    res3 = {"Y": "TYR", "K": "LYS", "F": "PHE", "N": "ASN", "I": "ILE", "M": "MET", "R": "ARG", "E": "GLU"}[letter]
    start, target = library()[res3][0][2], library()[res3][-1][2]
    layout, xyz = build_peptide(f"A{letter}A", [HELIX] * 3, chis={1: start})
    names, local, _ = residue(layout, xyz, 1)
    chis = [dihedral(*(local[names.index(a)] for a in chi)) for chi in CHI_ATOMS[res3]]
    np.testing.assert_allclose(wrapped(chis, start), 0.0, atol=1e-6)
    turned = set_chis(names, local, res3, target)
    _, direct = build_peptide(f"A{letter}A", [HELIX] * 3, chis={1: target})
    _, want, _ = residue(layout, direct, 1)
    np.testing.assert_allclose(turned, want, atol=1e-6)
    chis = [dihedral(*(turned[names.index(a)] for a in chi)) for chi in CHI_ATOMS[res3]]
    np.testing.assert_allclose(wrapped(chis, target), 0.0, atol=1e-6)


@pytest.mark.parametrize("name,min_blocks", [("AWA_2conf.pdb", 1), ("GNNAFNS_multiconf.pdb", 3), ("SKH_multiconf.pdb", 1)])
def test_library_rotamers_built_on_a_reach_the_real_b_side_chains(name, min_blocks):
    """Expanding altloc A's side chains over the library (no knowledge of B) yields, for every residue whose side chain
    differs in B, a component within 0.35 A RMSD of B's side chain (measured: Trp 0.13, Asn 0.15 / 0.33, Phe 0.29,
    Lys 0.09 A)."""
    path = PEPTIDES / name
    if not path.is_file():
        pytest.skip(f"reference data absent: {path} (../shared/data)")
    from guidance.structures.io import read_structure

    conf = read_structure(path)
    a, b = conf.coords[0].astype(np.float64), conf.coords[1].astype(np.float64)
    blocks = side_chain_blocks(conf.layout, a)
    moved = 0
    for block in blocks:
        rmsd = np.sqrt(((block.positions - b[block.atoms]) ** 2).sum(-1).mean(-1))
        if rmsd[0] > 1.0:  # B's side chain is another rotamer
            moved += 1
            assert rmsd.min() < 0.35, (block.res_name, block.res_seq, rmsd.min())
        assert block.weights[0] == pytest.approx(0.8) and block.weights.sum() == pytest.approx(1.0)
    assert moved >= min_blocks


def small_prior(n_modes=0):
    layout, xyz = build_peptide("GYAKG", [HELIX] * 5, chis={1: (-65.0, -85.0), 3: (-67.0, 180.0, 180.0, 180.0)})
    return RotamerPrior(layout, xyz, tau=0.4, n_modes=n_modes, mode_rms=0.8, anm_cutoff=12.0), layout, xyz


def test_denoiser_equals_the_enumerated_mixture():
    """With an isotropic core the factorised prior is a Gaussian mixture over every combination of rotamers; the
    block-wise denoiser and log-density agree with ReferencePrior over the enumerated product (an independent,
    whole-structure computation)."""
    prior, layout, xyz = small_prior()
    assert len(prior.blocks) == 2
    combos, weights = [], []
    for choice in itertools.product(*[range(len(b.weights)) for b in prior.blocks]):
        x = xyz.copy()
        w = 1.0
        for block, j in zip(prior.blocks, choice):
            x[block.atoms] = block.positions[j]
            w *= block.weights[j]
        combos.append(x)
        weights.append(w)
    assert len(combos) == np.prod([len(b.weights) for b in prior.blocks]) > 20
    full = ReferencePrior(layout, np.stack(combos), np.array(weights), tau=0.4, n_modes=0, dtype=torch.float64)
    prior64 = RotamerPrior(layout, xyz, tau=0.4, n_modes=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0 = full.sample(6, generator=g)
    sigma = torch.tensor([0.05, 0.3, 1.0, 2.5, 6.0, 40.0], dtype=torch.float64)
    x = x0 + sigma[:, None, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(prior64.denoise(x, sigma).numpy(), full.denoise(x, sigma).numpy(), atol=1e-9)
    np.testing.assert_allclose(prior64.log_marginal(x, sigma).numpy(), full.log_marginal(x, sigma).numpy(), rtol=1e-10)


@pytest.mark.parametrize("n_modes", [0, 6])
def test_tweedie_identity(n_modes):
    """D(x, sigma) = x + sigma^2 grad log p_sigma(x), with the score from autograd through log_marginal."""
    prior, layout, xyz = small_prior(n_modes)
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.2, 1.0, 4.0])
    x = (torch.as_tensor(xyz, dtype=torch.float32) + 1.5 * torch.randn((3, len(layout), 3), generator=g))
    x.requires_grad_(True)
    (score,) = torch.autograd.grad(prior.log_marginal(x, sigma).sum(), x)
    expected = x.detach() + sigma[:, None, None] ** 2 * score
    np.testing.assert_allclose(prior.denoise(x, sigma).detach().numpy(), expected.numpy(), atol=2e-4)


def test_samples_follow_the_rotamer_weights():
    prior, _, _ = small_prior(n_modes=6)
    n = 4000
    x = prior.sample(n, generator=torch.Generator().manual_seed(2))
    for k, block in enumerate(prior.blocks):
        r = prior.responsibilities(x, 0.0)[k]  # at sigma 0 each draw sits in its own component (tau << separation)
        freq = torch.bincount(r.argmax(-1), minlength=len(block.weights)).double() / n
        np.testing.assert_allclose(freq.numpy(), block.weights, atol=4 * np.sqrt(0.25 / n))


def test_one_conformer_only():
    _, layout, xyz = small_prior()
    with pytest.raises(ValueError, match="one conformer"):
        RotamerPrior(layout, np.stack([xyz, xyz]))
    with pytest.raises(ValueError, match="self_weight"):
        RotamerPrior(layout, xyz, self_weight=0.0)
