#!/usr/bin/env bash
# Create .venv (Python 3.11) with CPU torch 2.13.0 and the pinned dependencies; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,batch]"
# NudeNet (the nudity metric; its ONNX model ships in the wheel). --no-deps: it asks for
# opencv-python-headless, which would clash with opencv-python's cv2.
python -m pip install -q --disable-pip-version-check -c constraints.txt onnxruntime
python -m pip install -q --disable-pip-version-check --no-deps "nudenet==3.4.2"
