#!/usr/bin/env bash
# Proves the CUDA ops on a GPU machine (H100/H200, torch preinstalled, no network), in two calls that each
# fit in 10 minutes on 16 cores:
#   bash scripts/gpu_check.sh part1   # environment, build (-Xptxas -v), kernels registered, the CUDA kernels'
#                                     #   tests, compute-sanitizer memcheck/racecheck/synccheck/initcheck, then
#                                     #   every other CUDA test; measured on an H200 (2026-12-04): build 66 s,
#                                     #   tests 10 + 70 s, each sanitizer 7-8 s
#   bash scripts/gpu_check.sh part2   # both benchmarks at the paper size with every peer, ncu of the
#                                     #   from-logits kernels and of the fused lm_head's Triton matmuls, then
#                                     #   profile_step.py's kernel tables of one step;
#                                     #   measured: from logits 29 s for its bf16 row alone, from hidden 68 s
#                                     #   (the full tables, ncu and the profiles: not yet run; ~7 minutes est.)
#   bash scripts/gpu_check.sh part3   # amapo-train throughput and peak memory of the fused, ops and eager loss
#                                     #   paths on a random 1.5B Llama-3 shape (benchmarks/bench_train.py; not yet run)
#   bash scripts/gpu_check.sh all     # part1 and part2, one after the other, where one call may run longer than
#                                     #   10 minutes (refused under the device tool: its $OUT returns 8 files)
# With the device tool (15 device-minutes a session, the machine's start of a minute or more included, calls of
# at most 10 minutes, the machine given back after 30 s idle): part1 with BUDGET=300 (~3.5 minutes), then at
# once part2 with BUDGET set to the budget_left_s that `status` reports less 60 s (at most 570), so that the
# call returns its results before the session's device time ends; part3 needs a session of its own.
# Everything lands in one results folder, RESULTS (default $OUT when set, else results/gpu_check): logs,
# JSON, markdown tables and summary_<part>.md, a table of each step's status and time.
# Peers and the test dependencies the image lacks travel as wheels: run `bash scripts/fetch_peer_wheels.sh`
# on a machine with PyPI first, and carry .whl/. part2 rebuilds only if the extension is missing (a
# fresh machine); carry part1's _C*.so in .gpu_so/ to skip that.
# BUDGET (seconds, default 570) bounds the whole invocation, so that it returns inside one device call of
# 10 minutes: each step's time limit is cut to what is left, and a step that cannot start in time is
# recorded as SKIPPED (out of time) instead of the call being killed with its results unreturned. The
# benchmarks write their results files after every row, so a step stopped by its limit keeps its rows
# (marked partial: "complete": false).
# Under the device tool ($OUT set, 8 files at most come back) the logs are packed into logs.tar.gz
# when the folder holds more than 8 files.
set -uo pipefail
export PYTHONUNBUFFERED=1
export TRITON_PRINT_AUTOTUNING=1  # each autotuned kernel's choice and tuning time, in the logs
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PART="${1:-all}"
RESULTS="${RESULTS:-${OUT:-$ROOT/results/gpu_check}}"
mkdir -p "$RESULTS"
PY="${AMAPO_PYTHON:-python3}"
SITE=/tmp/amapo_site
WHEELS="${WHEELS:-.whl}"  # the carried peer wheels (scripts/fetch_peer_wheels.sh)
export PYTHONPATH="$ROOT:$ROOT/python:$SITE${PYTHONPATH:+:$PYTHONPATH}"
FAILED=0
BUDGET="${BUDGET:-570}"
RESERVE=15  # seconds kept for the summary and the packing after the last step

