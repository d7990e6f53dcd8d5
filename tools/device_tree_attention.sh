#!/usr/bin/env bash
# Runs on the GPU host (see ../shared/device/README.md): builds the tree-attention test and
# benchmark (plus the CUDA op and forward tests, which now go through the batched attention),
# runs them, compute-sanitizer memcheck and racecheck on the tree-attention test with small shapes,
# benchmark 6a (bench_tree_attention) and its torch side (tools/bench_attention_torch.py). Logs in
# $OUT. STEPS picks parts: test, sanitize, bench, ncu, torch (default all but ncu).
#   device run, carry [".devdeps"]: bash tools/device_tree_attention.sh
set -uo pipefail
out="${OUT:-/tmp/out}"
steps="${STEPS:-test sanitize bench torch}"
mkdir -p "$out"
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
SECONDS=0
b=/tmp/canopy-ta
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake --build $b -j"$(nproc)" --target test_tree_attention bench_tree_attention test_cuda_ops test_cuda_forward \
  > "$out/build.log" 2>&1 || { grep -E "error|warning" -A3 "$out/build.log" | head -40; exit 1; }
echo "built in ${SECONDS}s"
rc=0
if [[ $steps == *test* ]]; then
  # The fixtures' heads (16, 32) take the fallback kernel: the SmolLM2-shape random model of
  # device_test.sh (head_dim 64, 9 / 3 heads) puts the forward test through the tree kernel.
  python3 tools/write_smollm2_shape.py /tmp/smollm2-shape > "$out/bigmodel.log" 2>&1 && export CANOPY_TEST_BIG_MODEL=/tmp/smollm2-shape
  (cd $b && ctest -R "test_cuda_ops|test_cuda_forward" -V > "$out/ctest.log" 2>&1) || rc=1
  unset CANOPY_TEST_BIG_MODEL
  grep -E "\[ (cuda|spec|speed) " "$out/ctest.log" | grep -E "SmolLM2|speed" | head -12
  grep -E "tests passed|Passed|Failed|\*\*\*" "$out/ctest.log"
  $b/test_tree_attention > "$out/tree_test.log" 2>&1 || rc=1
  grep -E "MISMATCH|UNWRITTEN|BLIND|PASSED|FAILED|seed" "$out/tree_test.log" | tail -20
  echo "tree attention variants checked: $(grep -c "splits" "$out/tree_test.log") (wgmma: $(grep -c " wgmma" "$out/tree_test.log"))"
  echo "tests done at ${SECONDS}s"
fi
if [[ $steps == *sanitize* ]]; then
  for tool in memcheck racecheck; do
    sanitizer_run $tool 100 "$out/$tool.log" $b/test_tree_attention
  done
  echo "sanitizers done at ${SECONDS}s"
fi
if [[ $steps == *bench* ]]; then
  $b/bench_tree_attention > "$out/bench_tree_attention.log" 2>&1 || rc=1
  cat "$out/bench_tree_attention.log"
  echo "bench done at ${SECONDS}s"
fi
if [[ $steps == *kt16* ]]; then
  # The tuning knob: 16-key tiles for the two-row-block variant (fewer registers, more barriers).
  cmake -S . -B $b-kt16 -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS=-DCN_TA_WIDE_KT=16 > "$out/configure16.log" 2>&1 &&
    cmake --build $b-kt16 -j"$(nproc)" --target test_tree_attention bench_tree_attention > "$out/build16.log" 2>&1 || rc=1
  $b-kt16/test_tree_attention 2>&1 | grep -E "PASSED|FAILED|MISMATCH"
  $b-kt16/bench_tree_attention > "$out/bench_kt16.log" 2>&1 || rc=1
  grep -E "^ +[18] +(64|128) " "$out/bench_kt16.log"
  echo "kt16 done at ${SECONDS}s"
fi
if [[ $steps == *ncu* ]]; then
  # What bounds the wgmma kernel at batch 1, L = 16k: each pipe's utilisation, DRAM throughput,
  # the cycles a warp waits per issued instruction and what it waits for, at n = 1, 16, 64, 128.
  # (-k matches the plain function name unless told to use the demangled one; metric names go as
  # regexes so that a name this ncu lacks drops out instead of failing the run; --metrics once,
  # comma-separated.)
  for s in 1,64,16384 1,128,16384 1,16,16384 1,1,16384; do
    f="$out/ncu_${s//,/_}.txt"
    timeout 90 ncu --clock-control none --kernel-name-base demangled -k 'regex:tree_attn' --launch-skip 2 -c 1 \
      --section SpeedOfLight --section WarpStateStats \
      --metrics 'regex:sm__pipe_.*_cycles_active.avg.pct_of_peak_sustained_active$,regex:sm__inst_executed_pipe_(xu|fma|alu|lsu).avg.pct_of_peak_sustained_active$,dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio$' \
      $b/bench_tree_attention --shape "$s" > "$f" 2>&1
    echo "== $s (rc $?)"
    grep -E "tree_attn_wgmma|gpu__time_duration|dram__throughput|pipe_(tensor|xu|fma|alu|lsu)[a-z_]*\.avg|Warp Cycles Per Issued" "$f" |
      grep -vE "PROF|hmma_type|type_hmma" | head -12
    # Why a warp waits, per issued instruction: the six largest reasons (they sum to the cycles
    # per issued instruction above).
    grep -E "issue_stalled_" "$f" | awk '{print $NF, $1}' | sort -g -r | head -6
  done
  echo "ncu done at ${SECONDS}s"
fi
if [[ $steps == *torch* ]]; then
  PYTHONUNBUFFERED=1 timeout "${TORCH_TIMEOUT:-330}" python3 tools/bench_attention_torch.py --budget "${FLEX_BUDGET:-200}" \
    > "$out/bench_torch.log" 2> "$out/bench_torch.err" || rc=1
  cat "$out/bench_torch.log"; tail -5 "$out/bench_torch.err"
  echo "torch done at ${SECONDS}s"
fi
exit $rc
