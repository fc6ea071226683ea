"""ensemble-bench's inputs: the manifest (entries) and the grid (cells, one per job)."""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from guidance.structures.altlocs import RegionError
from guidance.structures.altlocs import parse_regions as _parse_regions
from observables.errors import InputError

GRID_KEYS = ("entry", "predictor", "guidance", "observables", "ensemble_size", "strength", "occupancy", "potentials",
             "seed")
GUIDING = ("density", "xray")  # the data a job can be guided by (grid.observables: one, or several joined by '+')


class BenchError(InputError):
    """A bad manifest or bench configuration (the message names the file/row and what to do)."""



@dataclass(frozen=True)
class Entry:
    """One manifest row: a structure with altlocs, an optional experimental map and the altloc regions to judge."""

    name: str
    structure: Path
    map: Path | None = None
    resolution: float | None = None  # A; the synthetic maps' resolution when null (bench.yaml synthetic.resolution)
    regions: tuple[tuple[str, int, int], ...] = ()  # (chain, first, last); empty = detected
    mtz_columns: str | None = None


def parse_regions(text, where: str = "") -> tuple[tuple[str, int, int], ...]:
    """``"A:180-184"``, ``"A:180-184; B:60-67"``, ``"A:42"`` or a list of such strings -> ((chain, first, last), ...)
    (guidance.structures.altlocs.parse_regions, with a manifest's error)."""
    try:
        return _parse_regions(text, where)
    except RegionError as exc:
        raise BenchError(str(exc)) from None


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



def _encode(cell: Cell) -> str:
    return ":".join(str(getattr(cell, k)) for k in GRID_KEYS).replace("+", "_p_")


def _decode(text: str) -> Cell:
    parts = str(text).replace("_p_", "+").split(":")
    kw = dict(zip(GRID_KEYS, parts))
    return Cell(entry=kw["entry"], predictor=kw["predictor"], guidance=kw["guidance"],
                ensemble_size=int(kw["ensemble_size"]), strength=float(kw["strength"]),
                occupancy=float(kw["occupancy"]), potentials=kw["potentials"], seed=int(kw["seed"]),
                observables=kw["observables"])


def cell_list(cells: list[Cell]) -> str:
    """The sweep value: one item per cell (Hydra sweeps over it; each job decodes its cell)."""
    return ",".join(_encode(c) for c in cells)
