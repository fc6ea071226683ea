"""Predictor atoms the input structure lacks (e.g. a terminal OXT): placeholder reference coordinates stay local and
the rigid fit onto the input leaves them out."""

from __future__ import annotations

import numpy as np
import torch

from guidance.objective import Objective, Term
from guidance.structures.matching import fill_missing
from guidance.sampler import random_rotations
from predictors.base import AtomLayout


def layout_of(rows):
    chain, seq, name = zip(*rows)
    return AtomLayout(list(chain), list(seq), ["ALA"] * len(rows), list(name), [n[0] for n in name])


def test_missing_atoms_sit_at_their_residue_centroid_or_the_nearest_residue():
    layout = layout_of([("A", 1, "N"), ("A", 1, "CA"), ("A", 1, "C"), ("A", 1, "OXT"), ("A", 2, "N"), ("A", 2, "CA"),
                        ("A", 3, "N")])
    coords = np.arange(2 * 7 * 3, dtype=np.float32).reshape(2, 7, 3)
    known = np.array([True, True, True, False, True, True, False])
    out = fill_missing(layout, coords, known)
    np.testing.assert_array_equal(out[:, known], coords[:, known])
    np.testing.assert_allclose(out[:, 3], coords[:, :3].mean(1))  # OXT: its residue's known atoms, per conformer
    np.testing.assert_allclose(out[:, 6], coords[:, 4:6].mean(1))  # residue 3 has none: the nearest residue's
    assert fill_missing(layout, coords, np.ones(7, bool)) is coords


def test_the_rigid_fit_ignores_atoms_the_reference_lacks():
    class Null:  # an observable that only records the frame it was evaluated in
        name = "null"

        def log_likelihood(self, coords, weights):
            return -0.0 * coords.sum()

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(12, 3, generator=g) * 5
    ref[11] = 0.0  # the placeholder of a missing atom
    rot = random_rotations(1, g)[0]
    x = (ref @ rot.T + torch.tensor([3.0, -2.0, 7.0]))[None]
    x[0, 11] = torch.tensor([40.0, 40.0, 40.0])  # the predictor puts the extra atom somewhere else entirely
    weights = torch.ones(12)
    weights[11] = 0.0
    masked = Objective([Term("null", Null(), 1.0)], n_members=1, reference=ref, align=True, reference_weights=weights)
    plain = Objective([Term("null", Null(), 1.0)], n_members=1, reference=ref, align=True)
    fitted, _ = masked._frame(x)
    np.testing.assert_allclose(fitted[0, :11].numpy(), ref[:11].numpy(), atol=1e-4)
    skewed, _ = plain._frame(x)
    assert (skewed[0, :11] - ref[:11]).norm(dim=-1).max() > 1.0  # without the weights the outlier drags the fit
