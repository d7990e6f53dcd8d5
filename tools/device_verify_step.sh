#!/usr/bin/env bash
# Runs on the GPU host (see ../shared/device/README.md): three changes to a verification step,
# checked and measured in one call. All are off by default until this runs.
#   - tuned cuBLAS products above the few-row kernel's 8 rows (CANOPY_CUDA_GEMM_TUNE=1,
#     cn_cuda_set_gemm_tune, kernels/cuda/gemm_tune.cuh);
#   - ffn's SwiGLU in the gate/up kernel's epilogue at 3-8 rows, after a separate RMSNorm
#     (CANOPY_CUDA_GEMV_SWIGLU_ROWS=8, cn_cuda_set_gemv_swiglu_rows);
#   - half of tree attention's softmax exponentials on the FMA pipe (CANOPY_CUDA_TA_POLY_EXP=1,
#     kernels/cuda/exp2_poly.h), in case the special-function unit bounds trees of 64-128 nodes.
# Steps:
#   1. build (-Werror, the carried Debian libraries), or reuse B=DIR;
#   2. test_cuda_ops (the tuned-products test prints what tuning kept per shape; the fusion test
#      compares the epilogue bit for bit), test_tree_attention (against float64) with the FMA-pipe
#      exponentials, the CUDA forward and graph tests with each change on
#      for the whole forward, and memcheck + racecheck on test_cuda_ops;
#   3. bench_gemm: Llama-3-8B's projections at 9-512 rows, the engine, cuBLAS and tuned side by
#      side, and the kept kernel of each shape;
#   4. bench_step --compare-tune: Llama-3-8B and SmolLM2-135M at L = 4096, decode and verification
#      with the default products and the tuned ones in one process, twice;
#   5. bench_step at 3, 4 and 8 nodes with and without the SwiGLU epilogue, alternating processes;
#   6. bench_tree_attention --shape with and without the FMA-pipe exponentials, alternating, and a
#      split sweep at batch 1, n = 16, L = 16k (6a's unmet 58%).
#   7. (STEPS=ncu, not in the default) ncu pipe utilisation of the tree-attention kernel at
#      n = 1, 16, 64, 128, L = 16k, with and without the FMA-pipe exponentials.
# STEPS picks parts (default tests,bench,ab; each part fits one 600 s call, the three together may
# not): tests = 2, bench = 3-4, ab = 5-6, ncu = 7; step 1 runs in each, reusing B's build. Logs go to
# $OUT/verify_step_PARTS.tgz (one file: the device returns a few files a call).
#   device run, carry [".devdeps"], back to back on one warm machine:
#     B=/tmp/vs STEPS=tests bash tools/device_verify_step.sh
#     B=/tmp/vs STEPS=bench bash tools/device_verify_step.sh
#     B=/tmp/vs STEPS=ab bash tools/device_verify_step.sh
set -uo pipefail
out="${OUT:-/tmp/out}"
steps="${STEPS:-tests,bench,ab}"
logs=/tmp/verify-step-logs/${steps//,/_}
mkdir -p "$out" "$logs"
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$logs/gpu.txt"
SECONDS=0
b="${B:-/tmp/canopy-build}"
if [[ ! -x $b/bench_step ]]; then
  cmake -S . -B "$b" -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON > "$logs/configure.log" 2>&1 ||
    { tail -30 "$logs/configure.log"; exit 1; }
fi
cmake --build "$b" -j"$(nproc)" --target test_cuda_ops test_cuda_forward test_cuda_graphs test_tree_attention \
  bench_gemm bench_step bench_tree_attention \
  > "$logs/build.log" 2>&1 || { grep -E "error|warning" -A3 "$logs/build.log" | head -40; exit 1; }
echo "built in ${SECONDS}s"

rc=0
check() { # check NAME CMD...: runs CMD into NAME.log, prints its verdict
  local name=$1
  shift
  timeout 240 "$@" > "$logs/$name.log" 2>&1
  local r=$?
  echo "$name: rc $r $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$logs/$name.log" | tr '\n' ' ')"
  [[ $r -ne 0 ]] && rc=$r && grep -E "FAILED|Failure|differ|error" "$logs/$name.log" | head -10
}
if [[ $steps == *tests* ]]; then
check test_cuda_ops "$b/test_cuda_ops"
grep -A40 "^tuned shapes" "$logs/test_cuda_ops.log" | head -30
CANOPY_CUDA_GEMM_TUNE=1 CANOPY_TEST_QUICK=1 check test_cuda_forward_tuned "$b/test_cuda_forward"
CANOPY_CUDA_GEMM_TUNE=1 check test_cuda_graphs_tuned "$b/test_cuda_graphs"
CANOPY_CUDA_GEMV_SWIGLU_ROWS=8 CANOPY_TEST_QUICK=1 check test_cuda_forward_swiglu "$b/test_cuda_forward"
CANOPY_CUDA_TA_POLY_EXP=1 check test_tree_attention_poly "$b/test_tree_attention"
CANOPY_CUDA_TA_POLY_EXP=1 CANOPY_TEST_QUICK=1 check test_cuda_forward_poly "$b/test_cuda_forward"
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --report-api-errors no "$b/test_cuda_ops" > "$logs/$tool.log" 2>&1
  echo "$tool test_cuda_ops (rc $?): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$logs/$tool.log" | tr '\n' ' ')"
