"""NOE distance restraints (X-PLOR/CNS ``assign`` format) as a pure-JAX likelihood of a weighted ensemble.

Forward model (all distances in Angstrom)
- A restraint is one or more pairs of atom selections (``assign (A) (B) d dminus dplus [OR (C) (D)] ...``) with bounds
  lower = d - dminus and upper = d + dplus (X-PLOR manual, NOE statement: "ASSIgn selection selection real real real
  [OR selection selection]").
- Within one member, the protons of the selections (and of every OR pair) are combined by SUM averaging,
  r_m = (sum_ij r_ij^-6)^(-1/6) (X-PLOR manual Sec. 20.2/20.2.1, AVERage=SUM; ``proton_averaging="mean"`` divides the
  sum by the number of pairs, X-PLOR's R-6).
- Over the ensemble the NOE intensity, not the distance, is averaged (it is ~ r^-6 in the slow-tumbling limit):
  r_eff = (sum_e w_e r_e^-6)^(-1/6) (``averaging="r-6"``, the default); ``"r-3"`` uses (sum_e w_e r_e^-3)^(-1/3)
  (internal motion faster than overall tumbling; Tropp 1980, J. Chem. Phys. 72, 6035); ``"none"`` scores every
  member on its own and weights the members' penalties.
- Flat-bottom penalty: violation v = max(lower - r_eff, 0) + max(r_eff - upper, 0) (A) and
  log_likelihood = -1/2 sum_restraints (v / sigma)^2: zero inside the bounds, a Gaussian of width ``sigma`` outside.
  With ``rswitch`` set it turns linear beyond v = rswitch (a Huber loss: same value and slope at rswitch), so a
  grossly violated (e.g. misassigned) restraint pulls with a bounded force instead of one growing without limit.

Protons a model does not have
Structure predictors give heavy atoms only.  When a selected proton is absent from the model it is stood in for
(``hydrogens=``):
- ``"placed"`` (default): every proton whose position the heavy atoms fix is placed by ``observables.hydrogens``
  (amide H, HA, Gly HA2/HA3, CH2 pairs with IUPAC stereo names, methine H, aromatic and planar NH/NH2 H; placed within
  0.05 A RMS of the deposited 2KJR protons).  Only freely rotating groups (CH3, NH3+, OH, SH) become a pseudo-atom: the
  centroid of their H (on the X-C axis, ``hydrogens.rotor_centroid``), with the methyl correction below.
- ``"wuthrich"``: the classic treatment; every group whose protons are not stereospecifically resolved (CH2, CH3,
  both methyls of Leu/Val, the ring-flipping HD/HE pairs of Phe/Tyr, NH2) becomes one pseudo-atom at the centroid of
  the group's protons, with the correction of ``PSEUDO_ATOM_CORRECTIONS``.
A pseudo-atom stands for the n protons of its group: it enters the r^-6 sum n times (n r^-6), so that a restraint
calibrated with SUM averaging over explicit protons keeps its meaning at long range, where n protons at about the same
distance r give n r^-6 (without it a methyl 7 A away would look 3^(1/6) = 1.2 times farther, more than the correction).
The correction (A) of Wuthrich, Billeter & Braun (1983), J. Mol. Biol. 169, 949-961 is added to the upper bound:
  methyl (e.g. Ala QB, Val QG1)                                  +1.0
  methylene CH2 (e.g. QB, Gly QA), and (here) NH2, NH3+, OH, SH   +1.0
  both methyls of Val (QQG) or Leu (QQD)                          +2.4
  aromatic ring pair of Phe/Tyr (QD, QE)                          +2.0
It bounds how much farther a partner can be from the pseudo-atom than from the nearest of its protons (triangle
inequality: the protons lie within about that distance of the pseudo-atom), so a satisfied proton-proton distance
stays satisfied.  Corrections of the two ends of a restraint add; with several pseudo-atoms in one selection the
largest counts; OR pairs take the largest sum.  By the same inequality the lower bound is lowered by the correction
(never below 0).  When the model has the protons (e.g. an NMR ensemble with hydrogens) they are used as they are.

Names
Selections are matched against IUPAC names (PDB v3), plus "HN" for the amide H and HT1-HT3 for the N-terminal H1-H3.
Many X-PLOR files use the older X-PLOR names for CH2 protons, HB1/HB2 for IUPAC HB3/HB2 (likewise HG1x, HA1 of Gly,
HG11 of Ile; the correspondence used by the CING validation suite's nomenclature tables, e.g. Lys HB3 <-> XPLOR
HB1; for 2KJR it does not matter: its file lists both protons of every such pair with the same bounds).  ``nomenclature="auto"`` (default) takes X-PLOR names when the file names a proton that only exists under them
(e.g. Lys HB1) and none that only exists under IUPAC (e.g. Lys HB3); "iupac" or "xplor" force one.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from observables.base import AtomInfo
from observables.errors import InputError
from observables.nmr import unmapped_report, unmapped_warning
from observables.hydrogens import (
    N_TERMINAL_SITES,
    PROTON_TEMPLATES,
    HSite,
    PlacementBuilder,
    add_site,
    residue_index,
)

__all__ = [
    "PSEUDO_ATOM_CORRECTIONS",
    "DistanceRestraint",
    "NoeObservable",
    "RestraintFormatError",
    "RestraintSet",
    "Selection",
    "SkippedStatement",
    "name_pattern",
    "parse_xplor_restraints",
    "parse_xplor_text",
]

# Pseudo-atom corrections to upper bounds (A), Wuthrich, Billeter & Braun 1983 (see the module docstring).
PSEUDO_ATOM_CORRECTIONS = {
    "methyl": 1.0,
    "methylene": 1.0,
    "two_methyls": 2.4,
    "aromatic_pair": 2.0,
    "nh2": 1.0,
    "rotor": 1.0,  # NH3+, OH, SH: the same cone geometry as a methyl (H within ~1 A of the axis point)
}

# Violation thresholds (A) in the report.
VIOLATION_LARGE = 0.5
VIOLATION_SMALL = 0.3

_DIST2_EPS = 1e-6  # A^2 added to squared distances: keeps r^-6 and its gradient finite for coincident points

AVERAGING = ("r-6", "r-3", "none")
PROTON_AVERAGING = ("sum", "mean")
HYDROGEN_MODES = ("placed", "wuthrich")
NOMENCLATURES = ("auto", "iupac", "xplor")


class RestraintFormatError(InputError):
    """A restraint file could not be read; the message names the file and line."""


# ----------------------------------------------------------------------------------------------------------------
# Parsing: tokens, selections, assign statements
# ----------------------------------------------------------------------------------------------------------------


class _Tok(NamedTuple):
    kind: str  # "(" | ")" | "word" | "str"
    value: str
    line: int


def _tokenize(text: str, source: str) -> list[_Tok]:
    """Split X-PLOR input into tokens, dropping comments: ``!`` to the end of the line, ``{ ... }`` (nestable, may span
    lines) and lines starting with ``*`` in column 1 (the header of PDB restraint files)."""
    toks: list[_Tok] = []
    i, n, line = 0, len(text), 1
    delimiters = set("()!{\"") | {" ", "\t", "\r", "\n", "\f", "\v"}
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
        elif ch.isspace():
            i += 1
        elif ch == "!" or (ch == "*" and (i == 0 or text[i - 1] == "\n")):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif ch == "{":
            start, depth = line, 0
            while i < n:
                c = text[i]
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        break
                elif c == "\n":
                    line += 1
                i += 1
            if i >= n:
                raise RestraintFormatError(f"{source}, line {start}: comment '{{' is never closed by '}}'")
            i += 1
        elif ch in "()":
            toks.append(_Tok(ch, ch, line))
            i += 1
        elif ch == '"':
            j = text.find('"', i + 1)
            if j < 0 or "\n" in text[i + 1 : j]:
                raise RestraintFormatError(f'{source}, line {line}: quoted string is not closed on the same line')
            toks.append(_Tok("str", text[i + 1 : j], line))
            i = j + 1
        else:
            j = i
            while j < n and text[j] not in delimiters:
                j += 1
            toks.append(_Tok("word", text[i:j], line))
            i = j
    return toks


def name_pattern(pattern: str) -> re.Pattern:
    """Compile an X-PLOR name pattern (case-insensitive, whole name): ``*`` any string, ``%`` one character, ``#`` one
    or more digits, ``+`` one digit; e.g. ``HB*`` -> HB2, HB3; ``HD#`` -> HD1, HD2 (and HD11 ... HD23)."""
    parts = {"*": ".*", "%": ".", "#": "[0-9]+", "+": "[0-9]"}
    return re.compile("".join(parts.get(c, re.escape(c)) for c in pattern.strip().upper()), re.IGNORECASE)


