#!/usr/bin/env bash
# VNN-COMP: check an instance before it is timed. Usage: prepare_instance.sh v1 CATEGORY ONNX VNNLIB
# ONNX names the two networks F and G of a two-network instance, separated by a comma (F.onnx,G.onnx).
# Reads both networks and the VNN-LIB file (errors are reported now, not during the timed run).
set -euo pipefail
[ "$#" -eq 4 ] || { echo "usage: $0 v1 CATEGORY ONNX VNNLIB" >&2; exit 1; }
here="$(cd "$(dirname "$0")/.." && pwd)"
IFS=, read -r first second <<< "$3"
[ -n "${second:-}" ] || { echo "qbound compares two networks: give ONNX as F.onnx,G.onnx" >&2; exit 1; }
pkill -f "qbound verify" 2>/dev/null || true   # a previous instance that outlived its timeout
"$here/.venv/bin/python" - "$first" "$second" "$4" <<'PY'
import sys
import qbound as qb
first, second, spec = sys.argv[1:]
qb.io.load_onnx(first)
qb.io.load_onnx(second)
qb.io.load_vnnlib(spec)
PY
