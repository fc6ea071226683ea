"""ensemble-bench: how well does predictor X, guided by method Y at strength Z, recover the alternate conformations of
PDB entries, and at what cost in geometry?

    ensemble-bench manifest=benchmarks/altloc_small.csv out_dir=bench/run1            # the grid in configs/bench.yaml
    ensemble-bench manifest=... grid.guidance=[none,dps,fk] grid.strength=[0.5,1,2] hydra/launcher=joblib
    ensemble-bench manifest=... "grid.observables=[density,xray,density+xray]"      # guided by amplitudes too

One *job* is one cell of the grid  entry x predictor x guidance x observables x ensemble size x strength x occupancy x
potentials x seed.  Jobs are independent Hydra multirun jobs (``job.*`` keys), so Hydra's launchers scale them out:
``hydra/launcher=joblib`` runs them in parallel on this machine, ``hydra/launcher=submitit_slurm`` on a cluster.  The
``ensemble-bench`` command expands the manifest and ``grid.*`` into that sweep, runs it, then aggregates every result
into ``results.csv``, ``report.md`` and ``plots/``.

Per entry (cached under ``<out_dir>/entries/<name>/``): the altloc structure is read; the altloc regions are taken from
the manifest or detected (contiguous residues with alternate conformers, at least ``regions.min_span`` long); the first
two conformers are the states A and B; the structure is carved to the residues within ``carve`` A of the regions.  The
carved model (``model.pdb``) carries a crystal: the entry's own cell and space group when its file has a real one,
else a P1 orthogonal cell around the model plus ``synthetic.box_padding`` A (none for an entry with an experimental
map, which gets no synthetic amplitudes).  Waters are not part of it (the reader drops them; the amplitudes' bulk
solvent stands in for them); ligands and ions are, as atoms the predictor models: the synthetic data are made from
exactly the carved model's atoms, and the structure file holds no atom the predictor lacks, so the xray observable's
fixed atoms (``AtomInfo.environment``) are empty and nothing is seen twice or missed.
Per occupancy b of B, unless the entry gives an experimental map, the synthetic data of the mixture (A at 1 - b, B at
b) are made with gemmi -- forward models independent of the ones guidance uses:
- a map (``synthetic_map``): gemmi's DensityCalculatorX, optionally with Gaussian noise at a signal-to-noise ratio;
- amplitudes (``synthetic_amplitudes``): |F_calc + k_sol exp(-B_sol s^2 / 4) F_mask| in the carved model's crystal,
  F_calc by gemmi's DensityCalculatorX and FFT (IT92 form factors), F_mask the Fourier transform of gemmi's flat
  solvent mask (``K_SOL``, ``B_SOL``), relative Gaussian noise ``synthetic.f_noise`` on |F| (the sigma column), a
  seeded free set of ``synthetic.free_fraction``, written as MTZ (FP, SIGFP, FreeR_flag; free = 0).

Per job: the guided run (guidance/run.py, composed from configs/run.yaml plus the job's overrides) writes its outputs
under ``<out_dir>/jobs/<key>/``; the metrics below go to ``<out_dir>/results/<key>.json``, written atomically.  A job
whose result exists is skipped (``force=true`` redoes it); a job that raises is recorded as failed with its error and
the others go on.  The grid's predictors are labels of ``predictors.<label>`` (override lists that may pick the
predictor config themselves, ``predictor=reference``).  Two single-state baselines come with the config, built from
altloc A only so that guidance has to find B: ``reference`` (A with its ANM flexibility) and ``rotamers`` (the same
with every side chain over a rotamer library, predictors/rotamers.py).  ``grid.observables`` chooses the data a job is
guided by: ``density`` (the map), ``xray`` (the amplitudes) or ``density+xray``; ``grid.strength`` is the weight of
each of them.

Metrics (``bench_metrics``, ``xray_metrics``): RSCC over the altloc regions (+2 A) and CC over the box against the map
(the synthetic map of the job's occupancy, whatever the job was guided by); R-work and R-free of the final ensemble
against the synthetic amplitudes (the project's xray observable in score fashion: bulk solvent and scales refitted to
the ensemble; empty for an entry with an experimental map, which has no amplitudes); per altloc, the best member RMSD
over the regions after superposition on the rest of the carved chain, and recovery (some member within 1.0 A);
member-weighted assigned fractions against the true occupancies (absolute error); all-atom LDDT of the best member to
each altloc; clashes per 1000 atoms; bond-length and bond-angle RMSZ against Engh & Huber; wall time.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from itertools import product
from pathlib import Path

import numpy as np

from observables.errors import InputError

log = logging.getLogger("ensemble_bench")

GRID_KEYS = ("entry", "predictor", "guidance", "observables", "ensemble_size", "strength", "occupancy", "potentials",
             "seed")
GUIDING = ("density", "xray")  # the data a job can be guided by (grid.observables: one, or several joined by '+')

# The flat bulk solvent of the synthetic amplitudes: typical refined values for protein crystals, k_sol = 0.35 e/A^3
# and B_sol = 46 A^2 (Fokine & Urzhumtsev 2002, Acta Cryst. D58, 1387: the means over a set of PDB entries).
K_SOL = 0.35  # e/A^3
B_SOL = 46.0  # A^2


class BenchError(InputError):
    """A bad manifest or bench configuration (the message names the file/row and what to do)."""


# ----------------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Entry:
    """One manifest row: a structure with altlocs, an optional experimental map and the altloc regions to judge."""

    name: str
    structure: Path
    map: Path | None = None
    resolution: float | None = None  # A; the synthetic maps' resolution when null (bench.yaml synthetic.resolution)
    regions: tuple[tuple[str, int, int], ...] = ()  # (chain, first, last); empty = detected
    mtz_columns: str | None = None


_REGION = re.compile(r"^\s*([A-Za-z0-9]+)\s*:\s*(-?\d+)\s*(?:-\s*(-?\d+))?\s*$")


def parse_regions(text, where: str = "") -> tuple[tuple[str, int, int], ...]:
    """``"A:180-184"``, ``"A:180-184; B:60-67"``, ``"A:42"`` or a list of such strings -> ((chain, first, last), ...)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return ()
    parts = text if isinstance(text, (list, tuple)) else re.split(r"[;,]", str(text))
    out = []
    for part in parts:
        m = _REGION.match(str(part))
        if not m:
            raise BenchError(f"{where}region {part!r}: write it as CHAIN:FIRST-LAST, e.g. A:180-184")
        first = int(m.group(2))
        last = int(m.group(3)) if m.group(3) is not None else first
        if last < first:
            raise BenchError(f"{where}region {part!r}: the last residue comes before the first")
        out.append((m.group(1), first, last))
    return tuple(out)