@dataclass(frozen=True)
class Selection:
    """One parsed atom selection: the expression tree ``node`` (nested tuples) and its text and line for messages.

    Nodes: ("all",), ("and", a, b), ("or", a, b), ("not", a), ("name", pattern), ("resname", pattern),
    ("segid", pattern), ("resid", lo, hi) with integers (lo == hi for one residue; None for any).
    """

    node: tuple
    text: str
    line: int


class _SelectionParser:
    """Recursive descent over the tokens inside one pair of parentheses (precedence: NOT > AND > OR)."""

    def __init__(self, toks: list[_Tok], source: str, line: int):
        self.toks, self.p, self.source, self.line = toks, 0, source, line

    def error(self, what: str, tok: _Tok | None = None) -> RestraintFormatError:
        line = self.line if tok is None else tok.line
        return RestraintFormatError(f"{self.source}, line {line}: {what}")

    def peek_word(self) -> str | None:
        if self.p < len(self.toks) and self.toks[self.p].kind == "word":
            return self.toks[self.p].value.lower()
        return None

    def parse(self) -> tuple:
        if not self.toks:
            raise self.error("empty atom selection '()'")
        node = self.parse_or()
        if self.p < len(self.toks):
            tok = self.toks[self.p]
            raise self.error(f"unexpected {tok.value!r} in atom selection (missing 'and'/'or'?)", tok)
        return node

    def parse_or(self) -> tuple:
        node = self.parse_and()
        while self.peek_word() == "or":
            self.p += 1
            node = ("or", node, self.parse_and())
        return node

    def parse_and(self) -> tuple:
        node = self.parse_not()
        while self.peek_word() == "and":
            self.p += 1
            node = ("and", node, self.parse_not())
        return node

    def parse_not(self) -> tuple:
        if self.peek_word() == "not":
            self.p += 1
            return ("not", self.parse_not())
        return self.parse_atom()

    def value(self, keyword: str) -> str:
        if self.p >= len(self.toks) or self.toks[self.p].kind not in ("word", "str"):
            got = self.toks[self.p].value if self.p < len(self.toks) else "the end of the selection"
            raise self.error(f"'{keyword}' needs a value, got {got!r}")
        self.p += 1
        return self.toks[self.p - 1].value

    def resid(self) -> tuple:
        tok = self.toks[self.p] if self.p < len(self.toks) else None
        text = self.value("resid")
        while self.p < len(self.toks) and (text.endswith(":") or self.toks[self.p].value.startswith(":")):
            text += self.value("resid")
        if text.strip() in ("*", ""):
            return ("resid", None, None)
        try:
            lo, _, hi = text.partition(":")
            lo_i = int(lo)
            hi_i = int(hi) if hi else lo_i
        except ValueError:
            raise self.error(f"resid {text!r} is not an integer or a range 'lo:hi'", tok) from None
        return ("resid", lo_i, hi_i)

    def parse_atom(self) -> tuple:
        if self.p >= len(self.toks):
            raise self.error("atom selection ends where a term is expected")
        tok = self.toks[self.p]
        if tok.kind == "(":
            depth, q = 0, self.p
            while q < len(self.toks):
                depth += {"(": 1, ")": -1}.get(self.toks[q].kind, 0)
                if depth == 0:
                    break
                q += 1
            inner = _SelectionParser(self.toks[self.p + 1 : q], self.source, tok.line)
            self.p = q + 1
            return inner.parse()
        if tok.kind != "word":
            raise self.error(f"unexpected {tok.value!r} in atom selection", tok)
        self.p += 1
        key = tok.value.lower()
        if key in ("all", "known") or key[:4] == "know":
            return ("all",)
        if key[:4] == "resi":
            return self.resid()
        if key[:4] == "name":
            return ("name", self.value("name"))
        if key[:4] == "segi":
            return ("segid", self.value("segid"))
        if key[:4] == "resn":
            return ("resname", self.value("resname"))
        if key[:4] == "atom":  # ATOM segid resid name
            seg = ("segid", self.value("atom"))
            res = self.resid()
            return ("and", ("and", seg, res), ("name", self.value("atom")))
        if key[:4] == "hydr":
            return ("name", "H*")
        raise self.error(
            f"unknown or unsupported selection keyword {tok.value!r} (supported: resid, name, segid, resname, atom, "
            "all, known, hydrogen, not, and, or)",
            tok,
        )


