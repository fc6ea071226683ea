"""The observable interface and its registry.

An observable is built once from its data and the atoms of the model (``AtomInfo``) and is afterwards a pure JAX
function of coordinates ``[E, N, 3]`` (Angstrom) and member weights ``[E]`` (summing to 1).  ``log_likelihood`` must
be jit-, grad- and vmap-able: guidance evaluates many FK particles at once with ``jax.vmap``.

The registry is the Python entry-point group ``ensemble_guide.observables`` (``name = "package.module:Factory"``):
this project's observables are listed there in pyproject.toml like any other package's.  ``register(name)`` adds a
factory in-process (a notebook, a test).  The factory's keyword parameters and their defaults are the observable's
options (``observables.<name>.*`` in the app; guidance.app.config reads them from the signature).

What the app shows and writes for an observable comes from optional attributes of the factory, so the app never
names one:

* ``data_key`` (default "data"): the option naming the data file (the density observable's is "map");
* ``headline``: the report keys logged at the end of a run (e.g. ("rscc", "cc_box"));
* ``describe(self) -> list[str]``: what the observable took from the data and the structure, logged once built;
* ``plots(self, coords, weights, report) -> list[PlotSpec]``: the plots of the fit to its data, drawn by the app;
* ``synthetic_data(cls, atoms, states, occupancies, directory, *, seed, **demo) -> Path`` (a classmethod): data of
  the mixture of ``states`` [K, N, 3] at ``occupancies`` [K] for the embedded demo.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from observables.errors import InputError

ENTRY_POINT_GROUP = "ensemble_guide.observables"


@dataclass(frozen=True)
class Crystal:
    """The crystal a structure or a data set belongs to: ``cell`` (a, b, c in A; alpha, beta, gamma in degrees) and
    the space group's Hermann-Mauguin name."""

    cell: tuple[float, float, float, float, float, float]
    space_group: str

    def describe(self) -> str:
        a, b, c, al, be, ga = self.cell
        return f"{self.space_group} ({a:.2f} {b:.2f} {c:.2f} A, {al:.1f} {be:.1f} {ga:.1f} deg)"

    def mismatch(self, other: "Crystal", length_tol: float = 0.01, angle_tol: float = 1.0) -> str | None:
        """Why ``other`` is a different crystal (space group, or a cell length off by more than ``length_tol``
        relative / an angle by more than ``angle_tol`` degrees), or None when they agree."""
        import gemmi

        mine, theirs = gemmi.find_spacegroup_by_name(self.space_group), gemmi.find_spacegroup_by_name(other.space_group)
        if mine is None or theirs is None or mine.number != theirs.number or mine.xhm() != theirs.xhm():
            return f"space group {self.space_group} vs {other.space_group}"
        for name, x, y in zip(("a", "b", "c"), self.cell[:3], other.cell[:3]):
            if abs(x - y) > length_tol * max(x, y):
                return f"cell {name} {x:.3f} vs {y:.3f} A"
        for name, x, y in zip(("alpha", "beta", "gamma"), self.cell[3:], other.cell[3:]):
            if abs(x - y) > angle_tol:
                return f"cell {name} {x:.2f} vs {y:.2f} deg"
        return None

    def check_structure(self, structure: "Crystal", what: str, option: str, allow: bool, error: type) -> str | None:
        """Refuse a structure from another crystal than these data (``what``: "map", "data"): raises ``error`` with one
        line naming both crystals and the option ``option`` that allows it; with ``allow``, returns that line as a note
        instead.  None when they agree."""
        why = self.mismatch(structure)
        if why is None:
            return None
        message = (f"the structure is from another crystal than the {what}: structure {structure.describe()}, {what} "
                   f"{self.describe()} ({why}); set {option}=true to use it anyway")
        if not allow:
            raise error(message)
        return message.split(";")[0] + " (allowed)"


@dataclass(frozen=True)
class FixedAtoms:
    """Atoms the data see but the sampler never moves: the input structure's waters, ligands, ions and any atom the
    model does not represent.  Arrays [M]; ``xyz`` [M, 3] A; ``u_aniso`` [M, 6] (U11, U22, U33, U12, U13, U23,
    Cartesian A^2) or None; ``label`` names each atom for messages ("A HOH 301 O")."""

    element: np.ndarray
    xyz: np.ndarray
    b_iso: np.ndarray
    occupancy: np.ndarray
    label: np.ndarray
    u_aniso: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.element)


