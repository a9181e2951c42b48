#!/usr/bin/env bash
# The one script for a lent GPU machine: build the wheel with the CUDA kernels, install it,
# test it, benchmark it. Run from the repository root with $OUT set (the device tool does):
#
#     bash benchmarks/gpu_validate.sh
#
# Stages (each under its own time limit, the whole script under 9 minutes; a failed stage is
# reported and the later ones still run; the exit status is non-zero if any stage failed):
#   1. versions: nvidia-smi, python, torch, nvcc                       -> $OUT/00_env.log
#   2. pip wheel --no-build-isolation --no-deps -w /tmp/wheel . (the README's GPU build; with
#      the GPU visible, for its architecture), then pip install --no-deps --force-reinstall of
#      that wheel                                                        -> $OUT/01_build.log
#      (the installed wheel, not the source tree, is what the next stages import: they run
#      from a scratch directory with `python -P`, so the checkout is not on sys.path)
#   3. pytest tests/test_ops.py [tests/test_triton_ops.py] tests/, through
#      benchmarks/pytest_installed.sh (which .ci/run uses to collect the suite the same way)
#                                                                       -> $OUT/02_pytest.log
#   4. benchmarks/bench_gpu_ops.py --out $OUT/gpu_ops.json              -> $OUT/03_bench.log
#   5. engm-fast bench --device cuda --out $OUT/gpu_bench.json (ENGM vs vmap, BackPACK,
#      Opacus; the peers come from .whl/ when carried, see benchmarks/fetch_peer_wheels.sh)
#                                                                       -> $OUT/04_step.log
#   6. a summary of the stages                                          -> $OUT/summary.txt
# At most 8 files in $OUT, no subfolders.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:?set OUT to the folder for logs and results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
WHEEL_DIR="${ENGM_WHEEL_DIR:-/tmp/wheel}"
SCRATCH="$(mktemp -d /tmp/engm_gpu_validate.XXXXXX)"
START=$(date +%s)
BUDGET="${ENGM_VALIDATE_BUDGET:-570}"  # seconds for the whole script (< the device's 10-minute call)
RESERVE=15          # kept back for the summary
declare -a SUMMARY=()
STATUS=0

ts() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

# seconds a stage may use: its own cap, or what is left of the budget
limit() {
  local cap=$1 left=$(( BUDGET - RESERVE - ($(date +%s) - START) ))
  (( left < cap )) && cap=$left
  (( cap < 1 )) && cap=1
  echo "$cap"
}

record() {  # record NAME RC SECONDS
  local verdict="ok"
  if (( $2 == 124 || $2 == 137 )); then verdict="TIMEOUT"; elif (( $2 != 0 )); then verdict="FAILED (rc $2)"; fi
  [[ $verdict != ok ]] && STATUS=1
  SUMMARY+=("$(printf '%-10s %-16s %4ss' "$1" "$verdict" "$3")")
  ts "$1: $verdict"
}

run_stage() {  # run_stage NAME CAP LOGFILE FUNCTION (an exported function, run by a child bash)
  local name=$1 cap=$2 log=$3 fn=$4
  local t0 rc lim
  lim=$(limit "$cap")
  ts "$name: start (limit ${lim}s) -> $log"
  t0=$(date +%s)
  # timeout signals the child's whole process group: pytest / python get the SIGINT and
  # still print what they have.
  timeout --signal=INT --kill-after=10 "$lim" bash -o pipefail -c "$fn" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  record "$name" "$rc" "$(( $(date +%s) - t0 ))"
  return "$rc"
}

