"""ensemble-bench's entries: the carved two-state model of each manifest entry and its synthetic data (a map and
amplitudes of the A/B mixture, made by gemmi: guidance.structures.maps), cached under ``<out_dir>/entries/<name>/``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from guidance.bench.manifest import BenchError, Entry
from guidance.structures.altlocs import region_mask

# The flat bulk solvent of the synthetic amplitudes: typical refined values for protein crystals, k_sol = 0.35 e/A^3
# and B_sol = 46 A^2 (Fokine & Urzhumtsev 2002, Acta Cryst. D58, 1387: the means over a set of PDB entries).
K_SOL = 0.35  # e/A^3
B_SOL = 46.0  # A^2



@dataclass
class Prepared:
    """An entry ready for jobs: the carved two-state structure and the arrays the metrics need."""

    entry: Entry
    structure: Path  # carved structure with altlocs A/B
    layout: object  # AtomLayout of the carved structure
    states: np.ndarray  # [2, N, 3]: A, B
    region: np.ndarray  # [N] bool
    regions: tuple[tuple[str, int, int], ...]
    ids: tuple[str, str]
    source_ids: list[str] = field(default_factory=list)
    crystal: tuple | None = None  # (cell, space group) written in the carved model (None: no cell, see prepare_entry)
    crystal_source: str = ""  # "the structure's" | "P1 box around the model ..." | why there is none


def model_crystal(crystal: tuple | None, states: np.ndarray, padding: float) -> tuple[tuple, str]:
    """The crystal of the carved model: the structure's own (cell, space group) when it has a real cell, else a P1
    orthogonal cell spanning the atoms of every state plus ``padding`` A on each side -> ((cell, space group), why)."""
    if crystal is not None:
        return (tuple(float(v) for v in crystal[0]), str(crystal[1])), "the structure's"
    points = np.asarray(states, np.float64).reshape(-1, 3)
    lengths = np.round(points.max(0) - points.min(0) + 2.0 * float(padding), 3)
    return ((*lengths.tolist(), 90.0, 90.0, 90.0), "P 1"), f"P1 box around the model (+{float(padding):g} A)"


def _file_crystal(path: Path) -> tuple | None:
    import gemmi

    st = gemmi.read_structure(str(path))
    if not st.cell.is_crystal() or st.cell.a <= 1.0 + 1e-6:
        return None
    sg = st.find_spacegroup()
    return tuple(st.cell.parameters), (sg.xhm() if sg is not None else "P 1")


def _same_crystal(a: tuple | None, b: tuple | None) -> bool:
    import gemmi

    if a is None or b is None:
        return a is b
    sa, sb = gemmi.find_spacegroup_by_name(a[1]), gemmi.find_spacegroup_by_name(b[1])
    return (sa is not None and sb is not None and sa.xhm() == sb.xhm()
            and np.allclose(np.asarray(a[0], float), np.asarray(b[0], float), atol=1e-3))


def write_carved_model(path: Path, layout, states: np.ndarray, crystal: tuple | None) -> Path:
    """The two states as one altloc model (A/B at 0.5/0.5, guidance.structures.io.write_altloc_structure) with the
    CRYST1 of ``crystal`` (cell, space group; None: no cell), written atomically as PDB."""
    import gemmi

    from guidance.structures.io import atomic_write, write_altloc_structure

    if crystal is None:
        return write_altloc_structure(path, layout, np.asarray(states, np.float64), (0.5, 0.5), ids=("A", "B"))
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.nocell.pdb")
    try:
        write_altloc_structure(tmp, layout, np.asarray(states, np.float64), (0.5, 0.5), ids=("A", "B"))
        st = gemmi.read_pdb_string(tmp.read_text())
    finally:
        tmp.unlink(missing_ok=True)
    st.cell = gemmi.UnitCell(*crystal[0])
    st.spacegroup_hm = gemmi.find_spacegroup_by_name(crystal[1]).hm
    return atomic_write(path, st.make_pdb_string())


def prepare_entry(entry: Entry, work: Path, *, min_span: int = 2, carve: float | None = 10.0,
                  box_padding: float = 8.0) -> Prepared:
    """Read, pick the regions and states, carve and write ``work/model.pdb`` with its crystal (``model_crystal``;
    atomically; idempotent: an existing model is rewritten only when its CRYST1 is not that crystal).  An entry with
    an experimental map gets no synthetic amplitudes and its model no cell, as before amplitudes existed: the map's
    own crystal is then not checked against a cell the bench would have made up."""
    from scipy.spatial import cKDTree

    from guidance.structures.io import altloc_regions, read_structure

    conf = read_structure(entry.structure)
    if len(conf.ids) < 2:
        raise BenchError(f"{entry.name}: {entry.structure} has no alternate conformations (altlocs)")
    regions = entry.regions or tuple(altloc_regions(conf, min_span=min_span))
    if not regions:
        raise BenchError(f"{entry.name}: no altloc region spans >= {min_span} residues; give one in the manifest")
    mask = region_mask(conf.layout, regions)
    if not mask.any():
        raise BenchError(f"{entry.name}: regions {list(regions)} select no atoms of {entry.structure}")
    states = conf.coords[:2]
    keep = np.ones(len(conf.layout), bool)
    if carve:
        near = np.zeros(len(conf.layout), bool)
        for s in states:
            hits = cKDTree(np.concatenate([x[mask] for x in states])).query_ball_point(s, r=float(carve))
            near |= np.array([len(h) > 0 for h in hits])
        residues = set(k for k, n in zip(conf.layout.residue_keys(), near) if n)
        keep = np.array([k in residues for k in conf.layout.residue_keys()])
    layout = conf.layout.select(keep)
    states = states[:, keep]
    work.mkdir(parents=True, exist_ok=True)
    path = work / "model.pdb"
    if entry.map is None:
        crystal, source = model_crystal(conf.crystal, states, box_padding)
    else:
        crystal, source = None, "none: the entry has an experimental map (no synthetic amplitudes)"
    if not path.is_file() or not _same_crystal(_file_crystal(path), crystal):
        write_carved_model(path, layout, states, crystal)
    return Prepared(entry, path, layout, states.astype(np.float32), region_mask(layout, regions), tuple(regions),
                    ("A", "B"), list(conf.ids), crystal, source)


def mixture_atoms(prep: Prepared, occupancy_b: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The A/B mixture as atoms: A at 1 - b and B at b where the states differ, once at full occupancy where they
    coincide -> (xyz [M, 3], element [M], occupancy [M])."""
    a, b = prep.states
    moved = np.linalg.norm(a - b, axis=-1) > 1e-3
    element = np.asarray(prep.layout.element).astype(str)
    occ = np.concatenate([np.where(moved, 1.0 - occupancy_b, 1.0), np.full(moved.sum(), occupancy_b)])
    return np.concatenate([a, b[moved]]), np.concatenate([element, element[moved]]), occ