# One row of the summary table per step: name, status (ok / FAILED / see log), seconds, detail.
summary_row() { echo "| $1 | $2 | $3 | $4 |" >>"$SUMMARY"; }
start_summary() {
  SUMMARY="$RESULTS/summary_$1.md"
  printf '# gpu_check %s, %s\n\n| step | status | s | detail |\n|---|---|---|---|\n' "$1" "$(date -u +%FT%TZ)" >"$SUMMARY"
}
run_step() {  # run_step NAME LOG TIMEOUT CMD...: runs CMD with a time limit, logs it, records a row
  local name=$1 log=$2 limit=$3 start=$SECONDS rc left
  shift 3
  left=$((BUDGET - SECONDS - RESERVE))
  if [ "$left" -lt 30 ]; then
    FAILED=1; summary_row "$name" "SKIPPED (out of time: BUDGET=$BUDGET s)" 0 -
    echo "== $name: skipped, ${left} s of the budget left"; return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" >>"$log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then summary_row "$name" ok $((SECONDS - start)) "$(basename "$log")"
  else FAILED=1; summary_row "$name" "FAILED (rc $rc$([ $rc -eq 124 ] && echo ', timed out'))" $((SECONDS - start)) "$(basename "$log")"; fi
  tail -3 "$log"
  return $rc
}

install_wheels() {  # install_wheels LOG: the carried wheels into $SITE, a summary row of its own (a failed
  # install is FAILED there, not only a "not installed" in the peers' rows)
  local log=$1
  : >"$log"
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "wheels: $(cd "$WHEELS" && echo *.whl)" >>"$log"
    run_step "peer wheels" "$log" 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" "$WHEELS"/*.whl
  else
    echo "wheels: none carried ($WHEELS/ is empty): the peers will say 'not installed' in their rows" | tee -a "$log"
  fi
}

# The build, against this machine's torch (no network: --no-index), ptxas' register/spill report in the log.
BUILD=(env AMAPO_CUDA=1 "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}" "MAX_JOBS=${MAX_JOBS:-16}"
       "CMAKE_ARGS=-DCMAKE_CUDA_FLAGS=-Xptxas=-v" "$PY" -m pip install -v --no-index --no-build-isolation --no-deps -e .)

part1() {
  start_summary part1
  install_wheels "$RESULTS/env.txt"
  (  # a subshell whose status says whether every probe ran: the row was "ok" whatever they printed
    probe=0
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || probe=1
    nvcc --version | tail -2 || probe=1
    "$PY" -c 'import sys, sysconfig, os, torch, triton
inc = sysconfig.get_paths()["include"]
print("python", sys.version.split()[0], sys.executable, "| Python.h:", os.path.exists(inc + "/Python.h"))
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
      "SMs", torch.cuda.get_device_properties(0).multi_processor_count)' || probe=1
    for tool in compute-sanitizer ncu cmake ninja; do echo "$tool: $(command -v $tool || echo MISSING)"; done
    exit $probe
  ) 2>&1 | tee -a "$RESULTS/env.txt"
  if [ "${PIPESTATUS[0]}" -eq 0 ]; then summary_row environment ok 0 env.txt
  else FAILED=1; summary_row environment "FAILED (a probe failed)" 0 env.txt; fi

  run_step "build (AMAPO_CUDA=1, -Xptxas -v)" "$RESULTS/build.log" 420 "${BUILD[@]}" || { echo "build failed"; return 1; }
  grep -E "registers|spill" "$RESULTS/build.log" | sort -u | head -20
  cp amapo_kernels/_C*.so "$RESULTS/" 2>/dev/null
  run_step "CUDA kernels registered" "$RESULTS/tests.log" 60 "$PY" -c 'import torch, amapo_kernels as ak, amapo_kernels._C as C