@dataclass(frozen=True)
class DistanceRestraint:
    """``pairs`` of selections (the first pair and any OR pairs) with bounds d - dminus, d + dplus (A)."""

    pairs: tuple[tuple[Selection, Selection], ...]
    d: float
    dminus: float
    dplus: float
    line: int

    @property
    def lower(self) -> float:
        return max(self.d - self.dminus, 0.0)

    @property
    def upper(self) -> float:
        return self.d + self.dplus

    def describe(self) -> str:
        ors = " OR ".join(f"({a.text}) ({b.text})" for a, b in self.pairs)
        return f"line {self.line}: {ors} [{self.lower:.2f}, {self.upper:.2f}]"


@dataclass(frozen=True)
class SkippedStatement:
    line: int
    reason: str


@dataclass(frozen=True)
class RestraintSet:
    """A parsed file: its distance ``restraints``, the ``skipped`` assign statements (other restraint types) and the
    ``ignored`` line ranges (inclusive) of text outside assign statements that is not a comment."""

    source: str
    restraints: tuple[DistanceRestraint, ...]
    skipped: tuple[SkippedStatement, ...]
    ignored: tuple[tuple[int, int], ...]

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for s in self.skipped:
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
        parts = [f"{self.source}: {len(self.restraints)} distance restraints"]
        parts += [f"skipped {k} statement(s): {r}" for r, k in reasons.items()]
        if self.ignored:
            lines = sum(b - a + 1 for a, b in self.ignored)
            parts.append(f"ignored {lines} line(s) of text outside assign statements")
        return "; ".join(parts)


_OTHER_KINDS = {
    1: "a single atom selection",
    3: "three atom selections (angle-type)",
    4: "four atom selections (a dihedral-angle restraint)",
    5: "five atom selections (a phi/psi or J-coupling-type restraint)",
    6: "six atom selections (an RDC/orientation restraint)",
}


def _is_value(word: str) -> bool:
    if word.startswith("$"):
        return True
    try:
        float(word)
    except ValueError:
        return False
    return True


def _group_end(toks: list[_Tok], p: int, source: str) -> int:
    """Index of the ')' closing the '(' at ``p``."""
    depth = 0
    for q in range(p, len(toks)):
        depth += {"(": 1, ")": -1}.get(toks[q].kind, 0)
        if depth == 0:
            return q
    raise RestraintFormatError(f"{source}, line {toks[p].line}: '(' is never closed by ')'")


