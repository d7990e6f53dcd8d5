#!/usr/bin/env bash
# Runs on the GPU host (see ../shared/device/README.md): builds canopy (-Werror, the carried Debian
# libraries), runs the CUDA tests named in $TESTS (default: the random-weights and op tests), then
# bench_step on the Llama-3-8B and SmolLM2-135M shapes with random weights. Logs go to $OUT.
#   device run, carry [".devdeps", ...]: bash tools/device_step.sh
set -uo pipefail
out="${OUT:-/tmp/out}"
mkdir -p "$out"
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
SECONDS=0
b=/tmp/canopy-build
tests="${TESTS:-test_random_weights test_cuda_ops}"
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake --build $b -j"$(nproc)" --target canopy_cli bench_step $tests > "$out/build.log" 2>&1 ||
  { grep -E "error|warning" -A3 "$out/build.log" | head -40; exit 1; }
echo "built in ${SECONDS}s"
rc=0
for t in $tests; do
  timeout 240 $b/$t > "$out/$t.log" 2>&1; r=$?
  echo "$t: rc $r $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/$t.log" | tr '\n' ' ')"
  [ $r -ne 0 ] && rc=$r && grep -E "MISMATCH|FAILED|Failure|error" "$out/$t.log" | head -10
done
grep -E "rel L2|differ" "$out/test_random_weights.log" 2>/dev/null | head -12
# L = 4096 (the issue's shape), then L = 256: the same steps with little attention, which shows
# what the rest of the forward costs.
for L in 4096 256; do
  $b/bench_step --config bench/configs/llama3-8b.json --config bench/configs/smollm2-135m.json --ctx $L --unfused ${STEP_ARGS:-} 2>&1 |
    tee "$out/bench_step_$L.txt"
done
echo "all done at ${SECONDS}s"
exit $rc
