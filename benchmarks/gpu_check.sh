#!/usr/bin/env bash
# One command for whoever holds an H100 / H200: the CUDA tests, the headline kernel benchmark, one
# end-to-end step, the README table; at most 9 minutes (GPU_CHECK_BUDGET seconds, default 530), each
# step with its own limit, cut to what is left of the budget. Run from anywhere inside the repository:
#
#     bash benchmarks/gpu_check.sh                   # everything
#     GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # rehearsal: every step that needs no GPU runs
#                                                    # (wheel install, imports, collecting the tests,
#                                                    # parsing the benchmark arguments, the table);
#                                                    # the GPU steps are printed, not run
#
# Results land in benchmarks/results/ in dar bench's usual format (plus gpu-check-<commit>.log);
# commit them, and the regenerated README table, afterwards. Each step has its own time limit and
# a failing step does not stop the others; the exit status is the number of failed steps.
#
# Python packages the machine lacks (diffusers, for the end-to-end step; a setuptools new enough for
# pyproject.toml's [project] table, for the editable install) are installed from wheels
# in .whl/ at the repository root when that folder exists (docs/benchmarks.md says how to fetch
# them). The project itself is installed editable without dependencies, so the machine's torch and
# triton are the ones measured. When $OUT is set (the device tool's output folder), the log and
# the result files are copied there too.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 99
ROOT=$(pwd)
PY=${PYTHON:-python3}
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
RESULTS="$ROOT/benchmarks/results"
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET:-530}
LOG="$RESULTS/gpu-check-$COMMIT.log"
[ "$DRY" = 1 ] && LOG=$(mktemp)
mkdir -p "$RESULTS"
: > "$LOG"
failed=0
STARTED=$(date +%s)
MARK=$(mktemp)  # results newer than this are this run's

say() { echo "[gpu_check +$(( $(date +%s) - STARTED ))s] $*" | tee -a "$LOG"; }

# step NAME SECONDS COMMAND...: run with a time limit (cut to what is left of the budget), log
# everything, count failures. gpu_step: the same, printed but not run in a dry run.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - STARTED) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 5 ]; then
    failed=$((failed + 1))
    say "!! $name skipped: the ${BUDGET}s budget is spent"
    return 0
  fi
  say "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    failed=$((failed + 1))
    say "!! $name failed (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))"
  else
    say "ok $name"
  fi
}
gpu_step() {
  if [ "$DRY" = 1 ]; then
    say "== $1 (limit ${2}s; dry run: not run): ${*:3}"
    return 0
  fi
  step "$@"
}

say "commit $COMMIT ($(git log -1 --format=%cd --date=iso 2>/dev/null || echo '?'))$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ', with uncommitted changes')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$LOG"

# --- environment ------------------------------------------------------------------------------
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  step "install carried wheels" 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/dar-gpu-site .whl/*.whl
  export PYTHONPATH="/tmp/dar-gpu-site${PYTHONPATH:+:$PYTHONPATH}"
fi
step "install dar (editable, no dependencies)" 60 "$PY" -m pip install -q --no-index --no-deps \
  --no-build-isolation -e .
timeout 60 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "diffusers", "transformers", "hypothesis", "pytest_benchmark"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING:", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
try:
    import torch
    print("cuda", torch.version.cuda, "| device", torch.cuda.get_device_name(0), "| capability",
          torch.cuda.get_device_capability(0), "| cudnn", torch.backends.cudnn.version())
except Exception as exc:  # noqa: BLE001
    print("torch.cuda unusable:", exc)
EOF

# dar's triton backend runs on triton >= 3.2, probing what each release offers (dar.kernels.features:
# TMA descriptors from 3.4, pointer loads before); say which path this machine gets, or why the backend
# is unavailable, before the table does.
timeout 60 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
from dar.backends import triton_available
why = triton_available()
if why:
    print("WARNING: dar-triton rows will read 'unavailable':", why)
else:
    from dar.kernels import features
    print("dar triton backend: available; host TMA descriptors:", features.TensorDescriptor is not None)
EOF

# The kernels must run compiled, never interpreted; hypothesis keeps its CI example counts.
unset TRITON_INTERPRET
export HYPOTHESIS_PROFILE=ci MPLBACKEND=Agg PYTHONUNBUFFERED=1

# --- 1. every CUDA test: the kernel files (their cuda-only tests run here, the rest on the GPU
# instead of the interpreter), then every other test marked for CUDA -------------------------
KERNEL_TESTS=$(ls tests/kernels/test_attention.py tests/kernels/test_scoring*.py tests/backends/test_triton.py \
  tests/varlen/test_*.py 2>/dev/null | tr '\n' ' ')
# shellcheck disable=SC2086
CUDA_TESTS=$(grep -l -E "cuda_only|requires_cuda|torch\.cuda\.is_available\(\)" tests/*/test_*.py 2>/dev/null \
  | grep -v -E "^tests/eval/" | grep -v -x -F -f <(printf '%s\n' $KERNEL_TESTS) | tr '\n' ' ')
