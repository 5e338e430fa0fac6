#!/usr/bin/env bash
# One call on a lent GPU box (no network): build the extension, run the GPU parity suite
# (tests marked `gpu` and the Triton tests on CUDA, not the interpreter), compute-sanitizer
# on a small run of every Triton core, and the issue-5 benchmarks in bfloat16.
#
#   scripts/gpu_check.sh [build] [test] [sanitize] [bench] [suites]   (default: the first four)
#
# Everything lands in $OUT (default ./gpu_check_out): one log per step, junit XML, the
# sanitizer reports, and the benchmark JSON/plots (also written to benchmarks/results/, which
# is what gets committed). Each step has its own time limit (seconds, override by variable)
# so that the whole call fits one 10-minute device command; a failing step does not stop
# the next one, and the exit status is the number of failed steps.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT" benchmarks/results
BUILD_LIMIT=${BUILD_LIMIT:-240}
TEST_LIMIT=${TEST_LIMIT:-150}
SANITIZE_LIMIT=${SANITIZE_LIMIT:-90}
BENCH_LIMIT=${BENCH_LIMIT:-240}
STEPS=${*:-build test sanitize bench}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TRITON_INTERPRET
failed=0

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }
run_step() {  # name limit command...: runs with a time limit, logs, counts failures
  local name=$1 limit=$2; shift 2
  log "$name: $* (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$name.log" | sed "s/^/  [$name] /" | tee -a "$OUT/summary.txt"
  log "$name: exit $rc"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  return "$rc"
}
has() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }

{
  echo "host $(hostname), $(date -u)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  command -v nvcc >/dev/null && nvcc --version | tail -1
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import triton; print('triton', triton.__version__)" 2>&1
  git log -1 --oneline 2>/dev/null
} | tee "$OUT/environment.txt"

# The venv of `make build` reuses the system torch; offline it only works when every dev
# requirement is already installed, so fall back to building in place with system python.
PY=.venv/bin/python
if has build; then
  if ! run_step build "$BUILD_LIMIT" make build PYTHON=python3; then
    PY=python3
    run_step build-inplace "$BUILD_LIMIT" python3 setup.py build_ext --inplace
  fi
fi
[ -x "$PY" ] || PY=python3
log "python for the remaining steps: $PY"
$PY -c "import kdfast; print(kdfast.available_backends())" 2>&1 | tee -a "$OUT/summary.txt"

if has test; then
  run_step test "$TEST_LIMIT" $PY -m pytest -q -m "gpu or triton_interpret" tests \
    --junitxml="$OUT/gpu-tests.xml"
fi

if has sanitize; then
  cat >"$OUT/triton_smoke.py" <<'PYEOF'
"""Forward and backward of every Triton core once, on small CUDA tensors (for the sanitizer)."""
import torch
from kdfast.functional import at_loss, fsp_loss, nst_loss, sp_loss

torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    s = torch.randn(3, 5, 9, 7, device="cuda", dtype=dtype, requires_grad=True)
    t = torch.randn(3, 7, 9, 7, device="cuda", dtype=dtype, requires_grad=True)
    losses = [at_loss(s, t, backend="triton"), sp_loss(s, t, backend="triton"),
              nst_loss(s, t, kernel="rbf", sigma2="mean", backend="triton"),
              nst_loss(s, t, kernel="poly", unbiased=True, backend="triton"),
              fsp_loss([(s, t)], [(s.detach() * 2, t.detach())], backend="triton")]
    sum(losses).backward()
    torch.cuda.synchronize()
    print(dtype, [float(x) for x in losses], float(s.grad.float().norm()))
PYEOF
  if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck; do
      run_step "sanitize-$tool" "$SANITIZE_LIMIT" env KDFAST_TRITON_NO_AUTOTUNE=1 \
        compute-sanitizer --tool "$tool" --error-exitcode 1 $PY "$OUT/triton_smoke.py"
    done
  else
    log "compute-sanitizer not found: running the smoke script alone"
    run_step smoke "$SANITIZE_LIMIT" $PY "$OUT/triton_smoke.py"
  fi
fi

# Issue-5 targets, bfloat16, forward+backward, side by side: eager reference, torch.compile,
# the native and Triton backends (max-autotune and the naive broadcasts only in `suites`).
PROVIDERS=${PROVIDERS:-reference,compile,native,triton}
bench_step() {  # step-name core shapes...: one kdfast.bench run within what is left
  local name=$1 core=$2; shift 2
  local left=$((BENCH_LIMIT - ($(date +%s) - bench_start)))
  if [ "$left" -lt 10 ]; then log "$name: skipped, benchmark time used up"; return; fi
  local args=(--cores "$core" --dtype bfloat16 --device cuda --modes full
              --providers "$PROVIDERS" --repeats 10 --time-limit 20
              --out benchmarks/results --name "$device-issue5-${name#bench-}")
  for shape in "$@"; do args+=(--shape "$shape"); done
  run_step "$name" "$left" env ${BENCH_ENV:-} $PY -m kdfast.bench "${args[@]}"
}
if has bench; then
  if $PY -c "import kdfast.bench" 2>/dev/null; then
    device=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
    bench_start=$(date +%s)
    bench_step bench-at at 128x64/256x56x56
    bench_step bench-nst-rbf nst-rbf 64x512/2048x7x7 64x128/512x28x28 16x256/512x256x256
    # the other side of the MMD backward choice (kept Gram blocks instead of recomputing)
    PROVIDERS=triton BENCH_ENV=KDFAST_TRITON_MMD_RECOMPUTE_MAX_HW=0 \
      bench_step bench-nst-rbf-kept-grams nst-rbf 64x512/2048x7x7
    bench_step bench-nst-poly nst-poly 64x128/512x28x28
    bench_step bench-sp sp 256x512/2048x7x7
  else
    log "kdfast.bench is not importable (branch bench not merged?): benchmarks skipped"
    failed=$((failed + 1))
  fi
fi
if has suites; then  # the full imagenet/large suites, every provider: a call of its own
  for suite in imagenet large; do
    run_step "suite-$suite" "$BENCH_LIMIT" $PY -m kdfast.bench --suite "$suite" \
      --dtype bfloat16 --device cuda --time-limit 20 --out benchmarks/results
  done
fi

cp -r benchmarks/results "$OUT/benchmark-results" 2>/dev/null
log "done: $failed failed step(s)"
exit "$failed"