def synthetic_map(prep: Prepared, occupancy_b: float, resolution: float, path: Path, *, b_factor: float = 20.0,
                  snr: float | None = None, seed: int = 0, padding: float = 6.0):
    """The map of the A/B mixture (A at 1 - b, B at b; atoms where A and B coincide once at full occupancy) computed
    by gemmi's DensityCalculatorX (IT92 form factors, uniform ``b_factor`` plus the resolution blur of
    observables.density.resolution_blur) on a P1 cell around the carved model,
    boxed to the atoms + ``padding`` A, at spacing resolution / 4; Gaussian noise of std = (map std) / ``snr`` when
    ``snr`` is given.  Written as CCP4 (atomically); an existing file is reused."""
    from guidance.structures.maps import atoms_density
    from observables.density import DensityMap, read_map, write_ccp4

    if path.is_file():
        return path
    xyz, element, occ = mixture_atoms(prep, occupancy_b)
    points = np.concatenate(list(prep.states))
    lo, hi = points.min(0) - padding, points.max(0) + padding
    spacing = resolution / 4.0
    size = np.ceil((hi - lo + 2 * padding) / spacing).astype(int) + 1  # the cell: box + margin, so nothing wraps in
    grid = atoms_density(xyz, element, occ, b_factor, resolution, size + size % 2, np.full(3, spacing))
    start = np.floor(lo / spacing).astype(int)
    shape = (np.ceil((hi - lo) / spacing).astype(int) + 1).tolist()
    values = np.array(grid.get_subarray(start.tolist(), shape), dtype=np.float32)
    if snr:
        rng = np.random.default_rng(seed)
        values = values + rng.normal(0.0, float(values.std()) / float(snr), values.shape).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_ccp4(path, DensityMap(values, start * spacing, np.full(3, spacing)))
    read_map(path)  # a written map must read back
    return path


