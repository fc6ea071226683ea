"""Structural metrics of an ensemble, in numpy: superposition, RMSD, altloc assignment, LDDT, region RMSD, recovery
of reference states, and covalent geometry / clash reports (restraints from guidance/structures/geometry.py).

Conventions: coordinates in Angstrom, one structure ``[N, 3]``, an ensemble ``[E, N, 3]``.  A rigid motion
``(R, t)`` acts on row-vector coordinates as ``x @ R.T + t``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree

from guidance.sampler import proper_rotation

from guidance.structures.geometry import (
    CLASH_DISTANCE,
    backbone_table,
    build_restraints,
    count_clashes,
    geometry_rmsz,
    rmsz,
    z_scores,
)
from guidance.structures.io import as_ensemble

# --------------------------------------------------------------------------------------------------------------------
# Superposition and RMSD
# --------------------------------------------------------------------------------------------------------------------


def _as_structure(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape [N, 3]; got {x.shape}")
    return x


def _as_mask(mask, n: int, name: str) -> np.ndarray:
    if mask is None:
        return np.ones(n, dtype=bool)
    mask = np.asarray(mask)
    if mask.dtype != bool:  # integer indices
        idx, mask = mask.astype(np.int64), np.zeros(n, dtype=bool)
        mask[idx] = True
    if mask.shape != (n,):
        raise ValueError(f"{name} must be a boolean mask of length {n} (or atom indices); got shape {mask.shape}")
    return mask


def kabsch(mobile, target, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Rigid motion ``(R, t)`` minimising ``sum_i w_i |R mobile_i + t - target_i|^2`` (Kabsch 1976).

    ``R`` is always a proper rotation (det +1): when the best orthogonal fit would be a reflection, the axis of the
    smallest singular value is flipped.  Apply it as ``mobile @ R.T + t``.
    """
    mobile, target = _as_structure(mobile, "mobile"), _as_structure(target, "target")
    if mobile.shape != target.shape:
        raise ValueError(f"mobile {mobile.shape} and target {target.shape} must have the same shape")
    if weights is None:
        w = np.ones(len(mobile))
    else:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape != (len(mobile),) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be {len(mobile)} non-negative numbers, not all zero")
    w = w / w.sum()
    mu_m = w @ mobile
    mu_t = w @ target
    cov = (mobile - mu_m).T @ ((target - mu_t) * w[:, None])  # [3, 3], sum_i w_i m_i t_i^T
    rot = proper_rotation(torch.from_numpy(cov[None]))[0].numpy().T  # the sampler's Kabsch step, as R @ x
    return rot, mu_t - rot @ mu_m


def superpose(mobile, target, fit_mask=None) -> np.ndarray:
    """``mobile`` (all atoms) moved by the rigid motion that best fits its ``fit_mask`` atoms onto ``target``'s."""
    mobile, target = _as_structure(mobile, "mobile"), _as_structure(target, "target")
    mask = _as_mask(fit_mask, len(mobile), "fit_mask")
    if not mask.any():
        raise ValueError("fit_mask selects no atoms to superpose on")
    rot, t = kabsch(mobile[mask], target[mask])
    return mobile @ rot.T + t


