#!/usr/bin/env bash
# Runs on the GPU host (see ../shared/device/README.md): builds canopy with -Werror and the carried
# Debian libraries, runs the CUDA tests (graphs, ops, forward), compute-sanitizer memcheck on the
# graph test, then bench_step with and without CUDA graphs side by side (--compare-graphs) for the
# Llama-3-8B and SmolLM2-135M shapes at L = 256 and 4096. Logs go to $OUT.
#   device run, carry [".devdeps"]: bash tools/device_graphs.sh   (DEVDEPS=../.devdeps from a subfolder)
set -uo pipefail
out="${OUT:-/tmp/out}"
mkdir -p "$out"
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
SECONDS=0
b=/tmp/canopy-graphs
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake --build $b -j"$(nproc)" --target test_cuda_graphs test_cuda_ops test_cuda_forward bench_step \
  > "$out/build.log" 2>&1 || { grep -E "error|warning" -A3 "$out/build.log" | head -40; exit 1; }
echo "built in ${SECONDS}s"
src=$PWD
(cd $b && CANOPY_SOURCE_DIR=$src timeout 120 ./test_cuda_graphs > "$out/test_cuda_graphs.log" 2>&1)
echo "test_cuda_graphs rc $? at ${SECONDS}s"; grep -E "^\[ graphs|^\[  (PASSED|FAILED)|ERROR|differs" "$out/test_cuda_graphs.log" | head
for cfg in llama3-8b smollm2-135m; do
  for L in 4096 256; do
    timeout 50 $b/bench_step --config bench/configs/$cfg.json --ctx $L --compare-graphs --reps 20 \
      > "$out/bench_${cfg}_$L.txt" 2>&1
    echo "== bench_step $cfg L=$L (rc $?) at ${SECONDS}s"; grep -v "^$" "$out/bench_${cfg}_$L.txt" | tail -14
  done
done
cd $b
for t in test_cuda_ops test_cuda_forward; do
  CANOPY_SOURCE_DIR=$src timeout 120 ./$t > "$out/$t.log" 2>&1
  echo "$t rc $? at ${SECONDS}s: $(grep -E '^\[  (PASSED|FAILED) ' "$out/$t.log" | tr '\n' ' ')"
done
grep -E "FAILED|MISMATCH|error" "$out"/test_cuda_*.log | head -20
CANOPY_SOURCE_DIR=$src timeout 100 compute-sanitizer --tool memcheck --report-api-errors no ./test_cuda_graphs \
  > "$out/memcheck_graphs.log" 2>&1
echo "memcheck test_cuda_graphs (rc $?) at ${SECONDS}s: $(grep -E 'ERROR SUMMARY|PASSED|FAILED' "$out/memcheck_graphs.log" | tr '\n' ' ')"
cd "$src"
echo "all done at ${SECONDS}s"