def synthetic_amplitudes(prep: Prepared, occupancy_b: float, resolution: float, path: Path, *,
                         b_factor: float = 20.0, f_noise: float = 0.05, free_fraction: float = 0.05, seed: int = 0):
    """Measured-like amplitudes of the A/B mixture (``mixture_atoms``, uniform ``b_factor``) in the carved model's
    crystal (``prep.crystal``), every reflection to ``resolution`` A but F000 and the systematic absences:

        |F| = | F_calc(h) + K_SOL exp(-B_SOL s^2 / 4) F_mask(h) |,   s = 1/d

    F_calc by gemmi's DensityCalculatorX (IT92 form factors, symmetry copies of the atoms, with gemmi's Refmac-like
    blur against aliasing, removed again) and FFT (``transform_map_to_f_phi``); F_mask the FFT of gemmi's flat
    solvent mask (1 in the solvent; observables.xray.bulk_solvent_mask: gemmi's ``SolventMasker`` with cctbx's radii,
    probe 1.1 A, shrink 0.9 A) on a grid of spacing resolution / 4.  Noise: F_obs = |F| + N(0, sigma), sigma = ``f_noise`` |F|
    (the SIGFP column; a negative draw, vanishingly rare at small f_noise, is reflected).  Free set: a seeded random
    ``free_fraction`` of the reflections, FreeR_flag 0 (CCP4's free value; the rest 1).  Written as MTZ (FP, SIGFP,
    FreeR_flag) atomically and read back with observables.reflections.read_reflections; an existing file of the
    same crystal is reused."""
    import gemmi

    from guidance.structures.maps import structure_factors
    from observables.reflections import read_reflections
    from observables.xray import atoms_structure, bulk_solvent_mask

    if prep.crystal is None:
        raise BenchError(f"{prep.entry.name}: the carved model has no crystal (the entry has an experimental map); "
                         "synthetic amplitudes are made only for entries without one")
    cell_params, sg_name = prep.crystal
    cell, sg = gemmi.UnitCell(*cell_params), gemmi.find_spacegroup_by_name(sg_name)
    if path.is_file():
        old = gemmi.read_mtz_file(str(path))
        if _same_crystal((tuple(old.cell.parameters), old.spacegroup.xhm()), prep.crystal):
            return path
    if not f_noise > 0:
        raise BenchError(f"synthetic.f_noise={f_noise}: amplitudes need sigmas; give a relative noise > 0 (e.g. 0.05)")
    if not 0 < free_fraction < 0.5:
        raise BenchError(f"synthetic.free_fraction={free_fraction}: give a fraction in (0, 0.5), e.g. 0.05")
    xyz, element, occ = mixture_atoms(prep, occupancy_b)
    st = atoms_structure(element, xyz, occ, b_factor, cell=cell, space_group=sg)
    f_grid, dc = structure_factors(st, resolution)
    asu = f_grid.prepare_asu_data(dmin=float(resolution), with_000=False, with_sys_abs=False)
    hkl = np.array(asu.miller_array, dtype=np.int32)
    f_calc = np.asarray(f_grid.get_value_by_hkl(hkl, unblur=dc.blur), np.complex128)
    _, mask = bulk_solvent_mask(cell, sg, element[occ > 0], xyz[occ > 0], float(resolution))
    f_mask = np.asarray(gemmi.transform_map_to_f_phi(mask, half_l=True).get_value_by_hkl(hkl), np.complex128)
    inv_d2 = cell.calculate_1_d2_array(hkl.astype(np.float64))
    f_abs = np.abs(f_calc + K_SOL * np.exp(-B_SOL * inv_d2 / 4.0) * f_mask)
    rng = np.random.default_rng(seed)
    sigma = float(f_noise) * f_abs
    f_obs = np.abs(f_abs + sigma * rng.standard_normal(len(f_abs)))
    flag = np.ones(len(hkl))
    flag[rng.permutation(len(hkl))[:int(round(free_fraction * len(hkl)))]] = 0.0
    keep = f_abs > 0
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = sg
    mtz.add_dataset("synthetic").wavelength = 1.0
    mtz.set_cell_for_all(cell)
    mtz.add_column("FP", "F")
    mtz.add_column("SIGFP", "Q")
    mtz.add_column("FreeR_flag", "I")
    mtz.set_data(np.column_stack([hkl, f_obs, sigma, flag])[keep].astype(np.float32))
    mtz.history = [f"ensemble-bench synthetic amplitudes: {prep.entry.name} A/B mixture, B occupancy "
                   f"{occupancy_b:g}, {resolution:g} A, k_sol {K_SOL} B_sol {B_SOL}, f_noise {f_noise:g}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        mtz.write_to_file(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    read_reflections(path)  # written amplitudes must read back
    return path

