"""Shared pieces of the NMR observables: the protein backbone, its dihedrals in pure JAX, and NMR-STAR 3 loops.

Backbone (``Backbone``): the model's residues in atom order, with the atom indices of N, CA and C and whether each
residue is joined to the one before it by a peptide bond.  A residue is every atom with one ``(chain_id, res_seq)``
(``observables.hydrogens.residue_groups``, the grouping of the model's atom layout); its name is its first atom's.  Residue i-1 and i are *linked* when they are neighbours in the same chain, both
have N, CA and C, their numbers differ by one, and — where the model comes with reference coordinates
(``AtomInfo.coords``) — the C(i-1)-N(i) distance in the first conformer is at most ``max_peptide_bond`` (2.0 A; a
peptide bond is 1.33 A).  A chain break therefore ends the dihedrals on both sides of it.

Dihedrals (IUPAC-IUB 1970 convention, as in gemmi's ``calculate_dihedral``: positive when, looking along the middle
bond from its first atom, the far bond is rotated clockwise from the near one; range (-pi, pi]):
    phi(i) = C(i-1) - N(i) - CA(i) - C(i)          psi(i) = N(i) - CA(i) - C(i) - N(i+1)
computed from heavy atoms only.  The differentiable form returns (cos, sin) of the angle, never the angle itself, so
it has no branch cut at +-180 deg and a finite gradient even for degenerate (collinear) geometry; physics formulas in
angles (Karplus curves, von Mises basins) are written with cos/sin of sums (``cos(a - b) = cos a cos b + sin a
sin b``).

NMR-STAR 3 (BMRB): gemmi's CIF parser reads STAR files, save frames included, except for one STAR-only construct
found in every BMRB entry: bare save-frame references such as ``$entity_1`` (CIF forbids a value that starts with
``$``).  ``read_star`` quotes those tokens (nothing else is changed) and hands the text to ``gemmi.cif``; only that
token pass is written here.  NMR-STAR 2.1 files (``_Chem_shift_value``, ``_Residue_seq_code``) are refused with a
message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import gemmi
import jax.numpy as jnp
import numpy as np

from observables.base import AtomInfo
from observables.errors import InputError
from observables.hydrogens import residue_groups

__all__ = [
    "MAX_PEPTIDE_BOND",
    "Backbone",
    "NmrDataError",
    "StarLoop",
    "backbone",
    "dihedral",
    "dihedral_cos_sin",
    "phi_psi",
    "phi_psi_cos_sin",
    "read_star",
    "read_star_loops",
    "residue_numbers",
    "select_chain",
    "one_line",
    "text_lines",
    "unmapped_report",
    "unmapped_warning",
]

# Largest C(i-1)-N(i) distance (A) still read as a peptide bond (a real one is 1.33 A).
MAX_PEPTIDE_BOND = 2.0

# Floors that keep square roots and divisions finite for degenerate geometry (units A^2 and A^8 respectively; both
# are negligible for real bonds of ~1.5 A, where |b|^2 ~ 2 A^2 and x^2 + y^2 ~ 25 A^8).
_NORM_FLOOR = 1e-12
_DIHEDRAL_FLOOR = 1e-6


class NmrDataError(InputError):
    """NMR data could not be read or does not fit the model (file, line/residue and what to do are in the message)."""


# ----------------------------------------------------------------------------------------------------------------
# Data that cannot be mapped onto the model: counted and listed, never dropped silently
# ----------------------------------------------------------------------------------------------------------------

# How many unmapped data the report lists by name (all of them are counted).
UNMAPPED_SHOWN = 10


def text_lines(text: str) -> list[str]:
    """The lines of a data file's text, split at \n, \r\n or \r only.  ``str.splitlines`` also splits at form feeds
    and at U+0085 (what a cp1252 ellipsis in a comment becomes when read as Latin-1), which would cut a comment in two
    and shift the line number in every later message."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def one_line(message: str) -> str:
    """``message`` with its white space (newlines included) collapsed, for one-line user errors."""
    return " ".join(str(message).split())


def _category(reason: str) -> str:
    """The short category of a reason such as "residue absent (A.90)": the text before its parenthesised detail."""
    return reason.split(" (", 1)[0]


def unmapped_report(items) -> dict:
    """The report keys every NMR observable (rdc, noe, jcoupling, shifts) shares for data it could not map onto the
    model: ``n_unmapped`` (count), ``unmapped`` (the first ``UNMAPPED_SHOWN`` as short "label: reason" strings) and
    ``unmapped_reasons`` ({reason: count}).  ``items`` are (label, reason) pairs; reasons are short categories such
    as "residue absent", "atom absent", "unknown atom name", optionally followed by details in parentheses."""
    items = list(items)
    reasons: dict[str, int] = {}
    for _, why in items:
        reasons[_category(why)] = reasons.get(_category(why), 0) + 1
    return {
        "n_unmapped": float(len(items)),
        "unmapped": [f"{label}: {why}" for label, why in items[:UNMAPPED_SHOWN]],
        "unmapped_reasons": reasons,
    }


