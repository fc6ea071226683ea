"""Structures in and out: PDB / mmCIF via gemmi, altlocs <-> conformers, ensembles -> multi-model mmCIF.

Everything file-format related goes through gemmi (``gemmi.read_structure``, ``Structure.make_mmcif_document``,
``Structure.make_pdb_string``); nothing here parses PDB columns or CIF tokens by hand.

Reading (``read_structure``) turns one file into a :class:`Conformers`: one full copy of the atoms per alternate
conformation (altloc id) or per model, with weights.  What is kept: every residue except water (polymer residues
*and* ligands / ions); hydrogens and deuteriums are dropped unless ``hydrogens=True``.  Callers that want only the
protein filter afterwards with :func:`select_atoms` or ``layout.select``.

Atoms are matched everywhere by ``(chain, residue number, atom name)`` (``predictors.base.AtomKey``).  Insertion
codes cannot be represented by that key, so a file that uses them is refused with a message asking to renumber.

Writing: :func:`write_ensemble_cif` writes an ensemble ``[E, N, 3]`` as a multi-model mmCIF with the member
weights in a custom category; :func:`write_altloc_structure` writes conformers as one model with altlocs.  Both
write atomically (temporary file in the target folder, then ``os.replace``).
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import gemmi
import numpy as np

from observables.errors import InputError
from predictors.base import AtomKey, AtomLayout

__all__ = [
    "StructureError",
    "Conformers",
    "read_fixed_atoms",
    "read_structure",
    "write_ensemble_cif",
    "write_altloc_structure",
    "LayoutMatch",
    "match_layouts",
    "select_atoms",
    "altloc_regions",
    "as_ensemble",
    "MEMBER_CATEGORY",
    "METADATA_CATEGORY",
]

# Custom mmCIF categories written by write_ensemble_cif and read back by read_structure.
MEMBER_CATEGORY = "_ensemble_guide_member."  # loop: model_id, weight
METADATA_CATEGORY = "_ensemble_guide_metadata."  # loop: key, value (value JSON-encoded unless a plain string)

_CIF_SUFFIXES = (".cif", ".mmcif", ".mcif")
_DEFAULT_B = 20.0  # A^2, written when the caller gives no B-factors


log = logging.getLogger("ensemble_guide")


class StructureError(InputError):
    """A structure file (or a selection on it) cannot be used; the message names the file and the culprit."""


@dataclass
class Conformers:
    """The conformations one file describes, each as a full copy of the same atoms.

    ``coords[k]`` is conformer ``ids[k]`` with weight ``weights[k]``.  For altloc files every atom without an
    altloc (shared) appears, identical, in every conformer; ``varying`` marks the atoms listed under two or more
    altloc ids (their positions may differ between conformers).  For multi-model files ``varying`` marks the
    atoms whose position differs between models by more than 1e-3 A.
    """

    layout: AtomLayout
    coords: np.ndarray  # [K, N, 3] float32
    weights: np.ndarray  # [K] float64, sums to 1
    ids: list[str]  # altloc ids ("A", "B", ...) or model names ("1", "2", ...)
    b_factors: np.ndarray  # [N] float32 (of the first conformer's atom)
    varying: np.ndarray  # [N] bool
    path: Path | None
    kind: str  # "altloc" | "models" | "single"
    metadata: dict = field(default_factory=dict)  # from _ensemble_guide_metadata, when the file has it
    # What the file says of each conformer's copy of each atom (None when built in memory without a file):
    # occupancies[k, i] is the occupancy conformer k carries for atom i, so that sum_k occupancies[:, i] is the atom's
    # total occupancy in the file: an altloc's own record at its occupancy, a shared record split by the conformer
    # weights, 0 where conformer k borrowed another altloc's record; b_iso [K, N] (A^2) and u_aniso [K, N, 6]
    # (U11, U22, U33, U12, U13, U23, Cartesian A^2, zeros for isotropic atoms) of the record each conformer uses.
    occupancies: np.ndarray | None = None
    b_iso: np.ndarray | None = None
    u_aniso: np.ndarray | None = None
    crystal: tuple | None = None  # (cell (a, b, c, alpha, beta, gamma), space group name) when the file has a cell
    # what read_structure kept and ignored: model, chains, atoms, polymer_residues, other_residues {name: count},
    # ignored {hydrogens, waters, water_atoms, duplicate_atoms}, altlocs, models_read (empty when built in memory)
    contents: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def relative_occupancies(self) -> np.ndarray:
        """occupancies / weights [K, N]: each conformer's per-atom occupancy relative to its weight, so that the
        weighted conformers reproduce the file's occupancies (ones when the file gave none)."""
        if self.occupancies is None:
            return np.ones(self.coords.shape[:2], np.float32)
        return (self.occupancies / np.maximum(self.weights, 1e-12)[:, None]).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# reading


