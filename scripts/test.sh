#!/usr/bin/env bash
# The project's one test command: sets up .venv from scratch if needed (scripts/setup.sh), then
# runs the default (fast) test suite.
#   bash scripts/test.sh            # default suite
#   bash scripts/test.sh -m slow    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
python -m pytest -q "$@"