def unmapped_warning(source: str, items, what: str) -> str:
    """One warning line: how many ``what`` of ``source`` are not used, by reason, with the first few labels."""
    items = list(items)
    by_reason: dict[str, list[str]] = {}
    for label, why in items:
        by_reason.setdefault(_category(why), []).append(label)
    parts = [f"{why}: {', '.join(labels[:6])}{' ...' if len(labels) > 6 else ''}" for why, labels in by_reason.items()]
    return f"{source}: {len(items)} {what} cannot be mapped onto the model and are not used -- " + "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# The backbone
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """The model's residues (length R, in atom order) and their backbone atoms; indices are into the atom arrays.

    ``n``, ``ca``, ``c``: atom index of N, CA, C (-1 where the residue lacks it).  ``linked_prev[i]``: residue i is
    joined to residue i-1 by a peptide bond (see the module docstring).  ``has_phi`` / ``has_psi``: the dihedral is
    defined (the residue has N, CA, C and the neighbour it needs is linked).
    """

    chain_id: np.ndarray
    res_seq: np.ndarray
    res_name: np.ndarray
    n: np.ndarray
    ca: np.ndarray
    c: np.ndarray
    linked_prev: np.ndarray

    def __len__(self) -> int:
        return len(self.res_seq)

    @property
    def complete(self) -> np.ndarray:
        return (self.n >= 0) & (self.ca >= 0) & (self.c >= 0)

    @property
    def has_phi(self) -> np.ndarray:
        return self.linked_prev & self.complete

    @property
    def has_psi(self) -> np.ndarray:
        linked_next = np.append(self.linked_prev[1:], False)
        return linked_next & self.complete

    @property
    def phi_atoms(self) -> np.ndarray:
        """[R, 4] atom indices C(i-1), N, CA, C (0 where phi is undefined: mask with ``has_phi``)."""
        prev_c = np.concatenate([[0], self.c[:-1]])
        idx = np.stack([prev_c, self.n, self.ca, self.c], axis=1)
        return np.where(self.has_phi[:, None], idx, 0)

    @property
    def psi_atoms(self) -> np.ndarray:
        """[R, 4] atom indices N, CA, C, N(i+1) (0 where psi is undefined: mask with ``has_psi``)."""
        next_n = np.append(self.n[1:], 0)
        idx = np.stack([self.n, self.ca, self.c, next_n], axis=1)
        return np.where(self.has_psi[:, None], idx, 0)

    def index(self) -> dict[tuple[str, int], int]:
        """``{(chain_id, res_seq): residue index}``."""
        return {(str(ch), int(rs)): i for i, (ch, rs) in enumerate(zip(self.chain_id, self.res_seq))}

    def chains(self) -> list[str]:
        """Chains that have at least one complete backbone residue, in order of appearance."""
        seen: list[str] = []
        for ch, ok in zip(self.chain_id, self.complete):
            if ok and str(ch) not in seen:
                seen.append(str(ch))
        return seen


def backbone(atoms: AtomInfo, max_peptide_bond: float = MAX_PEPTIDE_BOND) -> Backbone:
    """The backbone of ``atoms`` (see ``Backbone``); peptide links are decided once, here, from the reference."""
    chain = np.asarray(atoms.chain_id).astype(str)
    seq = np.asarray(atoms.res_seq).astype(np.int64)
    rname = np.asarray(atoms.res_name).astype(str)
    aname = np.char.strip(np.asarray(atoms.atom_name).astype(str))
    n_atoms = len(seq)
    if n_atoms == 0:
        raise NmrDataError("the model has no atoms")
    keys, residue = residue_groups(chain, seq)
    n_res = len(keys)
    starts = np.unique(residue, return_index=True)[1]  # first atom of each residue (increasing, as residues are)
    idx = {name: np.full(n_res, -1, dtype=np.int64) for name in ("N", "CA", "C")}
    for k, r in enumerate(residue.tolist()):
        if aname[k] in idx and idx[aname[k]][r] < 0:
            idx[aname[k]][r] = k
    complete = (idx["N"] >= 0) & (idx["CA"] >= 0) & (idx["C"] >= 0)
    linked = np.zeros(n_res, dtype=bool)
    linked[1:] = (
        (chain[starts[1:]] == chain[starts[:-1]])
        & (seq[starts[1:]] - seq[starts[:-1]] == 1)
        & complete[1:]
        & complete[:-1]
    )
    if atoms.coords is not None and np.any(linked):
        ref = np.asarray(atoms.coords, dtype=np.float64)
        ref = ref[0] if ref.ndim == 3 else ref
        r = np.flatnonzero(linked)
        dist = np.linalg.norm(ref[idx["N"][r]] - ref[idx["C"][r - 1]], axis=-1)
        linked[r] = np.isfinite(dist) & (dist <= max_peptide_bond)
    return Backbone(
        chain_id=chain[starts],
        res_seq=seq[starts],
        res_name=rname[starts],
        n=idx["N"],
        ca=idx["CA"],
        c=idx["C"],
        linked_prev=linked,
    )


