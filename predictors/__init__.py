"""Priors: structure predictors behind one denoising interface (torch only; never imports jax or guidance)."""

from predictors.base import AtomLayout, Denoiser, NoiseSchedule

__all__ = ["AtomLayout", "Denoiser", "NoiseSchedule"]
