#!/usr/bin/env bash
# `make gpu-check`: one script for a machine with one H100/H200 (or more), about 2-3 minutes.
#
# Steps, each under its own `timeout` (expected time on an H200, estimated, not yet measured /
# hard limit; the limits add up to 9.6 minutes, so one 10-minute device command gets the summary;
# measured on an H200, 2026-12-04: 114 s in all before the tuned and sweep steps existed):
#   1. check torch + GPU, install pytest/ninja from build/gpu-wheels when missing   ~10 s
#   2. build the CUDA and CPU kernels (python -m model.kernels.build)             13 s / 100 s
#   3. the `gpu` tests of tests/test_kernels.py                                    12 s / 45 s
#   3b. tuned: the same tests with every kernel on a non-default launch shape     ~12 s / 40 s
#      (LLMK_TUNE=$TUNED_SHAPES, the shapes step 4b sweeps; see csrc/cuda_common.cuh)
#   4. kernel table: bench/bench_kernels.py --device cuda --repeats 10            19 s / 90 s
#   4b. sweep: bench/kernel_sweep.py, the norms' and cross-entropy's launch shapes  ~15 s / 50 s
#      (forward and backward timed apart, and a profiler table of their kernels): written to
#      <out>/<device>-sweep.md; the fastest shapes become the .cu launchers' defaults by hand
#   5. full training run of gpt-tiny: bench/gpu_train.py gpu-check                ~20 s / 60 s
#      With 2+ GPUs a 2-rank NCCL run, else 1 GPU in bf16; final val loss, tokens/s, MFU and the
#      peak's source go into the results file (marked gpu_train section).  Our loop
#      (`python -m launch train gpt-tiny`) runs when this Python has its modules (DeepSpeed,
#      pydantic, PyYAML, tokenizers, ...); otherwise the section says so in one line and names what
#      ran instead: gpu_train.py's plain-PyTorch loop over the same model, tokens, init, data order,
#      optimiser and schedule (DDP over NCCL for 2 ranks), from the plan and token files in
#      build/gpu-data (made here by `.venv/bin/python bench/gpu_train.py prepare build/gpu-data`;
#      carry it with the wheels).  Soft budget 45 s (it stops training and still evaluates).
#      The recipe's model.kernels=auto loads the kernels built in step 2 (kernels=torch when that
#      step failed; without it, on a fresh machine, auto builds them inside this step's limit).
#   6. ONNX Runtime: bench/gpu_onnx.py check build/gpu-onnx                        3 s / 40 s
#      The exported decoder (gpt-tiny's shape, KV cache as inputs/outputs; made here by
#      `.venv/bin/python bench/gpu_onnx.py prepare build/gpu-onnx`, carry it) on the TensorRT and
#      CUDA execution providers against the PyTorch model's logits (prefill + 16 decode steps) and
#      the CPU provider's decode-step time.  A provider this onnxruntime lacks (or no onnxruntime)
#      is one line in the results, not a failure.
#   7. training step: bench/bench_step.py --device cuda --profile (GPT-2 124M, batch 32 x 1024, plain
#      GPT eager/compile vs ours torch/fused/fused+compile/torch+compile; three torch.compile runs,
#      14-19 s each on the H200; then one profiled step per row: device time by kernel family)
#                                              --budget $STEP_BUDGET_S (120) / that + 30 s
#   Then a summary of each step's status and time, and the results last (bench/results/<device>.md:
#   the kernel table, the gpu_train section, the marked bench_step section).  A failing step does
#   not stop the later ones; the script exits non-zero at the end if any failed.
#
# Works with the machine's own Python (torch >= 2.6, no network, none of our other pins): it imports
# only torch, pytest and ninja, and installs the last two from wheels brought along in
# build/gpu-wheels (made here by `make gpu-wheels`; build/ is git-ignored, so carry it to the
# machine, e.g. the device tool's carry: ["build/gpu-wheels", "build/gpu-data"]) into
# build/gpu-pylib when they are missing.
#
# Environment:
#   PYTHON=python3           the interpreter to use
#   GPU_CHECK_STEPS="build tests tuned kernels sweep train onnx step"   run only these steps (e.g. "step" to rerun
#                            the training-step benchmark after the kernels were built on this machine)
#   STEP_BUDGET_S=120        soft time limit of bench_step.py (it skips a compile that would not fit
#                            and stops timing at the limit; SIGTERM 30 s later writes what it has)
#   GPU_CHECK_DATA=build/gpu-data   the plain loop's plan and tokens (bench/gpu_train.py prepare)
#   GPU_CHECK_ONNX=build/gpu-onnx   the exported decoder and its reference (bench/gpu_onnx.py prepare)
#   GPU_CHECK_TRAIN_OUT=build/gpu-train   the training run's folder (metrics.jsonl, summary.json; our
#                            loop's run with its checkpoint under runs/); its figures go to the results
#   GPU_CHECK_TRAIN_ARGS=    more arguments of `gpu_train.py gpu-check` (--kernels torch, --procs 1,
#                            --steps N)
#   GPU_CHECK_KERNEL_ARGS=   more arguments of bench_kernels.py (the CPU test adds --no-compile)
#   GPU_CHECK_ALLOW_CPU=1    rehearsal without a GPU: CPU kernels only, the gpu tests skip, the
#                            benchmarks run with --device cpu --quick, the training run stops after
#                            10 steps, and they write to build/gpu-check/
#   GPU_CHECK_OUT=dir        where the benchmarks write their tables (default bench/results; through
#                            the device tool use GPU_CHECK_OUT=$OUT so the tables come back even
#                            if the command is cut short, then copy them to bench/results/)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=" ${GPU_CHECK_STEPS:-build tests tuned kernels sweep train onnx step} "
# Non-default launch shapes of every kernel the sweep varies (the tuned step runs the gpu tests with them)
TUNED_SHAPES=norm_fwd_threads=128,norm_fwd_hoist=1,norm_bwd_threads=256,norm_bwd_blocks=4,ce_fwd_unroll=4,ce_fwd_threads=256,ce_bwd_unroll=4,ce_bwd_gy=8
STEP_BUDGET_S=${STEP_BUDGET_S:-120}
OUT=${GPU_CHECK_OUT:-bench/results}
DATA=${GPU_CHECK_DATA:-build/gpu-data}
ONNX=${GPU_CHECK_ONNX:-build/gpu-onnx}
TRAIN_OUT=${GPU_CHECK_TRAIN_OUT:-build/gpu-train}
DEV=cuda
BENCH_ARGS=()
KERNEL_ARGS=(--repeats 10)
TRAIN_ARGS=()
T0=$SECONDS
SUMMARY=()
FAILED=0

