"""Prior-side potentials by name (``potentials=[geometry]``, ``potentials=[boltz]``): each builds an
``energy_and_grad(x, t)`` for the predictor of the run; its options are the ``potentials.<name>.*`` keys (guidance.app
.config registers them from ``options()``, so the code's defaults are the config's)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from observables.errors import InputError

log = logging.getLogger("ensemble_guide")


class PotentialError(InputError):
    """A potential that cannot be built for this predictor, or a bad option (one line from the app)."""


@dataclass(frozen=True)
class PotentialBuilder:
    build: Callable  # build(predictor, **options) -> (energy_and_grad, description)
    options: Callable[[], dict]  # the options and their defaults


def _geometry(predictor, **options):
    from guidance.potentials import GeometryPotential

    try:
        pot = GeometryPotential(predictor.layout, **options)
    except TypeError as exc:
        raise PotentialError(f"potentials.geometry: {exc}") from exc
    return pot.energy_and_grad, f"Engh & Huber bonds and angles + clash wall, {options}"


def _geometry_options() -> dict:
    from guidance.app.config import signature_defaults
    from guidance.potentials import GeometryPotential

    return signature_defaults(GeometryPotential, skip=1, exclude=("reference", "restraints"))


def _boltz(predictor, terms=None):
    """Boltz's physical steering potentials (predictor=boltz1/boltz2): inter-chain clashes, identical chains' centres
    of mass, covalent connections and the ligand terms; ``terms``: None = all, or a subset."""
    if not callable(getattr(predictor, "potentials", None)):
        raise PotentialError("potentials=[boltz] needs a Boltz predictor (predictor=boltz1 or boltz2)")
    try:
        pot = predictor.potentials(terms)
    except ValueError as exc:
        raise PotentialError(f"potentials.boltz.terms: {exc}") from exc
    return pot.energy_and_grad, f"Boltz steering energies {pot.names}"


def _signature(fn) -> dict:
    from guidance.app.config import signature_defaults

    return signature_defaults(fn, skip=1)


BUILDERS: dict[str, PotentialBuilder] = {
    "geometry": PotentialBuilder(_geometry, _geometry_options),
    "boltz": PotentialBuilder(_boltz, lambda: _signature(_boltz)),
}


def build(name: str, predictor, options: dict):
    """-> (energy_and_grad, description) of potential ``name`` for ``predictor``."""
    if name not in BUILDERS:
        raise PotentialError(f"unknown potential {name!r}; available: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[name].build(predictor, **options)