def rmsd(a, b, mask=None) -> float:
    """Root-mean-square deviation between ``a`` and ``b`` over ``mask`` atoms, as they are (no superposition)."""
    a, b = _as_structure(a, "a"), _as_structure(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a {a.shape} and b {b.shape} must have the same shape")
    m = _as_mask(mask, len(a), "mask")
    if not m.any():
        raise ValueError("mask selects no atoms")
    return float(np.sqrt(np.mean(np.sum((a[m] - b[m]) ** 2, axis=-1))))


# --------------------------------------------------------------------------------------------------------------------
# Altloc assignment (metrics.json: reference.altlocs.<id>.best_rmsd / .assigned_fraction)
# --------------------------------------------------------------------------------------------------------------------


# Side-chain atoms with interchangeable names: a 180-degree flip of the terminal group gives the same molecule, so a
# model may carry either naming.  Compared under the better of the two, as LDDT does (Mariani et al. 2013,
# Bioinformatics 29:2722: Asp, Glu, Phe, Tyr, Arg); Leu/Val methyls are prochiral (named by stereochemistry), not swapped.
SYMMETRIC_ATOMS = {
    "ASP": (("OD1", "OD2"),),
    "GLU": (("OE1", "OE2"),),
    "PHE": (("CD1", "CD2"), ("CE1", "CE2")),
    "TYR": (("CD1", "CD2"), ("CE1", "CE2")),
    "ARG": (("NH1", "NH2"),),
}


def symmetric_swaps(layout) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per residue with interchangeable atoms (``SYMMETRIC_ATOMS``), the index arrays (a, b) of the atoms to exchange
    together; residues missing one of them are left out."""
    index = layout.index()
    residue_name = dict(zip(layout.residue_keys(), layout.res_name.tolist()))
    swaps = []
    for (chain, seq), res_name in residue_name.items():
        pairs = SYMMETRIC_ATOMS.get(res_name, ())
        keys = [((chain, seq, a), (chain, seq, b)) for a, b in pairs]
        if pairs and all(ka in index and kb in index for ka, kb in keys):
            swaps.append((np.array([index[ka] for ka, _ in keys]), np.array([index[kb] for _, kb in keys])))
    return swaps


def match_symmetric(model, target, swaps, mask=None) -> np.ndarray:
    """``model`` [N, 3] with each residue's interchangeable atoms (``swaps``, from :func:`symmetric_swaps`) exchanged
    where that brings them closer to ``target`` (summed squared distance; only groups with an atom in ``mask``)."""
    out = np.array(model, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    for a, b in swaps:
        if mask is not None and not (mask[a].any() or mask[b].any()):
            continue
        keep = ((out[a] - target[a]) ** 2).sum() + ((out[b] - target[b]) ** 2).sum()
        swap = ((out[b] - target[a]) ** 2).sum() + ((out[a] - target[b]) ** 2).sum()
        if swap < keep:
            out[a], out[b] = out[b].copy(), out[a].copy()
    return out


def _fit_symmetric(member, target, fit, swaps, region):
    """Superpose on ``fit`` (all atoms when None), pick the better naming of symmetric atoms, and fit again (the
    naming can change the fit when the fit atoms include them)."""
    x = superpose(member, target, fit) if fit is not None else np.asarray(member, dtype=np.float64)
    if not swaps:
        return x
    x = match_symmetric(x, target, swaps, region)
    return superpose(x, target, fit) if fit is not None else x


def altloc_assignment(
    members,
    member_weights,
    references,
    ref_ids: Sequence[str],
    region_mask,
    *,
    fit_mask=None,
    superpose_first: bool = False,
    swaps=None,
) -> dict[str, dict[str, Any]]:
    """Assign each ensemble member to the reference conformer (altloc) it is closest to over the altloc region.

    Returns, per reference id, ``best_rmsd`` (smallest region RMSD of any member to it, A), ``assigned_fraction``
    (total weight of the members closest to it; ties go to the first reference) and ``members`` (their indices).
    With ``superpose_first`` each member is first superposed onto each reference on ``fit_mask`` (default: the
    atoms outside the region), so a rigid motion of a member does not change its assignment.  ``swaps`` (from
    :func:`symmetric_swaps`) compares symmetric side-chain atoms under their better naming.
    """
    members = as_ensemble(members, name="members", single=False)
    n_members, n_atoms = members.shape[:2]
    references = as_ensemble(references, n_atoms, "references", single=False, members="K", match="the members")
    ref_ids = [str(r) for r in ref_ids]
    if len(ref_ids) != len(references):
        raise ValueError(f"{len(ref_ids)} reference ids for {len(references)} references")
    weights = np.asarray(member_weights, dtype=np.float64).reshape(-1)
    if weights.shape != (n_members,) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"member_weights must be {n_members} non-negative numbers, not all zero")
    weights = weights / weights.sum()
    region = _as_mask(region_mask, n_atoms, "region_mask")
    if not region.any():
        raise ValueError("region_mask selects no atoms: the altloc region is empty")

    fit = None
    if superpose_first:
        fit = ~region if fit_mask is None else _as_mask(fit_mask, n_atoms, "fit_mask")
        if fit.sum() < 3:
            raise ValueError(f"superpose_first needs at least 3 atoms to fit on; the fit mask has {int(fit.sum())} "
                             "(the region covers almost everything: pass fit_mask explicitly)")

    dist = np.empty((n_members, len(references)))  # region RMSD of member e to reference k
    for e in range(n_members):
        for k, ref in enumerate(references):
            x = _fit_symmetric(members[e], ref, fit if superpose_first else None, swaps, region)
            dist[e, k] = rmsd(x, ref, region)

    nearest = np.argmin(dist, axis=1)  # argmin returns the first of tied minima
    return {
        rid: {
            "best_rmsd": float(dist[:, k].min()),
            "assigned_fraction": float(weights[nearest == k].sum()),
            "members": np.flatnonzero(nearest == k).tolist(),
        }
        for k, rid in enumerate(ref_ids)
    }


# --------------------------------------------------------------------------------------------------------------------
# Benchmark scores: LDDT, region RMSD, recovery of reference states
# --------------------------------------------------------------------------------------------------------------------

LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)  # A (Mariani et al. 2013)


def lddt(model, reference, mask=None, inclusion_radius: float = 15.0, thresholds=LDDT_THRESHOLDS,
         residue_ids=None) -> float:
    """All-atom local distance difference test of ``model`` against ``reference`` (both [N, 3], same atom order).

    Mariani, Biasini, Barbato & Schwede (2013) Bioinformatics 29:2722.  The pairs scored are the atom pairs (i < j,
    both in ``mask``) whose distance in the *reference* is below ``inclusion_radius`` (A), excluding pairs of atoms of
    the same residue when ``residue_ids`` ([N] labels, e.g. from :func:`guidance.structures.geometry.residue_index`) is given.
    A pair's distance is preserved at threshold t when |d_model - d_reference| < t; the score is the fraction of
    preserved pairs averaged over ``thresholds`` (the global, pair-pooled score).  Not included: the original's
    stereochemistry check and its renaming of symmetric side-chain atoms (e.g. Asp OD1/OD2) to the better match.
    Raises ValueError when no pair is within the radius.
    """
    model, reference = _as_structure(model, "model"), _as_structure(reference, "reference")
    if model.shape != reference.shape:
        raise ValueError(f"model {model.shape} and reference {reference.shape} must have the same shape")
    sel = _as_mask(mask, len(reference), "mask") & np.all(np.isfinite(reference), axis=1) & np.all(
        np.isfinite(model), axis=1)
    idx = np.flatnonzero(sel)
    pairs = cKDTree(reference[idx]).query_pairs(inclusion_radius, output_type="ndarray") if len(idx) > 1 else []
    if len(pairs) == 0:
        raise ValueError(f"no atom pairs within the inclusion radius {inclusion_radius} A of the reference")
    i, j = idx[pairs[:, 0]], idx[pairs[:, 1]]
    if residue_ids is not None:
        labels = np.asarray(residue_ids)
        if labels.shape != (len(reference),):
            raise ValueError(f"residue_ids must have one label per atom ({len(reference)}); got shape {labels.shape}")
        other = labels[i] != labels[j]
        i, j = i[other], j[other]
        if len(i) == 0:
            raise ValueError("every atom pair within the inclusion radius is inside one residue")
    d_ref = np.linalg.norm(reference[i] - reference[j], axis=-1)
    d_mod = np.linalg.norm(model[i] - model[j], axis=-1)
    diff = np.abs(d_mod - d_ref)
    return float(np.mean([np.mean(diff < t) for t in thresholds]))


def region_rmsd(member, target, region_mask, fit_mask=None, swaps=None) -> float:
    """RMSD (A) over ``region_mask`` atoms after superposing ``member`` onto ``target`` on ``fit_mask`` atoms (by
    default every atom outside the region: how far the region sits from the target's with the rest of the chain
    in register).  ``swaps`` (from :func:`symmetric_swaps`): symmetric side-chain atoms under their better naming."""
    member, target = _as_structure(member, "member"), _as_structure(target, "target")
    region = _as_mask(region_mask, len(member), "region_mask")
    if not region.any():
        raise ValueError("region_mask selects no atoms")
    fit = ~region if fit_mask is None else _as_mask(fit_mask, len(member), "fit_mask")
    if fit.sum() < 3:
        raise ValueError(f"superposition needs at least 3 atoms to fit on; the fit mask has {int(fit.sum())}"
                         " (pass fit_mask explicitly)")
    return rmsd(_fit_symmetric(member, target, fit, swaps, region), target, region)


def recovery(best_rmsd: dict, threshold: float = 1.0) -> dict[str, Any]:
    """Which reference states (e.g. altlocs) an ensemble recovers: state k counts as recovered when some member
    comes within ``threshold`` A of it (best RMSD <= threshold).

    ``best_rmsd`` maps a state id to its best RMSD (a number, None for "not computed", or a dict with a
    ``best_rmsd`` entry, as :func:`altloc_assignment` returns).  Returns ``recovered`` ({id: bool}),
    ``n_recovered``, ``n_states``, ``fraction`` (None when there are no states) and ``threshold``."""
    recovered = {}
    for sid, value in best_rmsd.items():
        if isinstance(value, dict):
            value = value.get("best_rmsd")
        recovered[str(sid)] = value is not None and np.isfinite(value) and float(value) <= threshold
    n = sum(recovered.values())
    return {"recovered": recovered, "n_recovered": int(n), "n_states": len(recovered),
            "fraction": n / len(recovered) if recovered else None, "threshold": float(threshold)}


# --------------------------------------------------------------------------------------------------------------------
# Covalent geometry and clashes
# --------------------------------------------------------------------------------------------------------------------

# Ideal backbone geometry, Engh & Huber (1991) Acta Cryst. A47, 392-400, means and standard deviations (A, degrees),
# for "default" (non-Gly, non-Pro), "GLY" and "PRO" residues: the backbone rows of the full table
# guidance/structures/data/engh_huber_1991.csv (which names where each number was read).  C-N, CA-C-N and C-N-CA are the
# peptide bond to the next residue of the same kind; PRO has only N-CA, CA-C, N-CA-C and C-N (to its own N).
# guidance/fixtures.py builds ideal peptides from it.
ENGH_HUBER_1991 = backbone_table()


def _backbone_index(layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per residue with N, CA and C: atom indices [R, 3], chain ids, residue numbers."""
    index: dict[tuple[str, int], dict[str, int]] = {}
    for i, (key, aname) in enumerate(zip(layout.residue_keys(), layout.atom_name.tolist())):
        if aname in ("N", "CA", "C"):
            index.setdefault(key, {})[aname] = i
    keys = [k for k, v in index.items() if len(v) == 3]
    atoms = np.array([[index[k]["N"], index[k]["CA"], index[k]["C"]] for k in keys], dtype=np.int64).reshape(-1, 3)
    return atoms, np.array([k[0] for k in keys]), np.array([k[1] for k in keys])


def geometry_report(layout, coords, reference=None) -> dict[str, Any]:
    """Covalent geometry and clash statistics of an ensemble ``[E, N, 3]`` laid out as ``layout`` (AtomLayout-like).

    ``bond_rmsz`` / ``angle_rmsz``: RMSZ of every bond length and bond angle with an Engh & Huber (1991) template
    (heavy atoms of the 20 amino acids, the peptide bond and a C-terminal OXT; guidance/structures/geometry.py), pooled over
    all members; ``n_bonds`` / ``n_angles`` count them per member, ``bond_outliers`` / ``angle_outliers`` are the
    member-mean counts with |z| > 4.  The backbone-only values are kept under ``rmsz_n_ca``, ``rmsz_ca_c``,
    ``rmsz_c_n`` (peptide bond) and ``rmsz_n_ca_c``.
    ``clashes_per_1000_atoms``: member-mean number of clashing heavy-atom pairs (closer than ``CLASH_DISTANCE``
    and more than three bonds apart; rule in guidance/structures/geometry.py) per 1000 heavy atoms.  ``reference`` ([N, 3] or
    [E, N, 3]) is used to find covalent bonds of ligands and modified residues so they are not counted as clashes;
    by default they are read from ``coords`` (a bond must hold in every member).
    ``min_ca_ca``: the smallest CA-CA distance of consecutive residues (same chain, numbers differing by one) in any
    member.  Values that cannot be computed are None.  ``per_member`` has the same statistics for each member.
    """
    coords = as_ensemble(coords, len(layout), match="the layout")
    n_members = len(coords)
    restraints = build_restraints(layout, coords if reference is None else reference)
    zb, za = z_scores(restraints, coords)
    geo = geometry_rmsz(layout, coords, restraints)
    clashes = count_clashes(layout, coords, CLASH_DISTANCE, restraints)

    bb, bb_chain, bb_seq = _backbone_index(layout)
    consecutive = np.flatnonzero((bb_chain[:-1] == bb_chain[1:]) & (bb_seq[1:] - bb_seq[:-1] == 1))
    ca_xyz = coords[:, bb[:, 1]]
    ca_ca = np.linalg.norm(ca_xyz[:, consecutive + 1] - ca_xyz[:, consecutive], axis=-1)  # [E, R-1]

    def finite_min(x):
        x = x[np.isfinite(x)]
        return float(x.min()) if x.size else None

    def kind_rmsz(z, kinds, kind):
        return rmsz(z[:, kinds == kind])

    return {
        "n_members": n_members,
        "n_residues_backbone": len(bb),
        "bond_rmsz": geo["bond_rmsz"],
        "angle_rmsz": geo["angle_rmsz"],
        "n_bonds": geo["n_bonds"],
        "n_angles": geo["n_angles"],
        "bond_outliers": geo["bond_outliers"],
        "angle_outliers": geo["angle_outliers"],
        "rmsz_n_ca": kind_rmsz(zb, restraints.bond_kind, "N-CA"),
        "rmsz_ca_c": kind_rmsz(zb, restraints.bond_kind, "CA-C"),
        "rmsz_c_n": kind_rmsz(zb, restraints.bond_kind, "C(-1)-N"),
        "rmsz_n_ca_c": kind_rmsz(za, restraints.angle_kind, "N-CA-C"),
        "clashes_per_1000_atoms": clashes["clashes_per_1000_atoms"],
        "min_ca_ca": finite_min(ca_ca.ravel()),
        "per_member": {
            "bond_rmsz": geo["per_member"]["bond_rmsz"],
            "angle_rmsz": geo["per_member"]["angle_rmsz"],
            "bond_outliers": geo["per_member"]["bond_outliers"],
            "angle_outliers": geo["per_member"]["angle_outliers"],
            "clashes": clashes["clashes"],
            "clashes_per_1000_atoms": clashes["per_member_per_1000_atoms"],
            "min_ca_ca": [finite_min(ca_ca[e]) for e in range(n_members)],
        },
    }