$PY - <<'PYEOF'
import torch, sys
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, device: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE'}")
sys.exit(0 if torch.cuda.is_available() else 3)
PYEOF
rc=$?
if [ "$rc" -ne 0 ]; then
  if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ] && [ "$rc" -eq 3 ]; then
    echo "no GPU: CPU rehearsal (GPU_CHECK_ALLOW_CPU=1)"
    DEV=cpu
    BENCH_ARGS=(--quick)
    KERNEL_ARGS=()
    TRAIN_ARGS=(--steps 10)
    OUT=${GPU_CHECK_OUT:-build/gpu-check}
  else
    echo "no usable torch with a CUDA GPU (set GPU_CHECK_ALLOW_CPU=1 to rehearse on CPU)" >&2
    exit "$rc"
  fi
fi

# Missing pytest/ninja go into build/gpu-pylib (on PYTHONPATH, its bin/ on PATH), not into the
# machine's Python: --target also works where that Python is "externally managed" (PEP 668) or
# read-only.  One pip call for both: a second --target install into the same folder would skip
# bin/ (already there) and lose the ninja binary.  ninja counts as present only as an executable.
PYLIB=$PWD/build/gpu-pylib
export PYTHONPATH="$PYLIB${PYTHONPATH:+:$PYTHONPATH}"
add_ninja_path() {
  local bin_dir
  bin_dir=$($PY -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null || true)
  export PATH="$PYLIB/bin${bin_dir:+:$bin_dir}:$PATH"
}
add_ninja_path
MISSING=()
$PY -c "import pytest" 2>/dev/null || MISSING+=(pytest)
command -v ninja >/dev/null || MISSING+=(ninja)
if [ "${#MISSING[@]}" -gt 0 ]; then
  $PY -m pip install --quiet --upgrade --no-index --find-links build/gpu-wheels --target "$PYLIB" "${MISSING[@]}" ||
    { echo "cannot install ${MISSING[*]} from build/gpu-wheels (run 'make gpu-wheels' and carry build/gpu-wheels)" >&2
      exit 4; }
  add_ninja_path