def _parse_assign(toks: list[_Tok], p: int, source: str) -> tuple[DistanceRestraint | SkippedStatement, int]:
    """Parse the assign statement starting at token ``p``; return it (or why it is skipped) and the next token."""
    line = toks[p].line
    p += 1
    segments: list[list[Selection]] = [[]]
    values: list[_Tok] = []
    while p < len(toks):
        tok = toks[p]
        if tok.kind == "(":
            q = _group_end(toks, p, source)
            inner = toks[p + 1 : q]
            node = _SelectionParser(inner, source, tok.line).parse()
            segments[-1].append(Selection(node, " ".join(t.value for t in inner), tok.line))
            p = q + 1
        elif tok.kind == ")":
            raise RestraintFormatError(f"{source}, line {tok.line}: ')' without a matching '('")
        elif tok.kind == "word" and _is_value(tok.value):
            values.append(tok)
            p += 1
        elif tok.kind == "word" and tok.value.lower() == "or" and p + 1 < len(toks) and toks[p + 1].kind == "(":
            segments.append([])
            p += 1
        else:
            break
    if len(segments) == 1 and len(segments[0]) != 2:
        return SkippedStatement(line, f"{_OTHER_KINDS.get(len(segments[0]), f'{len(segments[0])} atom selections')}"
                                      ", not a distance restraint"), p
    for k, seg in enumerate(segments):
        if len(seg) != 2:
            where = "the first pair" if k == 0 else f"OR clause {k}"
            raise RestraintFormatError(
                f"{source}, line {line}: {where} of this assign statement has {len(seg)} atom selection(s); "
                "a distance restraint pairs exactly two"
            )
    if len(values) != 3 or any(v.value.startswith("$") for v in values):
        found = " ".join(v.value for v in values) or "none"
        raise RestraintFormatError(
            f"{source}, line {line}: a distance restraint needs three numbers 'd dminus dplus' after its selections; "
            f"found {found}"
        )
    d, dminus, dplus = (float(v.value) for v in values)
    if not all(math.isfinite(x) for x in (d, dminus, dplus)) or d < 0 or dminus < 0 or dplus < 0:
        raise RestraintFormatError(
            f"{source}, line {line}: d, dminus and dplus must be finite and >= 0, got {d} {dminus} {dplus}"
        )
    pairs = tuple((seg[0], seg[1]) for seg in segments)
    return DistanceRestraint(pairs, d, dminus, dplus, line), p


def parse_xplor_text(text: str, source: str = "<string>") -> RestraintSet:
    """Parse X-PLOR/CNS restraint text: every ``assign`` statement with two selections (plus OR pairs) is a distance
    restraint; assign statements with another number of selections (dihedrals, couplings, RDCs) are skipped with the
    reason; other text (NOE block keywords, PDB headers, tables) is ignored and its lines recorded.

    Errors (``RestraintFormatError``) name ``source`` and the line: unbalanced parentheses or comments, unknown
    selection keywords, a distance restraint without exactly three numbers, negative bounds.
    """
    toks = _tokenize(text, source)
    restraints: list[DistanceRestraint] = []
    skipped: list[SkippedStatement] = []
    ignored_lines: set[int] = set()
    p = 0
    while p < len(toks):
        tok = toks[p]
        if (
            tok.kind == "word"
            and len(tok.value) >= 4
            and "assign".startswith(tok.value.lower())
            and p + 1 < len(toks)
            and toks[p + 1].kind == "("
        ):
            item, p = _parse_assign(toks, p, source)
            (restraints if isinstance(item, DistanceRestraint) else skipped).append(item)
        else:
            ignored_lines.add(tok.line)
            p += 1
    ranges: list[tuple[int, int]] = []
    for ln in sorted(ignored_lines):
        if ranges and ln <= ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], ln)
        else:
            ranges.append((ln, ln))
    return RestraintSet(source, tuple(restraints), tuple(skipped), tuple(ranges))


def parse_xplor_restraints(path) -> RestraintSet:
    """Read and parse an X-PLOR/CNS restraint file (``parse_xplor_text``); the file name goes into every message."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise RestraintFormatError(f"cannot read restraint file {path}: {exc.strerror or exc}") from None
    return parse_xplor_text(text, source=str(path))


# ----------------------------------------------------------------------------------------------------------------
# The atoms a selection can pick: the model's atoms plus the protons it lacks
# ----------------------------------------------------------------------------------------------------------------


def _xplor_name(site: HSite) -> str:
    """X-PLOR's older name of a templated proton: HN for H, HT1-3 for H1-3, X1 for the IUPAC X3 of a CH2 group."""
    if site.name == "H":
        return "HN"
    if site.group == "H" and site.rule == "rotor":
        return "HT" + site.name[-1]
    if site.rule == "methylene" and site.name.endswith("3"):
        return site.name[:-1] + "1"
    return site.name


