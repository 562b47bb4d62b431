#!/usr/bin/env bash
# The GPU run in one script (at most 10 minutes on one H100/H200: the step limits sum to 590 s), results as JSON
# in benchmarks/results/gpu/ (and copied to $OUT when set, as the device machines of this project want):
#   0. each kernel's default config compiled for sm_90a and sm_80 (what needs no GPU; the timings are read against
#      it): python -m fkv_compile.tools.gpu_static, docs/gpu_static.md
#   1. the Triton kernels on CUDA tensors against the float64 oracle in bf16, fp16 and fp32, and the autotune
#      cache (tuned once, then read by a fresh process): benchmarks/gpu_check.py
#   2. range attention against SDPA/FlashAttention on the same kept tokens and against dense, at 1560 and 8160
#      tokens per frame, with the GPU's measured copy and matmul ceilings: benchmarks/kernels.py
#   3. real-size Self Forcing (30 layers, 12 heads x 128, random weights, bf16, 1560 tokens per frame) dense vs
#      select vs compact, whole videos timed with CUDA events, per chunk: fkv bench --device cuda --side 1 (the
#      modes compile at the same time; its JSON holds the call level as soon as that is measured)
# On a machine without a CUDA GPU it says what it needs and exits with status 2. Each step has its own time
# limit; a step that fails or runs out is reported and the next one runs; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys, torch, triton; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "benchmarks/gpu.sh needs a CUDA GPU with PyTorch and Triton importable by $PY; none here, nothing measured." >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FKV_TUNING_CACHE="$PWD/benchmarks/results/gpu/tuning.json"
mkdir -p benchmarks/results/gpu
failed=0
step() {  # step <seconds> <what> <command...>
  local limit=$1 what=$2
  shift 2
  echo "== $what (at most ${limit} s)"
  local start=$SECONDS
  if ! timeout "$limit" "$@"; then
    echo "== FAILED or out of time: $what" >&2
    failed=1
  fi
  echo "== $what: $((SECONDS - start)) s"
}
"$PY" -c 'import torch, triton; print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)'
step 120 "kernels compiled for sm_90a and sm_80 (needs no GPU: registers, spills, shared memory, SASS)" \
  env TRITON_INTERPRET=0 "$PY" -m fkv_compile.tools.gpu_static --defaults-only --dtypes bfloat16,float16 \
  --out benchmarks/results/gpu/static
step 100 "kernels against the float64 oracle, autotune cache" "$PY" benchmarks/gpu_check.py
step 100 "kernels against SDPA/FlashAttention and dense" "$PY" benchmarks/kernels.py --dtype bfloat16
step 260 "real-size Self Forcing, dense vs select vs compact" "$PY" -m fkv_compile.tools.cli bench \
  --geometry self-forcing-5s --device cuda --side 1 --layers 30 --dtype bfloat16 --repeats 1 --no-png \
  --out benchmarks/results/gpu
step 10 "the roofline model beside the measurements" "$PY" -m fkv_compile.tools.roofline \
  --compare benchmarks/results/gpu/kernels_bfloat16.json --json benchmarks/results/gpu/model.json
if [ -n "${OUT:-}" ]; then
  cp -r benchmarks/results/gpu/*.json benchmarks/results/gpu/static "$OUT"/ 2>/dev/null || true
fi
exit $failed
