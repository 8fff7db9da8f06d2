#!/usr/bin/env bash
# The main job from a fresh clone: set up, then erase "circle" from the shipped ShapesWorld model
# with Bi-Erasing. Writes outputs/demo/{erasure.safetensors, before_after.png, report.md}.
#   bash scripts/demo.sh [extra bierasing erase flags]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
bierasing erase --concept circle --safe square --out outputs/demo "$@"
echo "see outputs/demo/report.md and outputs/demo/before_after.png"
