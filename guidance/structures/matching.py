"""Putting one layout's coordinates onto another's atoms (the input structure onto the predictor's layout)."""

from __future__ import annotations

import numpy as np

from observables.errors import InputError


def fill_missing(layout, coords: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Reference coordinates [K, N, 3] for atoms of ``layout`` the input structure lacks (``known`` False): the
    centroid of the known atoms of the same residue, else of the nearest residue in layout order that has some.  They
    only keep an observable's box and mask local (a placeholder at the origin would stretch both); the rigid fit onto
    the input leaves them out."""
    if known.all():
        return coords
    if not known.any():
        raise InputError("none of the predictor's atoms is in the structure: nothing to place the data around")
    out = coords.copy()
    res_index = layout.residue_index()
    have = np.unique(res_index[known])
    for r in np.unique(res_index[~known]):
        source = r if r in have else have[np.argmin(np.abs(have - r))]
        centre = coords[:, known & (res_index == source)].mean(axis=1)  # [K, 3]
        out[:, ~known & (res_index == r)] = centre[:, None]
    return out
