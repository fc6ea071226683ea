"""Model maps and structure factors computed by gemmi -- forward models independent of the project's own (JAX)
ones, for synthetic data (ensemble-bench) and for checks and timings (scripts/bench_density.py, bench_xray.py) --
and the correlation coefficient the bench reports.

* ``p1_density``: gemmi's DensityCalculatorX (IT92 form factors, 5 Gaussians per atom) of a structure on a P1
  orthogonal cell of ``size`` voxels of ``spacing`` A, blurred by observables.density.resolution_blur(resolution)
  A^2 on top of each atom's B (the project's resolution convention), no d_min (gemmi would re-size the grid).
* ``structure_factors``: DensityCalculatorX in the structure's own cell and space group (every symmetry copy), with
  gemmi's Refmac-compatible blur against aliasing, then FFT (``transform_map_to_f_phi``): read values with
  ``unblur=dc.blur`` to remove that blur again.
"""

from __future__ import annotations

import math

import numpy as np


def p1_density(structure, size, spacing, resolution: float):
    """The DensityCalculatorX of ``structure`` (a gemmi.Structure; its cell is replaced) on a P1 cell of ``size``
    [3] voxels of ``spacing`` [3] A, after put_model_density_on_grid -> the calculator (its ``grid`` is periodic)."""
    import gemmi

    from observables.density import resolution_blur

    size = np.asarray(size, dtype=int)
    structure.cell = gemmi.UnitCell(*(size * np.asarray(spacing, dtype=np.float64)).tolist(), 90, 90, 90)
    structure.spacegroup_hm = "P 1"
    dc = gemmi.DensityCalculatorX()
    dc.blur = resolution_blur(resolution)
    dc.grid.set_unit_cell(structure.cell)
    dc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    dc.grid.set_size(*size.tolist())
    dc.put_model_density_on_grid(structure[0])
    return dc


def atoms_density(xyz: np.ndarray, element: np.ndarray, occupancy: np.ndarray, b_factor: float, resolution: float,
                  size, spacing):
    """``p1_density`` of bare atoms ``xyz [M, 3]`` (elements, occupancies; atoms of occupancy 0 left out; uniform
    ``b_factor``) -> the gemmi grid."""
    from observables.xray import atoms_structure

    return p1_density(atoms_structure(element, xyz, occupancy, b_factor), size, spacing, resolution).grid


def structure_factors(structure, d_min: float):
    """(F grid, calculator) of ``structure`` in its own crystal to ``d_min`` A (module docstring)."""
    import gemmi

    dc = gemmi.DensityCalculatorX()
    dc.d_min = float(d_min)
    dc.set_refmac_compatible_blur(structure[0])
    dc.set_grid_cell_and_spacegroup(structure)
    dc.put_model_density_on_grid(structure[0])
    return gemmi.transform_map_to_f_phi(dc.grid, half_l=True), dc


def correlation(x, y) -> float:
    """Pearson's correlation coefficient of two equally long arrays (NaN when either is constant)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    d = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / d) if d > 0 else float("nan")