def select_chain(bb: Backbone, chain: str | None, what: str) -> str:
    """The chain that ``what`` (a data description) refers to: ``chain`` if given, else the model's only chain."""
    chains = bb.chains()
    if chain is not None:
        if str(chain) not in chains:
            raise NmrDataError(f"{what}: chain {chain!r} has no backbone (N, CA, C) in the model; chains: {chains}")
        return str(chain)
    if len(chains) != 1:
        raise NmrDataError(f"{what}: the model has {len(chains)} protein chains {chains}; say which with chain=...")
    return chains[0]


# ----------------------------------------------------------------------------------------------------------------
# Dihedrals (pure JAX)
# ----------------------------------------------------------------------------------------------------------------


def _dihedral_xy(p0, p1, p2, p3):
    """(x, y) with dihedral = atan2(y, x): x = (b0 x b1).(b1 x b2), y = |b1| b0.(b1 x b2) (both in A^4)."""
    b0, b1, b2 = p1 - p0, p2 - p1, p3 - p2
    n2 = jnp.cross(b1, b2)
    x = jnp.sum(jnp.cross(b0, b1) * n2, axis=-1)
    y = jnp.sqrt(jnp.sum(b1 * b1, axis=-1) + _NORM_FLOOR) * jnp.sum(b0 * n2, axis=-1)
    return x, y


def dihedral_cos_sin(p0, p1, p2, p3):
    """cos and sin of the dihedral p0-p1-p2-p3 (points [..., 3], A); smooth, finite gradient everywhere."""
    x, y = _dihedral_xy(p0, p1, p2, p3)
    r = jnp.sqrt(x * x + y * y + _DIHEDRAL_FLOOR)
    return x / r, y / r


def dihedral(p0, p1, p2, p3):
    """The dihedral p0-p1-p2-p3 in radians, (-pi, pi] (for reports and tests; use ``dihedral_cos_sin`` in physics)."""
    x, y = _dihedral_xy(p0, p1, p2, p3)
    return jnp.arctan2(y, x)


def phi_psi_cos_sin(coords, bb: Backbone):
    """``(cos_phi, sin_phi, cos_psi, sin_psi)``, each ``[..., R]``, from ``coords [..., N, 3]``.

    Entries where the dihedral is undefined (``bb.has_phi`` / ``bb.has_psi`` False) are meaningless; mask them.
    """
    pa, sa = bb.phi_atoms, bb.psi_atoms
    cphi, sphi = dihedral_cos_sin(*(coords[..., pa[:, k], :] for k in range(4)))
    cpsi, spsi = dihedral_cos_sin(*(coords[..., sa[:, k], :] for k in range(4)))
    return cphi, sphi, cpsi, spsi


def phi_psi(coords, bb: Backbone):
    """phi and psi ``[..., R]`` in radians, NaN where undefined (for reports and tests)."""
    pa, sa = bb.phi_atoms, bb.psi_atoms
    phi = dihedral(*(coords[..., pa[:, k], :] for k in range(4)))
    psi = dihedral(*(coords[..., sa[:, k], :] for k in range(4)))
    return jnp.where(bb.has_phi, phi, jnp.nan), jnp.where(bb.has_psi, psi, jnp.nan)


# ----------------------------------------------------------------------------------------------------------------
# NMR-STAR 3
# ----------------------------------------------------------------------------------------------------------------

# One token of a non-text-field STAR line: a quoted string (closed by a quote followed by white space or the end of
# the line, as in CIF 1.1), a comment, or a bare word.
_STAR_TOKEN = re.compile(r"""'.*?'(?=\s|$)|".*?"(?=\s|$)|#.*$|\S+""")


