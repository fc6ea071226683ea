#!/usr/bin/env bash
# Install Protenix (ByteDance's AlphaFold-3 reproduction) into the ACTIVE Python environment, beside Boltz, for
# `predictor=protenix`.
#
# Protenix's wheel pins torch 2.7.1, numpy 2.x, gemmi 0.6.7, deepspeed, triton and CUDA-only cuequivariance packages,
# all of which conflict with boltz==2.2.1 and this project.  Its code runs on CPU with what we already have, so:
#   1. the pip-resolvable packages it imports come from this project's extra `.[protenix]` (pyproject.toml);
#   2. protenix itself, fair-esm (imported by its model's input embedder) and pdbeccdutils (used only to build the
#      component cache) are installed with --no-deps, so none of their pins applies.  pip then reports protenix's
#      unmet pins as "dependency conflicts": expected; pip's output is shown only if an install fails.
# Idempotent: re-running it changes nothing.  It checks at the end that torch / numpy / gemmi were left alone and that
# boltz and protenix both import (with LAYERNORM_TYPE=torch, so no CUDA kernel is compiled).
#
# Usage, from the checkout, in the environment where the project is installed (`pip install -e .` as in the README):
#   bash scripts/install_protenix.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PROTENIX_VERSION="2.0.0"   # keep in step with predictors/protenix.py:PROTENIX_VERSION
PY="${PYTHON:-python}"
versions() { "$PY" -c "import torch, numpy, gemmi; print(torch.__version__, numpy.__version__, gemmi.__version__)"; }

# pip's output is kept and shown only if it fails (the --no-deps install reports protenix's unmet pins, expected).
quiet_pip() {
    local log
    log=$(mktemp)
    if ! "$PY" -m pip install -q "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

before=$(versions)
quiet_pip -e ".[protenix]"
quiet_pip --no-deps "protenix==${PROTENIX_VERSION}" "fair-esm==2.0.0" "pdbeccdutils==1.0.0"

after=$(versions)
if [ "$before" != "$after" ]; then
    echo "install_protenix.sh: torch/numpy/gemmi changed from '$before' to '$after'" >&2
    exit 1
fi
LAYERNORM_TYPE=torch "$PY" - <<'PYEOF'
import importlib.metadata as md

import boltz  # noqa: F401  the two predictor families live side by side
from predictors.protenix import PROTENIX_VERSION, _protenix

_protenix()  # every Protenix module predictor=protenix uses
installed = md.version("protenix")
assert installed == PROTENIX_VERSION, f"protenix {installed} installed, predictors/protenix.py expects {PROTENIX_VERSION}"
print(f"protenix {installed} beside boltz {md.version('boltz')}")
PYEOF
echo "torch numpy gemmi: $after"