@dataclass(frozen=True)
class AtomInfo:
    """Plain description of the model's atoms (length N), in the order of the coordinates an observable receives.

    ``coords`` are optional reference coordinates ``[K, N, 3]`` (e.g. the input structure's conformers) with their
    ``weights [K]``: an observable may use them to fix things that must not move with the sample, such as a density
    mask, a map box or the bulk-solvent model of a crystal.
    What a structure file says about the atoms beyond their positions, each optional:
    - ``b_iso`` [N] or [K, N] (A^2) and ``u_aniso`` [N, 6] or [K, N, 6] (Cartesian U, A^2; zeros where isotropic);
    - ``occupancy`` [N] (of every member alike) or [K, N] (per conformer, relative to the conformer's weight: valid
      when an observable is evaluated on exactly the K reference conformers, as in score mode);
    - ``crystal``: the cell and space group of the structure; ``environment``: the fixed atoms around the model.
    """

    element: np.ndarray
    atom_name: np.ndarray
    res_name: np.ndarray
    res_seq: np.ndarray
    chain_id: np.ndarray
    coords: np.ndarray | None = None
    weights: np.ndarray | None = None
    b_iso: np.ndarray | None = None
    u_aniso: np.ndarray | None = None
    occupancy: np.ndarray | None = None
    crystal: Crystal | None = None
    environment: FixedAtoms | None = None

    def __len__(self) -> int:
        return len(self.element)

    @classmethod
    def from_layout(cls, layout: Any, coords: np.ndarray | None = None, **extra) -> "AtomInfo":
        """Build from any object with AtomLayout-like arrays (duck typed: observables do not import predictors);
        ``extra`` sets the optional fields (weights, b_iso, u_aniso, occupancy, crystal, environment)."""
        if coords is not None:
            coords = np.asarray(coords, dtype=np.float32)
            if coords.ndim == 2:
                coords = coords[None]
        return cls(
            element=np.asarray(layout.element).astype(str),
            atom_name=np.asarray(layout.atom_name).astype(str),
            res_name=np.asarray(layout.res_name).astype(str),
            res_seq=np.asarray(layout.res_seq).astype(np.int64),
            chain_id=np.asarray(layout.chain_id).astype(str),
            coords=coords,
            **extra,
        )


@dataclass(frozen=True)
class PlotSpec:
    """A plot an observable asks the app to draw (observables stay free of matplotlib): ``name`` is the file under
    plots/ (e.g. "saxs_fit.png"), ``kind`` one the app draws (guidance.app.plots.DRAWERS: map_slice, saxs_fit,
    r_by_resolution), ``data`` its arguments."""

    name: str
    kind: str
    data: dict


@runtime_checkable
class Observable(Protocol):
    name: str

    def predict(self, coords, weights):
        """Ensemble-averaged prediction of the data."""
        ...

    def log_likelihood(self, coords, weights):
        """Scalar log-likelihood of the data given the weighted ensemble (jit-, grad- and vmap-able)."""
        ...

    def report(self, coords, weights) -> dict[str, float]:
        """Human-facing agreement statistics (chi2, RSCC, Q, violations, ...)."""
        ...


# Optional, for observables whose ensemble prediction is the weighted sum of member predictions (density, SAXS
# intensities, ...): ``member_predictions(coords) -> [E, ...]`` and ``log_likelihood_from_predictions(predictions,
# weights) -> scalar``.  Member-weight refinement then computes the members once instead of at every step.


Factory = Callable[..., Observable]  # factory(atoms: AtomInfo, **options) -> Observable
_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Class/function decorator: make ``factory(atoms, **options)`` available as ``name`` in this process."""

    def deco(factory: Factory) -> Factory:
        _REGISTRY[name] = factory
        return factory

    return deco


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Every observable name: the installed entry points and the in-process registrations."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def factory(name: str) -> Factory:
    """The factory registered as ``name`` (loaded from its entry point on first use)."""
    if name not in _REGISTRY:
        eps = _entry_points()
        if name not in eps:
            raise InputError(f"unknown observable {name!r}; available: {', '.join(available())}")
        _REGISTRY[name] = eps[name].load()
    return _REGISTRY[name]


def build(name: str, atoms: AtomInfo, **options) -> Observable:
    """Instantiate the observable registered as ``name``."""
    return factory(name)(atoms, **options)
