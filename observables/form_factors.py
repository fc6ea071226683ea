"""The project's one table of atomic scattering factors: X-ray (IT92) and electron (ITC Table 4.3.2.2), from gemmi.

Every observable that needs a form factor (density maps, SAXS, X-ray structure factors) asks here, so the numbers and
the element-name rule are the same everywhere.

Sources
- X-ray: International Tables for Crystallography Vol. C (1992), Table 6.1.1.4: four Gaussians and a constant,
  f(s) = sum_i a_i exp(-b_i s^2) + c, s = sin(theta)/lambda = 1/(2d) in 1/A, a_i and c in electrons, b_i in A^2.
- Electron: International Tables for Crystallography Vol. C, Table 4.3.2.2 (Peng et al. 1996, Acta Cryst. A52, 257):
  five Gaussians f_e(s) = sum_i a_i exp(-b_i s^2), a_i in A, b_i in A^2.
The coefficients are read from gemmi (``Element.it92``, ``Element.c4322``), not retyped here.
"""

from __future__ import annotations

import functools

import gemmi
import numpy as np

from observables.errors import InputError

__all__ = ["KINDS", "coefficients", "form_factor", "it92", "normalise_element"]

KINDS = ("xray", "em")


def normalise_element(element) -> str:
    """Element symbol as gemmi spells it: 'FE', ' fe', 'Fe' -> 'Fe'."""
    return str(element).strip().capitalize()


@functools.cache
def it92(element: str) -> tuple[np.ndarray, np.ndarray, float]:
    """IT92 coefficients of ``element``: a [4] (electrons), b [4] (A^2) and the constant c (electrons)."""
    name = normalise_element(element)
    el = gemmi.Element(name)
    if not name or el.atomic_number == 0:
        raise InputError(f"unknown element {element!r}: no X-ray form factor for it (gemmi does not know it); fix the "
                         "element column of the structure")
    coef = el.it92
    a = np.array(coef.a, dtype=np.float64)
    if not np.any(a != 0):
        raise InputError(f"element {name!r} has no IT92 form factor in gemmi's tables")
    b = np.array(coef.b, dtype=np.float64)
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b, float(coef.c)


@functools.cache
def coefficients(element: str, kind: str = "xray") -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-sum coefficients ``(a [5], b [5])`` of one element's scattering factor f(s) = sum_g a_g exp(-b_g s^2).

    ``kind="xray"``: IT92, a1..a4, c (electrons) with b1..b4, 0 (A^2): the constant c is a Gaussian of zero width (a
    delta function in real space that only the atom's B-factor widens).  ``kind="em"``: ITC Table 4.3.2.2, a1..a5 (A),
    b1..b5 (A^2).  s = sin(theta)/lambda in 1/A.  Unknown elements raise ``ValueError``.
    """
    if kind not in KINDS:
        raise InputError(f"unknown scattering kind {kind!r}; use one of {KINDS}")
    name = normalise_element(element)
    if kind == "xray":
        a4, b4, c = it92(name)
        a = np.array([*a4, c], dtype=np.float64)
        b = np.array([*b4, 0.0], dtype=np.float64)
    else:
        el = gemmi.Element(name)
        if not name or el.atomic_number == 0:
            raise InputError(f"unknown element {element!r}: no electron scattering factor for it (gemmi does not know it)")
        a = np.array(el.c4322.a, dtype=np.float64)
        b = np.array(el.c4322.b, dtype=np.float64)
        if not np.any(a != 0):
            raise InputError(f"element {name!r} has no em scattering factor in gemmi's tables")
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


def form_factor(element: str, stol2, kind: str = "xray") -> np.ndarray:
    """f(s) at s^2 = (sin(theta)/lambda)^2 = 1/(4 d^2) (1/A^2, any shape): electrons (xray) or A (em)."""
    a, b = coefficients(element, kind)
    s2 = np.asarray(stol2, dtype=np.float64)
    return np.sum(a * np.exp(-b * s2[..., None]), axis=-1)
