#!/usr/bin/env bash
# Runs on the GPU host (see ../shared/device/README.md): two changes to the products of a
# verification step, checked and measured in one call. Both are off by default until this runs.
#   - tuned cuBLAS products above the few-row kernel's 8 rows (CANOPY_CUDA_GEMM_TUNE=1,
#     cn_cuda_set_gemm_tune, kernels/cuda/gemm_tune.cuh);
#   - ffn's SwiGLU in the gate/up kernel's epilogue at 3-8 rows, after a separate RMSNorm
#     (CANOPY_CUDA_GEMV_SWIGLU_ROWS=8, cn_cuda_set_gemv_swiglu_rows).
# Steps:
#   1. build (-Werror, the carried Debian libraries), or reuse B=DIR;
#   2. test_cuda_ops (the tuned-products test prints what tuning kept per shape; the fusion test
#      compares the epilogue bit for bit), the CUDA forward and graph tests with each change on
#      for the whole forward, and memcheck + racecheck on test_cuda_ops;
#   3. bench_gemm: Llama-3-8B's projections at 9-512 rows, the engine, cuBLAS and tuned side by
#      side, and the kept kernel of each shape;
#   4. bench_step --compare-tune: Llama-3-8B and SmolLM2-135M at L = 4096, decode and verification
#      with the default products and the tuned ones in one process, twice;
#   5. bench_step at 3, 4 and 8 nodes with and without the SwiGLU epilogue, alternating processes.
# Logs go to $OUT/verify_products.tgz (one file: the device returns a few files a call).
#   device run, carry [".devdeps"]: bash tools/device_verify_products.sh
set -uo pipefail
out="${OUT:-/tmp/out}"
logs=/tmp/verify-products-logs
mkdir -p "$out" "$logs"
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$logs/gpu.txt"
SECONDS=0
b="${B:-/tmp/canopy-build}"
if [[ ! -x $b/bench_step ]]; then
  cmake -S . -B "$b" -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON > "$logs/configure.log" 2>&1 ||
    { tail -30 "$logs/configure.log"; exit 1; }
fi
cmake --build "$b" -j"$(nproc)" --target test_cuda_ops test_cuda_forward test_cuda_graphs bench_gemm bench_step \
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
check test_cuda_ops "$b/test_cuda_ops"
grep -A40 "^tuned shapes" "$logs/test_cuda_ops.log" | head -30
CANOPY_CUDA_GEMM_TUNE=1 CANOPY_TEST_QUICK=1 check test_cuda_forward_tuned "$b/test_cuda_forward"
CANOPY_CUDA_GEMM_TUNE=1 check test_cuda_graphs_tuned "$b/test_cuda_graphs"
CANOPY_CUDA_GEMV_SWIGLU_ROWS=8 CANOPY_TEST_QUICK=1 check test_cuda_forward_swiglu "$b/test_cuda_forward"
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --report-api-errors no "$b/test_cuda_ops" > "$logs/$tool.log" 2>&1
  echo "$tool test_cuda_ops (rc $?): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$logs/$tool.log" | tr '\n' ' ')"
done
echo "tests done at ${SECONDS}s"

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
for r in 1 2; do
  for side in on off; do
    env $([[ $side == on ]] && echo CANOPY_CUDA_GEMV_SWIGLU_ROWS=8) timeout 100 "$b/bench_step" \
      --config bench/configs/smollm2-135m.json --config bench/configs/llama3-8b.json --ctx 4096 --nodes 3,4,8 \
      --reps 20 > "$logs/step_swiglu_${side}_$r.txt" 2>&1
    echo "swiglu epilogue $side, round $r:"
    grep -E "^decode|top ids" "$logs/step_swiglu_${side}_$r.txt"
  done
done
echo "all done at ${SECONDS}s"
tar czf "$out/verify_products.tgz" -C "$logs" .
exit $rc
