"""Likelihoods: pure JAX forward models of experimental data (never imports torch, predictors or guidance)."""

from observables.base import AtomInfo, Crystal, FixedAtoms, Observable, PlotSpec, available, build, factory, register

__all__ = ["AtomInfo", "Crystal", "FixedAtoms", "Observable", "PlotSpec", "available", "build", "factory", "register"]