done
echo "tests done at ${SECONDS}s"
fi

if [[ $steps == *bench* ]]; then

timeout 200 "$b/bench_gemm" --rows 9,16,32,64,128,256,512 > "$logs/bench_gemm.txt" 2>&1
grep -A12 "step's products" "$logs/bench_gemm.txt"
for r in 1 2; do
  timeout 150 "$b/bench_step" --config bench/configs/llama3-8b.json --ctx 4096 --nodes 2,16,64,128 --reps 10 \
    --compare-tune > "$logs/step_8b_$r.txt" 2>&1
  grep -E "^decode|top ids" "$logs/step_8b_$r.txt"
done
timeout 100 "$b/bench_step" --config bench/configs/smollm2-135m.json --ctx 4096 --nodes 4,16,64 --reps 10 \
  --compare-tune > "$logs/step_smollm2.txt" 2>&1
grep -E "^decode|top ids" "$logs/step_smollm2.txt"
fi

if [[ $steps == *ab* ]]; then
for r in 1 2; do
  for side in on off; do
    env $([[ $side == on ]] && echo CANOPY_CUDA_GEMV_SWIGLU_ROWS=8) timeout 100 "$b/bench_step" \
      --config bench/configs/smollm2-135m.json --config bench/configs/llama3-8b.json --ctx 4096 --nodes 3,4,8 \
      --reps 20 > "$logs/step_swiglu_${side}_$r.txt" 2>&1
    echo "swiglu epilogue $side, round $r:"
    grep -E "^decode|top ids" "$logs/step_swiglu_${side}_$r.txt"
  done
done
: > "$logs/poly_shapes.txt"
for r in 1 2; do
  for s in 1,64,4096 1,64,16384 1,128,16384 1,64,32768 1,16,16384 8,64,16384 1,1,16384; do
    for side in on off; do
      echo "$side $(env $([[ $side == on ]] && echo CANOPY_CUDA_TA_POLY_EXP=1) timeout 60 "$b/bench_tree_attention" \
        --shape "$s" 2>&1 | tail -1)" >> "$logs/poly_shapes.txt"
    done
  done
done
cat "$logs/poly_shapes.txt"
# Batch 1, n = 16 at 16k keys ran at 58% of the floor against 75% for n = 1 with the same tiles:
# its 64 real rows a KV head write and merge partial states of 17 MB beside 67 MB of K/V at the
# engine's 32 splits. How the split count trades that against filling the device:
for sp in 8 12 16 24 32 48; do
  echo "splits $sp: $(timeout 60 "$b/bench_tree_attention" --shape 1,16,16384,$sp 2>&1 | tail -1)"
done | tee "$logs/split_sweep_n16.txt"
fi
if [[ $steps == *ncu* ]]; then
# What bounds the wgmma kernel at 64-128 nodes (on the ridge: bandwidth and MMA floors within 3%):
# each pipe's utilisation, DRAM throughput and warp stalls, with the exponentials on either pipe.
# Metric names go as regexes so that a name this ncu lacks drops out instead of failing the run.
for s in 1,64,16384 1,128,16384 1,16,16384 1,1,16384; do
  for side in off on; do
    f="$logs/ncu_${s//,/_}_poly_$side.txt"
    env $([[ $side == on ]] && echo CANOPY_CUDA_TA_POLY_EXP=1) timeout 90 ncu --clock-control none \
      --kernel-name-base demangled -k 'regex:tree_attn' --launch-skip 2 -c 1 \
      --section SpeedOfLight --section WarpStateStats \
      --metrics 'regex:sm__pipe_.*_cycles_active.avg.pct_of_peak_sustained_active$' \
      --metrics 'regex:sm__inst_executed_pipe_(xu|fma|alu|lsu|fmaheavy|fmalite|uniform).avg.pct_of_peak_sustained_active$' \
      --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum \
      "$b/bench_tree_attention" --shape "$s" > "$f" 2>&1
    echo "== $s poly $side (rc $?)"
    grep -E "Function Name|tree_attn|gpu__time_duration|dram__throughput|pipe_(tensor|xu|fma|alu|lsu)|Stall|Duration" "$f" \
      | grep -vE " 0(\.0+)?$" | head -24
  done
done
fi
echo "all done at ${SECONDS}s"
tar czf "$out/verify_step_${steps//,/_}.tgz" -C "$logs" .
exit $rc