def _entry(row: dict, base: Path, where: str) -> Entry:
    def path_of(key):
        value = row.get(key)
        if value is None or str(value).strip() in ("", "null", "None"):
            return None
        p = Path(os.path.expandvars(str(value).strip())).expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    name = str(row.get("name") or "").strip()
    structure = path_of("structure")
    if not name or structure is None:
        raise BenchError(f"{where}every entry needs a name and a structure")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise BenchError(f"{where}entry name {name!r}: use letters, digits, '_', '.', '-' only")
    if not structure.is_file():
        raise BenchError(f"{where}structure not found: {structure}")
    map_path = path_of("map")
    if map_path is not None and not map_path.is_file():
        raise BenchError(f"{where}map not found: {map_path}")
    res = row.get("resolution")
    try:
        resolution = None if res in (None, "", "null") else float(res)
    except ValueError:
        raise BenchError(f"{where}resolution {res!r} is not a number (A)") from None
    if map_path is not None and resolution is None:
        raise BenchError(f"{where}an experimental map needs its resolution")
    return Entry(name, structure, map_path, resolution, parse_regions(row.get("region"), where),
                 (str(row["mtz_columns"]) if row.get("mtz_columns") else None))


def read_manifest(path) -> list[Entry]:
    """Entries of a CSV (header: name, structure[, map, resolution, region, mtz_columns]) or YAML manifest (a list
    of mappings with the same keys, or ``{entries: [...]}``).  Relative paths are relative to the manifest's folder;
    ``$VARS`` and ``~`` are expanded."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BenchError(f"manifest not found: {path}")
    base = path.resolve().parent
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        doc = yaml.safe_load(path.read_text())
        rows = doc.get("entries") if isinstance(doc, dict) else doc
        if not isinstance(rows, list):
            raise BenchError(f"{path}: expected a list of entries (or 'entries: [...]')")
        entries = [_entry(dict(r), base, f"{path} entry {k + 1}: ") for k, r in enumerate(rows)]
    else:
        with path.open(newline="") as fh:
            lines = [ln for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
        reader = csv.DictReader(lines)
        if not reader.fieldnames or not {"name", "structure"} <= {f.strip() for f in reader.fieldnames}:
            raise BenchError(f"{path}: the CSV header must name at least 'name' and 'structure'")
        entries = [_entry({k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items() if k},
                          base, f"{path} row {k + 2}: ") for k, r in enumerate(reader)]
    names = [e.name for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BenchError(f"{path}: duplicate entry names {dup}")
    if not entries:
        raise BenchError(f"{path}: no entries")
    return entries


# ----------------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Cell:
    entry: str
    predictor: str = "reference"
    guidance: str = "fk"
    ensemble_size: int = 4
    strength: float = 1.0
    occupancy: float = 0.5  # of altloc B in the synthetic map
    potentials: str = "none"  # none | geometry | boltz | "geometry+boltz"
    seed: int = 0
    observables: str = "density"  # the data guidance uses: density | xray | "density+xray"

    @property
    def key(self) -> str:
        return (f"{self.entry}__{self.predictor}__{self.guidance}__{self.observables.replace('+', '-')}"
                f"__E{self.ensemble_size}__s{self.strength:g}__b{self.occupancy:g}__{self.potentials.replace('+', '-')}"
                f"__seed{self.seed}")

    @property
    def guided_by(self) -> list[str]:
        return self.observables.split("+")


def guiding_observables(value) -> str:
    """A ``grid.observables`` value (``density``, ``xray``, ``density+xray``) checked, in the order given."""
    names = [n.strip() for n in str(value).split("+")]
    bad = [n for n in names if n not in GUIDING]
    if bad or not names or len(set(names)) != len(names):
        raise BenchError(f"grid.observables value {value!r}: use {' | '.join(GUIDING)} or several joined by '+' "
                         "(density+xray)")
    return "+".join(names)


def expand_grid(entries: list[str], grid) -> list[Cell]:
    """Every combination of the entries and the ``grid`` lists, in a fixed order (``observables`` defaults to
    ``[density]``)."""
    axes = [list(entries)] + [list(grid.get(k) or ["density"]) if k == "observables" else list(grid[k])
                              for k in GRID_KEYS[1:]]
    cells = []
    for values in product(*axes):
        kw = dict(zip(GRID_KEYS, values))
        cells.append(Cell(entry=str(kw["entry"]), predictor=str(kw["predictor"]), guidance=str(kw["guidance"]),
                          ensemble_size=int(kw["ensemble_size"]), strength=float(kw["strength"]),
                          occupancy=float(kw["occupancy"]), potentials=str(kw["potentials"]), seed=int(kw["seed"]),
                          observables=guiding_observables(kw["observables"])))
    return cells


# ----------------------------------------------------------------------------------------------------- entries


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


def _residue_keys(layout) -> list[tuple[str, int]]:
    return list(zip(np.asarray(layout.chain_id).tolist(), np.asarray(layout.res_seq).tolist()))


def region_mask(layout, regions) -> np.ndarray:
    chain, seq = np.asarray(layout.chain_id).astype(str), np.asarray(layout.res_seq)
    mask = np.zeros(len(chain), bool)
    for c, first, last in regions:
        mask |= (chain == c) & (seq >= first) & (seq <= last)
    return mask


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
    """The two states as one altloc model (A/B at 0.5/0.5, guidance.structure.write_altloc_structure) with the
    CRYST1 of ``crystal`` (cell, space group; None: no cell), written atomically as PDB."""
    import gemmi

    from guidance.structure import atomic_write, write_altloc_structure

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

    from guidance.structure import altloc_regions, read_structure

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
        residues = set(k for k, n in zip(_residue_keys(conf.layout), near) if n)
        keep = np.array([k in residues for k in _residue_keys(conf.layout)])
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


def _gemmi_density(xyz: np.ndarray, element: np.ndarray, occupancy: np.ndarray, b_factor: float, resolution: float,
                   size: np.ndarray, spacing: np.ndarray):
    """gemmi's DensityCalculatorX density of atoms ``xyz [M, 3]`` (elements, occupancies; atoms of occupancy 0 are
    left out; uniform ``b_factor`` plus observables.density.resolution_blur) on a P1 orthogonal cell of ``size``
    voxels of ``spacing`` A -> the gemmi grid (periodic)."""
    import gemmi

    from observables.density import resolution_blur
    from observables.xray import atoms_structure

    st = atoms_structure(element, xyz, occupancy, b_factor)
    size = np.asarray(size, dtype=int)
    st.cell = gemmi.UnitCell(*(size * np.asarray(spacing)).tolist(), 90, 90, 90)
    dc = gemmi.DensityCalculatorX()
    dc.blur = resolution_blur(resolution)  # no d_min: gemmi would then re-size the grid to d_min / (2 rate)
    dc.grid.set_unit_cell(st.cell)
    dc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    dc.grid.set_size(*size.tolist())
    dc.put_model_density_on_grid(st[0])
    return dc.grid


def synthetic_map(prep: Prepared, occupancy_b: float, resolution: float, path: Path, *, b_factor: float = 20.0,
                  snr: float | None = None, seed: int = 0, padding: float = 6.0):
    """The map of the A/B mixture (A at 1 - b, B at b; atoms where A and B coincide once at full occupancy) computed
    by gemmi's DensityCalculatorX (IT92 form factors, uniform ``b_factor`` plus the resolution blur of
    observables.density.resolution_blur) on a P1 cell around the carved model,
    boxed to the atoms + ``padding`` A, at spacing resolution / 4; Gaussian noise of std = (map std) / ``snr`` when
    ``snr`` is given.  Written as CCP4 (atomically); an existing file is reused."""
    from observables.density import DensityMap, read_map, write_ccp4

    if path.is_file():
        return path
    xyz, element, occ = mixture_atoms(prep, occupancy_b)
    points = np.concatenate(list(prep.states))
    lo, hi = points.min(0) - padding, points.max(0) + padding
    spacing = resolution / 4.0
    size = np.ceil((hi - lo + 2 * padding) / spacing).astype(int) + 1  # the cell: box + margin, so nothing wraps in
    grid = _gemmi_density(xyz, element, occ, b_factor, resolution, size + size % 2, np.full(3, spacing))
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
    dc = gemmi.DensityCalculatorX()
    dc.d_min = float(resolution)
    dc.set_refmac_compatible_blur(st[0])
    dc.set_grid_cell_and_spacegroup(st)
    dc.put_model_density_on_grid(st[0])
    f_grid = gemmi.transform_map_to_f_phi(dc.grid, half_l=True)
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


# ----------------------------------------------------------------------------------------------------- metrics


def _map_correlations(members, weights, element, map_path: Path, resolution: float, region_points: np.ndarray,
                      b_factor: float = 20.0, radius: float = 2.0) -> dict:
    """RSCC within ``radius`` A of ``region_points`` and CC over the box, between the map and the weighted ensemble's
    model map (gemmi DensityCalculatorX on the map's grid)."""
    from observables.density import read_map

    target = read_map(map_path)
    shape = np.array(target.shape)
    spacing = np.asarray(target.spacing)
    margin = np.ceil(8.0 / spacing).astype(int)
    size = shape + 2 * margin
    size = size + size % 2
    start = np.round(np.asarray(target.origin) / spacing).astype(int) - margin
    xyz = np.concatenate([np.asarray(c) for c in members]) - start * spacing  # shifted into the cell
    occ = np.repeat(np.asarray(weights, dtype=np.float64), len(element))
    grid = _gemmi_density(xyz, np.tile(element, len(members)), occ, b_factor, resolution, size, spacing)
    model_map = np.array(grid.get_subarray(margin.tolist(), shape.tolist()), dtype=np.float64)
    values = np.asarray(target.values, dtype=np.float64)
    axes = [np.asarray(target.origin)[k] + np.arange(shape[k]) * spacing[k] for k in range(3)]
    grid_points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    from scipy.spatial import cKDTree

    near = cKDTree(region_points).query(grid_points, distance_upper_bound=radius)[0] <= radius

    def cc(x, y):
        x, y = x - x.mean(), y - y.mean()
        d = math.sqrt(float((x * x).sum() * (y * y).sum()))
        return float((x * y).sum() / d) if d > 0 else float("nan")

    return {"rscc_region": cc(values.reshape(-1)[near], model_map.reshape(-1)[near]),
            "cc_box": cc(values.reshape(-1), model_map.reshape(-1)), "region_grid_points": int(near.sum())}


def bench_metrics(prep: Prepared, members: np.ndarray, weights: np.ndarray, occupancy_b: float, map_path: Path,
                  resolution: float, *, recovery_threshold: float = 1.0) -> dict:
    """The per-job metrics of the module docstring for an ensemble ``members [E, N, 3]`` on ``prep.layout``."""
    from guidance.geometry import residue_index
    from guidance.metrics import altloc_assignment, geometry_report, lddt, region_rmsd, symmetric_swaps

    members = np.asarray(members, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    region = prep.region
    fit = ~region if (~region).sum() >= 3 else region  # a region covering (almost) everything: fit on itself
    swaps = symmetric_swaps(prep.layout)  # Asp/Glu/Phe/Tyr/Arg terminal atoms under their better naming
    out: dict = {"n_atoms": int(len(region)), "n_region_atoms": int(region.sum()),
                 "ab_region_rmsd": float(region_rmsd(prep.states[1], prep.states[0], region, fit, swaps))}
    true_occ = {"A": 1.0 - occupancy_b, "B": occupancy_b}
    residues = residue_index(prep.layout)  # LDDT leaves out pairs within a residue
    assign = altloc_assignment(members, weights, prep.states, prep.ids, region, fit_mask=fit, superpose_first=True,
                               swaps=swaps)
    for k, alt in enumerate(prep.ids):
        rmsds = [float(region_rmsd(m, prep.states[k], region, fit, swaps)) for m in members]
        best = int(np.argmin(rmsds))
        out[f"best_rmsd_{alt}"] = rmsds[best]
        out[f"recovered_{alt}"] = bool(rmsds[best] <= recovery_threshold)
        try:
            out[f"lddt_{alt}"] = float(max(lddt(m, prep.states[k], residue_ids=residues) for m in members))
        except ValueError as exc:  # e.g. a one-residue entry (a ligand): inter-residue LDDT is undefined
            log.info("%s: LDDT to %s undefined (%s)", prep.entry.name, alt, exc)
            out[f"lddt_{alt}"] = float("nan")
        out[f"fraction_{alt}"] = assign[alt]["assigned_fraction"]
        out[f"fraction_error_{alt}"] = abs(assign[alt]["assigned_fraction"] - true_occ[alt])
    geo = geometry_report(prep.layout, members)
    out.update({"bond_rmsz": geo["bond_rmsz"], "angle_rmsz": geo["angle_rmsz"],
                "clashes_per_1000_atoms": geo["clashes_per_1000_atoms"]})
    element = np.asarray(prep.layout.element).astype(str)
    region_points = np.concatenate([s[region] for s in prep.states])
    out.update(_map_correlations(members, weights, element, map_path, resolution, region_points))
    return out


XRAY_KEYS = ("r_work", "r_free", "n_work", "n_free", "k_sol", "b_sol", "d_min")


@lru_cache(maxsize=4)
def _xray_scorer(structure: str, amplitudes: str, stamps: tuple):
    """The xray observable on the atoms of the carved model ``structure`` as a guided run builds it (B-factors,
    occupancies, crystal and fixed atoms from the file: guidance.run.structure_atoms) with data ``amplitudes`` ->
    (observable, layout).  Kept for the next jobs of the same entry and occupancy (``report`` leaves it unchanged;
    ``stamps``, the files' mtime and size, make a rewritten file a new key): building and compiling it costs more
    than scoring."""
    from guidance.run import structure_atoms
    from guidance.structure import match_layouts, read_structure
    from observables.base import AtomInfo
    from observables.xray import XrayObservable

    conf = read_structure(structure)
    extras = structure_atoms(conf, conf.layout, match_layouts(conf.layout, conf.layout))
    if extras.get("environment") is not None:  # the carved model holds the model's atoms only (module docstring)
        raise BenchError(f"{structure} has {len(extras['environment'])} atoms besides the model's; the synthetic "
                         "amplitudes do not contain them")
    atoms = AtomInfo.from_layout(conf.layout, coords=conf.coords, **extras)
    return XrayObservable(atoms, data=amplitudes), conf.layout


def xray_metrics(prep: Prepared, members: np.ndarray, weights: np.ndarray, amplitudes: Path | None) -> dict:
    """R-work and R-free (with n_work, n_free, k_sol, b_sol, d_min) of the ensemble ``members [E, N, 3]`` (on
    ``prep.layout``) at ``weights`` against ``amplitudes``, by the project's xray observable in score fashion
    (``_xray_scorer``): its ``report`` refits bulk solvent and scales to the ensemble.  Without amplitudes every
    value is None (empty in the tables, never 0)."""
    if amplitudes is None:
        return {k: None for k in XRAY_KEYS}
    from guidance.structure import match_layouts

    files = (Path(prep.structure), Path(amplitudes))
    stamps = tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    obs, layout = _xray_scorer(str(files[0]), str(files[1]), stamps)
    match = match_layouts(prep.layout, layout)
    if match.missing_in_src or match.missing_in_dst:
        raise BenchError(f"{prep.entry.name}: the carved model {prep.structure} does not hold the entry's atoms; "
                         "delete it to have it rewritten")
    x = np.zeros((len(members), len(layout), 3), np.float32)
    x[:, match.dst_index] = np.asarray(members, np.float32)[:, match.src_index]
    report = obs.report(x, np.asarray(weights, np.float32))
    return {k: report[k] for k in XRAY_KEYS}


# ----------------------------------------------------------------------------------------------------- one job


def _atomic_json(path: Path, obj) -> None:
    from guidance.structure import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _potential_overrides(potentials: str) -> list[str]:
    names = [p for p in potentials.split("+") if p and p != "none"]
    return [f"potentials=[{','.join(names)}]"] if names else []


def run_overrides(cfg, cell: Cell, prep: Prepared, map_path: Path, resolution: float, job_dir: Path,
                  amplitudes: Path | None = None) -> list[str]:
    """The overrides of configs/run.yaml that make one job's guided run: the observables of ``cell.observables``
    with their data (``map_path``, ``amplitudes``), each weighted by ``cell.strength``."""
    from omegaconf import OmegaConf

    entry = prep.entry
    predictors = OmegaConf.to_container(cfg.predictors, resolve=True) if cfg.get("predictors") else {}
    predictor_over = [str(o) for o in (predictors.get(cell.predictor) or [])]
    # a grid label may name a variant of a predictor: its overrides then choose the config (predictor=reference)
    if not any(o.startswith("predictor=") for o in predictor_over):
        predictor_over.insert(0, f"predictor={cell.predictor}")
    guided_by = cell.guided_by
    over = [f"structure={prep.structure}", f"observables=[{','.join(guided_by)}]"]
    if "density" in guided_by:
        over += [f"observables.density.map={map_path}", f"observables.density.resolution={resolution}",
                 f"observables.density.weight={cell.strength}"]
    if "xray" in guided_by:
        if amplitudes is None:
            raise BenchError(f"{entry.name}: an xray-guided job needs amplitudes; the entry has an experimental map "
                             "and no amplitudes (synthetic amplitudes are made only for entries without a map)")
        over += [f"observables.xray.data={amplitudes}", f"observables.xray.weight={cell.strength}"]
    over += [f"guidance={cell.guidance}", f"ensemble_size={cell.ensemble_size}",
             f"seed={cell.seed}", "output.plots=false", "output.particles=false", "mode=sample"]
    if entry.mtz_columns and "density" in guided_by:
        over.append(f"observables.density.mtz_columns={entry.mtz_columns}")
    over += _potential_overrides(cell.potentials)
    over += predictor_over
    methods = OmegaConf.to_container(cfg.methods, resolve=True) if cfg.get("methods") else {}
    over += [str(o) for o in (methods.get(cell.guidance) or [])]
    over += [str(o) for o in (cfg.get("run") or [])]
    return over


def run_job(cfg, cell: Cell, out_dir: Path) -> dict:
    """One cell: prepare (cached), run the guided sampling, compute the metrics, write ``results/<key>.json``."""
    from hydra import compose

    from guidance.run import run as run_one
    from guidance.structure import match_layouts, read_structure

    result_path = out_dir / "results" / f"{cell.key}.json"
    if result_path.is_file() and not cfg.force:
        previous = json.loads(result_path.read_text())
        if previous.get("status") == "ok" or not cfg.retry_failed:
            log.info("skip %s (finished: %s)", cell.key, previous.get("status"))
            return previous
    t0 = time.perf_counter()
    record = {"key": cell.key, "cell": asdict(cell), "status": "failed", "pid": os.getpid()}
    try:
        entries = {e.name: e for e in read_manifest(cfg.manifest)}
        if cell.entry not in entries:
            raise BenchError(f"entry {cell.entry!r} is not in the manifest {cfg.manifest}")
        entry = entries[cell.entry]
        syn = cfg.synthetic
        prep = prepare_entry(entry, out_dir / "entries" / entry.name, min_span=int(cfg.regions.min_span),
                             carve=cfg.regions.carve, box_padding=float(syn.get("box_padding", 8.0)))
        resolution = float(entry.resolution or syn.resolution)
        amplitudes = None
        if entry.map is not None:
            map_path = entry.map
        else:
            snr = syn.snr
            name = f"map_b{cell.occupancy:g}_{resolution:g}A" + (f"_snr{snr:g}" if snr else "") + ".ccp4"
            map_path = synthetic_map(prep, cell.occupancy, resolution, out_dir / "entries" / entry.name / name,
                                     b_factor=float(syn.b_factor), snr=snr, seed=int(syn.seed))
            f_noise, free = float(syn.get("f_noise", 0.05)), float(syn.get("free_fraction", 0.05))
            name = f"amplitudes_b{cell.occupancy:g}_{resolution:g}A_noise{f_noise:g}_free{free:g}_seed{syn.seed}.mtz"
            amplitudes = synthetic_amplitudes(prep, cell.occupancy, resolution, out_dir / "entries" / entry.name / name,
                                              b_factor=float(syn.b_factor), f_noise=f_noise, free_fraction=free,
                                              seed=int(syn.seed))
        job_dir = out_dir / "jobs" / cell.key
        run_cfg = compose(config_name="run",
                          overrides=run_overrides(cfg, cell, prep, map_path, resolution, job_dir, amplitudes))
        t_run = time.perf_counter()
        run_metrics = run_one(run_cfg, job_dir)
        sampling_s = time.perf_counter() - t_run
        ens = read_structure(job_dir / "ensemble.cif")
        match = match_layouts(prep.layout, ens.layout)
        if match.missing_in_src:  # predictor atoms absent from the structure are dropped; the reverse is an error
            log.info("%s: %d ensemble atoms not in the structure (ignored)", cell.key, len(match.missing_in_src))
        if match.missing_in_dst:
            raise BenchError(f"{cell.key}: {len(match.missing_in_dst)} structure atoms are not in the sampled "
                             f"ensemble (e.g. {match.missing_in_dst[:3]}): the predictor does not model them")
        members = np.zeros((len(ens.ids), len(prep.layout), 3))
        members[:, match.src_index] = ens.coords[:, match.dst_index]
        metrics = bench_metrics(prep, members, np.asarray(ens.weights), cell.occupancy, map_path, resolution,
                                recovery_threshold=float(cfg.recovery_threshold))
        t_x = time.perf_counter()
        metrics.update(xray_metrics(prep, members, np.asarray(ens.weights), amplitudes))
        metrics["xray_metrics_s"] = time.perf_counter() - t_x
        metrics["sampling_s"] = sampling_s
        run_obs = run_metrics["observables"]
        metrics["density_rscc_run"] = run_obs.get("density", {}).get("rscc")
        metrics["xray_r_free_run"] = run_obs.get("xray", {}).get("r_free")
        metrics["xray_r_work_run"] = run_obs.get("xray", {}).get("r_work")
        record.update(status="ok", metrics=metrics, map=str(map_path), regions=[list(r) for r in prep.regions],
                      amplitudes=None if amplitudes is None else str(amplitudes),
                      crystal=None if prep.crystal is None else {
                          "cell": list(prep.crystal[0]), "space_group": prep.crystal[1], "source": prep.crystal_source})
    except Exception as exc:  # a crashed job is a result too: record it and let the others run
        record.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=8))
        log.error("job %s failed: %s: %s", cell.key, type(exc).__name__, exc)
    record["wall_s"] = time.perf_counter() - t0
    _atomic_json(result_path, record)
    _progress(out_dir)
    return record


