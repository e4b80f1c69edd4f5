#!/usr/bin/env bash
# VNN-COMP: decide one instance. Usage: run_instance.sh v1 CATEGORY ONNX VNNLIB RESULTS TIMEOUT
# ONNX is F.onnx,G.onnx (two networks); VNNLIB a VNN-LIB 2.0 file over both, or a 1.0 file whose box
# is checked for top-1 equivalence. RESULTS gets sat / unsat / unknown on its first line, and for sat
# the counterexample ((X_0 v) ... (Y_0 v) ...).
set -uo pipefail
[ "$#" -eq 6 ] || { echo "usage: $0 v1 CATEGORY ONNX VNNLIB RESULTS TIMEOUT" >&2; exit 1; }
here="$(cd "$(dirname "$0")/.." && pwd)"
IFS=, read -r first second <<< "$3"
results="$5"
# Leave a few seconds of the timeout for starting Python and writing the answer.
budget=$(python3 -c "print(max(float('$6') - 5.0, 1.0))")
cex="$(mktemp)"
property=()
if ! grep -q "declare-network" "$4" 2>/dev/null && ! zgrep -q "declare-network" "$4" 2>/dev/null; then
  property=(--top1)   # a one-network (1.0) file: its box, top-1 equivalence of F and G
fi
output="$("$here/.venv/bin/qbound" verify "$first" "$second" --vnnlib "$4" "${property[@]}" \
          --timeout "$budget" --counterexample "$cex" -q 2>/dev/null)"
answer="${output%%$'\n'*}"
case "$answer" in
  sat|unsat|unknown) ;;
  *) answer="error" ;;
esac
echo "$answer" > "$results"
if [ "$answer" = "sat" ]; then cat "$cex" >> "$results"; fi
rm -f "$cex"
