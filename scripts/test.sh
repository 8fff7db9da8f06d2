#!/usr/bin/env bash
# The project's one test command: sets up .venv from scratch (Python 3.11, CPU torch 2.13.0,
# pinned dependencies) if needed, then runs the default (fast) test suite.
#   bash scripts/test.sh            # default suite
#   bash scripts/test.sh -m slow    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
python -m pytest -q "$@"
