"""Multiconformer (altloc) models <-> weighted ensembles.

A *multiconformer model* is one model in which some atoms are listed several times, under alternate location ids
(altlocs A, B, ...) with occupancies: the form X-ray models (and qFit) use for conformational heterogeneity.  An
*ensemble* is ``[E, N, 3]`` coordinates with member weights ``[E]`` summing to 1.  This module converts both ways.

ensemble -> multiconformer model (:func:`ensemble_to_multiconf`)
    - **Units.**  Each residue is clustered on its own (``by="residue"``, qFit-style), or contiguous runs of
      residues are clustered jointly (``by="segment"``: runs of consecutive residues of a chain that each split when
      clustered alone, or the runs given in ``segments=``).
    - **Frame.**  Members are compared in the frame they are given in (the sampler's output, the map's frame).
      With ``fit=`` (a mask or atom indices) every member is first superposed (Kabsch, unweighted, on the fit atoms)
      onto the member with the largest weight, and the model is written in that member's frame.
    - **Clustering.**  Complete-linkage hierarchical clustering of the members on the RMSD over all atoms of the
      unit (the layout's atoms; ``read_structure`` layouts are heavy atoms), cut at ``threshold`` A: within one
      cluster *every* pair of members is within ``threshold`` (the cluster "diameter"), so members within the
      threshold of each other merge.  Deterministic (scipy's linkage; exact ties in distance are broken by member
      order).  Members with weight 0 are left out (``AltlocGroup.members`` marks them -1).
    - **Cap.**  If a unit has more than ``max_altlocs`` clusters, the same tree is cut into ``max_altlocs``
      clusters instead: the most similar conformations are merged first, so no member and no occupancy is lost.
      Clusters lighter than ``min_occupancy`` (default 0: none) are then dissolved, their members joining the
      cluster they are closest to (weighted mean squared distance).
    - **Coordinates.**  Each altloc is the weighted mean of its members (``center="mean"``, the default) or its
      weighted medoid (``center="medoid"``: the member with the least weighted squared distance to the others).
      The mean is the default because an altloc in a crystallographic model *is* the mean position of a substate
      (the spread belongs in the B-factor), because two bonded atoms averaged over the same members keep their
      bond (the mean of the bond vectors), which is what keeps peptide links between units sensible, and because
      the clustering threshold bounds how far any member is from the mean, so the shortening of bonds by
      averaging is second order (about spread^2 / (2 * bond length)).  The medoid keeps one member's exact
      covalent geometry (ring planarity, chirality) but two neighbouring medoids usually come from different
      members, so bonds *between* units break by up to the cluster spread.
    - **Occupancy** of an altloc = the sum of its members' weights (weights are normalised to sum 1).
    - **Letters.**  By default (``letters="linked"``) letters follow the members along the chain: each unit's
      clusters take the letters of the preceding bonded unit's clusters they share the most member weight with
      (Hungarian assignment; leftover clusters take the lowest unused letters), so that a reader bonding A to A
      across a peptide link joins positions of the same members; a unit after one without altlocs (or a chain
      break) starts again with A = most occupied.  ``letters="occupancy"`` is qFit's convention: per unit, A, B,
      C, ... in order of decreasing occupancy (ties: the cluster holding the lowest member index first), letters
      *not* linked across units (each group records its members in ``AltlocGroup.members``).  ``by="segment"``
      clusters a run of residues jointly, so its letters are shared either way.  A unit with one cluster is
      written without altloc (blank, occupancy 1).
    - **Backbone-linked neighbours.**  When a unit with altlocs is bonded to a neighbouring residue that has none
      (a peptide link C(i)-N(i+1), or any inter-residue bond found by distance), the neighbour's atoms that move
      with the unit's altlocs -- the bonded atom, then its bonded atoms in turn, within that neighbour residue --
      are written with the unit's altloc ids and occupancies too, at the unit's clusters' positions, as long as
      an altloc's position differs from the shared one by more than ``link_tolerance`` A.  Every bond across the
      junction then joins positions averaged over the same members, so each reader's pairing (same letter, or
      blank with any letter) has a bond length within ``link_tolerance`` of the members' own; atoms of the
      neighbour that move less stay blank.  This never happens when the neighbour is identical in all members
      (e.g. a round trip of a deposited model).  It is not applied between two units that both have altlocs (use
      ``by="segment"`` or ``letters="linked"`` there), nor beyond the neighbour residue, and an atom claimed by
      both of its neighbours keeps the first (in chain order).

multiconformer model -> ensemble (:func:`multiconf_to_ensemble`, :func:`read_altloc_ensemble`)
    Per residue: its altloc ids (letter order), each with an occupancy (the mean occupancy of the residue's atoms
    listed under it), normalised within the residue (a residue whose altlocs sum to 0.6 counts as 1.0); an atom
    not listed under an altloc id of its residue takes its blank position, else its most occupied one (the rule
    ``read_structure`` uses).  ``read_structure`` makes one conformer per altloc id with one weight per id for the
    whole file, which is exact only when every residue has the same occupancies.  Here members are made by
    *letter-ordered quantile coupling*: each residue's altlocs are laid on [0, 1) in letter order, lengths =
    occupancies; the union of all residues' boundaries cuts [0, 1) into intervals, and each interval is one member
    (weight = its length) that takes, in every residue, the altloc its interval lies in.  So every residue's
    altlocs come back with exactly its occupancies, "A goes with A" wherever occupancies allow, and a file whose
    residues all share the same altlocs and occupancies gives exactly ``read_structure``'s conformers (members =
    altloc ids).  There are at most 1 + sum over residues of (altlocs - 1) members.

Files: :func:`write_multiconf` (PDB, or mmCIF for .cif/.mmcif; .gz gzips; atomic) and :func:`read_multiconf`.  PDB
stores occupancies with two decimals: altloc occupancies are rounded per residue so that they still sum to the
same total (largest remainder); mmCIF keeps them as they are.
"""

