#!/usr/bin/env bash
# VNN-COMP: install qbound (CPU JAX) into .venv beside this folder. Usage: install_tool.sh v1
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -e '.[onnx,vnnlib]'
.venv/bin/qbound --version