@dataclass
class _Site:
    """One atom key of one model: its residue name, element, and the positions listed under each altloc."""

    res_name: str
    element: str
    alts: dict  # altloc id ("" for none) -> (xyz [3], occupancy, B)

    def pick(self, altloc: str) -> tuple:
        """Position for conformer ``altloc``: its own entry, else the shared one, else the most occupied."""
        if altloc in self.alts:
            return self.alts[altloc]
        if "" in self.alts:
            return self.alts[""]
        return max(self.alts.values(), key=lambda v: v[1])  # first of equal occupancies wins

    @property
    def varying(self) -> bool:
        return len(self.alts) >= 2


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _is_cif_name(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name.endswith(_CIF_SUFFIXES)


def _read_gemmi(path: Path) -> tuple[gemmi.Structure, gemmi.cif.Block | None]:
    if not path.exists():
        raise StructureError(f"{path}: no such file")
    if not path.is_file():
        raise StructureError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise StructureError(f"{path}: the file is empty")
    doc = gemmi.cif.Document()
    fmt = gemmi.CoorFormat.Mmcif if _is_cif_name(path) else gemmi.CoorFormat.Detect
    try:
        st = gemmi.read_structure(str(path), merge_chain_parts=True, format=fmt, save_doc=doc)
    except Exception as exc:  # gemmi raises RuntimeError/ValueError/IOError with its own text
        raise StructureError(f"{path}: cannot read as PDB or mmCIF: {_one_line(exc)}") from None
    block = doc[0] if st.input_format == gemmi.CoorFormat.Mmcif and len(doc) > 0 else None
    return st, block


DUPLICATE_TOLERANCE = 1e-3  # A: two records of one atom (same residue, name, altloc) this close are one atom


def _collect_model(model: gemmi.Model, path: Path, hydrogens: bool,
                   contents: dict | None = None) -> dict[AtomKey, _Site]:
    """Atom sites of one model in file order, waters (and hydrogens) removed.

    An atom written twice with the same residue, name and altloc at the same position (within DUPLICATE_TOLERANCE)
    is kept once, with a warning that names the copies; at different positions it is a StructureError that names
    the residue.  ``contents``, when given, is filled with what was kept and what was ignored (see
    :func:`_describe_contents`)."""
    sites: dict[AtomKey, _Site] = {}
    res_names: dict[tuple[str, int], str] = {}
    skipped: set[tuple[str, int, str]] = set()
    duplicates: list[str] = []
    n_hydrogens = n_waters = n_water_atoms = 0
    counted: set = set()
    n_polymer = 0
    other_res: dict[str, int] = {}  # residue name -> count, for ligands, ions, unknown residues
    chains: list[str] = []
    for chain in model:
        for res in chain:
            if res.is_water():
                n_waters += 1
                n_water_atoms += len(res)
                continue
            if chain.name not in chains:
                chains.append(chain.name)
            where = f"residue {chain.name} {res.name} {res.seqid.num}{res.seqid.icode.strip()}"
            if res.seqid.icode not in (" ", "\0", ""):
                raise StructureError(
                    f"{path}: {where} has an insertion code; atoms are matched by (chain, residue number, atom name),"
                    " so renumber the residues without insertion codes first"
                )
            rkey = (chain.name, res.seqid.num)
            seen = res_names.get(rkey)
            if seen is not None and seen != res.name:
                if any(a.has_altloc() for a in res):
                    if (chain.name, res.seqid.num, res.name) not in skipped:
                        skipped.add((chain.name, res.seqid.num, res.name))
                        warnings.warn(
                            f"{path}: {where} is microheterogeneity (altlocs with residue {seen}); keeping {seen} only",
                            stacklevel=3,
                        )
                    continue
                raise StructureError(
                    f"{path}: {where} reuses the number of residue {chain.name} {seen} {res.seqid.num}"
                )
            res_names[rkey] = res.name
            if rkey not in counted:
                counted.add(rkey)
                if _is_polymer_residue(res.name):
                    n_polymer += 1
                else:
                    other_res[res.name] = other_res.get(res.name, 0) + 1
            for atom in res:
                if not hydrogens and atom.is_hydrogen():
                    n_hydrogens += 1
                    continue
                key = (chain.name, res.seqid.num, atom.name)
                alt = atom.altloc if atom.has_altloc() else ""
                site = sites.get(key)
                if site is None:
                    site = sites[key] = _Site(res.name, atom.element.name.upper(), {})
                p = atom.pos
                if alt in site.alts:
                    label = f" altloc {alt}" if alt else ""
                    if np.linalg.norm(np.subtract(site.alts[alt][0], (p.x, p.y, p.z))) <= DUPLICATE_TOLERANCE:
                        duplicates.append(f"{chain.name} {res.name} {res.seqid.num} {atom.name}{label}")
                        continue
                    raise StructureError(
                        f"{path}: {where} lists atom {atom.name}{label} twice at different positions; give the"
                        " copies different altloc ids (A, B, ...) if they are alternative conformations, or delete"
                        " one of them"
                    )
                site.alts[alt] = ((p.x, p.y, p.z), float(atom.occ), float(atom.b_iso), _aniso(atom))
    if duplicates:
        shown = ", ".join(duplicates[:5]) + (f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else "")
        warnings.warn(f"{path}: model {model.name}: {len(duplicates)} atom(s) written twice at the same position,"
                      f" kept once: {shown}", stacklevel=3)
    if contents is not None:
        contents.update(
            model=model.name, chains=chains, atoms=len(sites),
            polymer_residues=n_polymer,
            other_residues={name: n for name, n in sorted(other_res.items())},
            ignored={"hydrogens": n_hydrogens, "waters": n_waters, "water_atoms": n_water_atoms,
                     "duplicate_atoms": len(duplicates)},
        )
    return sites


def _describe_contents(path: Path, contents: dict, n_models: int) -> str:
    """One line for the log: what of the file is used (model, chains, atoms, ligands) and what is ignored."""
    other = contents.get("other_residues", {})
    ligands = (", ".join(f"{n} {name}" if n > 1 else name for name, n in list(other.items())[:8])
               + (" ..." if len(other) > 8 else "")) if other else "none"
    ign = contents["ignored"]
    ignored = [f"{v} {k.replace('_', ' ')}" for k, v in ign.items() if v and k != "water_atoms"]
    ignored = [w[:-1] if w.startswith("1 ") else w for w in ignored]  # "1 water", "1 duplicate atom"
    read = contents.get("models_read") or [contents["model"]]
    if len(read) > 1:
        models = f"models {read[0]}-{read[-1]} (one conformer each)"
    else:
        models = f"model {read[0]}" + (f" of {n_models}" if n_models > 1 else "")
    if contents.get("altlocs"):
        models += f", altlocs {', '.join(contents['altlocs'])}"
    return (f"{path.name}: {models}, chains {', '.join(contents['chains'])}: kept {contents['atoms']} atoms in "
            f"{contents['polymer_residues']} polymer residues; ligands/ions/other residues kept: {ligands}; "
            f"ignored: {', '.join(ignored) if ignored else 'nothing'}")


def _aniso(atom: gemmi.Atom) -> tuple:
    """An atom's anisotropic U (U11, U22, U33, U12, U13, U23; Cartesian A^2), zeros when it has none."""
    u = atom.aniso
    return (u.u11, u.u22, u.u33, u.u12, u.u13, u.u23) if u.nonzero() else (0.0,) * 6


def _pick_models(st: gemmi.Structure, path: Path, model: int | str | None) -> list[gemmi.Model]:
    """The models of ``st``, or only the one named ``model`` (its number as written in the file); StructureError when
    that model does not exist or the file has no models."""
    models = list(st)
    if model is not None:
        models = [m for m in models if m.name == str(model)]
        if not models:
            names = ", ".join(m.name for m in st) or "none"
            raise StructureError(f"{path}: has no model {model!r} (models: {names})")
    if not models:
        raise StructureError(f"{path}: contains no atoms (no models)")
    return models


def _first_sites(models: list[gemmi.Model], path: Path, hydrogens: bool,
                 contents: dict | None = None) -> dict[AtomKey, _Site]:
    """The atom sites of the first model; StructureError when it has none (outside water)."""
    sites = _collect_model(models[0], path, hydrogens, contents)
    if not any(len(res) for ch in models[0] for res in ch):
        raise StructureError(f"{path}: no atom records found; is it a PDB or mmCIF coordinate file?")
    if not sites:
        what = "atoms" if hydrogens else "non-hydrogen atoms"
        raise StructureError(f"{path}: contains no {what} outside water")
    return sites


def _layout_of(keys: list[AtomKey], sites: dict[AtomKey, _Site]) -> AtomLayout:
    return AtomLayout(
        chain_id=np.array([k[0] for k in keys], dtype=object),
        res_seq=np.array([k[1] for k in keys], dtype=np.int64),
        res_name=np.array([sites[k].res_name for k in keys], dtype=object),
        atom_name=np.array([k[2] for k in keys], dtype=object),
        element=np.array([sites[k].element for k in keys], dtype=object),
    )


def _normalised(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    total = float(w.sum())
    if not np.all(np.isfinite(w)) or total <= 0.0 or np.any(w < 0):
        return np.full(len(w), 1.0 / len(w))
    return w / total


def _cif_loop(block: gemmi.cif.Block | None, prefix: str, tags: list[str]) -> list[list[str]]:
    if block is None:
        return []
    table = block.find(prefix, tags)
    return [[gemmi.cif.as_string(row[i]) for i in range(len(tags))] for row in table]


def _read_metadata(block: gemmi.cif.Block | None) -> dict:
    out = {}
    for key, value in _cif_loop(block, METADATA_CATEGORY, ["key", "value"]):
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def read_structure(path, *, hydrogens: bool = False, model: int | str | None = None) -> Conformers:
    """Read a PDB / mmCIF file (optionally gzipped) into conformers.

    - One model with altlocs: one conformer per altloc id (sorted), ``kind="altloc"``.  Shared atoms are copied
      into every conformer; an atom that lacks an altloc id present elsewhere in the file (e.g. only A/B here but
      A/B/C elsewhere) takes its most occupied altloc.  Weights are the mean occupancy of each altloc's atoms,
      normalised to sum 1.  Microheterogeneity (different residue names per altloc) keeps the first residue name
      and warns.
    - Several models: one conformer per model, ``kind="models"``; atoms are matched by key and an atom missing
      from a model is an error.  Weights come from the ``_ensemble_guide_member`` category written by
      :func:`write_ensemble_cif`, else are uniform.  Altlocs inside a model collapse to the most occupied one.
    - Several models *and* altlocs in the first model: the first model's altlocs are used (with a warning).
      ``model=`` (the model number as written in the file: MODEL record / pdbx_PDB_model_num) reads only that
      model, and its altlocs if it has any.
    - Otherwise one conformer, ``kind="single"``, weight 1.

    Waters are removed; ligands and ions are kept; hydrogens/deuteriums are removed unless ``hydrogens=True``.
    """
    path = Path(path)
    st, block = _read_gemmi(path)
    models = _pick_models(st, path, model)
    contents: dict = {}
    first = _first_sites(models, path, hydrogens, contents)
    altlocs = sorted({a for site in first.values() for a in site.alts if a})
    metadata = _read_metadata(block)
    contents["altlocs"] = altlocs
    contents["models_read"] = [models[0].name] if (altlocs or len(models) == 1) else [m.name for m in models]
    log.info("%s", _describe_contents(path, contents, len(st)))

    if altlocs or len(models) == 1:
        if altlocs and len(models) > 1:
            warnings.warn(
                f"{path}: has {len(models)} models and altlocs; using the altlocs of model {models[0].name}"
                " (pass model= to choose another)",
                stacklevel=2,
            )
        keys = list(first)
        layout = _layout_of(keys, first)
        ids = altlocs or [models[0].name]
        coords = np.array([[first[k].pick(a)[0] for k in keys] for a in ids], dtype=np.float32)
        if altlocs:
            occ = [np.mean([first[k].alts[a][1] for k in keys if a in first[k].alts]) for a in altlocs]
            weights = _normalised(np.array(occ))
            varying = np.array([first[k].varying for k in keys], dtype=bool)
        else:
            weights = np.ones(1)
            varying = np.zeros(len(keys), dtype=bool)
        b_factors = np.array([first[k].pick(ids[0])[2] for k in keys], dtype=np.float32)
        picks = [[first[k].pick(a) for k in keys] for a in ids]
        occupancies = np.array([[_share(first[k], a, w) for k in keys] for a, w in zip(ids, weights)], np.float32)
        return Conformers(layout, coords, weights, ids, b_factors, varying, path,
                          "altloc" if altlocs else "single", metadata, occupancies=occupancies,
                          b_iso=np.array([[e[2] for e in row] for row in picks], np.float32),
                          u_aniso=np.array([[e[3] for e in row] for row in picks], np.float32),
                          crystal=_crystal(st), contents=contents)

    # several models, no altlocs in the first: one conformer per model
    per_model = [first] + [_collect_model(m, path, hydrogens) for m in models[1:]]
    union: dict[AtomKey, _Site] = {}
    for sites in per_model:
        for k, s in sites.items():
            union.setdefault(k, s)
    keys = list(union)
    for m, sites in zip(models, per_model):
        missing = next((k for k in keys if k not in sites), None)
        if missing is not None:
            c, r, a = missing
            raise StructureError(
                f"{path}: model {m.name} lacks atom {a} of residue {c} {union[missing].res_name} {r}"
                " (every model must have the same atoms)"
            )
    layout = _layout_of(keys, union)
    ids = [m.name for m in models]
    coords = np.array([[sites[k].pick("")[0] for k in keys] for sites in per_model], dtype=np.float32)
    b_factors = np.array([first[k].pick("")[2] for k in keys], dtype=np.float32)
    spread = np.linalg.norm(coords - coords[:1], axis=-1).max(axis=0)
    varying = spread > 1e-3
    recorded = {mid: w for mid, w in _cif_loop(block, MEMBER_CATEGORY, ["model_id", "weight"])}
    if recorded and all(i in recorded for i in ids):
        try:
            weights = _normalised(np.array([float(recorded[i]) for i in ids]))
        except ValueError:
            raise StructureError(f"{path}: {MEMBER_CATEGORY}weight has a value that is not a number") from None
    else:
        if recorded:
            warnings.warn(f"{path}: {MEMBER_CATEGORY}model_id does not cover every model; using uniform weights",
                          stacklevel=2)
        weights = np.full(len(ids), 1.0 / len(ids))
    picks = [[sites[k].pick("") for k in keys] for sites in per_model]
    occupancies = np.array([[w * e[1] for e in row] for row, w in zip(picks, weights)], np.float32)
    return Conformers(layout, coords, weights, ids, b_factors, varying, path, "models", metadata,
                      occupancies=occupancies, b_iso=np.array([[e[2] for e in row] for row in picks], np.float32),
                      u_aniso=np.array([[e[3] for e in row] for row in picks], np.float32), crystal=_crystal(st),
                      contents=contents)


def _share(site: "_Site", altloc: str, weight: float) -> float:
    """The occupancy conformer ``altloc`` (weight ``weight``) carries for one atom: its own record's, a shared record's
    times the weight, or 0 when it borrowed another altloc's record (see ``Conformers.occupancies``)."""
    if altloc in site.alts:
        return site.alts[altloc][1]
    if "" in site.alts:
        return site.alts[""][1] * weight
    return 0.0


def _crystal(st: gemmi.Structure) -> tuple | None:
    """(cell parameters, space group name) of a structure with a real unit cell, else None (e.g. CRYST1 1 1 1)."""
    if not st.cell.is_crystal() or st.cell.a <= 1.0 + 1e-6:
        return None
    sg = st.find_spacegroup()
    return tuple(st.cell.parameters), (sg.xhm() if sg is not None else st.spacegroup_hm or "P 1")


def read_fixed_atoms(path, exclude=(), *, hydrogens: bool = False, model: int | str | None = None) -> dict:
    """The atoms of a structure file's first (or ``model``) model whose (chain, residue number, atom name) is not in
    ``exclude``: waters, ligands, ions and anything else a model leaves out, every altloc record on its own.

    Returns arrays for ``observables.base.FixedAtoms``: element, xyz [M, 3], b_iso, occupancy, u_aniso [M, 6], label,
    plus ``counts`` {"water": n, "other": n} of the atoms kept.  Hydrogens are left out unless ``hydrogens=True``."""
    path = Path(path)
    st, _ = _read_gemmi(path)
    models = _pick_models(st, path, model)
    skip = set(exclude)
    rows = []
    counts = {"water": 0, "other": 0}
    for chain in models[0]:
        for res in chain:
            water = res.is_water()
            for atom in res:
                if not hydrogens and atom.is_hydrogen():
                    continue
                if (chain.name, res.seqid.num, atom.name) in skip:
                    continue
                p = atom.pos
                alt = atom.altloc if atom.has_altloc() else ""
                rows.append((atom.element.name, (p.x, p.y, p.z), float(atom.b_iso), float(atom.occ), _aniso(atom),
                             f"{chain.name} {res.name} {res.seqid.num} {atom.name}{'.' + alt if alt else ''}"))
                counts["water" if water else "other"] += 1
    return {
        "element": np.array([r[0] for r in rows], dtype=str),
        "xyz": np.array([r[1] for r in rows], dtype=np.float32).reshape(-1, 3),
        "b_iso": np.array([r[2] for r in rows], dtype=np.float32),
        "occupancy": np.array([r[3] for r in rows], dtype=np.float32),
        "u_aniso": np.array([r[4] for r in rows], dtype=np.float32).reshape(-1, 6),
        "label": np.array([r[5] for r in rows], dtype=str),
        "counts": counts,
    }


# ----------------------------------------------------------------------------------------------------------------
# writing


def as_ensemble(coords, n_atoms: int | None = None, name: str = "coords", *, single: bool = True,
                finite: bool = False, members: str = "E", match: str | None = None) -> np.ndarray:
    """``coords`` as a float64 ensemble ``[E, N, 3]``: the project's one check of ensemble coordinates.

    ``n_atoms``: the N required (None: any).  ``single``: a single structure ``[N, 3]`` is read as one member.
    ``finite``: refuse NaN and infinite coordinates.  ``members`` names the leading axis in the message ("E",
    "K" for conformers) and ``match`` what N must match ("the layout").  Raises ``ValueError`` naming ``name``, its
    shape and the shape expected."""
    x = np.asarray(coords, dtype=np.float64)
    if single and x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[-1] != 3 or (n_atoms is not None and x.shape[1] != n_atoms):
        n = "N" if n_atoms is None else str(n_atoms)
        alternative = f" or [{n}, 3]" if single else ""
        target = f" to match {match}" if match else ""
        raise ValueError(f"{name} has shape {np.shape(coords)}, expected [{members}, {n}, 3]{alternative}{target}")
    if finite and not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return x


def _check_coords(layout: AtomLayout, coords, name: str) -> np.ndarray:
    x = as_ensemble(coords, len(layout), name, finite=True, members="K", match="the layout")
    return np.round(x, 4)  # 1e-4 A: drops float32 noise from the text; PDB keeps 1e-3 anyway


def _check_b(layout: AtomLayout, b_factors) -> np.ndarray:
    if b_factors is None:
        return np.full(len(layout), _DEFAULT_B)
    b = np.asarray(b_factors, dtype=np.float64).reshape(-1)
    if b.shape != (len(layout),):
        raise ValueError(f"b_factors has shape {np.shape(b_factors)}, expected ({len(layout)},)")
    return b


def _residue_runs(layout: AtomLayout) -> list[tuple[str, int, str, list[int]]]:
    """Consecutive atoms of one (chain, residue) -> (chain, res_seq, res_name, atom indices), in layout order (a
    residue whose atoms are not contiguous gives several runs)."""
    residue = layout.residue_index()
    n = len(residue)
    start = np.ones(n, dtype=bool)
    start[1:] = residue[1:] != residue[:-1]
    bounds = np.append(np.flatnonzero(start), n).tolist()
    return [(str(layout.chain_id[a]), int(layout.res_seq[a]), str(layout.res_name[a]), list(range(a, b)))
            for a, b in zip(bounds[:-1], bounds[1:])]


@functools.lru_cache(maxsize=None)
def _is_polymer_residue(name: str) -> bool:
    info = gemmi.find_tabulated_residue(name)
    return info is not None and (info.is_amino_acid() or info.is_nucleic_acid())


def _make_atom(name: str, element: str, xyz, occ: float, b: float, altloc: str = "\0") -> gemmi.Atom:
    atom = gemmi.Atom()
    atom.name = name
    atom.element = gemmi.Element(element)
    atom.pos = gemmi.Position(float(xyz[0]), float(xyz[1]), float(xyz[2]))
    atom.occ = float(occ)
    atom.b_iso = float(b)
    atom.altloc = altloc
    return atom


def _make_model(name: str, layout: AtomLayout, runs, atoms_of) -> gemmi.Model:
    """One gemmi model; ``atoms_of(i)`` yields the gemmi atoms written for layout atom i."""
    model = gemmi.Model(name)
    current: gemmi.Chain | None = None
    for chain_id, res_seq, res_name, idx in runs:
        if current is None or current.name != chain_id:
            if current is not None:
                model.add_chain(current)
            current = gemmi.Chain(chain_id)
        res = gemmi.Residue()
        res.name = res_name
        res.seqid = gemmi.SeqId(res_seq, " ")
        res.het_flag = "A" if _is_polymer_residue(res_name) else "H"
        for i in idx:
            for atom in atoms_of(i):
                res.add_atom(atom)
        current.add_residue(res)
    if current is not None:
        model.add_chain(current)
    return model


def _finish_entities(st: gemmi.Structure) -> None:
    """Entities, subchains (label_asym_id A, B, ...), polymer sequences and label_seq_id, as readers expect."""
    st.setup_entities()
    new_names: dict[str, str] = {}
    for model in st:
        for chain in model:
            for res in chain:
                if res.subchain not in new_names:
                    new_names[res.subchain] = _asym_name(len(new_names))
                res.subchain = new_names[res.subchain]
    for n, ent in enumerate(st.entities, start=1):
        ent.subchains = [new_names.get(s, s) for s in ent.subchains]
        ent.name = str(n)
        if ent.entity_type == gemmi.EntityType.Polymer and ent.subchains:
            span = st[0].get_subchain(ent.subchains[0])
            ent.full_sequence = [r.name for r in span]
    st.assign_label_seq_id()


def dress(st: gemmi.Structure, *, crystal: tuple | None = None, fixed_from=None, exclude=()) -> gemmi.Structure:
    """What a written model keeps of its input: the ``crystal`` (cell parameters, space-group name) and, from the
    first model of the structure file ``fixed_from``, every residue none of whose atoms (chain, residue number, atom
    name) is in ``exclude`` (the layout's atoms): waters, ligands, ions, as the file has them (altlocs, B,
    occupancies, HETATM).  Added to every model of ``st``; entities and subchains are set up again."""
    if crystal is not None:
        st.cell = gemmi.UnitCell(*[float(v) for v in crystal[0]])
        st.spacegroup_hm = gemmi.find_spacegroup_by_name(str(crystal[1])).hm
    if fixed_from is None:
        return st
    skip = set(exclude)
    source, _ = _read_gemmi(Path(fixed_from))
    carried = [(chain.name, res) for chain in source[0] for res in chain
               if not any((chain.name, res.seqid.num, a.name) in skip for a in res)]
    if not carried:
        return st
    for model in st:
        for chain_name, res in carried:
            chain = next((c for c in model if c.name == chain_name), None)
            if chain is None:
                model.add_chain(gemmi.Chain(chain_name))
                chain = model[len(model) - 1]
            chain.add_residue(res)
    for model in st:
        for chain in model:
            for res in chain:
                res.subchain = ""
    st.assign_subchains(force=True)
    st.entities.clear()
    _finish_entities(st)
    return st


def _asym_name(n: int) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    name = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        name = letters[r] + name
    return name


def atomic_write(path: Path, text: str | bytes) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text if isinstance(text, bytes) else text.encode()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _metadata_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def write_ensemble_cif(
    path,
    layout: AtomLayout,
    coords,
    weights,
    *,
    b_factors=None,
    title: str = "ensemble-guide",
    metadata: dict | None = None,
    crystal: tuple | None = None,
) -> Path:
    """Write an ensemble ``[E, N, 3]`` as a multi-model mmCIF (models 1..E) and return the path.

    Member weights go into the custom loop ``_ensemble_guide_member.model_id / .weight`` (read back by
    :func:`read_structure`); the occupancy column stays 1.0 because every model is a complete structure on its own.
    ``metadata`` goes into ``_ensemble_guide_metadata.key / .value`` (non-string values JSON-encoded).  B-factors
    default to 20 A^2; ``crystal`` (cell parameters, space-group name: the input's) is kept.  Written atomically;
    ``.gz`` suffix gzips.
    """
    x = _check_coords(layout, coords, "coords")
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (len(x),):
        raise ValueError(f"weights has shape {np.shape(weights)}, expected ({len(x)},) for {len(x)} members")
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    w = w / w.sum()
    b = _check_b(layout, b_factors)
    layout.index()  # refuses duplicate atom keys

    st = gemmi.Structure()
    st.name = "ensemble"
    st.info["_struct.title"] = title
    runs = _residue_runs(layout)
    names, elements = layout.atom_name, layout.element
    for e in range(len(x)):
        xe = x[e]
        one_atom = lambda i: (_make_atom(names[i], elements[i], xe[i], 1.0, b[i]),)  # noqa: E731
        st.add_model(_make_model(str(e + 1), layout, runs, one_atom))
    _finish_entities(st)
    dress(st, crystal=crystal)
    doc = st.make_mmcif_document()
    block = doc.sole_block()
    block.set_mmcif_category(MEMBER_CATEGORY, {
        "model_id": [str(e + 1) for e in range(len(x))],
        "weight": [f"{v:.8f}" for v in w],
    })
    if metadata:
        block.set_mmcif_category(METADATA_CATEGORY, {
            "key": [str(k) for k in metadata],
            "value": [_metadata_value(v) for v in metadata.values()],
        })
    return atomic_write(Path(path), doc.as_string())


def write_altloc_structure(
    path,
    layout: AtomLayout,
    coords,
    occupancies,
    *,
    ids=None,
    tolerance: float = 0.01,
    b_factors=None,
) -> Path:
    """Write conformers ``[K, N, 3]`` as one model with altlocs (PDB, or mmCIF when the suffix is .cif/.mmcif).

    An atom whose positions differ between any two conformers by more than ``tolerance`` A is written K times with
    altloc ids ``ids`` (default A, B, C, ...) and the given occupancies; every other atom is written once, at
    conformer 0's position, with occupancy 1.  ``read_structure`` of the result returns the conformers (shared atoms
    within ``tolerance``) with weights ``occupancies / sum(occupancies)``.  If no atom differs the file has no
    altlocs and reads back as one conformer.  Written atomically; ``.gz`` suffix gzips.
    """
    x = _check_coords(layout, coords, "coords")
    k = len(x)
    occ = np.asarray(occupancies, dtype=np.float64).reshape(-1)
    if occ.shape != (k,):
        raise ValueError(f"occupancies has shape {np.shape(occupancies)}, expected ({k},) for {k} conformers")
    if np.any(occ < 0) or np.any(occ > 1) or occ.sum() > 1.0 + 1e-6:
        raise ValueError(f"occupancies must lie in [0, 1] and sum to at most 1, got {occ.tolist()}")
    ids = [chr(ord("A") + j) for j in range(k)] if ids is None else [str(i) for i in ids]
    if len(ids) != k or len(set(ids)) != k or any(len(i) != 1 or not i.strip() for i in ids):
        raise ValueError(f"ids must be {k} distinct single characters, got {ids}")
    b = _check_b(layout, b_factors)
    layout.index()

    diff = x[:, None] - x[None, :]  # [K, K, N, 3]
    spread = np.sqrt((diff**2).sum(-1)).max(axis=(0, 1)) if k > 1 else np.zeros(len(layout))
    varying = spread > tolerance
    names, elements = layout.atom_name, layout.element

    def atoms_of(i):
        if not varying[i]:
            return (_make_atom(names[i], elements[i], x[0, i], 1.0, b[i]),)
        return tuple(_make_atom(names[i], elements[i], x[j, i], occ[j], b[i], ids[j]) for j in range(k))

    st = gemmi.Structure()
    st.name = "altloc"
    st.add_model(_make_model("1", layout, _residue_runs(layout), atoms_of))
    _finish_entities(st)
    path = Path(path)
    if _is_cif_name(path):
        text = st.make_mmcif_document().as_string()
    else:
        st.assign_serial_numbers()
        text = st.make_pdb_string()
    return atomic_write(path, text)


# ----------------------------------------------------------------------------------------------------------------
# layouts and selections


@dataclass
class LayoutMatch:
    """Atoms shared by two layouts: ``dst[..., dst_index, :] = src[..., src_index, :]`` copies them over."""

    src_index: np.ndarray  # int64, in dst order
    dst_index: np.ndarray  # int64, increasing
    missing_in_dst: list[AtomKey]  # src atoms dst lacks, in src order
    missing_in_src: list[AtomKey]  # dst atoms src lacks, in dst order


def match_layouts(src: AtomLayout, dst: AtomLayout) -> LayoutMatch:
    """Match atoms by (chain, residue number, atom name)."""
    src_idx = src.index()
    dst_keys = dst.keys()
    dst.index()  # refuses duplicates
    pairs = [(src_idx[k], j) for j, k in enumerate(dst_keys) if k in src_idx]
    dst_set = set(dst_keys)
    return LayoutMatch(
        src_index=np.array([p[0] for p in pairs], dtype=np.int64),
        dst_index=np.array([p[1] for p in pairs], dtype=np.int64),
        missing_in_dst=[k for k in src.keys() if k not in dst_set],
        missing_in_src=[k for k in dst_keys if k not in src_idx],
    )


def select_atoms(
    layout: AtomLayout,
    *,
    chain: str | None = None,
    residues: tuple[int, int] | None = None,
    atom_names=None,
) -> np.ndarray:
    """Boolean mask [N] of atoms in ``chain``, residue numbers ``residues`` (inclusive) and ``atom_names``.

    ``None`` means no restriction; ``atom_names`` may be one name or a collection.  A selection that matches no
    atom raises :class:`StructureError`.
    """
    mask = np.ones(len(layout), dtype=bool)
    what = []
    if chain is not None:
        mask &= layout.chain_id == str(chain)
        what.append(f"chain {chain}")
    if residues is not None:
        lo, hi = residues
        mask &= (layout.res_seq >= int(lo)) & (layout.res_seq <= int(hi))
        what.append(f"residues {lo}-{hi}")
    if atom_names is not None:
        names = [atom_names] if isinstance(atom_names, str) else [str(a) for a in atom_names]
        mask &= np.isin(layout.atom_name, names)
        what.append(f"atom names {', '.join(names)}")
    if not mask.any():
        chains = ", ".join(dict.fromkeys(layout.chain_id.tolist())) or "none"
        raise StructureError(
            f"selection {' / '.join(what) or '(everything)'} selects no atoms (layout has {len(layout)} atoms,"
            f" chains {chains})"
        )
    return mask


def altloc_regions(conf: Conformers, min_span: int = 1) -> list[tuple[str, int, int]]:
    """Runs of consecutive residues (same chain, residue numbers increasing by 1) that contain varying atoms.

    Returns ``(chain, first residue, last residue)`` for each run of at least ``min_span`` residues, in layout order.
    """
    layout = conf.layout
    flagged = dict.fromkeys(key for key, v in zip(layout.residue_keys(), conf.varying.tolist()) if v)
    regions: list[list] = []
    for c, r in layout.residues():
        if (c, r) not in flagged:
            continue
        if regions and regions[-1][0] == c and regions[-1][2] == r - 1:
            regions[-1][2] = r
        else:
            regions.append([c, r, r])
    return [(c, a, b) for c, a, b in regions if b - a + 1 >= min_span]
