"""Structural metrics of an ensemble, in plain numpy: superposition, RMSD, altloc assignment, backbone geometry.

Conventions: coordinates in Angstrom, one structure ``[N, 3]``, an ensemble ``[E, N, 3]``.  A rigid motion
``(R, t)`` acts on row-vector coordinates as ``x @ R.T + t``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.spatial import cKDTree

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
    u, _, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
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


def altloc_assignment(
    members,
    member_weights,
    references,
    ref_ids: Sequence[str],
    region_mask,
    *,
    fit_mask=None,
    superpose_first: bool = False,
) -> dict[str, dict[str, Any]]:
    """Assign each ensemble member to the reference conformer (altloc) it is closest to over the altloc region.

    Returns, per reference id, ``best_rmsd`` (smallest region RMSD of any member to it, A), ``assigned_fraction``
    (total weight of the members closest to it; ties go to the first reference) and ``members`` (their indices).
    With ``superpose_first`` each member is first superposed onto each reference on ``fit_mask`` (default: the
    atoms outside the region), so a rigid motion of a member does not change its assignment.
    """
    members = np.asarray(members, dtype=np.float64)
    references = np.asarray(references, dtype=np.float64)
    if members.ndim != 3 or members.shape[-1] != 3:
        raise ValueError(f"members must have shape [E, N, 3]; got {members.shape}")
    n_members, n_atoms = members.shape[:2]
    if references.ndim != 3 or references.shape[1:] != (n_atoms, 3):
        raise ValueError(f"references must have shape [K, {n_atoms}, 3] to match the members; got {references.shape}")
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
            x = superpose(members[e], ref, fit) if superpose_first else members[e]
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
# Backbone geometry and clashes
# --------------------------------------------------------------------------------------------------------------------

# Ideal backbone geometry, Engh & Huber (1991) Acta Cryst. A47, 392-400, Table 3 (means and standard deviations from
# small-molecule structures).  Bond lengths in A, angle in degrees.  Residue-specific values for Gly and Pro; the
# C-N peptide bond takes the value for the residue that owns the N (C-N to Pro differs).
# The remaining backbone terms (C-O, CA-C-N, C-N-CA, CA-C-O) are given for "default" and "GLY" only; they are used to
# build ideal peptides (guidance/demo.py), not for the RMSZ below.
ENGH_HUBER_1991 = {
    #          N-CA            CA-C            C-N (this N)     N-CA-C
    "default": {"N-CA": (1.458, 0.019), "CA-C": (1.525, 0.021), "C-N": (1.329, 0.014), "N-CA-C": (111.2, 2.8),
                "C-O": (1.231, 0.020), "CA-C-N": (116.2, 2.0), "C-N-CA": (121.7, 1.8), "CA-C-O": (120.1, 2.1)},
    "GLY": {"N-CA": (1.451, 0.016), "CA-C": (1.516, 0.018), "C-N": (1.329, 0.014), "N-CA-C": (112.5, 2.9),
            "C-O": (1.231, 0.020), "CA-C-N": (116.4, 2.1), "C-N-CA": (120.6, 1.7), "CA-C-O": (120.8, 2.1)},
    "PRO": {"N-CA": (1.466, 0.015), "CA-C": (1.525, 0.021), "C-N": (1.341, 0.016), "N-CA-C": (111.8, 2.5)},
}

# Clash rule (kept simple on purpose): two heavy atoms clash when closer than CLASH_DISTANCE unless they are in the
# same residue, in sequence-adjacent residues of the same chain (|res_seq difference| <= 1, which covers the peptide
# bond and everything within three bonds of it), or both sulfur (disulfide bridges, S-S 2.04 A).
CLASH_DISTANCE = 2.2  # A


def _ideal(res_name: str, term: str) -> tuple[float, float]:
    return ENGH_HUBER_1991.get(res_name, ENGH_HUBER_1991["default"])[term]


def _backbone_index(layout) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Per residue with N, CA and C: atom indices [R, 3], residue names, chain ids, residue numbers."""
    index: dict[tuple[str, int], dict[str, int]] = {}
    names: dict[tuple[str, int], str] = {}
    for i, (chain, seq, rname, aname) in enumerate(
        zip(layout.chain_id.tolist(), layout.res_seq.tolist(), layout.res_name.tolist(), layout.atom_name.tolist())
    ):
        if aname in ("N", "CA", "C"):
            index.setdefault((chain, seq), {})[aname] = i
            names[(chain, seq)] = rname
    keys = [k for k, v in index.items() if len(v) == 3]
    atoms = np.array([[index[k]["N"], index[k]["CA"], index[k]["C"]] for k in keys], dtype=np.int64).reshape(-1, 3)
    return atoms, [names[k] for k in keys], np.array([k[0] for k in keys]), np.array([k[1] for k in keys])


def _rmsz(z: np.ndarray) -> float | None:
    z = z[np.isfinite(z)]
    return float(np.sqrt(np.mean(z**2))) if z.size else None


