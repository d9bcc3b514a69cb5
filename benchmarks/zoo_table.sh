#!/usr/bin/env bash
# The seed-004 zoo table on the GPU machine: eager fp16 vs kiln fp16 per model, written to
# docs/zoo_table.{md,json,png} (rewritten after each model, so a cut-short run keeps its rows).
#
#   bash benchmarks/zoo_table.sh                     # every zoo model, batch 1, fp16
#   OUT_DIR=$OUT bash benchmarks/zoo_table.sh        # write elsewhere (e.g. the device's $OUT)
#   MODELS=resnet50,bert-base BATCH=1,32 bash benchmarks/zoo_table.sh --against compile
#
# Extra arguments go to `kiln bench` (e.g. --iters 50, --against compile,onnxruntime).
set -euo pipefail

cd "$(dirname "$0")/.."
out_dir="${OUT_DIR:-docs}"
mkdir -p "$out_dir"

args=(--zoo --precision "${PRECISION:-fp16}" --batch "${BATCH:-1}"
      --json "$out_dir/zoo_table.json" --markdown "$out_dir/zoo_table.md"
      --plot "$out_dir/zoo_table.png")
if [[ -n "${MODELS:-}" ]]; then
  args+=(--models "$MODELS")
fi

PYTHON="${PYTHON:-python3}"
"$PYTHON" -c "import torch, sys; torch.cuda.is_available() or sys.exit(
    'no CUDA GPU: the zoo table is a GPU benchmark (set ALLOW_CPU=1 to run anyway)')" \
  || [[ -n "${ALLOW_CPU:-}" ]]

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null || true
"$PYTHON" -m kiln.cli bench "${args[@]}" "$@"
echo "wrote $out_dir/zoo_table.md, .json and .png"