cd "$REPO" || exit 1
# The benchmark's peers (BackPACK, Opacus, unfoldNd) are not in the GPU image and it has no
# network: benchmarks/fetch_peer_wheels.sh downloads them into .whl/, which the device call
# carries. Installed to a side directory so nothing of the image's own packages changes.
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/engm_peers \
    "$REPO"/.whl/*.whl && export PYTHONPATH="/tmp/engm_peers${PYTHONPATH:+:$PYTHONPATH}"
fi
export REPO OUT PY WHEEL_DIR SCRATCH

# ------------------------------------------------------------------ 1. versions
env_report() {
  echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
  nvidia-smi || echo "nvidia-smi failed"
  echo "--- python / torch / triton"
  "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "cc", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "mem GiB", round(p.total_memory / 2**30, 1))
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
EOF
  echo "--- nvcc"
  command -v nvcc && nvcc --version || echo "nvcc not on PATH"
  echo "--- g++"
  g++ --version | head -1 || echo "no g++"
}
export -f env_report
run_stage env 30 "$OUT/00_env.log" env_report

# ------------------------------------------------------------------ 2. wheel
build_and_install() {
  export MAX_JOBS="${MAX_JOBS:-16}"
  rm -rf "$WHEEL_DIR"
  "$PY" -m pip wheel --no-build-isolation --no-deps --no-index -w "$WHEEL_DIR" "$REPO" || return 1
  local whl
  whl=$(ls "$WHEEL_DIR"/engm_fast-*.whl 2>/dev/null | head -1)
  [[ -n $whl ]] || { echo "no engm_fast wheel in $WHEEL_DIR"; return 1; }
  echo "wheel: $whl"
  "$PY" -m zipfile -l "$whl" | grep -E "_C\..*\.so" || { echo "the wheel has no compiled extension"; return 1; }
  "$PY" -m pip install --no-deps --force-reinstall --no-index "$whl" || return 1
  # From the scratch directory: the installed package must be the one imported, with CUDA ops.
  (cd "$SCRATCH" && "$PY" -P - <<'EOF'
import engm_fast, torch
print("imported", engm_fast.__file__)
print("backends", engm_fast.available_backends(), "native error:", engm_fast.native_import_error())
assert "site-packages" in engm_fast.__file__ or "dist-packages" in engm_fast.__file__, "not the installed wheel"
assert "cuda" in engm_fast.available_backends(), "the installed extension has no CUDA kernels"
EOF
  )
}
export -f build_and_install
run_stage build 180 "$OUT/01_build.log" build_and_install

# ------------------------------------------------------------------ 3. tests
ENGM_TESTS="$REPO/tests/test_ops.py"
if [[ -f $REPO/tests/test_triton_ops.py ]]; then
  ENGM_TESTS+=" $REPO/tests/test_triton_ops.py"
else
  echo "tests/test_triton_ops.py not present: skipped" | tee -a "$OUT/02_pytest.log"
fi
ENGM_TESTS+=" $REPO/tests"
export ENGM_TESTS
run_tests() {
  # CI=true: the native tests fail, instead of skipping, if the installed wheel lacks _C.
  # shellcheck disable=SC2086  # ENGM_TESTS is a space-separated list of paths
  CI=true PYTHON="$PY" bash "$REPO/benchmarks/pytest_installed.sh" -q -rfEs $ENGM_TESTS
}
export -f run_tests
run_stage pytest 130 "$OUT/02_pytest.log" run_tests
tail -n 5 "$OUT/02_pytest.log" | sed 's/^/    /'

# ------------------------------------------------------------------ 4. op benchmarks
run_bench() { cd "$SCRATCH" && "$PY" -P -u "$REPO/benchmarks/bench_gpu_ops.py" --out "$OUT/gpu_ops.json"; }
export -f run_bench
run_stage bench 90 "$OUT/03_bench.log" run_bench

# ------------------------------------------------------------------ 5. peer benchmark
run_peer_bench() {
  cd "$SCRATCH" && "$PY" -P -u -m engm_fast bench --device cuda --out "$OUT/gpu_bench.json"
}
export -f run_peer_bench
run_stage peers 140 "$OUT/04_step.log" run_peer_bench

# ------------------------------------------------------------------ 6. summary
{
  echo "engm_fast GPU validation, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START ))s"
  printf '%s\n' "${SUMMARY[@]}"
  echo "--- op benchmark table"
  sed -n '/^case /,$p' "$OUT/03_bench.log" 2>/dev/null | head -40
  echo "--- peer benchmark table"
  sed -n '/^engm-fast bench/,$p' "$OUT/04_step.log" 2>/dev/null | head -60
} | tee "$OUT/summary.txt"
rm -rf "$SCRATCH"
exit "$STATUS"
