#!/usr/bin/env bash
# The whole GPU check in one run, for a GPU machine without network (H100/H200, torch with CUDA, nvcc):
# build the CUDA extension, run the GPU tests, run every benchmark on the GPU (then compute-sanitizer memcheck
# and racecheck on small cases), and print a short table last. Logs and JSON go to OUT_DIR.
#
#   bash benchmarks/gpu_check.sh OUT_DIR              # on the GPU machine (under 8 minutes on an H100)
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR    # anywhere: no build, CPU, quick benchmarks (CI runs it)
#
# Environment: PYTHON (default: python3), LLADA_CUDA_ARCHS (default 90a), MAX_JOBS (default 16),
# LLADA_WHEELS (default .whl: where an nvidia-cutlass wheel is taken from when the package is missing),
# LLADA_GPU_CHECK_SECONDS (default 540: the whole run's budget; a step gets what is left of it at most, and
# a step with less than 10 s left is skipped and counted as failed, so the run fits a 10-minute limit).
set -uo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
out=${1:?usage: gpu_check.sh [--dry-run] OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
failures=0

budget=${LLADA_GPU_CHECK_SECONDS:-540}

step() {  # step NAME TIMEOUT_S COMMAND...: runs COMMAND with a time limit, logs it, records failure
  local name=$1 limit=$2; shift 2
  local start=$SECONDS left=$((budget - SECONDS))
  echo "== $name"
  if [[ $left -lt 10 ]]; then
    echo "   skipped: the run's budget of $budget s is spent"
    failures=$((failures + 1))
    return 0
  fi
  [[ $left -lt $limit ]] && limit=$left
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - start)) s (log: $out/$name.log)"
  tail -n 3 "$out/$name.log" | sed 's/^/   | /'
  if [[ $rc -ne 0 ]]; then failures=$((failures + 1)); fi
  last_rc=$rc
  return 0
}
last_rc=0

benchmarks=(commit_tokens block_attention moe decode)
declare -A gpu_args=(
  [commit_tokens]="--device cuda"
  [block_attention]="--device cuda --dtype bfloat16 --tokens 4096 16384"
  [moe]="--device cuda"
  [decode]="--device cuda --shape small --batch 1 16 --gen-length 128"
)
if [[ $dry_run -eq 1 ]]; then
  step gpu-tests 600 "$PYTHON" -m pytest -q -m gpu tests
  for b in "${benchmarks[@]}"; do step "bench-$b" 300 "$PYTHON" -m "benchmarks.$b" --device cpu --quick; done
else
  if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)"; then
    wheels=${LLADA_WHEELS:-.whl}
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$out/site" "$wheels"/nvidia_cutlass-*.whl \
      || { echo "nvidia-cutlass is missing and no wheel was found in $wheels"; exit 1; }
    export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} LLADA_CUDA_ARCHS=${LLADA_CUDA_ARCHS:-90a}
  export PATH="$CUDA_HOME/bin:$PATH"
  step build 420 "$PYTHON" setup.py build_ext --inplace
  "$PYTHON" -c "import torch, llada_engine; print(llada_engine.build_info())" | tee "$out/build_info.txt"
  # pytest-xdist, where present, runs a crashing test in a worker of its own: the other tests still report.
  xdist=()
  "$PYTHON" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  # The Hopper attention kernels first, on their own and briefly (forward and gradients at the tile edges): if
  # they fail or hang, everything after runs the sm_80 kernels (LLADA_ATTENTION_KERNEL) and their own tests are
  # left out, so the rest still reports.
  smoke=(-m pytest -q -x -m gpu tests/ops/test_block_attention.py -k "tile_edges and hopper")
  step hopper-smoke 90 "$PYTHON" "${smoke[@]}"
  only=()
  if [[ $last_rc -ne 0 ]]; then
    # A failure that is not a hang (timeout's 124) is run once more under memcheck, for its first bad access.
    [[ $last_rc -ne 124 ]] && step hopper-memcheck 120 compute-sanitizer --tool memcheck "$PYTHON" "${smoke[@]}"
    echo "   the Hopper kernels failed: the remaining steps use LLADA_ATTENTION_KERNEL=flash2"
    export LLADA_ATTENTION_KERNEL=flash2
    only=(-k "not hopper")
  fi
  step gpu-tests 300 "$PYTHON" -m pytest -q -rf -m gpu "${xdist[@]}" "${only[@]}" tests
  for b in "${benchmarks[@]}"; do
    # shellcheck disable=SC2086
    step "bench-$b" 240 "$PYTHON" -m "benchmarks.$b" ${gpu_args[$b]}
  done
  # Sanitizers last, the slowest steps, so a short budget cuts them first. Every op once on small inputs
  # (the opcheck samples) under memcheck; one small case of each under racecheck.
  step memcheck 240 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PYTHON" -m pytest -q -m gpu -x tests/ops/test_opcheck.py
  step racecheck 180 compute-sanitizer --tool racecheck --error-exitcode 1 \
    "$PYTHON" -m pytest -q -m gpu -x tests/ops/test_opcheck.py -k "commit_tokens- or commit_tokens_per_seq- or block_attention_fwd or block_attention_bwd or moe_route or moe_permute or moe_grouped_gemm-"
fi

for b in "${benchmarks[@]}"; do
  [[ -f "$out/bench-$b.log" ]] && tail -n 1 "$out/bench-$b.log" >"$out/$b.json"
done
"$PYTHON" -m benchmarks.summarize "$out"
echo "gpu_check: $failures step(s) failed"
exit $((failures > 0))