def _progress(out_dir: Path) -> None:
    plan = out_dir / "plan.json"
    keys = json.loads(plan.read_text())["jobs"] if plan.is_file() else []
    done = failed = 0
    for k in keys:
        p = out_dir / "results" / f"{k}.json"
        if p.is_file():
            done += 1
            try:
                failed += json.loads(p.read_text()).get("status") != "ok"
            except json.JSONDecodeError:
                pass
    if keys:
        log.info("progress: %d/%d jobs finished (%d failed), %d left", done, len(keys), failed, len(keys) - done)


# ----------------------------------------------------------------------------------------------------- aggregation


ROW_KEYS = ("status", "rscc_region", "cc_box", "r_work", "r_free", "ab_region_rmsd", "best_rmsd_A", "best_rmsd_B",
            "recovered_A", "recovered_B", "fraction_A", "fraction_B", "fraction_error_B", "lddt_A", "lddt_B",
            "bond_rmsz", "angle_rmsz", "clashes_per_1000_atoms", "n_atoms", "n_region_atoms", "sampling_s", "wall_s",
            "error")


def collect(out_dir: Path, keys: list[str] | None = None) -> list[dict]:
    """One row per job (the tidy results table): the cell's values, then ``ROW_KEYS``."""
    rows = []
    for path in sorted((out_dir / "results").glob("*.json")):
        rec = json.loads(path.read_text())
        if keys is not None and rec["key"] not in keys:
            continue
        row = {"key": rec["key"], "observables": "density", **rec["cell"]}
        metrics = rec.get("metrics", {})
        for k in ROW_KEYS:
            row[k] = rec.get(k) if k in ("status", "wall_s", "error") else metrics.get(k)
        rows.append(row)
    return rows