def _count_clashes(xyz: np.ndarray, chain: np.ndarray, seq: np.ndarray, sulfur: np.ndarray) -> int:
    ok = np.all(np.isfinite(xyz), axis=1)
    idx = np.flatnonzero(ok)
    pairs = cKDTree(xyz[idx]).query_pairs(CLASH_DISTANCE, output_type="ndarray")
    if len(pairs) == 0:
        return 0
    i, j = idx[pairs[:, 0]], idx[pairs[:, 1]]
    bonded_neighbourhood = (chain[i] == chain[j]) & (np.abs(seq[i] - seq[j]) <= 1)
    disulfide = sulfur[i] & sulfur[j]
    return int(np.sum(~bonded_neighbourhood & ~disulfide))


def geometry_report(layout, coords) -> dict[str, Any]:
    """Backbone geometry and clash statistics of an ensemble ``[E, N, 3]`` laid out as ``layout`` (AtomLayout-like).

    RMSZ values compare N-CA, CA-C, C-N(next residue) bond lengths and the N-CA-C angle with Engh & Huber (1991)
    (``ENGH_HUBER_1991``), pooled over all members (``bond_rmsz`` pools the three bond kinds).
    ``clashes_per_1000_atoms`` is the member-averaged number of clashing heavy-atom pairs (rule at ``CLASH_DISTANCE``)
    per 1000 heavy atoms.  ``min_ca_ca`` is the smallest CA-CA distance of consecutive residues in any member.  Two
    residues are consecutive when they are in the same chain with residue numbers differing by one.  Values that
    cannot be computed (no protein backbone) are ``None``.  ``per_member`` has the same statistics for each member.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim == 2:
        coords = coords[None]
    if coords.ndim != 3 or coords.shape[1:] != (len(layout), 3):
        raise ValueError(f"coords must have shape [E, {len(layout)}, 3] to match the layout; got {coords.shape}")
    n_members = len(coords)

    bb, res_names, bb_chain, bb_seq = _backbone_index(layout)
    consecutive = np.flatnonzero((bb_chain[:-1] == bb_chain[1:]) & (bb_seq[1:] - bb_seq[:-1] == 1))

    ideal = {
        term: np.array([_ideal(r, term) for r in res_names], dtype=np.float64).reshape(-1, 2)
        for term in ("N-CA", "CA-C", "N-CA-C")
    }
    ideal_cn = np.array([_ideal(res_names[k + 1], "C-N") for k in consecutive], dtype=np.float64).reshape(-1, 2)

    n_xyz, ca_xyz, c_xyz = (coords[:, bb[:, a]] for a in range(3))  # each [E, R, 3]
    z = {
        "N-CA": (np.linalg.norm(ca_xyz - n_xyz, axis=-1) - ideal["N-CA"][:, 0]) / ideal["N-CA"][:, 1],
        "CA-C": (np.linalg.norm(c_xyz - ca_xyz, axis=-1) - ideal["CA-C"][:, 0]) / ideal["CA-C"][:, 1],
        "C-N": (np.linalg.norm(n_xyz[:, consecutive + 1] - c_xyz[:, consecutive], axis=-1) - ideal_cn[:, 0])
        / ideal_cn[:, 1],
    }
    u, v = n_xyz - ca_xyz, c_xyz - ca_xyz
    cos = np.sum(u * v, axis=-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
    angle = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    z["N-CA-C"] = (angle - ideal["N-CA-C"][:, 0]) / ideal["N-CA-C"][:, 1]
    ca_ca = np.linalg.norm(ca_xyz[:, consecutive + 1] - ca_xyz[:, consecutive], axis=-1)  # [E, R-1]

    element = np.char.upper(np.asarray(layout.element).astype(str))
    heavy = ~np.isin(element, ["H", "D"])
    chain = np.asarray(layout.chain_id).astype(str)[heavy]
    seq = np.asarray(layout.res_seq).astype(np.int64)[heavy]
    sulfur = element[heavy] == "S"
    n_heavy = int(heavy.sum())
    clashes = np.array([_count_clashes(coords[e][heavy], chain, seq, sulfur) for e in range(n_members)], dtype=float)
    clash_rate = clashes * 1000.0 / max(n_heavy, 1)

    def bond_z(sel):
        return np.concatenate([z["N-CA"][sel].ravel(), z["CA-C"][sel].ravel(), z["C-N"][sel].ravel()])

    def finite_min(x):
        x = x[np.isfinite(x)]
        return float(x.min()) if x.size else None

    return {
        "n_members": n_members,
        "n_residues_backbone": len(res_names),
        "bond_rmsz": _rmsz(bond_z(slice(None))),
        "angle_rmsz": _rmsz(z["N-CA-C"].ravel()),
        "rmsz_n_ca": _rmsz(z["N-CA"].ravel()),
        "rmsz_ca_c": _rmsz(z["CA-C"].ravel()),
        "rmsz_c_n": _rmsz(z["C-N"].ravel()),
        "rmsz_n_ca_c": _rmsz(z["N-CA-C"].ravel()),
        "clashes_per_1000_atoms": float(clash_rate.mean()),
        "min_ca_ca": finite_min(ca_ca.ravel()),
        "per_member": {
            "bond_rmsz": [_rmsz(bond_z(e)) for e in range(n_members)],
            "angle_rmsz": [_rmsz(z["N-CA-C"][e]) for e in range(n_members)],
            "clashes": clashes.astype(int).tolist(),
            "clashes_per_1000_atoms": clash_rate.tolist(),
            "min_ca_ca": [finite_min(ca_ca[e]) for e in range(n_members)],
        },
    }