assert ak.has_cuda_kernels(), "CUDA kernels not registered"
print("CUDA kernels registered; built against torch", C.torch_version, "running", torch.__version__)'

  # Every CUDA test: the CUDA kernels' own file here, the cuda-marked variants of all the others after the
  # sanitizers (-m cuda leaves out their CPU-emulated variants, which CI runs). A skip is a failure of this
  # check (the machine has a GPU), so -rs lists the reasons.
  run_step "tests/test_cuda_kernels.py" "$RESULTS/tests.log" 200 \
    "$PY" -m pytest -q -p no:cacheprovider -rfEs -m cuda tests/test_cuda_kernels.py
  # compute-sanitizer on small cases of every kernel, caching allocator off: each tensor its own allocation.
  # memcheck/racecheck/synccheck instrument our kernels only; initcheck must see every kernel's writes
  # (measured: filtered to ours, it called the labels that torch's copy kernel wrote uninitialized, 99
  # false reports, and ran past 150 s; unfiltered, 0 errors in 7 s).
  local filter
  for tool in memcheck racecheck synccheck initcheck; do
    echo "== $tool" >>"$RESULTS/sanitizers.log"
    filter=(--kernel-name kns=amapo)
    [ "$tool" = initcheck ] && filter=()
    run_step "compute-sanitizer $tool" "$RESULTS/sanitizers.log" 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode 9 "${filter[@]}" "$PY" tools/gpu_sanitize_case.py
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|========= (Invalid|Race|Uninitialized|Barrier)" "$RESULTS/sanitizers.log" | tail -2
  done
  # The cuda-marked tests of every other file last: 300 s, as the Triton tests compile each autotuning
  # configuration once (~30 kernels) besides their runs, a time harder to foresee than the sanitizers' few
  # seconds each, so a short BUDGET cuts this step and not those. pytest-xdist (in the GPU image) spreads
  # the compiles over 4 processes sharing the one GPU.
  local xdist=()
  "$PY" -c 'import xdist' 2>/dev/null && xdist=(-n 4)
  run_step "pytest -m cuda (all files)" "$RESULTS/tests.log" 300 \
    "$PY" -m pytest -q -p no:cacheprovider -rfEs "${xdist[@]}" -m cuda tests --ignore=tests/test_cuda_kernels.py
  if grep -E "^SKIPPED.*(CUDA|cuda|GPU)" "$RESULTS/tests.log"; then
    summary_row "no CUDA test skipped" FAILED 0 tests.log; FAILED=1
  fi
}

# part2 and part3 on a fresh machine: part1's extension carried in .gpu_so/, else a build.
ensure_built() {
  ls amapo_kernels/_C*.so >/dev/null 2>&1 && return 0
  cp .gpu_so/_C*.so amapo_kernels/ 2>/dev/null || run_step "build" "$RESULTS/build2.log" 420 "${BUILD[@]}"
}

part2() {
  start_summary part2
  # Autotuning choices on disk: each process after the first that tunes a key (bench_fused_linear) reads
  # them back, so the ncu and profile steps run the tiles the benchmark timed, without tuning again.
  export TRITON_CACHE_AUTOTUNING=1
  install_wheels "$RESULTS/bench_env.txt"
  ensure_built || return 1
  # The paper's size first, from logits then from hidden states: B=4 (2 pairs), T=2048, V=128256 (Llama 3),
  # H=4096; bf16 as trained, and fp32 from logits. Then the rest of issue 12's from-logits table (B*T = 2k and
  # 16k, V=32000): where the budget runs short, it is what goes. One (size, dtype) with every peer took 29 s on
  # an H200, torch.compile's compile included; the from-hidden table 68 s.
  run_step "bench_from_logits (paper size)" "$RESULTS/bench.log" 180 "$PY" benchmarks/bench_from_logits.py \
    --device cuda --sizes 4x2048x128256 --dtypes bf16,fp32 \
    --json "$RESULTS/from_logits.json" --markdown "$RESULTS/from_logits.md"
  run_step "bench_fused_linear" "$RESULTS/bench.log" 240 "$PY" benchmarks/bench_fused_linear.py --device cuda \
    --dtype bf16 --sizes 4x2048x4096x128256 \
    --json "$RESULTS/fused_linear.json" --markdown "$RESULTS/fused_linear.md"
  run_step "bench_from_logits (other sizes)" "$RESULTS/bench.log" 240 "$PY" benchmarks/bench_from_logits.py \
    --device cuda --sizes 2x1024x128256,8x2048x128256,4x2048x32000 --dtypes bf16,fp32 \
    --json "$RESULTS/from_logits_sizes.json" --markdown "$RESULTS/from_logits_sizes.md"
  # Nsight Compute on the from-logits kernels at the paper size (bench_from_logits.py's docstring command):
  # achieved DRAM throughput, occupancy and warp stalls of one forward and one backward launch.
  run_step "ncu (from-logits kernels)" "$RESULTS/ncu.log" 150 ncu --clock-control none \
    -k regex:'(forward|backward)_rows_kernel' --launch-skip 4 --launch-count 2 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
    "$PY" benchmarks/bench_from_logits.py --device cuda --sizes 4x2048x128256 --dtypes bf16 --peers ours
  grep -E "rows_kernel|DRAM Throughput|Duration|Achieved Occupancy" "$RESULTS/ncu.log" | head -12
  # Nsight Compute on the fused lm_head's two Triton matmul kernels (the statistics pass and the first g chunk
  # of one step) at the paper size, in the tiles the autotuner chose in bench_fused_linear (read back from
  # Triton's disk cache, TRITON_CACHE_AUTOTUNING above; without it the first trial's tiles): whether they are
  # bound by the tensor cores, L2 or issue, where profile_step's table below gives their time against cuBLAS's.
  run_step "ncu (fused lm_head Triton kernels)" "$RESULTS/ncu_triton.log" 120 ncu --clock-control none \
    -k regex:'_stats_kernel|_grad_logits_kernel' --launch-count 2 \
    --section LaunchStats --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section ComputeWorkloadAnalysis --section Occupancy --section WarpStateStats \
    "$PY" benchmarks/profile_step.py --device cuda --dtype bf16 --path from_hidden --backend triton \
    --size 4x2048x4096x128256 --warmup 0 --steps 1
  grep -E "_kernel|Duration|Compute \(SM\) Throughput|L2 Cache Throughput|DRAM Throughput|Registers Per" \
    "$RESULTS/ncu_triton.log" | head -16
  # Where a step's time goes, kernel by kernel, against its wall time (the gap: launches, syncs, idle GPU):
  # the from-logits step and the from-hidden step on both Triton-module backends, at the paper's size.
  local what
  for what in "from_logits --size 4x2048x128256" "from_hidden --backend triton --size 4x2048x4096x128256" \
              "from_hidden --backend cublas --size 4x2048x4096x128256"; do
    # shellcheck disable=SC2086  # $what is the arguments, split on purpose
    run_step "profile_step $what" "$RESULTS/profile.log" 90 "$PY" benchmarks/profile_step.py --device cuda \
      --dtype bf16 --path $what
  done
  cat "$RESULTS/from_logits.md" "$RESULTS/fused_linear.md" "$RESULTS/from_logits_sizes.md" 2>/dev/null
}

