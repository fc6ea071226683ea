"""An ensemble against the altlocs of a reference structure: ``metrics.json:reference`` of a run, and the altloc
figures of every ensemble-bench job (which reads them from that block: one definition of "assigned fraction").

The altloc region is given (``regions``: (chain, first, last) residue ranges, as a benchmark manifest names them) or
is every atom whose conformers differ.  Per altloc: the best member's RMSD over the region and the assigned fraction
(the weight of the members closest to it), each member first superposed onto the altloc on the atoms outside the
region (a rigid motion does not change an assignment) and compared under the better naming of symmetric side-chain
atoms (guidance.structures.metrics.altloc_assignment).  A region that covers (almost) everything is fitted on itself.
"""

from __future__ import annotations

import re

import numpy as np

from observables.errors import InputError

_REGION = re.compile(r"^\s*([A-Za-z0-9]+)\s*:\s*(-?\d+)\s*(?:-\s*(-?\d+))?\s*$")


class RegionError(InputError):
    """A residue range that cannot be read (the message says how to write one)."""


def parse_regions(text, where: str = "") -> tuple[tuple[str, int, int], ...]:
    """``"A:180-184"``, ``"A:180-184; B:60-67"``, ``"A:42"`` or a list of such strings -> ((chain, first, last), ...)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return ()
    parts = text if isinstance(text, (list, tuple)) else re.split(r"[;,]", str(text))
    out = []
    for part in parts:
        m = _REGION.match(str(part))
        if not m:
            raise RegionError(f"{where}region {part!r}: write it as CHAIN:FIRST-LAST, e.g. A:180-184")
        first = int(m.group(2))
        last = int(m.group(3)) if m.group(3) is not None else first
        if last < first:
            raise RegionError(f"{where}region {part!r}: the last residue comes before the first")
        out.append((m.group(1), first, last))
    return tuple(out)


def format_regions(regions) -> str:
    return ";".join(f"{c}:{a}-{b}" for c, a, b in regions)


def region_mask(layout, regions) -> np.ndarray:
    """[N] bool: the atoms of ``layout`` in the residue ranges ``regions``."""
    chain, seq = np.asarray(layout.chain_id).astype(str), np.asarray(layout.res_seq)
    mask = np.zeros(len(chain), bool)
    for c, first, last in regions:
        mask |= (chain == c) & (seq >= first) & (seq <= last)
    return mask


def reference_block(layout, members, member_weights, truth, regions=()) -> dict:
    """metrics.json:reference for an ensemble ``members [E, N, 3]`` on ``layout`` against ``truth`` (Conformers
    with K > 1 altlocs): per altloc ``best_rmsd`` and ``assigned_fraction`` (module docstring), the region's atom
    count and the truth's weights.  {} when the truth and the ensemble share no atom of the region."""
    from guidance.structures.io import match_layouts
    from guidance.structures.metrics import altloc_assignment, symmetric_swaps

    match = match_layouts(truth.layout, layout)
    varying = region_mask(truth.layout, regions) if regions else np.asarray(truth.varying, bool)
    keep = np.zeros(len(layout), bool)
    keep[match.dst_index] = True
    region = np.zeros(len(layout), bool)
    region[match.dst_index] = varying[match.src_index]
    if not region.any():
        return {}
    refs = np.full((len(truth.ids), len(layout), 3), np.nan, np.float32)
    refs[:, match.dst_index] = truth.coords[:, match.src_index]
    sub = layout.select(keep)
    fit = ~region[keep] if (~region[keep]).sum() >= 3 else region[keep]
    assignment = altloc_assignment(np.asarray(members)[:, keep], member_weights, refs[:, keep], list(truth.ids),
                                   region[keep], fit_mask=fit, superpose_first=True, swaps=symmetric_swaps(sub))
    return {"altlocs": assignment, "region_atoms": int(region.sum()),
            "region": format_regions(regions) if regions else "atoms whose altlocs differ",
            "true_weights": dict(zip(truth.ids, np.round(truth.weights, 4).tolist()))}
