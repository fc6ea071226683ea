"""Likelihoods: pure JAX forward models of experimental data (never imports torch, predictors or guidance)."""

from observables.base import AtomInfo, Crystal, FixedAtoms, Observable, available, build, register

__all__ = ["AtomInfo", "Crystal", "FixedAtoms", "Observable", "available", "build", "register"]
