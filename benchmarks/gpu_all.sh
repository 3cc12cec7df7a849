#!/usr/bin/env bash
# Every GPU figure issue #13 asks for, and the GPU tests, in one run with a time limit per step, so
# that a GPU host lent for a few minutes gives all of them at once (docs/benchmarks.md "On a GPU").
#
#   benchmarks/gpu_all.sh [OUTDIR]          # default OUTDIR: gpu-results/
#   SMOKE=1 benchmarks/gpu_all.sh /tmp/x    # tiny sizes on the CPU: checks the script, measures nothing
#
# PY picks the interpreter (default: .venv/bin/python when present, else python3); STEPS the steps
# to run (default: environment serving gpu_tests train_step batch; the first four fit 10 minutes, so
# a machine lent by the call can take them in one call and `STEPS=batch` in a second). MODELS is where
# the serving step leaves its ViT-B exports for the batch step (default: $TMPDIR/hyperct-gpu-models).
# Each step writes OUTDIR/<step>.log (and .json where it has figures); OUTDIR/summary.txt has one
# line per step with its exit status and seconds. A failed step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-results}"
mkdir -p "$out"
py="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONUNBUFFERED=1
: > "$out/summary.txt"

steps=" ${STEPS:-environment serving gpu_tests train_step batch} "
models="${MODELS:-${TMPDIR:-/tmp}/hyperct-gpu-models}"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  [[ "$steps" == *" $name "* ]] || return 0
  echo "== $name (at most ${limit} s): $*"
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$out/summary.txt"
  tail -n 30 "$out/$name.log"
}

if [ "${SMOKE:-0}" = 1 ]; then
  step serving 300 "$py" benchmarks/gpu_serving.py --device cpu --config tiny --tasks 3 --images 11 \
    --reps 2 --work "$models" --json "$out/serving.json"
  step train_step 300 "$py" benchmarks/train_step.py --config tiny --steps 2 --json "$out/train_step.json"
  step batch 300 "$py" -m benchmarks.batch --studies 2 --slices 150 --model "$models/merged_fp32"
  exit 0
fi

step environment 45 "$py" -c '
import onnxruntime as ort, torch
from operators.cuda_device import device_memory, preload_cuda_libraries
print("preload_dlls:", preload_cuda_libraries())
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("onnxruntime", ort.__version__, ort.get_available_providers())
print("device memory:", device_memory())
'
# the most important first (a lent GPU may be short of time): the limits add up to under 10 minutes
# item 1: all 25 tasks of one study, ORT CUDA EP (runner, no binding, factored, CUDA graph) vs PyTorch fp16 vs the floor
step serving 300 "$py" benchmarks/gpu_serving.py --work "$models" --json "$out/serving.json"
# the GPU tests: fp16 parity to fp32 on the CUDA EP, IO binding parity, every session resident on a
# large card, bf16 training with TF32 and the loader ratio
step gpu_tests 120 "$py" -m pytest -m gpu -q -p no:cacheprovider tests/test_export_formats.py \
  tests/test_training_speed.py
# item 3: ViT-B training step (bf16 autocast, TF32) vs the loader, projected hours for 20 epochs
step train_step 120 "$py" benchmarks/train_step.py --config vitb16 --steps 10 --json "$out/train_step.json"
# item 2: hyperct process on 300-slice studies with the ViT-B fp16 model (random weights) against the
# inference-only rate of the same model; needs the serving step's export
step batch 300 "$py" -m benchmarks.batch --studies 6 --workers 2 --model "$models/merged_fp16"
