"""The denoising interface every predictor implements.

A predictor is built once for one input (structure file or sequence): expensive conditioning runs then, under
``no_grad``, and is cached.  Afterwards it only answers ``denoise(x, sigma) -> x0_hat`` calls, with coordinates in
Angstrom and ``x`` of shape ``[B, N, 3]``.  The sampler (guidance/sampler.py) knows nothing about the network and
the network knows nothing about the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

AtomKey = tuple[str, int, str]  # (chain_id, res_seq, atom_name): how atoms are matched between layouts


@dataclass(frozen=True)
class AtomLayout:
    """Which atoms a predictor models, in its order.  All arrays have length N."""

    chain_id: np.ndarray  # str
    res_seq: np.ndarray  # int
    res_name: np.ndarray  # str
    atom_name: np.ndarray  # str
    element: np.ndarray  # str, upper case ("C", "N", "O", "S", "FE", ...)
    _index: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.chain_id)
        arrays = {
            "chain_id": np.asarray(self.chain_id, dtype=object).astype(str),
            "res_seq": np.asarray(self.res_seq, dtype=np.int64),
            "res_name": np.asarray(self.res_name, dtype=object).astype(str),
            "atom_name": np.asarray(self.atom_name, dtype=object).astype(str),
            "element": np.char.upper(np.asarray(self.element, dtype=object).astype(str)),
        }
        for name, arr in arrays.items():
            if arr.shape != (n,):
                raise ValueError(f"AtomLayout.{name} has shape {arr.shape}, expected ({n},)")
            object.__setattr__(self, name, arr)

    def __len__(self) -> int:
        return len(self.chain_id)

    def keys(self) -> list[AtomKey]:
        return list(zip(self.chain_id.tolist(), self.res_seq.tolist(), self.atom_name.tolist()))

    def index(self) -> dict[AtomKey, int]:
        """Map (chain, residue number, atom name) -> position; built once."""
        if self._index is None:
            keys = self.keys()
            idx = {k: i for i, k in enumerate(keys)}
            if len(idx) != len(keys):
                seen: set = set()
                dup = next(k for k in keys if k in seen or seen.add(k))
                raise ValueError(f"AtomLayout has a duplicate atom {dup}")
            object.__setattr__(self, "_index", idx)
        return self._index

    def select(self, mask_or_index) -> "AtomLayout":
        sel = np.asarray(mask_or_index)
        return AtomLayout(self.chain_id[sel], self.res_seq[sel], self.res_name[sel], self.atom_name[sel], self.element[sel])

    # Residue grouping: a residue is every atom with one (chain, residue number), wherever it sits in the layout;
    # residues are numbered in order of their first atom.  Only ``chain_id`` and ``res_seq`` are read, so these also
    # serve duck-typed layouts (``AtomLayout.residue_index(obj)``).

    def residue_keys(self) -> list[tuple[str, int]]:
        """(chain, residue number) of every atom, in layout order (length N)."""
        return list(zip(np.asarray(self.chain_id).tolist(), np.asarray(self.res_seq).tolist()))

    def residues(self) -> list[tuple[str, int]]:
        """Distinct (chain, residue number) in layout order."""
        return list(dict.fromkeys(AtomLayout.residue_keys(self)))

    def residue_index(self) -> np.ndarray:
        """[N] int64: for each atom, the position of its residue in :meth:`residues`."""
        keys = AtomLayout.residue_keys(self)
        order = {k: r for r, k in enumerate(dict.fromkeys(keys))}
        return np.array([order[k] for k in keys], dtype=np.int64)

    def residue_atoms(self) -> dict[tuple[str, int], np.ndarray]:
        """(chain, residue number) -> int64 indices of its atoms (increasing), residues in layout order."""
        groups: dict[tuple[str, int], list[int]] = {}
        for i, key in enumerate(AtomLayout.residue_keys(self)):
            groups.setdefault(key, []).append(i)
        return {k: np.array(v, dtype=np.int64) for k, v in groups.items()}


@dataclass(frozen=True)
class NoiseSchedule:
    """EDM / AlphaFold-3 sampling parameters a predictor was trained with (Karras et al. 2022; AF3 suppl. Alg. 18).

    As in AF3 and Boltz, ``sigma_max`` and ``sigma_min`` are in units of ``sigma_data``: the absolute noise levels run
    from ``sigma_data * sigma_max`` (2560 A by default) down to ``sigma_data * sigma_min``.  ``gamma_min`` is absolute
    (A): the churn factor ``gamma_0`` applies while sigma > ``gamma_min``.  ``noise_scale`` scales the churn noise,
    ``step_scale`` the ODE step.  Defaults are AlphaFold-3's.
    """

    sigma_data: float = 16.0
    sigma_max: float = 160.0
    sigma_min: float = 4e-4
    rho: float = 7.0
    gamma_0: float = 0.8
    gamma_min: float = 1.0
    noise_scale: float = 1.003
    step_scale: float = 1.5

    def replace(self, **changes) -> "NoiseSchedule":
        from dataclasses import replace

        return replace(self, **changes)


@runtime_checkable
class Denoiser(Protocol):
    layout: AtomLayout
    schedule: NoiseSchedule

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0_hat = D(x, sigma) for x [B, N, 3] (Angstrom) and sigma [B]; differentiable in x."""
        ...