# shellcheck disable=SC2086
gpu_step "kernel tests on the GPU" 150 "$PY" -m pytest $KERNEL_TESTS -q -p no:cacheprovider -x --durations=5
if [ -n "$CUDA_TESTS" ]; then
  # shellcheck disable=SC2086
  # Whole files: their tests branch on torch.cuda.is_available() inside (none is named for CUDA, so a
  # -k filter would select nothing and pytest would exit 5, a failed step).
  gpu_step "other CUDA tests" 45 "$PY" -m pytest $CUDA_TESTS -q -p no:cacheprovider
fi

# --- 2. headline kernel benchmark: Qwen-Image-Edit 1-3 references (L 8392 / 12488 / 16584),
# bf16, D 128, DAR triton / torch / flex against plain SDPA (flash, cuDNN, efficient) and plain
# FlexAttention ------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  # shellcheck disable=SC2086
  step "collect the kernel tests" 60 "$PY" -m pytest $KERNEL_TESTS --collect-only -q -p no:cacheprovider
  step "parse the benchmark arguments" 60 "$PY" -c "
from dar.bench import _parser, impls, shapes
a = _parser().parse_args(['kernels', '--preset', 'qwen-edit', '--impl', 'dar-triton', '--impl', 'dar-torch',
    '--impl', 'dar-flex', '--impl', 'sdpa-flash', '--impl', 'sdpa-cudnn', '--impl', 'sdpa-efficient', '--impl', 'flex',
    '--warmup', '5', '--reps', '20', '--no-plot'])
print(len(shapes.resolve(a.preset)), 'shapes,', len(impls.resolve(a.impl)), 'implementations')
b = _parser().parse_args(['e2e', '--model', 'qwen-image-edit', '--backend', 'triton', '--warmup', '1', '--reps', '2'])
print('e2e', b.model, b.backend)"
fi
gpu_step "kernel benchmark (qwen-edit)" 130 "$PY" benchmarks/run.py kernels --preset qwen-edit \
  --impl dar-triton --impl dar-torch --impl dar-flex --impl sdpa-flash --impl sdpa-cudnn \
  --impl sdpa-efficient --impl flex --warmup 5 --reps 20 --no-plot

# --- 3. one end-to-end denoising step (Qwen-Image-Edit, random weights, DAR triton vs off) ----
gpu_step "end-to-end step (qwen-image-edit, triton)" 90 "$PY" benchmarks/run.py e2e --model qwen-image-edit \
  --backend triton --warmup 1 --reps 2

# --- 4. README table from benchmarks/results ---------------------------------------------------
if [ "$DRY" = 1 ]; then
  step "README performance table (printed)" 20 "$PY" benchmarks/make_table.py
else
  step "README performance table" 20 "$PY" benchmarks/make_table.py --readme README.md
fi

say "done in $(( $(date +%s) - STARTED ))s, $failed step(s) failed; results in benchmarks/results/, log $LOG"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] && [ "$DRY" != 1 ]; then
  cp "$LOG" "$OUT"/ 2>/dev/null
  # the newest results of this run (dar bench names them <kind>-<device>-<commit>.*)
  find "$RESULTS" -newer "$MARK" -type f \( -name '*.json' -o -name '*.md' \) -exec cp {} "$OUT"/ \; 2>/dev/null
  cp README.md "$OUT"/README.md 2>/dev/null
fi
exit "$failed"