class _Universe:
    """Flat arrays over every selectable atom: the model's atoms, then absent template protons (virtual)."""

    def __init__(self, atoms: AtomInfo):
        self.index = index = residue_index(atoms)
        chain, resid, resname, iupac, xplor, aliased, source = [], [], [], [], [], [], []

        def add(key, res, name, site, src):
            chain.append(key[0])
            resid.append(key[1])
            resname.append(res)
            iupac.append(name)
            xplor.append(_xplor_name(site) if site else name)
            # "HN"/"H" and HT1/H1 are understood under either convention (CH2 names are not: they conflict)
            aliased.append(site is not None and (site.name == "H" or site in N_TERMINAL_SITES))
            source.append(src)

        self.templates: list[tuple[HSite, ...]] = []
        for r, (key, res) in enumerate(zip(index.keys, index.res_name)):
            sites = PROTON_TEMPLATES.get(res, ())
            if sites and index.previous[r] < 0 and (r == 0 or index.keys[r - 1][0] != key[0]):  # chain start: NH3+
                sites = tuple(s for s in sites if s.name != "H") + N_TERMINAL_SITES
            self.templates.append(sites)
            template = {s.name: s for s in sites}
            names = dict(index.atoms[r])
            for name, i in names.items():
                add(key, res, name, template.get(name), ("atom", i))
            for name, site in template.items():
                if name not in names:
                    add(key, res, name, site, ("virtual", r, site))
        self.chain = np.array([c.upper() for c in chain], dtype=object)
        self.resid = np.array(resid, dtype=np.int64)
        self.resname = np.array(resname, dtype=object)
        iupac, xplor, aliased = np.array(iupac, dtype=object), np.array(xplor, dtype=object), np.array(aliased)
        self.names = {
            "iupac": (iupac, np.where(aliased, xplor, iupac)),
            "xplor": (xplor, np.where(aliased, iupac, xplor)),
        }
        self.source = source
        self._cache: dict = {}

    def __len__(self) -> int:
        return len(self.source)

    def _match(self, values: np.ndarray, pattern: str) -> np.ndarray:
        key = (id(values), pattern)
        if key not in self._cache:
            rx = name_pattern(pattern)
            uniq = {v for v in values if rx.fullmatch(v)}
            self._cache[key] = np.fromiter((v in uniq for v in values), dtype=bool, count=len(values))
        return self._cache[key]

    def select(self, node: tuple, convention: str) -> np.ndarray:
        kind = node[0]
        if kind == "all":
            return np.ones(len(self), dtype=bool)
        if kind == "and":
            return self.select(node[1], convention) & self.select(node[2], convention)
        if kind == "or":
            return self.select(node[1], convention) | self.select(node[2], convention)
        if kind == "not":
            return ~self.select(node[1], convention)
        if kind == "resid":
            if node[1] is None:
                return np.ones(len(self), dtype=bool)
            return (self.resid >= node[1]) & (self.resid <= node[2])
        if kind == "name":
            primary, alias = self.names[convention]
            return self._match(primary, node[1]) | self._match(alias, node[1])
        if kind == "resname":
            return self._match(self.resname, node[1])
        if kind == "segid":
            if not node[1].strip():
                return np.ones(len(self), dtype=bool)
            return self._match(self.chain, node[1].strip())
        raise ValueError(f"unknown selection node {kind!r}")


# ----------------------------------------------------------------------------------------------------------------
# Points: model atoms, placed protons and pseudo-atoms, computed from coordinates in one pass
# ----------------------------------------------------------------------------------------------------------------


class _Points:
    """Registry of the points restraints refer to; each is the mean of two base points (equal for a single one).

    Base points are model atoms (gathered) and placements (``hydrogens.PlacementBuilder``).
    """

    def __init__(self, index):
        self.index = index
        self.builder = PlacementBuilder()
        self.atom_rows: list[int] = []
        self._atom_base: dict[int, int] = {}
        self._placed_base: dict[tuple, int | None] = {}
        self.final: list[tuple[tuple[str, int], tuple[str, int]]] = []
        self.correction: list[float] = []
        self.multiplicity: list[float] = []
        self.keys: dict[tuple, int] = {}

    def _atom(self, i: int) -> tuple[str, int]:
        if i not in self._atom_base:
            self._atom_base[i] = len(self.atom_rows)
            self.atom_rows.append(i)
        return ("a", self._atom_base[i])

    def _placed(self, r: int, site: HSite) -> tuple[str, int] | None:
        key = (r, site.name)
        if key not in self._placed_base:
            self._placed_base[key] = add_site(self.builder, site, r, self.index)
        k = self._placed_base[key]
        return None if k is None else ("p", k)

    def _rotor(self, r: int, site: HSite) -> tuple[str, int] | None:
        key = (r, "rotor", site.group)
        if key not in self._placed_base:
            parent = self.index.atoms[r].get(site.parent)
            attached = self.index.atoms[r].get(site.refs[0])
            self._placed_base[key] = (
                None if parent is None or attached is None
                else self.builder.add_bisector(parent, [attached], site.length / 3.0)  # hydrogens.rotor_centroid
            )
        k = self._placed_base[key]
        return None if k is None else ("p", k)

    def point(self, key: tuple, bases: list, correction: float, multiplicity: int = 1) -> int | None:
        if key in self.keys:
            return self.keys[key]
        if not bases or any(b is None for b in bases):
            return None
        self.keys[key] = len(self.final)
        self.final.append((bases[0], bases[-1]))
        self.correction.append(correction)
        self.multiplicity.append(float(multiplicity))
        return self.keys[key]

    def atom_point(self, i: int) -> int:
        return self.point(("atom", i), [self._atom(i)], 0.0)

    def placed_point(self, r: int, site: HSite) -> int | None:
        return self.point(("placed", r, site.name), [self._placed(r, site)], 0.0)

    def rotor_point(self, r: int, site: HSite, n_protons: int) -> int | None:
        kind = "methyl" if site.parent.startswith("C") else "rotor"
        return self.point(("rotor", r, site.group), [self._rotor(r, site)], PSEUDO_ATOM_CORRECTIONS[kind], n_protons)

    def group_point(self, key: tuple, bases: list, kind: str, n_protons: int) -> int | None:
        return self.point(key, bases, PSEUDO_ATOM_CORRECTIONS[kind], n_protons)

    def build(self):
        table = self.builder.build()
        n_a = len(self.atom_rows)

        def flat(b):
            return b[1] if b[0] == "a" else n_a + b[1]

        first = np.array([flat(a) for a, _ in self.final], dtype=np.int32)
        second = np.array([flat(b) for _, b in self.final], dtype=np.int32)
        atom_rows = np.array(self.atom_rows, dtype=np.int32)

        def points(coords):  # [..., N, 3] -> [..., M, 3]
            base = jnp.concatenate([coords[..., atom_rows, :], table.place(coords).astype(coords.dtype)], axis=-2)
            return 0.5 * (base[..., first, :] + base[..., second, :])

        return points