part3() {
  start_summary part3
  install_wheels "$RESULTS/train_env.txt"
  ensure_built || return 1
  # Issue 13's model run: random:llama3-1b (1.50B parameters, V=128256), seq 2048, 2 pairs a step, ZeRO-3 on
  # one GPU, bf16, gradient checkpointing, 20 AMaPO steps through amapo-train for eager, ops and fused. fused
  # last: its first step compiles and autotunes the Triton kernels, and it gets the time the others leave of
  # the step's budget (each impl at most 300 s).
  local left=$((BUDGET - SECONDS - RESERVE - 20))
  run_step "bench_train (llama3-1b, ZeRO-3)" "$RESULTS/train.log" 540 "$PY" benchmarks/bench_train.py --device cuda \
    --impls eager,ops,fused --timeout 300 --budget "$left" --work-dir /tmp/bench_train \
    --json "$RESULTS/train.json" --markdown "$RESULTS/train.md"
  cp /tmp/bench_train/*.log "$RESULTS/" 2>/dev/null
  cat "$RESULTS/train.md" 2>/dev/null
}

case "$PART" in
  part1) part1 ;;
  part2) part2 ;;
  part3) part3 ;;
  all)  # more than 10 minutes, and part1's and part2's results together are more than the 8 files $OUT returns
    if [ -n "${OUT:-}" ] && [ "$RESULTS" = "$OUT" ]; then
      echo "gpu_check.sh all: under the device tool (\$OUT) run part1 and part2 as two calls" >&2; exit 2
    fi
    part1; part2 ;;
  *) echo "usage: bash scripts/gpu_check.sh part1|part2|part3|all" >&2; exit 2 ;;
esac
# The device tool returns at most 8 files from $OUT: past that, one archive of the logs.
if [ -n "${OUT:-}" ] && [ "$RESULTS" = "$OUT" ] && [ "$(find "$RESULTS" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
  (cd "$RESULTS" && tar -czf logs.tar.gz -- *.log *.txt && rm -f -- *.log *.txt) \
    && echo "== logs packed into $RESULTS/logs.tar.gz (more than 8 files)"
fi
echo "== results in $RESULTS ($SECONDS s of BUDGET=$BUDGET)"; cat "$RESULTS"/summary_*.md
exit $FAILED