def write_report(rows: list[dict], out_dir: Path) -> dict[str, Path]:
    """``results.csv`` (every job), ``report.md`` (summary tables) and ``plots/{tradeoff,recovery}.png``."""
    from guidance.structure import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["key", *GRID_KEYS, *ROW_KEYS]
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    paths = {"csv": atomic_write(out_dir / "results.csv", buf.getvalue())}

    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    md = ["# ensemble-bench report", "", f"{len(rows)} jobs: {len(ok)} finished, {len(failed)} failed.", ""]
    md += ["## Recovery of altloc B by method", "",
           "Entries in which some member came within the recovery threshold of B (over the altloc regions, after "
           "superposition on the rest of the chain), per predictor / guidance / observables / strength / "
           "potentials.", "",
           "Jobs: the same over every job of the group (seeds, occupancies, ensemble sizes), a less noisy count.", "",
           "Observables: the data the jobs were guided by.  Whatever guided a job, RSCC is against the map (the "
           "synthetic map of the job's occupancy unless the entry gives one) and R-free against the synthetic "
           "amplitudes of that occupancy (empty: the entry has an experimental map and no amplitudes).", "",
           "| predictor | guidance | observables | strength | potentials | entries with B recovered "
           "| jobs with B recovered | mean best RMSD to B (A) | mean B fraction error | mean RSCC (region) "
           "| mean R-free | mean bond RMSZ | mean angle RMSZ | clashes /1000 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault((r["predictor"], r["guidance"], r["observables"], r["strength"], r["potentials"]),
                          []).append(r)

    def mean(rs, k):
        vals = [float(r[k]) for r in rs if r.get(k) is not None and np.isfinite(float(r[k]))]
        return float(np.mean(vals)) if vals else float("nan")

    for (pred, guid, obs, strength, pots), rs in sorted(groups.items()):
        recovered = sorted({r["entry"] for r in rs if r["recovered_B"]})
        entries = sorted({r["entry"] for r in rs})
        md.append(f"| {pred} | {guid} | {obs} | {strength:g} | {pots} | {len(recovered)}/{len(entries)} "
                  f"({', '.join(recovered) or '-'}) | {sum(bool(r['recovered_B']) for r in rs)}/{len(rs)} "
                  f"| {mean(rs, 'best_rmsd_B'):.2f} | {mean(rs, 'fraction_error_B'):.2f}"
                  f" | {mean(rs, 'rscc_region'):.3f} | {_fmt_r(mean(rs, 'r_free'))} | {mean(rs, 'bond_rmsz'):.2f} "
                  f"| {mean(rs, 'angle_rmsz'):.2f} | {mean(rs, 'clashes_per_1000_atoms'):.1f} |")
    md += ["", "## Per entry", "",
           "| entry | A-B RMSD (A) | predictor | guidance | observables | E | strength | b | potentials | seed "
           "| best RMSD B | recovered B | fraction B | LDDT B | RSCC region | CC box | R-work | R-free | bond RMSZ "
           "| angle RMSZ | wall (s) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(ok, key=lambda r: (r["entry"], r["predictor"], r["guidance"], r["observables"], r["strength"],
                                       r["occupancy"])):
        md.append(f"| {r['entry']} | {r['ab_region_rmsd']:.2f} | {r['predictor']} | {r['guidance']} | "
                  f"{r['observables']} | {r['ensemble_size']} | {r['strength']:g} | {r['occupancy']:g} | "
                  f"{r['potentials']} | {r['seed']} | {r['best_rmsd_B']:.2f} | {'yes' if r['recovered_B'] else 'no'} | "
                  f"{r['fraction_B']:.2f} | {r['lddt_B']:.3f} | {r['rscc_region']:.3f} | {r['cc_box']:.3f} | "
                  f"{_fmt_r(r['r_work'])} | {_fmt_r(r['r_free'])} | {_fmt(r['bond_rmsz'])} | "
                  f"{_fmt(r['angle_rmsz'])} | {r['wall_s']:.1f} |")
    if failed:
        md += ["", "## Failed jobs", "", "| job | error |", "|---|---|"]
        md += [f"| {r['key']} | {str(r['error']).replace('|', '/')[:300]} |" for r in failed]
    try:
        paths.update(_plots(ok, out_dir / "plots"))
        md += ["", "## Plots", "", "![data fit vs geometry](plots/tradeoff.png)", "",
               "![recovery vs strength](plots/recovery.png)"]
    except Exception as exc:  # a missing plotting backend must not lose the tables
        log.warning("plots not written: %s", exc)
    paths["report"] = atomic_write(out_dir / "report.md", "\n".join(md) + "\n")
    return paths


