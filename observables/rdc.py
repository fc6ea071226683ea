"""Residual dipolar couplings (RDCs) of a weighted ensemble, with one alignment tensor fitted inside the loss.

Physics (units: Hz, Angstrom, SI constants)
- For a pair of spin-1/2 nuclei P, Q at fixed distance r in a weakly aligned molecule, the dipolar coupling is

      D = D_max * u^T S u,        D_max = -(mu0 / 4 pi) * gamma_P gamma_Q hbar / (pi r^3)   (Hz)

  with u the unit P-Q vector in the molecular frame and S the Saupe order matrix (3x3, symmetric, traceless,
  dimensionless).  (The secular dipolar Hamiltonian in Hz is -(mu0/4pi) gamma_P gamma_Q hbar / (2 pi r^3)
  (3 cos^2 theta - 1) I_z S_z, so the splitting averaged over orientations is D_max <(3 cos^2 theta - 1) / 2>,
  and <(3 cos^2 theta - 1) / 2> = u^T S u; e.g. the relax manual, maths_fns.rdc, with S = 3/2 A.)
  Gyromagnetic ratios: IUPAC, Harris et al., Pure Appl. Chem. 73, 1795 (2001), Table 1 (rad s^-1 T^-1).
  For 15N-1H at r = 1.02 A, D_max = +22.95 kHz (gamma_N < 0); at 1.04 A it is 21.66 kHz, the often-quoted 21.7 kHz.
- Several bond types share one tensor: every coupling k is D_k = c_k u_k^T T u_k, where T = D_max(N-H) S is the
  tensor in Hz "normalised to N-H" and c_k = D_max(k) / D_max(N-H) is a fixed, signed ratio per bond type (gamma
  and bond length).  T has 5 free parameters (Txx, Tyy, Txy, Txz, Tyz; Tzz = -Txx - Tyy), so each coupling is one
  row of a linear model  D = A s  with  A_k = c_k [x^2 - z^2, y^2 - z^2, 2xy, 2xz, 2yz],  s = (Txx, Tyy, Txy, Txz, Tyz)
  (the SVD/least-squares order-matrix fit of Losonczi et al., J. Magn. Reson. 138, 334 (1999)).
- Ensemble: one tensor for the weighted ensemble (the molecules of all members align in the same medium), so the
  prediction is D_k = sum_m w_m c_k u_km^T T u_km = (sum_m w_m A_km) s: the design rows are averaged over members
  with the weights, and the tensor is fitted once to the averaged rows.  Members must share one molecular frame
  (superpose them first; guidance does this when it aligns members to the input structure).
- Fit: weighted least squares (rows and data divided by each coupling's sigma) by QR of the design matrix, with a
  tiny Tikhonov term (``RIDGE`` x mean squared column norm) that keeps the fit defined -- and differentiable -- for
  degenerate bond-vector sets; its effect on a well-posed fit is ~1e-6 relative.
- Reported conventions (Clore, Gronenborn & Bax, J. Magn. Reson. 133, 216 (1998); Bax, Kontaxis & Tjandra, Methods
  Enzymol. 339, 127 (2001)):  D(theta, phi) = Da [(3 cos^2 theta - 1) + 3/2 R sin^2 theta cos 2 phi]  in the
  principal frame of T (|Tzz| >= |Tyy| >= |Txx|), hence  Da = Tzz / 2  (Hz, for N-H),  R = Dr / Da =
  (2/3) (Txx - Tyy) / Tzz  in [0, 2/3].  Q factor (Cornilescu, Marquardt, Ottiger & Bax, J. Am. Chem. Soc. 120,
  6836 (1998)):  Q = sqrt(sum (D_obs - D_calc)^2 / sum D_obs^2).
- Signs: values are the signed couplings as measured (the aligned splitting minus the isotropic J).  Because
  gamma_N < 0, a 15N-1H and a 13C-1H bond of the same orientation have couplings of opposite sign (c_k < 0 for C-H);
  data sets that report N-H couplings with that sign removed must be converted before mixing bond types (a single
  bond type is unaffected: the tensor absorbs a global sign).
- Likelihood: Gaussian noise of standard deviation sigma (Hz) per coupling, the tensor at its best fit (profile
  likelihood):  log L = -1/2 sum ((D_obs - D_calc) / sigma)^2.

Atoms: couplings name two atoms of the model by (chain, residue number, atom name).  Hydrogens come from the model
when it has them (amide H named H or HN, HA); otherwise, since predictors give heavy atoms only, they are placed
from the backbone inside the JAX function (differentiable): the amide H at ``AMIDE_NH`` along the bisector of
C(i-1)->N and CA->N (``observables.hydrogens.place_amide_h``); HA of non-glycine residues at ``ALIPHATIC_CH`` opposite
the sum of the unit vectors CA->N, CA->C and CA->CB (tetrahedral); glycine HA2/HA3 by the IUPAC methylene rule
(``place_glycine_ha``).  Both X-H lengths are observables.hydrogens' constants.
Couplings that cannot be built are not used but counted and listed with a reason (``unmapped``, and the report's
``n_unmapped`` / ``unmapped``): residue absent, atom absent, unknown atom name, proline or first residue (no amide
H), heavy atoms missing for a placement.  Wildcard atoms (``10CA-HA#``) are predicted as the mean of their members'
couplings (``RDCObservable``).

Readers: the simple ``.pa`` format, PALES dipolar-coupling tables (``VARS``/``FORMAT``) and the NMR-STAR 3 ``_RDC``
loop (``read_pa``, ``read_pales``, ``read_nmrstar``; ``read_rdc`` picks one).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gemmi
import jax
import jax.numpy as jnp
import numpy as np

from observables.base import AtomInfo
from observables.errors import InputError
from observables.form_factors import normalise_element
from observables.hydrogens import ALIPHATIC_CH, AMIDE_NH, bisector_h, methylene_h, place_amide_h
from observables.nmr import NmrDataError, read_star, text_lines, unmapped_report

__all__ = [
    "BOND_LENGTHS",
    "GYROMAGNETIC_RATIO",
    "AtomRef",
    "Coupling",
    "RDCError",
    "RDCObservable",
    "alignment_tensor",
    "design_rows",
    "dipolar_constant",
    "fit_tensor",
    "place_glycine_ha",
    "place_ha",
    "read_nmrstar",
    "read_pa",
    "read_pales",
    "read_rdc",
    "tensor_parameters",
]

# ----------------------------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------------------------

# mu0 / (4 pi) in T m A^-1 (SI; CODATA 2018 gives 1.00000000055e-7, the difference is irrelevant here).
MU0_OVER_4PI = 1.0e-7
# Reduced Planck constant in J s (exact in the 2019 SI: h = 6.62607015e-34 J s).
HBAR = 6.62607015e-34 / (2.0 * math.pi)

# Gyromagnetic ratios gamma in rad s^-1 T^-1 of the NMR-active isotopes 1H, 13C, 15N (the nuclei of labelled
# proteins), keyed by element: IUPAC recommendations, Harris et al., Pure Appl. Chem. 73, 1795 (2001), Table 1
# (gamma / 10^7 rad s^-1 T^-1 = 26.7522128, 6.728284, -2.71261804).
GYROMAGNETIC_RATIO = {"H": 26.7522128e7, "C": 6.728284e7, "N": -2.71261804e7}

# The amide N-H distance (observables.hydrogens.AMIDE_NH, 1.02 A) is used both to place H and in D_max(N-H): it is
# also the value of the reference analysis of the shared ubiquitin data (../shared/data/README.md: Q = 0.18 for
# 1UBQ).  Only the N-H direction enters the fit; the length only sets D_max(N-H), i.e. the N-H normalisation of T and
# the ratios c_k of the other bond types.  HA is placed at observables.hydrogens.ALIPHATIC_CH (1.09 A).

# Internuclear distances (A) that fix each bond type's D_max, keyed "A-B" by atom names (order-free; HN = H,
# HA2/HA3 = HA).  Heavy-atom bonds: Engh & Huber, Acta Cryst. A47, 392 (1991), protein backbone.  These are
# equilibrium lengths; vibrationally averaged "effective" lengths are a few percent longer (Ottiger & Bax, J. Am.
# Chem. Soc. 120, 12334 (1998)) -- override with the ``bond_lengths`` option when mixing bond types matters.
BOND_LENGTHS = {
    "N-H": AMIDE_NH,
    "CA-HA": ALIPHATIC_CH,
    "N-CA": 1.458,
    "CA-C": 1.525,
    "C-N": 1.329,
    "CA-CB": 1.530,
}

# Relative Tikhonov term of the tensor fit (see the module docstring).
RIDGE = 1e-6
# Fewest couplings the observable accepts: the tensor has 5 parameters, so 5 couplings are always fitted exactly.
MIN_COUPLINGS = 6

_NULL = {".", "?", ""}


class RDCError(InputError):
    """RDC data could not be read or matched to the model (the message names the file, line and coupling)."""


def dipolar_constant(element_1: str, element_2: str, distance: float) -> float:
    """D_max (Hz) of a pair of nuclei at ``distance`` (A): -(mu0/4pi) gamma_1 gamma_2 hbar / (pi r^3).

    Elements H, C, N stand for 1H, 13C, 15N (``GYROMAGNETIC_RATIO``).  D = D_max u^T S u with S the Saupe matrix.
    """
    try:
        g1 = GYROMAGNETIC_RATIO[normalise_element(element_1)]
        g2 = GYROMAGNETIC_RATIO[normalise_element(element_2)]
    except KeyError as exc:
        raise RDCError(
            f"no gyromagnetic ratio for element {exc.args[0]!r}; RDCs are supported between "
            f"{', '.join(sorted(GYROMAGNETIC_RATIO))} (1H, 13C, 15N)"
        ) from None
    if not distance > 0:
        raise RDCError(f"internuclear distance must be > 0 A, got {distance}")
    r = distance * 1e-10  # m
    return -MU0_OVER_4PI * g1 * g2 * HBAR / (math.pi * r**3)


# ----------------------------------------------------------------------------------------------------------------
# Pure-JAX geometry and the tensor fit
# ----------------------------------------------------------------------------------------------------------------


def _unit(v, eps: float = 1e-12):
    """v / |v| along the last axis; finite (zero) for a zero vector."""
    return v / jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True) + eps)


def place_ha(n, ca, c, cb, length: float = ALIPHATIC_CH):
    """HA positions [..., 3] (A) of non-glycine residues from N, CA, C, CB [..., 3]: at ``length`` from CA opposite
    the sum of the unit bond vectors CA->N, CA->C, CA->CB (exact for an ideal tetrahedron, close otherwise)."""
    neighbours = jnp.stack([n, c, cb], axis=-2)
    return bisector_h(ca, neighbours, jnp.ones(neighbours.shape[:-1]), length)


def place_glycine_ha(ca, n, c, sign, length: float = ALIPHATIC_CH):
    """Gly HA2 (``sign`` -1) or HA3 (+1) positions [..., 3] (A) from CA, N, C [..., 3]: the IUPAC methylene rule of
    observables.hydrogens.methylene_h (in the plane bisecting N-CA-C, +-54.7 deg from its bisector, at ``length``),
    the construction the NOE observable uses."""
    return methylene_h(ca, n, c, sign, length)


def design_rows(vectors, scale):
    """Design-matrix rows [..., M, 5] for bond vectors ``[..., M, 3]`` (any length; they are normalised) and the
    per-coupling ratio ``scale [M]`` = D_max(k) / D_max(N-H):  scale * [x^2 - z^2, y^2 - z^2, 2xy, 2xz, 2yz],
    so that D = rows @ (Txx, Tyy, Txy, Txz, Tyz) with T in Hz (N-H normalised)."""
    u = _unit(vectors)
    x, y, z = u[..., 0], u[..., 1], u[..., 2]
    rows = jnp.stack([x * x - z * z, y * y - z * z, 2.0 * x * y, 2.0 * x * z, 2.0 * y * z], axis=-1)
    return rows * jnp.asarray(scale)[..., :, None]


def fit_tensor(rows, d_obs, inv_sigma=None, ridge: float = RIDGE):
    """Weighted least-squares tensor ``s [5]`` = (Txx, Tyy, Txy, Txz, Tyz) (Hz) and the fitted couplings ``[M]``.

    Minimises sum ((d_obs - rows @ s) * inv_sigma)^2 + ridge * mean_col(|A_w|^2) |s|^2 by a QR factorisation of the
    augmented whitened design matrix (differentiable in ``rows`` and ``d_obs``; jit/vmap-able)."""
    rows = jnp.asarray(rows)
    d_obs = jnp.asarray(d_obs, dtype=rows.dtype)
    w = jnp.ones_like(d_obs) if inv_sigma is None else jnp.asarray(inv_sigma, dtype=rows.dtype)
    a = rows * w[:, None]
    b = d_obs * w
    scale = jax.lax.stop_gradient(jnp.mean(jnp.sum(a * a, axis=0)))
    damping = jnp.sqrt(ridge * scale + 1e-30) * jnp.eye(5, dtype=rows.dtype)
    q, r = jnp.linalg.qr(jnp.concatenate([a, damping], axis=0))
    rhs = q.T @ jnp.concatenate([b, jnp.zeros(5, dtype=rows.dtype)])
    s = jax.scipy.linalg.solve_triangular(r, rhs, lower=False)
    return s, rows @ s


def saupe_to_matrix(s):
    """The symmetric traceless 3x3 tensor from its 5 parameters (Txx, Tyy, Txy, Txz, Tyz) (numpy or JAX)."""
    xp = jnp if isinstance(s, jax.Array) else np
    s = xp.asarray(s)
    txx, tyy, txy, txz, tyz = s[0], s[1], s[2], s[3], s[4]
    return xp.stack(
        [xp.stack([txx, txy, txz]), xp.stack([txy, tyy, tyz]), xp.stack([txz, tyz, -txx - tyy])]
    )


def matrix_to_saupe(t) -> np.ndarray:
    """The 5 parameters (Txx, Tyy, Txy, Txz, Tyz) of a symmetric 3x3 tensor (its trace is dropped)."""
    t = np.asarray(t, dtype=np.float64)
    t = 0.5 * (t + t.T) - np.trace(t) / 3.0 * np.eye(3)
    return np.array([t[0, 0], t[1, 1], t[0, 1], t[0, 2], t[1, 2]])


def alignment_tensor(da: float, rhombicity: float, rotation: np.ndarray | None = None) -> np.ndarray:
    """The 3x3 tensor T (Hz, N-H normalised) with axial component ``da`` (Hz) and rhombicity R in [0, 2/3]:
    principal values Tzz = 2 Da, Txx = Da (-1 + 3/2 R), Tyy = Da (-1 - 3/2 R) (Clore et al. 1998), rotated into the
    molecular frame by ``rotation`` (3x3, columns = principal axes x, y, z; identity if None)."""
    if not 0.0 <= rhombicity <= 2.0 / 3.0 + 1e-12:
        raise ValueError(f"rhombicity must lie in [0, 2/3], got {rhombicity}")
    principal = np.diag([da * (-1.0 + 1.5 * rhombicity), da * (-1.0 - 1.5 * rhombicity), 2.0 * da])
    rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    return rot @ principal @ rot.T


def tensor_parameters(t) -> dict[str, object]:
    """Da (Hz), Dr (Hz), rhombicity R, principal values (x, y, z with |x| <= |y| <= |z|) and axes (columns) of T."""
    t = np.asarray(t, dtype=np.float64)
    values, axes = np.linalg.eigh(0.5 * (t + t.T))
    order = np.argsort(np.abs(values), kind="stable")
    values, axes = values[order], axes[:, order]
    txx, tyy, tzz = values
    da = 0.5 * tzz
    rhombicity = (2.0 / 3.0) * (txx - tyy) / tzz if tzz != 0 else 0.0
    return {"da": da, "dr": da * rhombicity, "rhombicity": rhombicity, "principal_values": values, "axes": axes}


# ----------------------------------------------------------------------------------------------------------------
# Data: couplings and their readers
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AtomRef:
    """One atom named by the data: chain (None = the observable's chain), residue number, atom name."""

    chain: str | None
    res_seq: int
    name: str
    res_name: str | None = field(default=None, compare=False)  # residue type when the file gives it (PALES, STAR)

    def __str__(self) -> str:
        return f"{self.chain + '.' if self.chain else ''}{self.res_seq}{self.name}"


@dataclass(frozen=True)
class Coupling:
    """One measured RDC between two atoms: ``value`` and ``error`` (None if not given) in Hz; ``source`` says where it
    was read ("file:line" or "file: _RDC row ID 5")."""

    atom1: AtomRef
    atom2: AtomRef
    value: float
    error: float | None = None
    source: str = ""

    @property
    def label(self) -> str:
        """The .pa-style label, e.g. 14N-H, 13C-14N, A.16H-A.15C."""
        a, b = self.atom1, self.atom2
        if (a.chain, a.res_seq) == (b.chain, b.res_seq):
            return f"{a}-{b.name}"
        return f"{a}-{b}"


# mollib-style interaction label: [chain.]<res><atom>-[chain.][res]<atom>[+-offset], e.g. 14N-H, A.16H-A.15C, 14N-C-1;
# atom names may end in the wildcards # (digits), * (anything) or % (one character): 10CA-HA#
_ATOM = r"[A-Za-z][A-Za-z0-9'#*%]*"
_PA_LABEL = re.compile(
    rf"^(?:(?P<c1>[A-Za-z0-9]+)\.)?(?P<r1>\d+)(?P<a1>{_ATOM})"
    rf"-(?:(?P<c2>[A-Za-z0-9]+)\.)?(?P<r2>\d+)?(?P<a2>[A-Za-z][A-Za-z0-9'#*%]*?)(?P<off>[+-]\d+)?$"
)
_PA_CSA = re.compile(r"^(?:[A-Za-z0-9]+\.)?\d+[A-Za-z][A-Za-z0-9'#*%]*$")
# Comments in .pa and PALES files: "#", "!" or "//" at the start of a line or after white space, and REMARK lines.
_COMMENT = re.compile(r"(?:^|\s)(?:#|!|//)")
_WILDCARDS = "#*%"


def _strip_comment(raw: str) -> str:
    line = raw.strip()
    if line[:6].upper() == "REMARK":
        return ""
    m = _COMMENT.search(line)
    return (line[: m.start()] if m else line).strip()


def _read_text(path: Path, what: str) -> str:
    """The text of an RDC file, or an RDCError naming it (missing, a directory, binary, not UTF-8)."""
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "not found"
        raise RDCError(f"RDC file {path}: {state} (set observables.rdc.data to a {what} file)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RDCError(f"cannot read RDC file {path}: {exc.strerror or exc}") from None
    if b"\x00" in data:
        raise RDCError(f"{path}: not a text file (it contains NUL bytes); expected a {what} file")
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as Windows editors write
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        printable = sum(32 <= b < 127 or b in (9, 10, 13) or b >= 160 for b in data)
        if printable < 0.95 * len(data):
            raise RDCError(
                f"{path}: not a text file (undecodable byte at offset {exc.start}); expected a {what} file"
            ) from None
        return data.decode("latin-1")  # a text file with a few accented characters in its comments


def _table_rows(path: Path, what: str):
    """(line number, "file:line", the line without its comment) of every line of a .pa or PALES file that is not
    blank or a comment."""
    for lineno, raw in enumerate(text_lines(_read_text(path, what)), start=1):
        line = _strip_comment(raw)
        if line:
            yield lineno, f"{path}:{lineno}", line


def _add_once(couplings: list[Coupling], seen: dict, coupling: Coupling, label: str, first: str, hint: str = "") -> None:
    """Append ``coupling`` unless its atom pair (in either order, under either H name) is already in ``seen``, which
    maps a pair to where it was first given (``first`` for this one); a pair given twice is an RDCError."""
    key = _pair_key(coupling.atom1, coupling.atom2)
    if key in seen:
        raise RDCError(f"{coupling.source}: coupling {label} is already given {seen[key]}{hint}")
    seen[key] = first
    couplings.append(coupling)


def _check_atom_name(name: str, where: str, label: str) -> None:
    """RDCs join 1H, 13C and 15N nuclei: the atom name must start with H, C or N (a known gyromagnetic ratio)."""
    stem = name.rstrip(_WILDCARDS)
    if not stem or stem[0].upper() not in GYROMAGNETIC_RATIO or any(ch in _WILDCARDS for ch in stem):
        raise RDCError(
            f"{where}: unknown atom name {name!r} in {label!r}; RDCs join 1H, 13C and 15N atoms, so names start with "
            "H, C or N (wildcards #, *, % only at the end, e.g. HA# for glycine HA2/HA3); fix the label"
        )


def _value_and_error(fields: list[str], where: str, what: str) -> tuple[float, float | None]:
    try:
        value = float(fields[0])
        error = float(fields[1]) if len(fields) > 1 else None
    except ValueError:
        raise RDCError(
            f"{where}: cannot read {' '.join(fields)!r} as a coupling in Hz [and its error]; expected {what}"
        ) from None
    if not math.isfinite(value):
        raise RDCError(f"{where}: the coupling must be a finite number of Hz, got {fields[0]!r}; fix or remove the line")
    if error is not None and not (math.isfinite(error) and error > 0):
        raise RDCError(f"{where}: the error must be a finite number > 0 Hz, got {fields[1]!r}; fix or remove it")
    return value, error


def read_pa(path: str | Path) -> list[Coupling]:
    """Read the RDCs of a ``.pa`` partial-alignment file (the format of mollib's ``pa`` tool).

    One coupling per line: ``<label> <value Hz> [<error Hz>]``, fields separated by spaces or tabs.  Comments: ``#``,
    ``!`` or ``//`` at the start of a line or after white space, and lines starting with ``REMARK``.  The label names
    two atoms: ``14N-H`` (same residue), ``14N-14H``, ``A.16H-A.15C`` (chain prefixes), ``14N-C-1`` (second atom in
    residue 14 - 1), any pair of 1H/13C/15N atoms (``14CA-HA``, ``14C-15N``, ``14CA-C``, ``14HN-HA``, ``14H-13HA``...).
    An atom name may end in a wildcard (``#`` any digits, ``*`` anything, ``%`` one character): ``10CA-HA#`` is the
    coupling to glycine HA2/HA3, predicted as their mean (see ``RDCObservable``).  Lines whose label names one atom
    (``2N 112.1``) are residual chemical-shift-anisotropy data, not RDCs, and are ignored, as are blank and comment
    lines.  Anything else raises ``RDCError`` naming the file and line; so does a file without any RDC.
    """
    path = Path(path)
    couplings: list[Coupling] = []
    seen: dict[tuple, str] = {}
    n_csa = 0
    for lineno, where, line in _table_rows(path, ".pa"):
        fields = line.split()
        label = fields[0]
        if _PA_CSA.match(label):  # one atom: a RACS/CSA value, not an RDC
            n_csa += 1
            continue
        m = _PA_LABEL.match(label)
        if m is None:
            raise RDCError(
                f"{where}: cannot read the interaction label {label!r}; expected e.g. '14N-H', '14CA-HA', '10CA-HA#', "
                "'14C-15N', 'A.14N-H' or '14N-C-1'"
            )
        if len(fields) not in (2, 3):
            raise RDCError(
                f"{where}: expected '<label> <value Hz> [<error Hz>]', got {len(fields)} fields in {line!r}"
            )
        for name in (m["a1"], m["a2"]):
            _check_atom_name(name, where, label)
        value, error = _value_and_error(fields[1:], where, "'<label> <value Hz> [<error Hz>]'")
        r1 = int(m["r1"])
        r2 = int(m["r2"]) if m["r2"] is not None else r1
        if m["off"] is not None:
            r2 += int(m["off"])
        atom1 = AtomRef(m["c1"], r1, m["a1"].upper())
        atom2 = AtomRef(m["c2"] or m["c1"], r2, m["a2"].upper())
        _add_once(couplings, seen, Coupling(atom1, atom2, value, error, where), label, f"at line {lineno}",
                  "; keep one of the two")
    if not couplings:
        extra = f" (only {n_csa} one-atom CSA lines)" if n_csa else ""
        raise RDCError(
            f"{path}: no RDCs found{extra}; expected lines '<label> <value Hz> [<error Hz>]' such as '14N-H -12.5'"
        )
    return couplings


# PALES dipolar-coupling table columns (Zweckstetter, Nat. Protoc. 3, 679 (2008)): VARS names them, FORMAT gives
# C formats (not needed: rows are white-space separated).
_PALES_REQUIRED = ("RESID_I", "ATOMNAME_I", "RESID_J", "ATOMNAME_J")


def read_pales(path: str | Path) -> list[Coupling]:
    """Read RDCs from a PALES dipolar-coupling table (the ``-inD`` input of PALES, also what it writes).

    Layout: optional ``REMARK`` and ``DATA SEQUENCE ...`` lines, one ``VARS`` line naming the columns, e.g.
    ``VARS RESID_I RESNAME_I ATOMNAME_I RESID_J RESNAME_J ATOMNAME_J D DD W``, a ``FORMAT`` line (C formats; the
    rows are read as white-space separated fields), then one row per coupling.  Columns used: RESID_I/J,
    ATOMNAME_I/J (required), RESNAME_I/J (checked against the model), SEGNAME_I/J (chain), the coupling D (Hz; the
    ``D_OBS`` column when a PALES output table has one), its error DD (Hz; > 0) and the weight W (>= 0; read and
    checked, not used: weights here come from the errors or ``sigma``).  Other columns (DI, D_DIFF, ...) are ignored.
    Amide H may be named HN or H; ``HA#``-style wildcards as in ``read_pa``.  Errors name the file and line.
    """
    path = Path(path)
    columns: list[str] | None = None
    couplings: list[Coupling] = []
    seen: dict[tuple, str] = {}
    for lineno, where, line in _table_rows(path, "PALES dipolar-coupling table"):
        fields = line.split()
        head = fields[0].upper()
        if head == "DATA" or head == "FORMAT":
            continue
        if head == "VARS":
            if columns is not None:
                raise RDCError(f"{where}: a second VARS line; a PALES table has one (split the file per data set)")
            columns = [f.upper() for f in fields[1:]]
            missing = [c for c in _PALES_REQUIRED if c not in columns]
            if "D" not in columns and "D_OBS" not in columns:
                missing.append("D")
            if missing:
                raise RDCError(
                    f"{where}: the VARS line lacks column(s) {', '.join(missing)}; expected e.g. 'VARS RESID_I "
                    "RESNAME_I ATOMNAME_I RESID_J RESNAME_J ATOMNAME_J D DD W'"
                )
            continue
        if columns is None:
            raise RDCError(
                f"{where}: data before the VARS line; a PALES table starts with 'VARS RESID_I RESNAME_I ATOMNAME_I "
                "RESID_J RESNAME_J ATOMNAME_J D DD W' and a FORMAT line"
            )
        if len(fields) != len(columns):
            raise RDCError(
                f"{where}: {len(fields)} fields but the VARS line names {len(columns)} columns "
                f"({' '.join(columns)}); fix the row"
            )
        row = dict(zip(columns, fields))
        atoms = []
        for side in ("I", "J"):
            try:
                res = int(row[f"RESID_{side}"])
            except ValueError:
                raise RDCError(f"{where}: RESID_{side} {row[f'RESID_{side}']!r} is not an integer residue number") from None
            name = row[f"ATOMNAME_{side}"].upper()
            _check_atom_name(name, where, f"ATOMNAME_{side} {name}")
            chain = row.get(f"SEGNAME_{side}")
            res_name = row.get(f"RESNAME_{side}")
            atoms.append(AtomRef(chain if chain not in (None, "-", ".") else None, res, name,
                                 res_name.upper() if res_name else None))
        value_col = "D_OBS" if "D_OBS" in row else "D"
        vals = [row[value_col]] + ([row["DD"]] if "DD" in row else [])
        value, error = _value_and_error(vals, where, f"numbers in columns {value_col}" + (" DD" if "DD" in row else ""))
        if "W" in row:
            try:
                w = float(row["W"])
            except ValueError:
                w = float("nan")
            if not (math.isfinite(w) and w >= 0):
                raise RDCError(f"{where}: the weight W must be a finite number >= 0, got {row['W']!r}")
        _add_once(couplings, seen, Coupling(atoms[0], atoms[1], value, error, where), f"{atoms[0]}-{atoms[1]}",
                  f"at line {lineno}")
    if columns is None:
        raise RDCError(
            f"{path}: no VARS line; not a PALES dipolar-coupling table (expected 'VARS RESID_I RESNAME_I ATOMNAME_I "
            "RESID_J RESNAME_J ATOMNAME_J D DD W', a FORMAT line and rows)"
        )
    if not couplings:
        raise RDCError(f"{path}: the PALES table has a VARS line but no coupling rows")
    return couplings


def _pair_key(a: AtomRef, b: AtomRef) -> tuple:
    one = (a.chain, a.res_seq, _canonical_name(a.name))
    two = (b.chain, b.res_seq, _canonical_name(b.name))
    return tuple(sorted([one, two], key=str))


def read_nmrstar(path: str | Path, list_id: str | None = None) -> list[Coupling]:
    """Read RDCs from the ``_RDC`` loop of an NMR-STAR 3 file (BMRB ``RDC_list`` save frame), parsed with gemmi
    through ``observables.nmr.read_star``.

    Tags used: ``_RDC.Atom_ID_1/2`` and ``_RDC.Val`` (required); residue numbers from ``_RDC.Auth_seq_ID_1/2`` when
    present and set, else ``_RDC.Comp_index_ID_1/2``, else ``_RDC.Seq_ID_1/2``; optional ``_RDC.Val_err`` (Hz),
    ``_RDC.ID`` (to name rows in messages) and ``_RDC.RDC_list_ID``.  A file with several lists (several alignment
    media, each with its own tensor) needs ``list_id``.  Chains are not read: the observable's ``chain`` applies.
    """
    path = Path(path)
    _read_text(path, "NMR-STAR 3 (_RDC loop)")  # a missing, binary or undecodable file: one line naming it
    try:  # BMRB files' bare $frame references are quoted first (gemmi's CIF parser rejects them)
        doc = read_star(path)
    except NmrDataError as exc:  # names the file and line
        raise RDCError(str(exc)) from None
    loops = []
    for block in doc:
        for item in _items_with_frames(block):
            if item.loop is not None and any(tag.lower().startswith("_rdc.") for tag in item.loop.tags):
                loops.append(item)
    if not loops:
        raise RDCError(
            f"{path}: no _RDC loop found; expected an NMR-STAR 3 'loop_ _RDC.ID _RDC.Atom_ID_1 ... _RDC.Val' "
            "(or give a .pa or PALES file)"
        )
    rows_by_list: dict[str, list[tuple[int, dict[str, str]]]] = {}
    for n_loop, item in enumerate(loops):
        loop = item.loop
        tags = [tag.split(".", 1)[1].lower() if "." in tag else tag.lower() for tag in loop.tags]
        for required in ("atom_id_1", "atom_id_2", "val"):
            if required not in tags:
                raise RDCError(
                    f"{path}:{item.line_number}: the _RDC loop has no _RDC.{required.capitalize()} column; add it"
                )
        width, values = loop.width(), list(loop.values)
        for i in range(loop.length()):
            row = {tags[j]: gemmi.cif.as_string(values[i * width + j]) for j in range(width)}
            key = row.get("rdc_list_id", "") if row.get("rdc_list_id", "") not in _NULL else str(n_loop + 1)
            rows_by_list.setdefault(key, []).append((item.line_number, row))
    if list_id is None:
        if len(rows_by_list) > 1:
            raise RDCError(
                f"{path} has {len(rows_by_list)} RDC lists (IDs {', '.join(rows_by_list)}), each from its own "
                "alignment: choose one with rdc_list=<ID>"
            )
        rows = next(iter(rows_by_list.values()))
    else:
        if str(list_id) not in rows_by_list:
            raise RDCError(f"{path}: no RDC list with ID {list_id!r}; the file has {', '.join(rows_by_list)}")
        rows = rows_by_list[str(list_id)]

    couplings: list[Coupling] = []
    seen: dict[tuple, str] = {}
    for k, (loop_line, row) in enumerate(rows, start=1):
        rid = row.get("id", "")
        where = f"{path}: _RDC loop at line {loop_line}, row {k}" + (f" (_RDC.ID {rid})" if rid not in _NULL else "")
        atoms = []
        for side in ("1", "2"):
            name = row[f"atom_id_{side}"]
            seq = None
            for tag in (f"auth_seq_id_{side}", f"comp_index_id_{side}", f"seq_id_{side}"):
                if row.get(tag, ".") not in _NULL:
                    seq = row[tag]
                    break
            if name in _NULL or seq is None:
                raise RDCError(f"{where}: atom {side} needs an Atom_ID and a residue number (Auth_seq_ID/Comp_index_ID)")
            _check_atom_name(name, where, f"_RDC.Atom_ID_{side} {name}")
            comp = row.get(f"comp_id_{side}", ".")
            try:
                atoms.append(AtomRef(None, int(seq), name.upper(), None if comp in _NULL else comp.upper()))
            except ValueError:
                raise RDCError(f"{where}: residue number {seq!r} of atom {side} is not an integer") from None
        try:
            value = float(row["val"])
        except ValueError:
            raise RDCError(f"{where}: _RDC.Val {row['val']!r} is not a number (Hz)") from None
        error = None
        if row.get("val_err", ".") not in _NULL:
            try:
                error = float(row["val_err"])
            except ValueError:
                raise RDCError(f"{where}: _RDC.Val_err {row['val_err']!r} is not a number (Hz)") from None
            if not (math.isfinite(error) and error > 0):
                raise RDCError(f"{where}: _RDC.Val_err must be a finite number > 0 Hz, got {row['val_err']!r}")
        if not math.isfinite(value):
            raise RDCError(f"{where}: _RDC.Val must be a finite number of Hz, got {row['val']!r}")
        _add_once(couplings, seen, Coupling(atoms[0], atoms[1], value, error, where), f"{atoms[0]}-{atoms[1]}",
                  f"({where})")
    return couplings


def _items_with_frames(block):
    """All items of a block, descending into save frames."""
    for item in block:
        if item.frame is not None:
            yield from _items_with_frames(item.frame)
        else:
            yield item


_STAR_SUFFIXES = (".str", ".star", ".nmrstar", ".nef", ".cif")


def read_rdc(path: str | Path, format: str = "auto", list_id: str | None = None) -> list[Coupling]:
    """Read RDCs: ``format`` "pa" (``read_pa``), "pales" (``read_pales``), "star" (NMR-STAR 3, ``read_nmrstar``) or
    "auto": NMR-STAR by suffix (.str/.star/.nmrstar/.nef/.cif); otherwise by content -- a ``VARS`` line means a PALES
    table, an ``_RDC.`` tag NMR-STAR, anything else .pa."""
    path = Path(path)
    fmt = str(format).lower()
    if fmt not in ("auto", "pa", "pales", "star"):
        raise RDCError(f"unknown RDC format {format!r} for {path}; set observables.rdc.format to auto, pa, pales or star")
    if fmt == "auto":
        if path.suffix.lower() in _STAR_SUFFIXES:
            fmt = "star"
        else:
            head = _read_text(path, ".pa, PALES or NMR-STAR")
            if re.search(r"^\s*VARS\s", head, flags=re.MULTILINE | re.IGNORECASE):
                fmt = "pales"
            elif re.search(r"^\s*_RDC\.", head, flags=re.MULTILINE | re.IGNORECASE):
                fmt = "star"
            else:
                fmt = "pa"
    if fmt in ("pa", "pales") and list_id is not None:
        raise RDCError(f"{path}: rdc_list applies to NMR-STAR files only; unset observables.rdc.rdc_list")
    if fmt == "pa":
        return read_pa(path)
    if fmt == "pales":
        return read_pales(path)
    return read_nmrstar(path, list_id=list_id)


# ----------------------------------------------------------------------------------------------------------------
# Matching couplings to the model's atoms
# ----------------------------------------------------------------------------------------------------------------

# How a coupling to a wildcard atom (HA#, HB*, ...) is predicted from the couplings to its members (see RDCObservable).
WILDCARD_AVERAGING = ("mean", "sum")

_RESIDUE_ALIASES = {"HSD": "HIS", "HSE": "HIS", "HSP": "HIS", "HID": "HIS", "HIE": "HIS", "HIP": "HIS",
                    "CYX": "CYS", "CYM": "CYS", "MSE": "MET"}


def _canonical_name(name: str) -> str:
    """Atom-name aliases: the amide H is H (HN in some programs)."""
    name = str(name).strip().upper()
    return "H" if name == "HN" else name


def _bond_type_name(name: str) -> str:
    name = _canonical_name(str(name).rstrip(_WILDCARDS))
    return "HA" if name in ("HA2", "HA3") else name


def bond_type(name_1: str, name_2: str, lengths: Mapping[str, float]) -> str | None:
    """The key of ``lengths`` ("A-B", order-free) for a pair of atom names, or None."""
    a, b = _bond_type_name(name_1), _bond_type_name(name_2)
    for key in (f"{a}-{b}", f"{b}-{a}"):
        if key in lengths:
            return key
    return None


def _wildcard(name: str) -> re.Pattern | None:
    """The whole-name pattern of an atom name with wildcards (# any digits, * anything, % one character), or None."""
    if not any(ch in _WILDCARDS for ch in name):
        return None
    parts = {"#": "[0-9]*", "*": ".*", "%": "."}
    return re.compile("".join(parts.get(ch, re.escape(ch)) for ch in name.upper()))


def _known_names(res_name: str) -> set[str] | None:
    """Atom names of a standard residue type (heavy atoms and protons, IUPAC), or None for other residues."""
    from observables.hydrogens import PROTON_TEMPLATES

    sites = PROTON_TEMPLATES.get(res_name)
    if sites is None:
        return None
    names = {"N", "CA", "C", "O", "OXT", "H", "H1", "H2", "H3"}
    for site in sites:
        names |= {site.name, site.parent, *(r.lstrip("-") for r in site.refs)}
    return names


def _placeable(res_name: str) -> tuple[str, ...]:
    """Protons this module places from the backbone when the model lacks them."""
    if res_name == "GLY":
        return ("H", "HA2", "HA3")
    return ("HA",) if res_name == "PRO" else ("H", "HA")


class _Points:
    """Bookkeeping of the points the bond vectors join: model atoms, placed amide H, placed HA, placed Gly HA2/HA3."""

    def __init__(self):
        self.atoms: list[int] = []
        self.amide: list[tuple[int, int, int]] = []  # (C_prev, N, CA)
        self.ha: list[tuple[int, int, int, int]] = []  # (N, CA, C, CB)
        self.gly: list[tuple[int, int, int, int]] = []  # (CA, N, C, sign): sign -1 = HA2, +1 = HA3
        self._index: dict[tuple, int] = {}

    def add(self, kind: str, key: tuple) -> tuple[str, int]:
        tag = (kind, key)
        if tag not in self._index:
            table = {"atom": self.atoms, "amide": self.amide, "ha": self.ha, "gly": self.gly}[kind]
            self._index[tag] = len(table)
            table.append(key[0] if kind == "atom" else key)
        return kind, self._index[tag]

    def offsets(self) -> dict[str, int]:
        n_atom, n_amide, n_ha = len(self.atoms), len(self.amide), len(self.ha)
        return {"atom": 0, "amide": n_atom, "ha": n_atom + n_amide, "gly": n_atom + n_amide + n_ha}


class RDCObservable:
    """Likelihood of measured RDCs given a weighted ensemble, with one alignment tensor fitted inside the loss.

    Built from the model's atoms and ``data`` (a .pa, PALES or NMR-STAR path, or a sequence of ``Coupling``).
    Options: ``format`` "auto" | "pa" | "pales" | "star"; ``sigma`` noise per coupling in Hz (a number, or a mapping
    from bond type such as "N-H" or "CA-HA" to Hz); ``file_errors`` use the file's per-coupling errors where given
    instead of ``sigma``; ``chain`` the model chain the data refer to (None: the model's only polymer chain);
    ``rdc_list`` which NMR-STAR RDC list to use; ``bond_lengths`` overrides/extra entries of ``BOND_LENGTHS`` (A,
    keyed "A-B" by atom names); ``model_hydrogens`` use H/HN/HA coordinates of the model when it has them (else
    always place them); ``place_hydrogens`` place missing H from the backbone (else those couplings are unmapped);
    ``wildcard_average`` "mean" | "sum" (below).

    Atom pairs: a pair whose type is in ``bond_lengths`` (N-H, CA-HA, N-CA, CA-C, C-N, CA-CB) has that fixed
    internuclear distance; any other pair of 1H/13C/15N atoms (HN-HA, H-H, two-bond C-H, ...) uses its distance in
    the model, D = D_max(r) u^T S u with D_max ~ r^-3 averaged over members together with the angular term.

    Wildcards (``10CA-HA#``: the coupling to glycine HA2 and HA3; ``#`` any digits, ``*`` anything, ``%`` one
    character): the prediction is the **mean** of the couplings to the matching atoms (``wildcard_average="mean"``),
    D(CA-HA#) = (D(CA-HA2) + D(CA-HA3)) / 2, each with its own fixed CA-HA length.  Why the mean: it is the convention
    of PALES and Xplor-NIH for pseudo-atoms (a methyl's coupling is the average over its three protons, which is what
    its single splitting measures), it keeps the coupling on the scale of one bond (so ``sigma``, Q factors and the
    bond-type ratios mean the same as for a single C-H), and when the two protons are indistinguishable (degenerate
    Gly HA2/HA3) the observed effective splitting is their average.  Data sets that report the *sum* of the two
    couplings (some CH2 measurements do) set ``wildcard_average="sum"``.  Members are resolved in the model (its own
    protons) and among the placed protons (H, HA, Gly HA2/HA3); a wildcard is used only when every member can be
    built, else the coupling is unmapped (averaging over a subset would change its meaning).

    Unmapped couplings are counted and listed, never dropped silently: ``unmapped`` (label, reason) pairs, reasons
    "residue absent", "atom absent", "unknown atom name", "no amide H" (proline, first residue), "cannot place H"
    (heavy atoms missing), "placement off"; the report's ``n_unmapped``, ``unmapped`` and ``unmapped_reasons``
    (``observables.nmr.unmapped_report``), and the older ``n_missing`` (residue absent) and ``n_skipped`` (the rest).

    See the module docstring for the physics.  ``couplings`` are the couplings used (in order of ``observed``),
    ``skipped`` the (label, reason) pairs left out other than absent residues, ``n_missing`` those whose residue is
    not in the model.
    """

    name = "rdc"
    headline = ("chi2", "q_factor", "rmsd")

    @classmethod
    def synthetic_data(cls, atoms, states, occupancies, directory, *, seed: int = 0, **_) -> Path:
        """The demo's couplings: ``synthetic_nh_rdcs`` of the mixture, written as two_state_nh.pa."""
        return synthetic_nh_rdcs(atoms, states, occupancies, Path(directory) / "two_state_nh.pa", seed=seed)

    def __init__(
        self,
        atoms: AtomInfo,
        data: str | Path | Sequence[Coupling] | None = None,
        format: str = "auto",
        sigma: float | Mapping[str, float] = 1.0,
        file_errors: bool = False,
        chain: str | None = None,
        rdc_list: str | int | None = None,
        bond_lengths: Mapping[str, float] | None = None,
        model_hydrogens: bool = True,
        place_hydrogens: bool = True,
        wildcard_average: str = "mean",
    ):
        if data is None:
            raise RDCError(
                "the rdc observable needs data: set observables.rdc.data to a .pa, PALES or NMR-STAR (_RDC loop) "
                "file, or pass a list of Coupling"
            )
        if wildcard_average not in WILDCARD_AVERAGING:
            raise RDCError(
                f"observables.rdc.wildcard_average must be one of {', '.join(WILDCARD_AVERAGING)}, "
                f"got {wildcard_average!r}"
            )
        self.wildcard_average = wildcard_average
        if isinstance(data, (str, Path)):
            couplings = read_rdc(data, format=format, list_id=None if rdc_list is None else str(rdc_list))
            origin = str(data)
        else:
            couplings = list(data)
            origin = "the given couplings"
            if not all(isinstance(c, Coupling) for c in couplings):
                raise RDCError("data must be a path or a sequence of observables.rdc.Coupling")

        lengths = dict(BOND_LENGTHS)
        for key, value in (bond_lengths or {}).items():
            try:
                ok = float(value) > 0 and math.isfinite(float(value))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise RDCError(f"observables.rdc.bond_lengths[{key!r}] must be a number > 0 A, got {value!r}")
            lengths[str(key).upper()] = float(value)
        self.bond_lengths = lengths
        self.reference_dmax = dipolar_constant("N", "H", lengths["N-H"])  # Hz, normalises T to N-H

        chain = self._data_chain(atoms, chain)
        self.chain = chain
        index = {}
        for i, (c, r, a) in enumerate(zip(atoms.chain_id, atoms.res_seq, atoms.atom_name)):
            index.setdefault((str(c), int(r), _canonical_name(a)), i)
        residues = {(c, r) for c, r, _ in index}
        names_in: dict[tuple[str, int], list[str]] = {}
        for c, r, a in index:
            names_in.setdefault((c, r), []).append(a)
        res_name = {(str(c), int(r)): str(n).strip().upper() for c, r, n in zip(atoms.chain_id, atoms.res_seq, atoms.res_name)}
        elements = np.asarray(atoms.element).astype(str)
        model_h = bool(model_hydrogens)

        points = _Points()
        pair_ends, pair_coupling, pair_factor, pair_scale, pair_model_r = [], [], [], [], []
        used, skipped, missing, missing_why = [], [], [], []
        scale_by_type: dict[str, float] = {}
        model_distance_types: set[str] = set()
        for cpl in couplings:
            refs = [AtomRef(a.chain or chain, a.res_seq, _canonical_name(a.name), a.res_name)
                    for a in (cpl.atom1, cpl.atom2)]
            for ref in refs:
                _check_atom_name(ref.name, cpl.source or origin, cpl.label)
            absent = [r for r in refs if (r.chain, r.res_seq) not in residues]
            if absent:
                missing.append(cpl.label)
                missing_why.append(f"residue absent ({', '.join(f'{r.chain}.{r.res_seq}' for r in absent)})")
                continue
            for ref in refs:
                model_name = res_name.get((ref.chain, ref.res_seq), "")
                if ref.res_name and _RESIDUE_ALIASES.get(ref.res_name, ref.res_name) != _RESIDUE_ALIASES.get(
                    model_name, model_name
                ):
                    raise RDCError(
                        f"{cpl.source}: residue {ref.chain}.{ref.res_seq} is {ref.res_name} in the data but "
                        f"{model_name} in the model; the residue numbering of data and model differ (renumber one "
                        "of them, or check observables.rdc.chain)"
                    )
            members, reason = [], None
            for ref in refs:
                found, why = self._members(ref, index, names_in, res_name, points, model_h, place_hydrogens)
                if why is not None:
                    reason = why
                    break
                members.append(found)
            if reason is not None:
                skipped.append((cpl.label, reason))
                continue
            btype = bond_type(refs[0].name, refs[1].name, lengths)
            fixed = btype is not None
            if not fixed:
                btype = "-".join(sorted((_bond_type_name(refs[0].name), _bond_type_name(refs[1].name))))  # order-free
                model_distance_types.add(btype)
            pairs = [(p1, p2, n1, n2) for p1, n1 in members[0] for p2, n2 in members[1]]
            if any(p1 == p2 for p1, p2, _, _ in pairs):
                raise RDCError(f"{cpl.source}: coupling {cpl.label} joins an atom to itself; fix the label")
            factor = 1.0 / len(pairs) if self.wildcard_average == "mean" else 1.0
            k = len(used)
            for p1, p2, n1, n2 in pairs:
                el = [self._element_of(AtomRef(ref.chain, ref.res_seq, n), index, elements)
                      for ref, n in ((refs[0], n1), (refs[1], n2))]
                try:
                    dmax = dipolar_constant(el[0], el[1], lengths[btype] if fixed else 1.0)
                except RDCError as exc:
                    raise RDCError(f"{cpl.source}: coupling {cpl.label}: {exc}") from None
                scale = dmax / self.reference_dmax
                scale_by_type.setdefault(btype, scale if fixed else float("nan"))
                pair_ends.append((p1, p2))
                pair_coupling.append(k)
                pair_factor.append(factor)
                pair_scale.append(scale)
                pair_model_r.append(not fixed)
            used.append((cpl, btype))

        self.n_missing = len(missing)
        self.missing = missing
        self.skipped = skipped
        self.unmapped = list(zip(missing, missing_why)) + list(skipped)
        self.model_distance_types = sorted(model_distance_types)
        if missing:
            warnings.warn(
                f"{origin}: {len(missing)} RDC(s) name residues that are not in the model (chain {chain}) and are "
                f"dropped: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}",
                stacklevel=2,
            )
        if skipped:
            reasons: dict[str, list[str]] = {}
            for label, why in skipped:
                reasons.setdefault(why, []).append(label)
            text = "; ".join(f"{why}: {', '.join(labels)}" for why, labels in reasons.items())
            warnings.warn(f"{origin}: {len(skipped)} RDC(s) skipped -- {text}", stacklevel=2)
        if len(used) < MIN_COUPLINGS:
            first = "; ".join(f"{label}: {why}" for label, why in self.unmapped[:3])
            raise RDCError(
                f"{origin}: only {len(used)} RDC(s) match the model (chain {chain}); the alignment tensor has 5 "
                f"parameters, so at least {MIN_COUPLINGS} are needed ({len(missing)} not in the model, "
                f"{len(skipped)} skipped{': ' + first if first else ''}); check the residue numbering and chain"
            )

        self.couplings = [c for c, _ in used]
        self.bond_types = [t for _, t in used]
        self.scale_by_type = scale_by_type
        sig = []
        for cpl, btype in used:
            if file_errors and cpl.error is not None:
                sig.append(cpl.error)
            elif isinstance(sigma, Mapping):
                if btype not in sigma:
                    raise RDCError(
                        f"observables.rdc.sigma has no entry for bond type {btype} (coupling {cpl.label}); give one "
                        "in Hz"
                    )
                sig.append(_number(sigma[btype], f"observables.rdc.sigma[{btype!r}]"))
            else:
                sig.append(_number(sigma, "observables.rdc.sigma"))
        sig = np.asarray(sig, dtype=np.float64)
        if not np.all(sig > 0) or not np.all(np.isfinite(sig)):
            raise RDCError(f"observables.rdc.sigma must be finite and > 0 Hz, got {sigma}")
        self.sigma = sig
        self.observed = np.array([c.value for c in self.couplings], dtype=np.float64)
        self.n = len(self.couplings)

        offs = points.offsets()
        ends_idx = np.array([[offs[kind] + i for kind, i in pair] for pair in pair_ends], dtype=np.int32)
        atom_idx = np.array(points.atoms, dtype=np.int32)
        amide_idx = np.array(points.amide, dtype=np.int32).reshape(-1, 3)
        ha_idx = np.array(points.ha, dtype=np.int32).reshape(-1, 4)
        gly_tab = np.array(points.gly, dtype=np.int32).reshape(-1, 4)
        gly_idx, gly_sign = gly_tab[:, :3], gly_tab[:, 3].astype(np.float32)
        p_scale = np.array(pair_scale, dtype=np.float32)
        p_factor = np.array(pair_factor, dtype=np.float32)
        p_model_r = np.array(pair_model_r, dtype=bool)
        p_coupling = np.array(pair_coupling, dtype=np.int32)
        any_model_r = bool(p_model_r.any())
        n_couplings = self.n
        d_obs = jnp.asarray(self.observed, dtype=jnp.float32)
        inv_sigma = jnp.asarray(1.0 / sig, dtype=jnp.float32)
        end1, end2 = ends_idx[:, 0], ends_idx[:, 1]

        def member_rows(coords):  # [E, N, 3] -> [E, M, 5]
            parts = [coords[:, atom_idx]]
            if len(amide_idx):
                parts.append(place_amide_h(coords, amide_idx[:, 1], amide_idx[:, 2], amide_idx[:, 0]))  # N, CA, C(i-1)
            if len(ha_idx):
                parts.append(place_ha(*(coords[:, ha_idx[:, j]] for j in range(4))))
            if len(gly_idx):
                parts.append(place_glycine_ha(*(coords[:, gly_idx[:, j]] for j in range(3)), gly_sign))
            pts = jnp.concatenate(parts, axis=1)
            vec = pts[:, end2] - pts[:, end1]  # [E, P, 3]
            rows = design_rows(vec, p_scale * p_factor)
            if any_model_r:  # pairs without a fixed length: D_max ~ r^-3 from the model (r in A)
                r2 = jnp.sum(vec * vec, axis=-1) + 1e-12
                rows = rows * jnp.where(p_model_r, r2**-1.5, 1.0)[..., None]
            out = jnp.zeros(rows.shape[:-2] + (n_couplings, 5), rows.dtype)
            return out.at[..., p_coupling, :].add(rows)

        def fit_rows(rows, weights):
            avg = jnp.einsum("e,emk->mk", weights.astype(rows.dtype), rows)
            return fit_tensor(avg, d_obs.astype(rows.dtype), inv_sigma.astype(rows.dtype))

        def loglik_rows(rows, weights):
            _, d_calc = fit_rows(rows, weights)
            r = (d_obs.astype(d_calc.dtype) - d_calc) * inv_sigma.astype(d_calc.dtype)
            return -0.5 * jnp.sum(r * r)

        self._member_rows_fn = member_rows
        self._member_rows = jax.jit(member_rows)
        self._fit = jax.jit(lambda coords, weights: fit_rows(member_rows(coords), weights))
        self._log_likelihood = jax.jit(lambda coords, weights: loglik_rows(member_rows(coords), weights))
        self._log_likelihood_from_rows = loglik_rows

    # -- construction helpers ------------------------------------------------------------------------------------

    @staticmethod
    def _data_chain(atoms: AtomInfo, chain: str | None) -> str:
        chains = list(dict.fromkeys(str(c) for c, a in zip(atoms.chain_id, atoms.atom_name) if str(a).strip() == "CA"))
        if chain is not None:
            if str(chain) not in {str(c) for c in atoms.chain_id}:
                raise RDCError(
                    f"observables.rdc.chain {chain!r} is not in the model (chains with CA atoms: "
                    f"{', '.join(chains) or 'none'})"
                )
            return str(chain)
        if len(chains) != 1:
            raise RDCError(
                f"the model has {len(chains)} chains with CA atoms ({', '.join(chains)}); say which one the RDC data "
                "refer to with observables.rdc.chain=<id>"
            )
        return chains[0]

    @staticmethod
    def _element_of(ref: AtomRef, index: dict, elements: np.ndarray) -> str:
        i = index.get((ref.chain, ref.res_seq, ref.name))
        if i is not None and elements[i].strip():
            return elements[i]
        return ref.name[0]  # placed hydrogens (H, HA), or a model without element symbols

    def _members(self, ref: AtomRef, index, names_in, res_name, points: _Points, model_h: bool, place: bool):
        """([(point, atom name), ...], None) for ``ref`` (several for a wildcard), or (None, reason)."""
        pattern = _wildcard(ref.name)
        if pattern is None:
            point, why = self._point(ref, index, res_name, points, model_h, place)
            return (None, why) if point is None else ([(point, ref.name)], None)
        resn = res_name.get((ref.chain, ref.res_seq), "?")
        present = names_in.get((ref.chain, ref.res_seq), [])
        candidates = list(dict.fromkeys([*present, *_placeable(resn)]))
        matches = [n for n in candidates if pattern.fullmatch(n)]
        if not matches:
            known = _known_names(resn)
            if known is not None and not any(pattern.fullmatch(n) for n in known):
                return None, f"unknown atom name ({ref.name} matches no atom of {resn})"
            return None, (f"atom absent ({ref.name} of {resn} {ref.res_seq}: no model atom or placeable proton "
                          "matches; only H, HA and Gly HA2/HA3 are placed)")
        out = []
        for name in matches:
            point, why = self._point(AtomRef(ref.chain, ref.res_seq, name), index, res_name, points, model_h, place)
            if point is None:
                return None, why
            out.append((point, name))
        return out, None

    @staticmethod
    def _point(ref: AtomRef, index, res_name, points: _Points, model_hydrogens: bool, place: bool):
        """(kind, index) of the point for ``ref``, or (None, reason)."""
        c, r, name = ref.chain, ref.res_seq, ref.name
        is_h = name.startswith("H")
        key = (c, r, name)
        if key in index and (model_hydrogens or not is_h):
            return points.add("atom", (index[key],)), None
        resn = res_name.get((c, r), "?")
        if name == "H":
            if resn == "PRO":
                return None, "no amide H (proline)"
            if not place:
                return None, "placement off (no amide H in the model; place_hydrogens is false)"
            prev = index.get((c, r - 1, "C"))
            n, ca = index.get((c, r, "N")), index.get((c, r, "CA"))
            if prev is None:
                return None, "no amide H (first residue of the chain: no C of residue i-1 to place it)"
            if n is None or ca is None:
                return None, "cannot place H (N or CA missing from the model)"
            return points.add("amide", (prev, n, ca)), None
        if name == "HA" and resn != "GLY":
            if not place:
                return None, "placement off (no HA in the model; place_hydrogens is false)"
            found = [index.get((c, r, a)) for a in ("N", "CA", "C", "CB")]
            if any(i is None for i in found):
                return None, "cannot place H (N, CA, C or CB missing from the model for HA)"
            return points.add("ha", tuple(found)), None
        if name in ("HA2", "HA3") and resn == "GLY":
            if not place:
                return None, f"placement off (no {name} in the model; place_hydrogens is false)"
            found = [index.get((c, r, a)) for a in ("CA", "N", "C")]
            if any(i is None for i in found):
                return None, f"cannot place H (N, CA or C missing from the model for {name})"
            return points.add("gly", (*found, -1 if name == "HA2" else 1)), None
        if is_h and key in index:  # a model hydrogen that model_hydrogens=False asks to ignore
            return None, f"atom absent ({name} is a model hydrogen and model_hydrogens is false; only H, HA are placed)"
        known = _known_names(resn)
        if known is not None and name not in known:
            hint = "; glycine has HA2/HA3 (HA# for their mean)" if resn == "GLY" and name.startswith("HA") else ""
            return None, f"unknown atom name ({name} is not an atom of {resn}{hint})"
        return None, f"atom absent ({name} of {resn} {r} is not in the model)"

    # -- the observable ------------------------------------------------------------------------------------------

    def member_predictions(self, coords) -> jnp.ndarray:
        """Each member's design rows ``[E, M, 5]``; the ensemble's are ``weights @`` these (linear in the weights),
        which makes refining member weights of a fixed ensemble cheap (``log_likelihood_from_predictions``)."""
        return self._member_rows(jnp.asarray(coords, dtype=jnp.float32))

    def log_likelihood_from_predictions(self, predictions, weights) -> jnp.ndarray:
        """``log_likelihood`` from ``member_predictions``: equal to ``log_likelihood(coords, weights)``."""
        return self._log_likelihood_from_rows(predictions, weights)

    def predict(self, coords, weights) -> jnp.ndarray:
        """Back-calculated couplings ``[M]`` (Hz, order of ``observed``) with the tensor fitted to this ensemble."""
        return self._fit(coords, weights)[1]

    def log_likelihood(self, coords, weights) -> jnp.ndarray:
        """-1/2 sum ((D_obs - D_calc) / sigma)^2 with the best-fit tensor; coords [E, N, 3] (A), weights [E]."""
        return self._log_likelihood(coords, weights)

    def tensor(self, coords, weights) -> np.ndarray:
        """The fitted alignment tensor T (3x3, Hz, N-H normalised: D_NH = u^T T u) of the weighted ensemble."""
        s, _ = self._fit(coords, weights)
        return saupe_to_matrix(np.asarray(s, dtype=np.float64))

    def report(self, coords, weights) -> dict:
        """Q factor, Da (Hz, N-H), Dr, rhombicity, RMSD (Hz), chi2 (mean squared normalised residual), n; the
        couplings that could not be mapped onto the model (``n_unmapped``, ``unmapped``, ``unmapped_reasons``; also
        split as ``n_missing``: residue not in the model, and ``n_skipped``: the rest); per-type Q factors when there
        are several bond types; ``model_distance_types`` (pair types whose distance comes from the model)."""
        s, d_calc = self._fit(coords, weights)
        d_calc = np.asarray(d_calc, dtype=np.float64)
        res = self.observed - d_calc
        params = tensor_parameters(saupe_to_matrix(np.asarray(s, dtype=np.float64)))
        out = {
            "q_factor": float(np.sqrt(np.sum(res**2) / np.sum(self.observed**2))),
            "da": float(params["da"]),
            "dr": float(params["dr"]),
            "rhombicity": float(params["rhombicity"]),
            "rmsd": float(np.sqrt(np.mean(res**2))),
            "chi2": float(np.mean((res / self.sigma) ** 2)),
            "n": float(self.n),
            "n_missing": float(self.n_missing),
            "n_skipped": float(len(self.skipped)),
            **unmapped_report(self.unmapped),
        }
        if self.model_distance_types:
            out["model_distance_types"] = list(self.model_distance_types)
        types = np.asarray(self.bond_types)
        if len(set(self.bond_types)) > 1:
            for t in sorted(set(self.bond_types)):
                sel = types == t
                out[f"q_factor_{t}"] = float(np.sqrt(np.sum(res[sel] ** 2) / np.sum(self.observed[sel] ** 2)))
        return out


def _number(value, option: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RDCError(f"{option} must be a number of Hz, got {value!r}") from None


def synthetic_nh_rdcs(atoms: AtomInfo, states, occupancies, path, *, da: float = 10.0, rhombicity: float = 0.3,
                      noise: float = 0.5, seed: int = 0) -> Path:
    """Backbone N-H RDCs (Hz) of the mixture of ``states`` [K, N, 3] at ``occupancies`` [K], written as a ``.pa``
    file (``<res>N-H <Hz>``).

    A known alignment tensor (``da`` Hz, ``rhombicity``, principal axes turned by a fixed random rotation) acts on the
    amide N-H vectors of each state (H placed from the backbone as this observable does); the mixture's coupling is
    the occupancy-weighted mean of the states' couplings, plus Gaussian noise of ``noise`` Hz."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    rot = q * np.sign(np.diag(r))
    s = matrix_to_saupe(alignment_tensor(da, rhombicity, rot))
    res_seq, atom_name, res_name = (np.asarray(atoms.res_seq), np.asarray(atoms.atom_name).astype(str),
                                    np.asarray(atoms.res_name).astype(str))

    def at(res, name):
        return np.flatnonzero((res_seq == res) & (atom_name == name))

    residues = [r for r in sorted(set(res_seq.tolist()))[1:]
                if res_name[res_seq == r][0] != "PRO" and at(r - 1, "C").size]
    couplings = np.zeros(len(residues))
    for occ, coords in zip(occupancies, np.asarray(states)):
        c_prev = np.array([int(at(r - 1, "C")[0]) for r in residues], dtype=np.int64)
        n_idx = np.array([int(at(r, "N")[0]) for r in residues], dtype=np.int64)
        ca = np.array([int(at(r, "CA")[0]) for r in residues], dtype=np.int64)
        h = np.asarray(place_amide_h(coords, n_idx, ca, c_prev))
        couplings += float(occ) * np.asarray(design_rows(h - coords[n_idx], np.ones(len(residues)))) @ s
    couplings += noise * rng.normal(size=len(residues))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# synthetic N-H RDCs of the two-state demo peptide, occupancies {list(occupancies)}, "
             f"Da {da} Hz, R {rhombicity}, noise {noise} Hz"]
    lines += [f"{r}N-H {d:.3f}" for r, d in zip(residues, couplings)]
    path.write_text("\n".join(lines) + "\n")
    return path
