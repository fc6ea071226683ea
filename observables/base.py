"""The observable interface and its registry.

An observable is built once from its data and the atoms of the model (``AtomInfo``) and is afterwards a pure JAX
function of coordinates ``[E, N, 3]`` (Angstrom) and member weights ``[E]`` (summing to 1).  ``log_likelihood`` must
be jit-, grad- and vmap-able: guidance evaluates many FK particles at once with ``jax.vmap``.

Observables register by name with ``@register("name")``; third-party packages add theirs through the Python
entry-point group ``ensemble_guide.observables`` (``name = "package.module:Factory"``) and are found by ``build``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

ENTRY_POINT_GROUP = "ensemble_guide.observables"


@dataclass(frozen=True)
class AtomInfo:
    """Plain description of the model's atoms (length N), in the order of the coordinates an observable receives.

    ``coords`` are optional reference coordinates ``[K, N, 3]`` (e.g. the input structure's conformers): an
    observable may use them to fix things that must not move with the sample, such as a density mask or a map box.
    """

    element: np.ndarray
    atom_name: np.ndarray
    res_name: np.ndarray
    res_seq: np.ndarray
    chain_id: np.ndarray
    coords: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.element)

    @classmethod
    def from_layout(cls, layout: Any, coords: np.ndarray | None = None) -> "AtomInfo":
        """Build from any object with AtomLayout-like arrays (duck typed: observables do not import predictors)."""
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
        )


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


Factory = Callable[..., Observable]  # factory(atoms: AtomInfo, **config) -> Observable
_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Class/function decorator: make ``factory(atoms, **config)`` available as ``name``."""

    def deco(factory: Factory) -> Factory:
        _REGISTRY[name] = factory
        return factory

    return deco


def _load_entry_points() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = ep.load()


def available() -> list[str]:
    _load_builtin()
    _load_entry_points()
    return sorted(_REGISTRY)


def build(name: str, atoms: AtomInfo, **config) -> Observable:
    """Instantiate the observable registered as ``name``."""
    _load_builtin()
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise KeyError(f"unknown observable {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name](atoms, **config)


def _load_builtin() -> None:
    import observables.density  # noqa: F401  (registers "density")
    import observables.jcoupling  # noqa: F401  (registers "jcoupling")
    import observables.linear  # noqa: F401  (registers "linear_gaussian")
    import observables.noe  # noqa: F401  (registers "noe")
    import observables.rdc  # noqa: F401  (registers "rdc")
    import observables.saxs  # noqa: F401  (registers "saxs")
    import observables.shifts  # noqa: F401  (registers "shifts")