def _fmt(v) -> str:
    return "-" if v is None else f"{float(v):.2f}"


def _fmt_r(v) -> str:
    """An R value or a mean of them: "-" when there is none (no amplitudes), never 0."""
    return "-" if v is None or not np.isfinite(float(v)) else f"{float(v):.3f}"


def _plots(rows: list[dict], plots: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    out = {}
    # the trade-off: data fit (RSCC over the regions) against the geometry penalty (bond RMSZ), per method
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["predictor"], r["guidance"], r["potentials"], r.get("observables", "density")),
                          []).append(r)

    def label_of(pred, guid, pots, obs):
        return f"{pred}/{guid}" + ("" if pots == "none" else f"+{pots}") + ("" if obs == "density" else f" [{obs}]")

    for (pred, guid, pots, obs), rs in sorted(groups.items()):
        label = label_of(pred, guid, pots, obs)
        x = np.array([np.nan if r["bond_rmsz"] is None else float(r["bond_rmsz"]) for r in rs])
        y = np.array([float(r["rscc_region"]) for r in rs])
        sc = ax.scatter(x, y, alpha=0.25, s=14)  # every job, faint
        strengths = sorted({float(r["strength"]) for r in rs})
        s_of = np.array([float(r["strength"]) for r in rs])
        mx = [np.nanmean(x[s_of == v]) for v in strengths]
        my = [np.nanmean(y[s_of == v]) for v in strengths]
        ax.plot(mx, my, "o-", color=sc.get_facecolor()[0][:3], label=label)  # the mean over entries per strength
        for v, xi, yi in zip(strengths, mx, my):
            ax.annotate(f"{v:g}", (xi, yi), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("bond-length RMSZ (Engh & Huber)")
    ax.set_ylabel("RSCC over the altloc regions")
    ax.set_title("data fit vs geometry (mean per strength; faint: single jobs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out["tradeoff"] = plots / "tradeoff.png"
    fig.savefig(out["tradeoff"], dpi=120)
    plt.close(fig)
    # recovery of B vs strength
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (pred, guid, pots, obs), rs in sorted(groups.items()):
        by_s: dict[float, list[bool]] = {}
        for r in rs:
            by_s.setdefault(float(r["strength"]), []).append(bool(r["recovered_B"]))
        s = sorted(by_s)
        ax.plot(s, [np.mean(by_s[k]) for k in s], "o-", label=label_of(pred, guid, pots, obs))
    ax.set_xlabel("guidance strength (weight of the data term)")
    ax.set_ylabel("fraction of jobs with B recovered (<= 1 A)")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out["recovery"] = plots / "recovery.png"
    fig.savefig(out["recovery"], dpi=120)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------------- the app


def _config_dir() -> str:
    from guidance.run import _config_dir as run_config_dir

    return run_config_dir()


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(overrides for the bench config, hydra-only arguments such as hydra/launcher=joblib)."""
    ours, hydra_args = [], []
    for a in argv:
        (hydra_args if a.startswith(("hydra", "--")) or a == "-m" else ours).append(a)
    return ours, hydra_args


def plan(argv: list[str]):
    """Compose configs/bench.yaml with the user's overrides and expand the grid -> (cfg, cells)."""
    from hydra import compose, initialize_config_dir

    ours, _ = _split_overrides(argv)
    with initialize_config_dir(config_dir=_config_dir(), version_base="1.3"):
        cfg = compose(config_name="bench", overrides=[o for o in ours if not o.startswith("job.")])
    if cfg.manifest is None:
        raise BenchError("manifest=<file.csv|yaml> is required (see README: ensemble-bench)")
    entries = [e.name for e in read_manifest(cfg.manifest)]
    if cfg.get("entries"):
        unknown = [e for e in cfg.entries if e not in entries]
        if unknown:
            raise BenchError(f"entries {unknown} are not in the manifest ({entries})")
        entries = [e for e in entries if e in set(cfg.entries)]
    return cfg, expand_grid(entries, cfg.grid)


def main(argv: list[str] | None = None) -> int:
    """``ensemble-bench``: plan the grid, run it as one Hydra multirun, aggregate."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(levelname)s] %(message)s", datefmt="%H:%M:%S")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg, cells = plan(argv)
    except InputError as exc:  # a bad manifest, structure or option: one line
        log.error("%s", " ".join(str(exc).split()))
        return 1
    except (HydraException, OmegaConfBaseException) as exc:
        log.error("%s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return 1
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = [c.key for c in cells]
    _atomic_json(out_dir / "plan.json", {"jobs": keys, "manifest": str(Path(cfg.manifest).resolve())})
    status = [_status(out_dir, k) for k in keys]
    finished = sum(s is not None for s in status)
    log.info("ensemble-bench: %d jobs (%d entries), %d already finished%s -> %s", len(keys),
             len({c.entry for c in cells}), finished, " (force: redoing them)" if cfg.force else "", out_dir)
    todo = cfg.force or any(s is None or (s != "ok" and cfg.retry_failed) for s in status)
    if todo:
        # the sweep: one Hydra job per cell (each finished one skips itself)
        ours, hydra_args = _split_overrides(argv)
        sweep = [f"job.cell={_cell_list(cells)}"]
        sys_argv = sys.argv
        sys.argv = [sys_argv[0], "-m", *[o for o in ours if not o.startswith("job.")], *sweep,
                    *[a for a in hydra_args if a != "-m"]]
        GlobalHydra.instance().clear()
        try:
            hydra.main(version_base="1.3", config_path=_config_dir(), config_name="bench")(_job_from_key)()
        finally:
            sys.argv = sys_argv
    rows = collect(out_dir, keys)
    paths = write_report(rows, out_dir)
    ok = sum(r["status"] == "ok" for r in rows)
    log.info("ensemble-bench: %d/%d jobs ok; %s, %s", ok, len(keys), paths["csv"], paths["report"])
    return 0 if rows else 1


def _status(out_dir: Path, key: str) -> str | None:
    path = out_dir / "results" / f"{key}.json"
    try:
        return json.loads(path.read_text()).get("status") if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _cell_list(cells: list[Cell]) -> str:
    """The sweep value: one item per cell (Hydra sweeps over it; each job decodes its cell)."""
    return ",".join(_encode(c) for c in cells)


def _encode(cell: Cell) -> str:
    return ":".join(str(getattr(cell, k)) for k in GRID_KEYS).replace("+", "_p_")


def _decode(text: str) -> Cell:
    parts = str(text).replace("_p_", "+").split(":")
    kw = dict(zip(GRID_KEYS, parts))
    return Cell(entry=kw["entry"], predictor=kw["predictor"], guidance=kw["guidance"],
                ensemble_size=int(kw["ensemble_size"]), strength=float(kw["strength"]),
                occupancy=float(kw["occupancy"]), potentials=kw["potentials"], seed=int(kw["seed"]),
                observables=kw["observables"])


def _job_from_key(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    cell = _decode(cfg.job.cell)
    log.info("job %s (hydra job %s)", cell.key, HydraConfig.get().job.get("num", "-"))
    run_job(cfg, cell, Path(cfg.out_dir).expanduser().resolve())


if __name__ == "__main__":
    # run the importable module, not this __main__ copy: the jobs Hydra's joblib launcher pickles then refer to
    # guidance.bench by name (its cached xray scorer included) instead of to a __main__ a worker does not have
    from guidance.bench import main as bench_main

    raise SystemExit(bench_main())