def _wuthrich_group(res: str, site: HSite) -> tuple[str, list[str], str] | None:
    """(pseudo-atom name, member protons, correction kind) of the Wuthrich group of a placeable proton, if any."""
    if site.rule == "methylene":
        return "Q" + site.group[1:], [site.group + "2", site.group + "3"], "methylene"
    if site.rule == "dihedral":
        return "Q" + site.group[1:], [site.group + "1", site.group + "2"], "nh2"
    if res in ("PHE", "TYR") and site.name in ("HD1", "HD2", "HE1", "HE2"):
        stem = site.name[:2]
        return "Q" + stem[1:], [stem + "1", stem + "2"], "aromatic_pair"
    return None


_TWO_METHYLS = {"LEU": ("HD1", "HD2", "QQD"), "VAL": ("HG1", "HG2", "QQG")}


# ----------------------------------------------------------------------------------------------------------------
# The observable
# ----------------------------------------------------------------------------------------------------------------


class NoeObservable:
    """Likelihood of NOE distance restraints given a weighted ensemble (module docstring: model, pseudo-atoms, names).

    Built from the model's atoms and an X-PLOR/CNS restraint file (``restraints``: a path or a ``RestraintSet``).
    Parameters: ``sigma`` (A) width of the flat-bottom penalty; ``averaging`` over members "r-6" | "r-3" | "none";
    ``proton_averaging`` "sum" | "mean"; ``hydrogens`` "placed" | "wuthrich" (stand-ins for absent protons);
    ``nomenclature`` "auto" | "iupac" | "xplor"; ``rswitch`` (A or None) where the penalty turns linear.
    Attributes: ``restraint_set`` (the parsed file), ``restraints`` (those in use, in the order of ``predict``),
    ``skipped`` (``SkippedStatement`` for restraints that parse but cannot be used on this model: no atom matched,
    a proton that cannot be placed, ...), ``lower``/``upper`` [R] (A, pseudo-atom corrections included),
    ``correction`` [R] (A), ``nomenclature`` (the one used).
    """

    name = "noe"
    data_key = "restraints"  # the option naming the data file
    headline = ("violations", "rms_violation")

    def __init__(
        self,
        atoms: AtomInfo,
        restraints: str | Path | RestraintSet | None = None,
        sigma: float = 0.5,
        averaging: str = "r-6",
        proton_averaging: str = "sum",
        hydrogens: str = "placed",
        nomenclature: str = "auto",
        rswitch: float | None = None,
    ):
        if restraints is None:
            raise RestraintFormatError("the noe observable needs a restraint file (restraints=<X-PLOR/CNS file>)")
        for label, value, allowed in (
            ("averaging", averaging, AVERAGING),
            ("proton_averaging", proton_averaging, PROTON_AVERAGING),
            ("hydrogens", hydrogens, HYDROGEN_MODES),
            ("nomenclature", nomenclature, NOMENCLATURES),
        ):
            if value not in allowed:
                raise InputError(f"observables.noe.{label} must be one of {allowed}, got {value!r}")
        if not sigma > 0:
            raise InputError(f"observables.noe.sigma must be > 0 A, got {sigma}")
        if rswitch is not None and not rswitch > 0:
            raise InputError(f"observables.noe.rswitch must be > 0 A (or null), got {rswitch}")
        rset = restraints if isinstance(restraints, RestraintSet) else parse_xplor_restraints(restraints)
        if not rset.restraints:
            raise RestraintFormatError(f"{rset.source}: contains no distance restraints ({rset.summary()})")
        self.restraint_set = rset
        self.sigma, self.averaging, self.proton_averaging = float(sigma), averaging, proton_averaging
        self.hydrogens, self.rswitch = hydrogens, None if rswitch is None else float(rswitch)

        universe = _Universe(atoms)
        self.nomenclature = nomenclature if nomenclature != "auto" else self._detect_nomenclature(universe, rset)
        pts = _Points(universe.index)
        used, skipped, pair_a, pair_b, pair_w, pair_r, corrections = [], [], [], [], [], [], []
        for restraint in rset.restraints:
            pairs, corr, why = self._resolve(restraint, universe, pts)
            if why is not None:
                skipped.append(SkippedStatement(restraint.line, why))
                continue
            for a, b, w in pairs:
                pair_a.append(a)
                pair_b.append(b)
                pair_w.append(w)
                pair_r.append(len(used))
            corrections.append(corr)
            used.append(restraint)
        if not used:
            reasons = "; ".join(sorted({s.reason for s in skipped})[:3])
            raise RestraintFormatError(f"{rset.source}: none of the {len(rset.restraints)} restraints applies to this model "
                             f"(e.g. {reasons})")
        self.restraints = tuple(used)
        self.skipped = tuple(skipped)
        if skipped:
            warnings.warn(unmapped_warning(rset.source, self._unmapped_items(), "restraint(s)"), stacklevel=2)
        self.correction = np.array(corrections, dtype=np.float32)
        self.lower = np.maximum(np.array([r.lower for r in used], dtype=np.float32) - self.correction, 0.0)
        self.upper = np.array([r.upper for r in used], dtype=np.float32) + self.correction
        points = pts.build()
        pair_a, pair_b = np.array(pair_a, dtype=np.int32), np.array(pair_b, dtype=np.int32)
        pair_r, pair_w = np.array(pair_r, dtype=np.int32), np.array(pair_w, dtype=np.float32)
        n_restraints = len(used)
        n_pairs = np.bincount(pair_r, weights=pair_w, minlength=n_restraints).astype(np.float32)
        self.n_pairs = n_pairs  # proton pairs per restraint (pseudo-atoms count with their multiplicity)
        lower, upper = jnp.asarray(self.lower), jnp.asarray(self.upper)
        sigma_, rswitch_ = self.sigma, self.rswitch

        def member_distances(coords):  # [E, N, 3] -> sum over proton pairs of multiplicity x r^-6 [E, R] (A^-6)
            x = points(coords)
            d2 = jnp.sum(jnp.square(x[..., pair_a, :] - x[..., pair_b, :]), axis=-1) + _DIST2_EPS
            inv6 = pair_w * d2**-3  # multiplicity x r^-6 (A^-6)
            s = jnp.zeros(inv6.shape[:-1] + (n_restraints,), inv6.dtype).at[..., pair_r].add(inv6)
            if proton_averaging == "mean":
                s = s / n_pairs
            return s

        def effective(coords, weights):  # ensemble-averaged distance r_eff [R] (or per member for "none": [E, R])
            s = member_distances(coords)
            if averaging == "r-6":
                return jnp.einsum("e,er->r", weights, s) ** (-1.0 / 6.0)
            if averaging == "r-3":
                return jnp.einsum("e,er->r", weights, jnp.sqrt(s)) ** (-1.0 / 3.0)
            return s ** (-1.0 / 6.0)

        def violation(r):
            return jax.nn.relu(lower - r) + jax.nn.relu(r - upper)

        def penalty(v):  # -log-likelihood per restraint (dimensionless)
            z = v / sigma_
            if rswitch_ is None:
                return 0.5 * jnp.square(z)
            zs = rswitch_ / sigma_
            return jnp.where(v <= rswitch_, 0.5 * jnp.square(z), 0.5 * zs**2 + zs * (z - zs))

        def log_likelihood(coords, weights):
            v = violation(effective(coords, weights))
            if averaging == "none":
                return -jnp.einsum("e,e->", weights, jnp.sum(penalty(v), axis=-1))
            return -jnp.sum(penalty(v))

        def statistics(coords, weights):
            r = effective(coords, weights)
            v = violation(r)
            member_v = violation(member_distances(coords) ** (-1.0 / 6.0))  # [E, R]: each member alone
            if averaging == "none":
                ll = -jnp.einsum("e,e->", weights, jnp.sum(penalty(v), axis=-1))
                v = jnp.einsum("e,er->r", weights, v)
            else:
                ll = -jnp.sum(penalty(v))
            return {
                "log_likelihood": ll,
                "violations": jnp.sum(v > VIOLATION_LARGE),
                "violations_gt_0_3": jnp.sum(v > VIOLATION_SMALL),
                "rms_violation": jnp.sqrt(jnp.mean(jnp.square(v))),
                "max_violation": jnp.max(v),
                "mean_violation": jnp.mean(v),
                "member_violations": jnp.einsum("e,e->", weights, jnp.sum(member_v > VIOLATION_LARGE, axis=-1)),
                "member_rms_violation": jnp.sqrt(jnp.einsum("e,er->", weights, jnp.square(member_v)) / n_restraints),
            }

        self._effective = jax.jit(effective)
        self._violation = jax.jit(lambda coords, weights: violation(effective(coords, weights)))
        self._log_likelihood = jax.jit(log_likelihood)
        self._statistics = jax.jit(statistics)

    # -------------------------------------------------------------------------------------------------- building

    @staticmethod
    def _detect_nomenclature(universe: _Universe, rset: RestraintSet) -> str:
        """"xplor" if some selection matches atoms only under X-PLOR names and none only under IUPAC, else "iupac"."""
        only = {"iupac": 0, "xplor": 0}
        for restraint in rset.restraints:
            for pair in restraint.pairs:
                for sel in pair:
                    hit = {c: universe.select(sel.node, c).any() for c in only}
                    for c in only:
                        only[c] += int(hit[c] and not hit["xplor" if c == "iupac" else "iupac"])
        if only["xplor"] and only["iupac"]:
            raise RestraintFormatError(
                f"{rset.source}: proton names mix conventions ({only['xplor']} selections match only X-PLOR names such "
                f"as HB1, {only['iupac']} only IUPAC names such as HB3); set nomenclature to 'iupac' or 'xplor'"
            )
        return "xplor" if only["xplor"] else "iupac"

    def _side(self, sel: Selection, universe: _Universe, pts: _Points) -> tuple[list[int], float, str | None]:
        """Points (deduplicated) and pseudo-atom correction of one selection, or why it cannot be used."""
        chosen = np.flatnonzero(universe.select(sel.node, self.nomenclature))
        if not len(chosen):
            return [], 0.0, f"no atom matched (the selection {sel.text} matches no atom of the model)"
        out: list[int] = []
        methyls: dict[int, set[str]] = {}
        for u in chosen:
            src = universe.source[u]
            if src[0] == "atom":
                k = pts.atom_point(src[1])
            else:
                r, site = src[1], src[2]
                res = universe.index.res_name[r]
                present = universe.index.atoms[r]
                group = _wuthrich_group(res, site) if self.hydrogens == "wuthrich" else None
                if group is not None and any(m in present for m in group[1]):
                    group = None  # the model has part of the group: place the missing proton on its own
                if site.rule == "rotor":  # the pseudo-atom stands for the group's protons the model lacks
                    n = sum(s.group == site.group and s.name not in present for s in universe.templates[r]
                            if s.rule == "rotor")
                    k = pts.rotor_point(r, site, n)
                    if res in _TWO_METHYLS and site.group in _TWO_METHYLS[res][:2] and n == 3:
                        methyls.setdefault(r, set()).add(site.group)
                elif group is not None:
                    name, members, kind = group
                    sites = {s.name: s for s in universe.templates[r]}
                    k = pts.group_point(("group", r, name), [pts._placed(r, sites[m]) for m in members], kind,
                                        len(members))
                else:
                    k = pts.placed_point(r, site)
                if k is None:
                    return [], 0.0, (f"proton not placeable ({universe.names['iupac'][0][u]} of residue "
                                     f"{universe.chain[u]} {res} {universe.resid[u]}: its heavy atoms are missing)")
            if k not in out:
                out.append(k)
        if self.hydrogens == "wuthrich":  # both methyls of a Leu/Val selected -> one QQ pseudo-atom
            for r, groups in methyls.items():
                res = universe.index.res_name[r]
                g1, g2, qq = _TWO_METHYLS[res]
                if groups == {g1, g2}:
                    sites = {s.group: s for s in universe.templates[r] if s.rule == "rotor"}
                    parts = [pts.rotor_point(r, sites[g], 3) for g in (g1, g2)]
                    bases = [pts.final[p][0] for p in parts]
                    k = pts.group_point(("group", r, qq), bases, "two_methyls", 6)
                    out = [p for p in out if p not in parts] + [k]
        return out, max(pts.correction[k] for k in out), None

    def _resolve(self, restraint: DistanceRestraint, universe: _Universe, pts: _Points):
        pairs: list[tuple[int, int, float]] = []
        corr = 0.0
        reasons = []
        for sa, sb in restraint.pairs:
            a, ca, why_a = self._side(sa, universe, pts)
            b, cb, why_b = self._side(sb, universe, pts)
            if why_a or why_b:
                reasons.append(why_a or why_b)
                continue
            new = [(i, j, pts.multiplicity[i] * pts.multiplicity[j]) for i in a for j in b if i != j]
            if not new:
                reasons.append("same point (both selections are the same single point)")
                continue
            pairs += new
            corr = max(corr, ca + cb)
        if not pairs:
            return [], 0.0, reasons[0]
        return pairs, corr, None

    # ------------------------------------------------------------------------------------------------ interface

    def predict(self, coords, weights) -> jnp.ndarray:
        """Ensemble-averaged effective distances r_eff [R] (A) of the restraints in use (``averaging="none"``:
        each member's, [E, R])."""
        return self._effective(coords, weights)

    def violations(self, coords, weights) -> np.ndarray:
        """Bound violations [R] (A) of the ensemble (``averaging="none"``: [E, R])."""
        return np.asarray(self._violation(coords, weights))

    def log_likelihood(self, coords, weights) -> jnp.ndarray:
        """Scalar log-likelihood given coords [E, N, 3] (A) and weights [E] (jit-, grad-, vmap-able)."""
        return self._log_likelihood(coords, weights)

    def report(self, coords, weights) -> dict:
        """``violations`` (restraints violated by > 0.5 A), ``violations_gt_0_3`` (> 0.3 A), ``rms_violation``,
        ``max_violation`` and ``mean_violation`` (A) of the ensemble-averaged distances; ``member_violations`` and
        ``member_rms_violation``: the same for each member on its own, weighted over members; ``n_restraints`` in
        use and ``n_skipped`` (parsed but not applicable to this model), listed with their reasons as ``n_unmapped``,
        ``unmapped`` (the first few "file:line: reason") and ``unmapped_reasons`` ({reason: count});
        ``log_likelihood``."""
        out: dict = {k: float(v) for k, v in self._statistics(coords, weights).items()}
        out["n_restraints"] = float(len(self.restraints))
        out["n_skipped"] = float(len(self.skipped))
        out.update(unmapped_report(self._unmapped_items()))
        return out

    def _unmapped_items(self) -> list[tuple[str, str]]:
        """(label, reason) of the restraints that parse but cannot be used on this model, labelled by file line."""
        return [(f"{self.restraint_set.source}:{s.line}", s.reason) for s in self.skipped]

    def worst(self, coords, weights, n: int = 10) -> list[str]:
        """The ``n`` largest violations as readable lines (restraint, bounds used, r_eff, violation)."""
        r = np.asarray(self._effective(coords, weights))
        v = self.violations(coords, weights)
        if v.ndim == 2:
            r, v = r.max(0), v.max(0)
        order = np.argsort(-v)[:n]
        return [
            f"{self.restraints[k].describe()} used [{self.lower[k]:.2f}, {self.upper[k]:.2f}] "
            f"r_eff {r[k]:.2f} violation {v[k]:.2f}"
            for k in order
        ]