def _quote_frame_references(text: str) -> str:
    """Quote bare ``$name`` save-frame references outside text fields and quotes; leave everything else as it is."""
    out = []
    in_text_field = False
    for line in text.splitlines():
        if line.startswith(";"):
            in_text_field = not in_text_field
            out.append(line)
            continue
        if in_text_field or "$" not in line:
            out.append(line)
            continue
        pieces, last = [], 0
        for m in _STAR_TOKEN.finditer(line):
            tok = m.group()
            if tok.startswith("$"):
                quote = '"' if "'" in tok else "'"
                pieces.append(line[last : m.start()] + quote + tok + quote)
                last = m.end()
        pieces.append(line[last:])
        out.append("".join(pieces))
    return "\n".join(out) + "\n"


def read_star(path: str | Path) -> gemmi.cif.Document:
    """An NMR-STAR 3 file as a ``gemmi.cif.Document`` (save frames are ``item.frame`` of the block's items)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise NmrDataError(f"cannot read NMR-STAR file {path}: {exc.strerror or exc}") from None
    if "\x00" in text:
        raise NmrDataError(f"{path}: not a text file (it contains NUL bytes); expected an NMR-STAR 3 file")
    try:
        doc = gemmi.cif.read_string(_quote_frame_references(text))
    except (RuntimeError, ValueError) as exc:
        msg = one_line(str(exc))
        m = re.match(r"^string:(\d+)(?::\d+)?:\s*(.*)$", msg)
        where = f"{path}:{m.group(1)}" if m else str(path)
        detail = m.group(2) if m else msg
        raise NmrDataError(
            f"{where}: not a readable NMR-STAR 3 file ({detail}); check that every loop_ row has one value per tag "
            "and that the file is complete"
        ) from None
    return doc


@dataclass(frozen=True)
class StarLoop:
    """One loop of one category: ``frame`` is its save-frame name ('' at block level), ``columns`` maps the tag
    (without the category prefix, e.g. ``"Seq_ID"``) to its values as strings (``None`` for '.' and '?')."""

    frame: str
    columns: dict[str, list[str | None]]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))


def _table_to_loop(frame: str, table: gemmi.cif.Table, prefix: str) -> StarLoop:
    columns: dict[str, list[str | None]] = {}
    tags = list(table.tags)
    for i, tag in enumerate(tags):
        col = table.column(i)
        columns[tag[len(prefix) :]] = [None if gemmi.cif.is_null(v) else gemmi.cif.as_string(v) for v in col]
    return StarLoop(frame=frame, columns=columns)


def read_star_loops(path: str | Path, category: str) -> list[StarLoop]:
    """Every loop of ``category`` (e.g. ``"_Atom_chem_shift."``) in the file, at block level and in save frames."""
    prefix = category if category.endswith(".") else category + "."
    doc = read_star(path)
    loops: list[StarLoop] = []
    for block in doc:
        table = block.find_mmcif_category(prefix)
        if table.width() > 0:
            loops.append(_table_to_loop("", table, prefix))
        for item in block:
            if item.frame is not None:
                table = item.frame.find_mmcif_category(prefix)
                if table.width() > 0:
                    loops.append(_table_to_loop(item.frame.name, table, prefix))
    return loops


def residue_numbers(loop: StarLoop, suffix: str, numbering: str, path: str | Path) -> tuple[list[int | None], str]:
    """Residue numbers of a loop's rows and the column they came from.

    ``numbering="auth"``: ``Auth_seq_ID<suffix>`` (the authors' numbering, which is what PDB/mmCIF models of the entry
    use); rows where it is missing fall back to nothing (None).  ``"seq"``: ``Seq_ID<suffix>`` (BMRB's own 1-based
    numbering of the entity sequence; equal to ``Comp_index_ID``).  ``"auto"``: ``auth`` if the column has values,
    else ``seq``.
    """
    if numbering not in ("auth", "seq", "auto"):
        raise NmrDataError(f"numbering must be 'auth', 'seq' or 'auto', got {numbering!r}")
    auth, seq = f"Auth_seq_ID{suffix}", f"Seq_ID{suffix}"
    if seq not in loop.columns and f"Comp_index_ID{suffix}" in loop.columns:
        seq = f"Comp_index_ID{suffix}"
    has_auth = auth in loop.columns and any(v is not None for v in loop.columns[auth])
    column = auth if numbering == "auth" or (numbering == "auto" and has_auth) else seq
    if column not in loop.columns or not any(v is not None for v in loop.columns[column]):
        other = "seq" if column == auth else "auth"
        raise NmrDataError(
            f"{path}: loop in frame {loop.frame!r} has no values in {column} (numbering={numbering!r}); "
            f"try numbering={other!r}"
        )
    out: list[int | None] = []
    for v in loop.columns[column]:
        try:
            out.append(None if v is None else int(v))
        except ValueError:
            raise NmrDataError(f"{path}: residue number {v!r} in {column} is not an integer") from None
    return out, column
