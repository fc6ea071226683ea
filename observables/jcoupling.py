"""3J(HN,HA) scalar couplings of a weighted ensemble from the backbone dihedral phi (pure JAX).

Karplus relation (units: Hz; theta and phi in degrees, phi from heavy atoms C(i-1)-N-CA-C, see ``observables.nmr``):
    3J(HN,HA) = A cos^2(theta) + B cos(theta) + C,        theta = phi - 60 deg
(the H-N-CA-HA dihedral of an L-residue with ideal geometry is phi - 60 deg).  Parameter sets (``KARPLUS``):
- ``vuister_bax_1993`` (default): A, B, C = 6.51, -1.76, 1.60 Hz.  Vuister & Bax (1993) J. Am. Chem. Soc. 115,
  7772-7777.  Check values: phi = -60 deg -> 4.11 Hz, phi = -120 deg -> 9.87 Hz.
- ``hu_bax_1997``: A, B, C = 7.09, -1.42, 1.55 Hz.  Hu & Bax (1997) J. Am. Chem. Soc. 119, 6360-6368.
  Check values: 4.03 Hz and 10.06 Hz.
- ``vogeli_2007``: A, B, C = 8.40, -1.36, 0.33 Hz.  Voegeli, Ying, Grishaev & Bax (2007) J. Am. Chem. Soc. 129,
  9377-9385, Table 1 (the static-structure fit), as transcribed in MDTraj's ``nmr.scalar_couplings`` ("Bax2007") and
  in a second public implementation; the paper itself could not be read here.  (A set 8.754, -1.222, 0.111 is also
  quoted in the literature; it is not the one these transcriptions give.)  Check values: 3.11 Hz and 10.09 Hz.
Any other set can be given as ``karplus=[A, B, C]`` (Hz, same theta = phi - 60 deg).

Ensemble: the observed coupling is the weighted mean of the members' couplings, <J> = sum_e w_e J(phi_e) — the
average of J, never J of an average phi.

Likelihood (Gaussian): logL = -1/2 sum_i (J_obs,i - <J>_i)^2 / s_i^2 with s_i^2 = sigma^2 + err_i^2: ``sigma`` (Hz)
is the scatter of the Karplus relation itself (static fit error plus unmodelled motion), err_i the measurement error
in the data file (0 when absent).

Data (``read_jcouplings``):
- NMR-STAR 3 (``_Coupling_constant`` loop): rows with ``Code`` 3JHNHA (or, without a code, atoms H/HN and HA);
  residues by ``Auth_seq_ID_1`` (``numbering="auth"``, default) or ``Seq_ID_1`` (``"seq"``); ``Comp_ID_1`` is
  checked against the model.
- plain text: one coupling per line, ``[chain] resnum J [error]`` (Hz), ``#`` starts a comment.
Glycines (two HA, no single Karplus curve here) and residues without phi (N-terminus, chain breaks) are dropped with
a warning; a residue number that is not in the model, or a residue name that differs from the model's, is an error.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from observables.base import AtomInfo
from observables.nmr import (
    MAX_PEPTIDE_BOND,
    Backbone,
    NmrDataError,
    backbone,
    dihedral_cos_sin,
    read_star_loops,
    residue_numbers,
    select_chain,
    text_lines,
    unmapped_report,
    unmapped_warning,
)

__all__ = [
    "KARPLUS",
    "KARPLUS_HU_BAX_1997",
    "KARPLUS_VOGELI_2007",
    "KARPLUS_VUISTER_BAX_1993",
    "JCouplingData",
    "JCouplingObservable",
    "KarplusParameters",
    "karplus_j",
    "read_jcouplings",
]


@dataclass(frozen=True)
class KarplusParameters:
    """J = A cos^2(phi + phase) + B cos(phi + phase) + C (Hz); ``phase_deg`` = -60 for 3J(HN,HA)."""

    A: float
    B: float
    C: float
    phase_deg: float = -60.0


# Vuister & Bax (1993) J. Am. Chem. Soc. 115, 7772: A, B, C in Hz.
KARPLUS_VUISTER_BAX_1993 = KarplusParameters(6.51, -1.76, 1.60)
# Hu & Bax (1997) J. Am. Chem. Soc. 119, 6360: A, B, C in Hz.
KARPLUS_HU_BAX_1997 = KarplusParameters(7.09, -1.42, 1.55)
# Voegeli, Ying, Grishaev & Bax (2007) J. Am. Chem. Soc. 129, 9377, Table 1: A, B, C in Hz.
KARPLUS_VOGELI_2007 = KarplusParameters(8.40, -1.36, 0.33)

KARPLUS: dict[str, KarplusParameters] = {
    "vuister_bax_1993": KARPLUS_VUISTER_BAX_1993,
    "hu_bax_1997": KARPLUS_HU_BAX_1997,
    "vogeli_2007": KARPLUS_VOGELI_2007,
}


def _karplus_parameters(spec) -> KarplusParameters:
    if isinstance(spec, KarplusParameters):
        return spec
    if isinstance(spec, str):
        if spec not in KARPLUS:
            raise NmrDataError(f"unknown Karplus parameter set {spec!r}; use one of {sorted(KARPLUS)} or [A, B, C] (Hz)")
        return KARPLUS[spec]
    values = [float(v) for v in spec]
    if len(values) != 3:
        raise NmrDataError(f"karplus=[A, B, C] needs three numbers (Hz), got {spec!r}")
    return KarplusParameters(*values)


def karplus_j(cos_phi, sin_phi, params: KarplusParameters = KARPLUS_VUISTER_BAX_1993):
    """3J (Hz) from cos and sin of phi: A cos^2(theta) + B cos(theta) + C with theta = phi + phase (phase -60 deg)."""
    phase = math.radians(params.phase_deg)
    cos_theta = cos_phi * math.cos(phase) - sin_phi * math.sin(phase)
    return params.A * cos_theta * cos_theta + params.B * cos_theta + params.C


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JCouplingData:
    """Measured 3J(HN,HA): per coupling the chain ('' = the model's only chain), residue number, residue name (''
    when the file has none), value and error (Hz; 0 when the file has none), and the source (for messages)."""

    chain: np.ndarray
    res_seq: np.ndarray
    res_name: np.ndarray
    value: np.ndarray
    error: np.ndarray
    source: str = "<data>"

    def __len__(self) -> int:
        return len(self.value)


_HN_NAMES = {"H", "HN"}
_HA_NAMES = {"HA", "HA1", "HA2", "HA3"}


def _read_star_jcouplings(path: Path, numbering: str) -> JCouplingData:
    loops = read_star_loops(path, "_Coupling_constant.")
    chain, seq, names, vals, errs = [], [], [], [], []
    for loop in loops:
        cols = loop.columns
        numbers, _ = residue_numbers(loop, "_1", numbering, path)
        n = len(loop)
        code = cols.get("Code", [None] * n)
        a1, a2 = cols.get("Atom_ID_1", [None] * n), cols.get("Atom_ID_2", [None] * n)
        comp = cols.get("Comp_ID_1", [None] * n)
        asym = cols.get("Auth_asym_ID_1", [None] * n)
        val, err = cols.get("Val", [None] * n), cols.get("Val_err", [None] * n)
        for i in range(n):
            atoms_pair = {str(a1[i]).upper(), str(a2[i]).upper()}
            if code[i] is not None:
                if "".join(ch for ch in code[i].upper() if ch.isalnum()) not in ("3JHNHA", "JHNHA"):
                    continue
            elif not (atoms_pair & _HN_NAMES and atoms_pair & _HA_NAMES):
                continue
            if val[i] is None or numbers[i] is None:
                continue
            try:
                vals.append(float(val[i]))
                errs.append(0.0 if err[i] is None else float(err[i]))
            except ValueError:
                raise NmrDataError(f"{path}: coupling row {i + 1} of frame {loop.frame!r}: value {val[i]!r}") from None
            seq.append(numbers[i])
            names.append("" if comp[i] is None else comp[i].upper())
            chain.append("" if asym[i] is None else asym[i])
    if not vals:
        raise NmrDataError(f"{path}: no 3J(HN,HA) couplings in any _Coupling_constant loop")
    return JCouplingData(np.array(chain), np.array(seq), np.array(names), np.array(vals), np.array(errs), str(path))


def _read_text_jcouplings(path: Path) -> JCouplingData:
    try:
        lines = text_lines(path.read_text(encoding="utf-8-sig", errors="replace"))
    except OSError as exc:
        raise NmrDataError(f"cannot read J-coupling file {path}: {exc.strerror or exc}") from None
    chain, seq, vals, errs = [], [], [], []
    for lineno, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        ch = ""
        if not fields[0].lstrip("+-").isdigit():
            ch, fields = fields[0], fields[1:]
        try:
            if len(fields) not in (2, 3):
                raise ValueError
            seq.append(int(fields[0]))
            vals.append(float(fields[1]))
            errs.append(float(fields[2]) if len(fields) == 3 else 0.0)
        except ValueError:
            raise NmrDataError(
                f"{path}:{lineno}: expected '[chain] resnum J [error]' (Hz), got {line.strip()!r}"
            ) from None
        chain.append(ch)
    if not vals:
        raise NmrDataError(f"{path}: no couplings found (expected lines '[chain] resnum J [error]')")
    n = len(vals)
    return JCouplingData(np.array(chain), np.array(seq), np.full(n, ""), np.array(vals), np.array(errs), str(path))


def read_jcouplings(path: str | Path, numbering: str = "auth") -> JCouplingData:
    """3J(HN,HA) couplings from an NMR-STAR 3 file (``_Coupling_constant`` loop) or a plain ``resnum J [error]`` file.

    The format is recognised by content (a ``_Coupling_constant.`` tag means NMR-STAR).
    """
    path = Path(path)
    if not path.exists():
        raise NmrDataError(f"J-coupling file not found: {path}")
    head = path.read_text(encoding="utf-8", errors="replace")
    if "_Coupling_constant." in head:
        return _read_star_jcouplings(path, numbering)
    return _read_text_jcouplings(path)


def _as_data(data) -> JCouplingData:
    if isinstance(data, JCouplingData):
        return data
    rows = [tuple(r) for r in data]
    if not rows or any(len(r) not in (2, 3) for r in rows):
        raise NmrDataError("in-memory J data must be rows of (resnum, J) or (resnum, J, error) in Hz")
    n = len(rows)
    return JCouplingData(
        chain=np.full(n, ""),
        res_seq=np.array([int(r[0]) for r in rows]),
        res_name=np.full(n, ""),
        value=np.array([float(r[1]) for r in rows]),
        error=np.array([float(r[2]) if len(r) == 3 else 0.0 for r in rows]),
    )


# ----------------------------------------------------------------------------------------------------------------
# The observable
# ----------------------------------------------------------------------------------------------------------------


class JCouplingObservable:
    """Likelihood of measured 3J(HN,HA) couplings given a weighted ensemble (see the module docstring).

    Parameters: ``data`` (a path, a ``JCouplingData``, or rows ``(resnum, J[, error])``), ``karplus`` (a name in
    ``KARPLUS`` or ``[A, B, C]`` in Hz), ``sigma`` (Hz, the Karplus relation's own scatter), ``chain`` (model chain the
    data refer to; default: the model's only protein chain, or the file's ``Auth_asym_ID``), ``numbering`` ("auth" or
    "seq", NMR-STAR only), ``max_peptide_bond`` (A, chain-break test on the reference coordinates).
    Attributes: ``backbone``, ``residues`` (model residue index of each kept coupling), ``observed``, ``error``,
    ``dropped`` (list of ``(chain, resnum, reason)``).
    """

    name = "jcoupling"
    headline = ("chi2", "q_factor", "rmsd")

    def __init__(
        self,
        atoms: AtomInfo,
        data=None,
        karplus: str | Sequence[float] | KarplusParameters = "vuister_bax_1993",
        sigma: float = 1.0,
        chain: str | None = None,
        numbering: str = "auth",
        max_peptide_bond: float = MAX_PEPTIDE_BOND,
    ):
        if data is None:
            raise NmrDataError(
                "the jcoupling observable needs data: an NMR-STAR 3 file with a _Coupling_constant loop, "
                "a text file of 'resnum J [error]' lines (Hz), or rows (resnum, J[, error])"
            )
        if not sigma >= 0:
            raise NmrDataError(f"observables.jcoupling.sigma must be >= 0 Hz, got {sigma}")
        self.params = _karplus_parameters(karplus)
        table = read_jcouplings(data, numbering) if isinstance(data, (str, Path)) else _as_data(data)
        self.backbone = bb = backbone(atoms, max_peptide_bond)
        index = bb.index()
        keep, self.dropped = [], []
        n_absent = 0
        for i in range(len(table)):
            ch = select_chain(bb, chain or table.chain[i] or None, table.source)
            key = (ch, int(table.res_seq[i]))
            if key not in index:
                n_absent += 1
                self.dropped.append((ch, key[1], "residue absent (not in the model)"))
                continue
            r = index[key]
            model_name = str(bb.res_name[r]).upper()
            if table.res_name[i] and table.res_name[i] != model_name:
                raise NmrDataError(
                    f"{table.source}: residue {ch}{key[1]} is {table.res_name[i]} in the data but {model_name} in the "
                    "model: the numbering of data and model differ (try numbering='seq' or 'auth', or renumber)"
                )
            if model_name == "GLY":
                self.dropped.append((ch, key[1], "glycine (two HA)"))
            elif not bb.has_phi[r]:
                self.dropped.append((ch, key[1], "no phi (chain start or break)"))
            else:
                keep.append((i, r))
        if len(table) and n_absent == len(table):
            ch, num, _ = self.dropped[0]
            raise NmrDataError(
                f"{table.source}: none of the {len(table)} couplings is for a residue in the model (the first is for "
                f"residue {ch}{num}, which is not in the model; model residues of chain {ch}: "
                f"{_span(bb, ch)}); check the chain and the numbering (numbering='auth'/'seq')"
            )
        if self.dropped:
            warnings.warn(unmapped_warning(str(table.source), self._unmapped_items(), "coupling(s)"), stacklevel=2)
        if not keep:
            raise NmrDataError(f"{table.source}: none of the {len(table)} couplings can be computed on this model")
        rows = np.array([k[0] for k in keep])
        self.residues = np.array([k[1] for k in keep])
        self.observed = table.value[rows].astype(np.float32)
        self.error = table.error[rows].astype(np.float32)
        self.sigma = float(sigma)
        total_sd = np.sqrt(self.sigma**2 + self.error.astype(np.float64) ** 2)
        if np.any(total_sd <= 0):
            raise NmrDataError("observables.jcoupling.sigma = 0 needs a positive error on every coupling")
        phi_atoms = bb.phi_atoms[self.residues]  # [M, 4]
        observed = jnp.asarray(self.observed)
        inv_var = jnp.asarray((1.0 / total_sd**2).astype(np.float32))
        params = self.params

        def member_predictions(coords):  # [E, N, 3] -> [E, M] (Hz)
            cos_phi, sin_phi = dihedral_cos_sin(*(coords[..., phi_atoms[:, k], :] for k in range(4)))
            return karplus_j(cos_phi, sin_phi, params)

        def log_likelihood_from_predictions(predictions, weights):
            resid = observed - weights @ predictions
            return -0.5 * jnp.sum(resid * resid * inv_var)

        def log_likelihood(coords, weights):
            return log_likelihood_from_predictions(member_predictions(coords), weights)

        def statistics(coords, weights):
            pred = weights @ member_predictions(coords)
            resid = observed - pred
            return {
                "rmsd": jnp.sqrt(jnp.mean(resid * resid)),
                "q_factor": jnp.sqrt(jnp.sum(resid * resid) / jnp.sum(observed * observed)),
                "chi2": jnp.mean(resid * resid * inv_var),
                "log_likelihood": -0.5 * jnp.sum(resid * resid * inv_var),
            }

        self._member_predictions = jax.jit(member_predictions)
        self._log_likelihood = jax.jit(log_likelihood)
        self._log_likelihood_from_predictions = log_likelihood_from_predictions
        self._statistics = jax.jit(statistics)

    def predict(self, coords, weights) -> jnp.ndarray:
        """Ensemble-averaged 3J(HN,HA) ``[M]`` (Hz) for the kept couplings, in data order."""
        return jnp.asarray(weights) @ self._member_predictions(coords)

    def member_predictions(self, coords) -> jnp.ndarray:
        """Each member's couplings ``[E, M]`` (Hz); the ensemble's is ``weights @`` this."""
        return self._member_predictions(coords)

    def log_likelihood_from_predictions(self, predictions, weights) -> jnp.ndarray:
        return self._log_likelihood_from_predictions(predictions, weights)

    def log_likelihood(self, coords, weights) -> jnp.ndarray:
        """Scalar Gaussian log-likelihood of the couplings (jit-, grad- and vmap-able)."""
        return self._log_likelihood(coords, weights)

    def report(self, coords, weights) -> dict:
        """``rmsd`` (Hz), ``q_factor`` = sqrt(sum (J_obs - J_calc)^2 / sum J_obs^2), ``chi2`` (mean), ``n``; the
        couplings not used (``n_unmapped``, ``unmapped`` "chain+residue: reason", ``unmapped_reasons``)."""
        out: dict = {k: float(v) for k, v in self._statistics(coords, weights).items()}
        out["n"] = float(len(self.observed))
        out.update(unmapped_report(self._unmapped_items()))
        return out

    def _unmapped_items(self) -> list[tuple[str, str]]:
        return [(f"{c}{n}", why) for c, n, why in self.dropped]


def _span(bb: Backbone, chain: str) -> str:
    seq = bb.res_seq[bb.chain_id == chain]
    return f"{seq.min()}-{seq.max()}" if len(seq) else "none"