fi
echo "ninja: $(command -v ninja || echo MISSING); pytest: $($PY -c 'import pytest; print(pytest.__version__, pytest.__file__)' 2>&1 | tail -1)"

# step NAME TIMEOUT_S COMMAND...: runs it under timeout, records status and time, never exits.
step() {
  local name=$1 limit=$2 t=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@"
  rc=$?
  local status="ok"
  LAST_RC=$rc
  [ "$rc" -eq 0 ] || { status="FAILED rc=$rc"; [ "$rc" -eq 124 ] && status="TIMED OUT after ${limit}s"; FAILED=1; }
  SUMMARY+=("$(printf '%-8s %-28s %4ss' "$name" "$status" "$((SECONDS - t))")")
}

# The results file the benchmarks write (bench_kernels.py's name for this device).
RESULT=$($PY - "$OUT" "$DEV" "${BENCH_ARGS[@]}" <<'PYEOF' 2>/dev/null
import sys
sys.path.insert(0, "bench")
from bench_kernels import device_slug
print(f"{sys.argv[1]}/{device_slug(sys.argv[2])}{'-quick' if '--quick' in sys.argv else ''}.md")
PYEOF
)
RESULT=${RESULT:-$OUT/gpu-check.md}
# shellcheck disable=SC2206  # word splitting of the extra arguments is intended
KERNEL_ARGS+=(${GPU_CHECK_KERNEL_ARGS:-})
# shellcheck disable=SC2206
TRAIN_ARGS+=(${GPU_CHECK_TRAIN_ARGS:-})

if [ "$DEV" = cuda ]; then BUILD_FLAGS=(--cuda --cpu); else BUILD_FLAGS=(--cpu); fi
case $STEPS in *" build "*)
  step build 100 $PY -m model.kernels.build "${BUILD_FLAGS[@]}"
  # kernels=auto would try the build again inside the training run's limit
  [ "$LAST_RC" -eq 0 ] || { TRAIN_ARGS+=(--kernels torch); echo "build failed: the training run uses kernels=torch"; } ;;
esac
case $STEPS in *" tests "*) step tests 45 $PY -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider ;; esac
case $STEPS in *" tuned "*)
  step tuned 40 env LLMK_TUNE="$TUNED_SHAPES" $PY -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider ;; esac
case $STEPS in *" kernels "*)
  step kernels 90 $PY bench/bench_kernels.py --device "$DEV" --out "$OUT" "${KERNEL_ARGS[@]}" "${BENCH_ARGS[@]}" ;; esac
case $STEPS in *" sweep "*)
  step sweep 50 $PY bench/kernel_sweep.py --device "$DEV" --out "$OUT" "${BENCH_ARGS[@]}" ;; esac
case $STEPS in *" train "*)
  step train 60 $PY bench/gpu_train.py gpu-check --plan "$DATA" --out "$TRAIN_OUT" --results "$RESULT" \
    --device "$DEV" --budget 45 "${TRAIN_ARGS[@]}" ;; esac
case $STEPS in *" onnx "*)
  ONNX_PROVIDERS=(); [ "$DEV" = cpu ] && ONNX_PROVIDERS=(--providers CPUExecutionProvider --repeats 5)
  step onnx 40 $PY bench/gpu_onnx.py check "$ONNX" --results "$RESULT" "${ONNX_PROVIDERS[@]}" ;; esac
case $STEPS in *" step "*)
  # On the GPU also ours with kernels=torch compiled (is the gap to plain compile our model or our
  # kernels?), and every row's step by kernel family (torch.profiler).
  STEP_ROWS=(); [ "$DEV" = cuda ] && STEP_ROWS=(--rows plain,plain-compile,ours-torch,ours-fused,ours-fused-compile,ours-torch-compile)
  step step "$((STEP_BUDGET_S + 30))" $PY bench/bench_step.py --device "$DEV" --out "$OUT" --budget "$STEP_BUDGET_S" \
    --profile "${STEP_ROWS[@]}" "${BENCH_ARGS[@]}" ;; esac
echo
echo "================================ summary (total $((SECONDS - T0))s)"
printf '%s\n' "${SUMMARY[@]}"
echo
echo "================================ results ($RESULT)"
if [ -f "$RESULT" ]; then cat "$RESULT"; else echo "(no table written)"; fi
exit "$FAILED"
