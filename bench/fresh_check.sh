#!/usr/bin/env bash
# A fresh machine, as a new user gets it: a throw-away venv, `bash install.sh --dev`, then README's
# test command (the linter, then the whole suite) from the project folder, where a folder of ours
# named like an installed package would shadow it. Run it before you raise a pin in constraints.txt,
# when a new release of transformers or peft is out, and before a release (torch stays at
# install.sh's pin: change it there to try another).
#
#   bash bench/fresh_check.sh            the newest versions the requirement files allow (--latest)
#   bash bench/fresh_check.sh --tested   constraints.txt's versions, as install.sh and .ci/run
#
# Prints the versions it got, the suite's counts, its slowest tests and its time; keeps the venv's
# `pip freeze` in $FRESH_OUT (default /tmp/fresh_check), from which constraints.txt is written after
# a green run.
# AGNEWS_DIR as for the tests (without it the tests that read rows skip; CI's rule makes them fail).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=--latest
[ "${1:-}" = "--tested" ] && mode=
out=${FRESH_OUT:-/tmp/fresh_check}
venv=$(mktemp -d /tmp/fresh_venv.XXXXXX)
trap 'rm -rf "$venv"' EXIT
mkdir -p "$out"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install -q --upgrade pip
start=$SECONDS
bash install.sh --dev $mode
echo "installed in $((SECONDS - start)) s: $(python --version), $mode"
pip freeze --exclude-editable | sed 's/+[a-z0-9.]*$//' >"$out/freeze.txt"
grep -iE '^(torch|triton|transformers|peft|kernels|tokenizers|safetensors|numpy|scikit-learn|matplotlib|tqdm|pytest|ruff|selenium|hypothesis)==' \
    "$out/freeze.txt" | tr '\n' ' '
echo
python -c "from transformers import pipeline; import peft; print('from transformers import pipeline; import peft: ok')"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
start=$SECONDS
[ -z "$mode" ] && export AGNEWS_LAB_TESTED_VERSIONS=1   # the test that checks the pins holds
ruff check .
set +e
# --durations: the slowest tests, where to look when the suite nears CI's 15 minutes
python -m pytest -q --durations=15 tests 2>&1 | tee "$out/pytest.log" | tail -n 25
status=${PIPESTATUS[0]}
set -e
echo "suite: exit $status in $((SECONDS - start)) s ($mode)"
exit "$status"