from __future__ import annotations

import string
import warnings
from collections import deque
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import gemmi
import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import squareform

from guidance.structures.geometry import bonded_matrix, covalent_radii

# io.py's gemmi helpers (one place builds models, entities and subchains; one place collects atom sites)
from guidance.structures.io import (
    Conformers,
    _finish_entities,
    _first_sites,
    _is_cif_name,
    _layout_of,
    _make_atom,
    _make_model,
    _pick_models,
    _read_gemmi,
    _residue_runs,
    as_ensemble,
    atomic_write,
    dress,
)
from guidance.structures.metrics import kabsch
from predictors.base import AtomLayout

__all__ = [
    "AltlocGroup",
    "MulticonfModel",
    "ensemble_to_multiconf",
    "multiconf_to_ensemble",
    "read_altloc_ensemble",
    "read_multiconf",
    "write_multiconf",
]

ALTLOC_IDS = string.ascii_uppercase  # altloc ids given to clusters (A = most occupied unless letters="linked")
_DEFAULT_B = 20.0  # A^2, written when the caller gives no B-factors
_COUPLING_EPS = 1e-6  # occupancy boundaries closer than this are one boundary (quantile coupling)

ResidueKey = tuple[str, int]  # (chain, residue number)


@dataclass(frozen=True)
class AltlocGroup:
    """One clustered unit of :func:`ensemble_to_multiconf`: a residue or a segment, and how its members split."""

    residues: tuple[ResidueKey, ...]  # the residues clustered together (one, or a segment)
    ids: tuple[str, ...]  # altloc id of each cluster, clusters by decreasing occupancy; ("",) for one cluster
    occupancies: np.ndarray  # [k] float64, sums to 1
    members: np.ndarray  # [E] int: index into ``ids`` of each input member; -1 for members of weight 0
    linked_atoms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # neighbour atoms given ids

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class MulticonfModel:
    """A multiconformer model: every atom of ``layout`` listed once (blank altloc) or under several altloc ids.

    Records are flat arrays sorted by atom, then altloc id: record ``r`` is atom ``layout[atom[r]]`` under altloc
    ``altloc[r]`` ("" for none) at ``coords[r]`` with ``occupancy[r]`` and ``b_factor[r]``.  ``groups`` says how
    an ensemble was clustered (empty for a model read from a file).
    """

    layout: AtomLayout
    atom: np.ndarray  # [M] int64
    altloc: np.ndarray  # [M] str
    coords: np.ndarray  # [M, 3] float64
    occupancy: np.ndarray  # [M] float64
    b_factor: np.ndarray  # [M] float64
    groups: list[AltlocGroup] = field(default_factory=list)
    path: Path | None = None

    def __post_init__(self) -> None:
        m = len(self.atom)
        self.atom = np.asarray(self.atom, dtype=np.int64)
        self.altloc = np.asarray(self.altloc, dtype=object).astype(str)
        self.coords = np.asarray(self.coords, dtype=np.float64).reshape(m, 3)
        self.occupancy = np.asarray(self.occupancy, dtype=np.float64).reshape(m)
        self.b_factor = np.asarray(self.b_factor, dtype=np.float64).reshape(m)
        if self.altloc.shape != (m,):
            raise ValueError(f"altloc has shape {self.altloc.shape}, expected ({m},)")
        order = np.lexsort((self.altloc, self.atom))
        for name in ("atom", "altloc", "coords", "occupancy", "b_factor"):
            setattr(self, name, getattr(self, name)[order])
        if m and (self.atom[0] < 0 or self.atom[-1] >= len(self.layout)):
            raise ValueError(f"record atom indices must lie in [0, {len(self.layout)})")
        missing = np.setdiff1d(np.arange(len(self.layout)), self.atom)
        if len(missing):
            raise ValueError(f"atom {self.layout.keys()[missing[0]]} has no record")
        pairs = list(zip(self.atom.tolist(), self.altloc.tolist()))
        if len(set(pairs)) != len(pairs):
            raise ValueError("an atom is listed twice under the same altloc id")
        self._starts = np.searchsorted(self.atom, np.arange(len(self.layout) + 1))
        self._residues = self.layout.residue_atoms()
        self._altlocs: dict | None = None

    def records(self, i: int) -> range:
        """Record indices of layout atom ``i``."""
        return range(self._starts[i], self._starts[i + 1])

    def record_for(self, i: int, altloc: str) -> int:
        """The record layout atom ``i`` has in conformation ``altloc``: its own, else its blank one, else its most
        occupied one (the first of equal occupancies) -- the rule of ``read_structure``."""
        recs = self.records(i)
        for wanted in (altloc, ""):
            for r in recs:
                if self.altloc[r] == wanted:
                    return r
        return max(recs, key=lambda q: (self.occupancy[q], -q))

    def altlocs(self) -> dict[ResidueKey, dict[str, float]]:
        """Per residue: altloc id -> occupancy (mean over the residue's atoms listed under it), in letter order.

        Residues without altlocs map to an empty dict.
        """
        if self._altlocs is None:
            out = {}
            for key, idx in self._residues.items():
                recs = np.concatenate([np.arange(self._starts[i], self._starts[i + 1]) for i in idx])
                recs = recs[self.altloc[recs] != ""]
                ids = sorted(set(self.altloc[recs].tolist()))
                out[key] = {a: float(self.occupancy[recs[self.altloc[recs] == a]].mean()) for a in ids}
            self._altlocs = out
        return {k: dict(v) for k, v in self._altlocs.items()}

    def conformations(self, chain: str, res_seq: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """One residue's conformations: ``(ids, coords [k, n, 3], occupancies [k] summing to 1, atom indices [n])``.

        ``ids`` are the residue's altloc ids in letter order, or ``[""]`` when it has none.  An atom not listed
        under an id takes its blank position, else its most occupied one (as in ``read_structure``).
        """
        key = (str(chain), int(res_seq))
        if key not in self._residues:
            raise KeyError(f"no residue {chain} {res_seq} in this model")
        self.altlocs()
        idx, occ = self._residues[key], self._altlocs[key]
        ids = list(occ) or [""]
        x = np.empty((len(ids), len(idx), 3))
        for j, i in enumerate(idx):
            for k, a in enumerate(ids):
                x[k, j] = self.coords[self.record_for(i, a)]
        q = np.array([occ[a] for a in ids]) if occ else np.ones(1)
        return ids, x, _normalised(q), idx

    def to_gemmi(self) -> gemmi.Structure:
        """The model as a one-model ``gemmi.Structure`` (entities, subchains and label_seq_id set up)."""
        names, elements = self.layout.atom_name, self.layout.element

        def atoms_of(i):
            return tuple(
                _make_atom(names[i], elements[i], self.coords[r], self.occupancy[r], self.b_factor[r],
                           self.altloc[r] or "\0")
                for r in self.records(i)
            )

        st = gemmi.Structure()
        st.name = "multiconf"
        st.add_model(_make_model("1", self.layout, _residue_runs(self.layout), atoms_of))
        _finish_entities(st)
        return st


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _normalised(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    total = float(w.sum())
    return w / total if total > 0 else np.full(len(w), 1.0 / len(w))


def _rmsd_matrix(x: np.ndarray) -> np.ndarray:
    """Pairwise RMSD [E, E] between members ``x`` [E, n, 3] (no superposition)."""
    e, n = x.shape[:2]
    f = (x - x.mean(axis=0)).reshape(e, -1)  # centring keeps the Gram trick accurate
    sq = np.einsum("ij,ij->i", f, f)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * f @ f.T) / n
    d = np.sqrt(np.maximum(d2, 0.0))
    d = 0.5 * (d + d.T)
    np.fill_diagonal(d, 0.0)
    return d


# ----------------------------------------------------------------------------------------------------------------
# ensemble -> multiconformer model


@dataclass
class _Unit:
    residues: list[ResidueKey]
    atoms: np.ndarray  # layout indices
    labels: np.ndarray  # [E_kept] cluster of each kept member, 0 = most occupied
    occupancies: np.ndarray  # [k]
    mix: np.ndarray  # [k, E_kept]: representative of cluster c = mix[c] @ member coordinates
    letters: list[int] = field(default_factory=list)  # altloc id of cluster c = ALTLOC_IDS[letters[c]]


def _cluster(x: np.ndarray, w: np.ndarray, threshold: float, max_altlocs: int, min_occupancy: float) -> np.ndarray:
    """Cluster labels [E] of members ``x`` [E, n, 3], ordered by decreasing occupancy (0 = most occupied)."""
    e = len(x)
    if e == 1:
        return np.zeros(1, dtype=np.int64)
    d = _rmsd_matrix(x)
    tree = linkage(squareform(d, checks=False), method="complete")
    labels = fcluster(tree, t=threshold, criterion="distance") - 1
    if labels.max() + 1 > max_altlocs:
        labels = fcluster(tree, t=max_altlocs, criterion="maxclust") - 1
    labels = _relabel(labels, w)
    while min_occupancy > 0 and labels.max() > 0:
        occ = np.bincount(labels, weights=w)
        light = int(np.argmin(occ))
        if occ[light] >= min_occupancy:
            break
        others = [c for c in range(len(occ)) if c != light]
        for m in np.flatnonzero(labels == light):
            cost = [np.average(d[m, labels == c] ** 2, weights=w[labels == c]) for c in others]
            labels[m] = others[int(np.argmin(cost))]
        labels = _relabel(labels, w)
    return labels


def _relabel(labels: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Renumber clusters 0, 1, ... by decreasing occupancy; ties: the cluster with the lowest member index first."""
    present = np.unique(labels)
    occ = np.array([w[labels == c].sum() for c in present])
    first = np.array([np.flatnonzero(labels == c)[0] for c in present])
    order = sorted(range(len(present)), key=lambda j: (-round(float(occ[j]), 12), first[j]))
    new = np.empty(labels.max() + 1, dtype=np.int64)
    new[present[order]] = np.arange(len(present))
    return new[labels]


def _mix(x: np.ndarray, w: np.ndarray, labels: np.ndarray, center: str) -> np.ndarray:
    """[k, E] weights over members whose product with member coordinates gives each cluster's representative."""
    k, e = labels.max() + 1, len(w)
    mix = np.zeros((k, e))
    for c in range(k):
        sel = np.flatnonzero(labels == c)
        if center == "mean":
            mix[c, sel] = w[sel] / w[sel].sum()
        else:  # weighted medoid: least weighted squared distance to the cluster's members
            d2 = _rmsd_matrix(x[sel]) ** 2
            mix[c, sel[int(np.argmin(d2 @ w[sel]))]] = 1.0
    return mix


def _make_unit(residues, atoms, x, w, threshold, max_altlocs, min_occupancy, center) -> _Unit:
    xs = x[:, atoms]
    labels = _cluster(xs, w, threshold, max_altlocs, min_occupancy)
    occ = np.bincount(labels, weights=w)
    return _Unit(list(residues), atoms, labels, occ / occ.sum(), _mix(xs, w, labels, center), list(range(len(occ))))


def _link_letters(units: list[_Unit], w: np.ndarray) -> None:
    """Give each unit's clusters the letters of the preceding bonded unit's clusters they share most weight with.

    Along a chain, unit j's clusters are matched one-to-one to unit j-1's letters by maximal shared member weight
    (Hungarian assignment); clusters left over take the unused letters in order of decreasing occupancy.  A unit
    after a unit without altlocs (or a chain break) keeps letters by decreasing occupancy.
    """
    for prev, u in pairwise(units):
        k, kp = len(u.occupancies), len(prev.occupancies)
        (c0, r0), (c1, r1) = prev.residues[-1], u.residues[0]
        if k < 2 or kp < 2 or c0 != c1 or r1 != r0 + 1:
            continue
        shared = np.zeros((kp, k))
        np.add.at(shared, (prev.labels, u.labels), w)
        rows, cols = linear_sum_assignment(-shared)
        letters = [-1] * k
        for r, c in zip(rows.tolist(), cols.tolist()):
            letters[c] = prev.letters[r]
        free = iter(sorted(set(range(len(ALTLOC_IDS))) - set(letters)))
        u.letters = [lt if lt >= 0 else next(free) for lt in letters]


def _segment_runs(units: list[_Unit]) -> list[list[int]]:
    """Runs of consecutive units (same chain, residue numbers +1) that each have altlocs."""
    runs: list[list[int]] = []
    for j, u in enumerate(units):
        if len(u.occupancies) < 2:
            continue
        (c, r), prev = u.residues[0], runs[-1][-1] if runs else None
        if prev is not None and prev == j - 1 and units[prev].residues[-1] == (c, r - 1):
            runs[-1].append(j)
        else:
            runs.append([j])
    return runs


def _explicit_segments(segments, residues: list[ResidueKey]) -> list[list[ResidueKey]]:
    taken: dict[ResidueKey, tuple] = {}
    out = []
    for seg in segments:
        try:
            chain, lo, hi = seg
            chain, lo, hi = str(chain), int(lo), int(hi)
        except (TypeError, ValueError):
            raise ValueError(f"segments must be (chain, first residue, last residue) triples, got {seg!r}") from None
        inside = [k for k in residues if k[0] == chain and lo <= k[1] <= hi]
        if not inside:
            raise ValueError(f"segment {chain} {lo}-{hi} contains no residue of the layout")
        for k in inside:
            if k in taken:
                raise ValueError(f"segments {taken[k]} and {(chain, lo, hi)} overlap at residue {k[0]} {k[1]}")
            taken[k] = (chain, lo, hi)
        out.append(inside)
    return out


def _check_ensemble(layout: AtomLayout, coords, weights) -> tuple[np.ndarray, np.ndarray]:
    x = as_ensemble(coords, len(layout), "coords", finite=True, match="the layout")
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (len(x),):
        raise ValueError(f"weights has shape {np.shape(weights)}, expected ({len(x)},) for {len(x)} members")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return x, w / w.sum()


def ensemble_to_multiconf(
    layout: AtomLayout,
    coords,
    weights,
    *,
    threshold: float = 0.5,
    max_altlocs: int = 4,
    by: str = "residue",
    segments=None,
    fit=None,
    center: str = "mean",
    min_occupancy: float = 0.0,
    link_tolerance: float | None = 0.1,
    letters: str = "linked",
    b_factors=None,
) -> MulticonfModel:
    """Cluster an ensemble ``coords`` [E, N, 3] with ``weights`` [E] into a multiconformer model.

    ``threshold`` (A): the largest RMSD between two members of one altloc (complete linkage, per residue or
    segment).  ``max_altlocs``: at most this many altlocs per unit (1-26).  ``by``: "residue" or "segment";
    ``segments``: explicit ``(chain, first, last)`` runs for ``by="segment"`` (default: the runs of consecutive
    residues that split on their own).  ``fit``: atoms (mask or indices) to superpose members on first.
    ``center``: "mean" or "medoid".  ``min_occupancy``: dissolve lighter altlocs.  ``link_tolerance`` (A, None
    to disable): when a unit's altlocs move a bonded neighbour's atoms by more than this, those atoms carry the
    altlocs too.  ``letters``: "linked" (the default: letters follow the members from one residue to the next) or
    "occupancy" (A = most occupied, per unit).  ``b_factors`` [N]: written for every record (default 20 A^2).  See the module
    docstring for the conventions.  Returns the model; :meth:`MulticonfModel.to_gemmi` gives a
    ``gemmi.Structure`` and :func:`write_multiconf` a file.
    """
    x, w_all = _check_ensemble(layout, coords, weights)
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0 A, got {threshold}")
    if not 1 <= int(max_altlocs) <= len(ALTLOC_IDS):
        raise ValueError(f"max_altlocs must be between 1 and {len(ALTLOC_IDS)}, got {max_altlocs}")
    if by not in ("residue", "segment"):
        raise ValueError(f"by must be 'residue' or 'segment', got {by!r}")
    if segments is not None and by != "segment":
        raise ValueError("segments= is used with by='segment'")
    if letters not in ("occupancy", "linked"):
        raise ValueError(f"letters must be 'occupancy' or 'linked', got {letters!r}")
    if center not in ("mean", "medoid"):
        raise ValueError(f"center must be 'mean' or 'medoid', got {center!r}")
    if not 0.0 <= min_occupancy < 1.0:
        raise ValueError(f"min_occupancy must lie in [0, 1), got {min_occupancy}")
    if b_factors is None:
        b = np.full(len(layout), _DEFAULT_B)
    else:
        b = np.asarray(b_factors, dtype=np.float64).reshape(-1)
        if b.shape != (len(layout),):
            raise ValueError(f"b_factors has shape {np.shape(b_factors)}, expected ({len(layout)},)")
    layout.index()  # refuses duplicate atom keys

    kept = np.flatnonzero(w_all > 0)
    x, w = x[kept], w_all[kept] / w_all[kept].sum()
    if fit is not None:
        x = _superpose(layout, x, w, fit)
    by_residue = layout.residue_atoms()
    residues = list(by_residue)
    args = (x, w, threshold, int(max_altlocs), min_occupancy, center)

    units = [_make_unit([k], by_residue[k], *args) for k in residues]
    if by == "segment":
        if segments is None:
            runs = [[k for j in run for k in units[j].residues] for run in _segment_runs(units)]
        else:
            runs = _explicit_segments(segments, residues)
        joint = {run[0]: run for run in runs if len(run) > 1 or segments is not None}
        inside = {k for run in joint.values() for k in run}
        merged = []
        for u in units:
            key = u.residues[0]
            if key in joint:
                run = joint[key]
                merged.append(_make_unit(run, np.concatenate([by_residue[k] for k in run]), *args))
            elif key not in inside:
                merged.append(u)
        units = merged

    if letters == "linked":
        _link_letters(units, w)
    owner = np.full(len(layout), -1, dtype=np.int64)  # unit whose altlocs an atom carries
    for j, u in enumerate(units):
        owner[u.atoms] = j
    linked: dict[int, list[int]] = {}
    if link_tolerance is not None:
        linked = _link_neighbours(layout, units, owner, x, w, float(link_tolerance))

    # records: one per atom (single units), or one per altloc id
    rec_atom, rec_alt, rec_xyz, rec_occ = [], [], [], []
    groups = []
    for j, u in enumerate(units):
        k = len(u.occupancies)
        ids = tuple(ALTLOC_IDS[c] for c in u.letters) if k > 1 else ("",)
        extra = np.array(linked.get(j, []), dtype=np.int64)
        for idx in (u.atoms, extra):
            reps = np.einsum("ce,ena->cna", u.mix, x[:, idx])  # [k, n, 3]
            for c in range(k):
                rec_atom.append(idx)
                rec_alt += [ids[c]] * len(idx)
                rec_xyz.append(reps[c])
                rec_occ += [float(u.occupancies[c]) if k > 1 else 1.0] * len(idx)
        members = np.full(len(w_all), -1, dtype=np.int64)
        members[kept] = u.labels
        groups.append(AltlocGroup(tuple(u.residues), ids, u.occupancies.copy(), members, extra))
    # atoms of single units claimed by a neighbour's altlocs are written only with those
    claimed = np.zeros(len(layout), dtype=bool)
    for idx in linked.values():
        claimed[idx] = True
    atom = np.concatenate(rec_atom)
    alt = np.array(rec_alt, dtype=object)
    keep = ~(claimed[atom] & (alt == ""))
    return MulticonfModel(
        layout=layout,
        atom=atom[keep],
        altloc=alt[keep],
        coords=np.concatenate(rec_xyz)[keep],
        occupancy=np.array(rec_occ)[keep],
        b_factor=b[atom[keep]],
        groups=groups,
    )


def _superpose(layout: AtomLayout, x: np.ndarray, w: np.ndarray, fit) -> np.ndarray:
    sel = np.asarray(fit)
    idx = np.flatnonzero(sel) if sel.dtype == bool else sel.astype(np.int64).reshape(-1)
    if sel.dtype == bool and sel.shape != (len(layout),):
        raise ValueError(f"fit mask has shape {sel.shape}, expected ({len(layout)},)")
    if len(idx) < 3:
        raise ValueError(f"fit selects {len(idx)} atoms; superposition needs at least 3")
    target = x[int(np.argmax(w)), idx]
    out = np.empty_like(x)
    for m in range(len(x)):
        r, t = kabsch(x[m, idx], target)
        out[m] = x[m] @ r.T + t
    return out


def _link_neighbours(layout, units, owner, x, w, tol) -> dict[int, list[int]]:
    """Atoms of single-conformer neighbour residues that move with a unit's altlocs, per unit index."""
    by_residue = layout.residue_atoms()
    residues = list(by_residue)
    position = {k: j for j, k in enumerate(residues)}
    ref = x[int(np.argmax(w))]
    radii = covalent_radii(layout.element)
    claimed: dict[int, int] = {}
    out: dict[int, list[int]] = {}
    for j, u in enumerate(units):
        if len(u.occupancies) < 2:
            continue
        mine = set(u.residues)
        for end, step in ((u.residues[0], -1), (u.residues[-1], +1)):
            p = position[end] + step
            if not 0 <= p < len(residues):
                continue
            nb = residues[p]
            if nb[0] != end[0] or nb[1] != end[1] + step or nb in mine:
                continue
            nb_atoms = by_residue[nb]
            nb_unit = units[owner[nb_atoms[0]]]
            if len(nb_unit.occupancies) > 1:
                continue  # both sides have altlocs: letters are per unit (qFit convention)
            seeds = nb_atoms[bonded_matrix(ref, radii, nb_atoms, by_residue[end]).any(axis=1)]
            shared = np.einsum("e,ena->na", nb_unit.mix[0], x[:, nb_atoms])  # [n, 3]
            mine_pos = np.einsum("ce,ena->cna", u.mix, x[:, nb_atoms])  # [k, n, 3]
            moved = np.linalg.norm(mine_pos - shared[None], axis=-1).max(axis=0) > tol
            local = {int(a): i for i, a in enumerate(nb_atoms)}
            queue, seen = deque(int(a) for a in seeds), {int(a) for a in seeds}
            while queue:
                a = queue.popleft()
                if not moved[local[a]] or a in claimed:
                    continue
                claimed[a] = j
                out.setdefault(j, []).append(a)
                near = nb_atoms[bonded_matrix(ref, radii, np.array([a]), nb_atoms)[0]]
                for n in near.tolist():
                    if n not in seen:
                        seen.add(n)
                        queue.append(n)
    return {j: sorted(v) for j, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# multiconformer model -> ensemble


def multiconf_to_ensemble(model: MulticonfModel) -> Conformers:
    """The ensemble a multiconformer model describes (letter-ordered quantile coupling; see the module docstring).

    Returns a :class:`Conformers` with ``kind="altloc"`` (or ``"single"`` when no residue has two altlocs):
    ``coords`` [K, N, 3] float32, ``weights`` [K] summing to 1, ``ids`` the altloc id of each member when it uses
    one id in every residue with altlocs, else the ids it mixes joined by "+" (made unique with ":2", ":3", ...).
    """
    layout = model.layout
    per_residue = []
    bounds: list[float] = []
    for chain, res in layout.residues():
        ids, x, q, idx = model.conformations(chain, res)
        cum = np.cumsum(q)[:-1]
        per_residue.append((ids, x, cum, idx))
        bounds += cum.tolist()
    edges = [0.0]
    for v in sorted(bounds):
        if v - edges[-1] > _COUPLING_EPS and 1.0 - v > _COUPLING_EPS:
            edges.append(v)
    edges.append(1.0)
    edges_a = np.array(edges)
    weights = np.diff(edges_a)
    mids = 0.5 * (edges_a[:-1] + edges_a[1:])
    coords = np.empty((len(weights), len(layout), 3))
    letters: list[list[str]] = [[] for _ in weights]
    for ids, x, cum, idx in per_residue:
        choice = np.searchsorted(cum, mids, side="right")
        coords[:, idx] = x[choice]
        if len(ids) > 1:
            for m, c in enumerate(choice.tolist()):
                letters[m].append(ids[c])
    labels = []
    for used in letters:
        distinct = sorted(set(used))
        label = "+".join(distinct) if distinct else "1"
        n = sum(1 for lab in labels if lab.split(":")[0] == label)
        labels.append(label if n == 0 else f"{label}:{n + 1}")
    first = model._starts[:-1]
    varying = np.diff(model._starts) >= 2
    return Conformers(
        layout=layout,
        coords=coords.astype(np.float32),
        weights=weights / weights.sum(),
        ids=labels,
        b_factors=model.b_factor[first].astype(np.float32),
        varying=varying,
        path=model.path,
        kind="altloc" if len(weights) > 1 else "single",
    )


# ----------------------------------------------------------------------------------------------------------------
# files


def read_multiconf(path, *, hydrogens: bool = False, model: int | str | None = None) -> MulticonfModel:
    """Read one model of a PDB / mmCIF file with its altloc records (occupancies and B-factors as written).

    The atoms are those ``read_structure`` keeps (waters removed, hydrogens unless ``hydrogens=True``, ligands
    kept), in the same order.  ``model`` picks a model by its number in the file (default: the first; a file with
    several models and no ``model=`` warns, since several models are an ensemble -- ``read_structure`` reads those).
    """
    path = Path(path)
    st, _ = _read_gemmi(path)
    models = _pick_models(st, path, model)
    if model is None and len(models) > 1:
        warnings.warn(f"{path}: has {len(models)} models; reading model {models[0].name} only (pass model= to"
                      " choose another, or read_structure for a multi-model ensemble)", stacklevel=2)
    sites = _first_sites(models, path, hydrogens)
    keys = list(sites)
    atom, alt, xyz, occ, bf = [], [], [], [], []
    for i, k in enumerate(keys):
        for a, (p, o, bb, _) in sites[k].alts.items():
            atom.append(i)
            alt.append(a)
            xyz.append(p)
            occ.append(o)
            bf.append(bb)
    return MulticonfModel(_layout_of(keys, sites), np.array(atom), np.array(alt, dtype=object), np.array(xyz),
                          np.array(occ), np.array(bf), path=path)


def read_altloc_ensemble(path, *, hydrogens: bool = False, model: int | str | None = None) -> Conformers:
    """Read a multiconformer model as an ensemble with per-residue occupancies kept exactly.

    ``read_multiconf`` followed by :func:`multiconf_to_ensemble`.  Where every residue with altlocs has the same
    ids and occupancies this equals ``read_structure(path)``; where occupancies differ between residues
    ``read_structure`` averages them into one weight per altloc id, while here each residue keeps its own.
    """
    return multiconf_to_ensemble(read_multiconf(path, hydrogens=hydrogens, model=model))


def _pdb_occupancies(model: MulticonfModel) -> np.ndarray:
    """Record occupancies rounded to 0.01 so that each residue's altloc occupancies keep their (rounded) sum."""
    occ = model.occupancy.copy()
    for idx in model.layout.residue_atoms().values():
        recs = np.concatenate([np.arange(model._starts[i], model._starts[i + 1]) for i in idx])
        recs = recs[model.altloc[recs] != ""]
        if not len(recs):
            continue
        ids = sorted(set(model.altloc[recs].tolist()))
        mean = np.array([model.occupancy[recs][model.altloc[recs] == a].mean() for a in ids]) * 100.0
        total = int(np.rint(mean.sum()))
        floor = np.floor(mean + 1e-9)
        extra = total - int(floor.sum())
        order = np.argsort(-(mean - floor), kind="stable")
        floor[order[:max(extra, 0)]] += 1
        for a, v, m in zip(ids, floor, mean):
            sel = recs[model.altloc[recs] == a]
            occ[sel] = np.round(model.occupancy[sel] + (v - m) / 100.0, 2)
    return occ


def write_multiconf(path, model: MulticonfModel, *, crystal: tuple | None = None, fixed_from=None) -> Path:
    """Write a multiconformer model as PDB, or mmCIF when the suffix is .cif/.mmcif (.gz gzips); atomic.

    PDB keeps coordinates to 1e-3 A and occupancies to 0.01 (rounded per residue so that they keep their sum);
    mmCIF keeps both as they are.  ``crystal`` (cell parameters, space-group name) and the residues of the structure
    file ``fixed_from`` that the model's layout lacks (waters, ligands, ions) are carried over (io.dress).
    """
    path = Path(path)
    exclude = model.layout.keys()
    if _is_cif_name(path):
        st = dress(model.to_gemmi(), crystal=crystal, fixed_from=fixed_from, exclude=exclude)
        text = st.make_mmcif_document().as_string()
    else:
        rounded = MulticonfModel(model.layout, model.atom, model.altloc, model.coords, _pdb_occupancies(model),
                                 model.b_factor)
        st = dress(rounded.to_gemmi(), crystal=crystal, fixed_from=fixed_from, exclude=exclude)
        st.assign_serial_numbers()
        text = st.make_pdb_string()
    return atomic_write(path, text)
