"""The ``ensemble-guide`` app: Hydra entry (main), config -> objects (build, predictors, potentials), where the
defaults come from (config), the output contract (outputs) and the plots (plots)."""

from guidance.app.job import config_dir, main, run

__all__ = ["config_dir", "main", "run"]
