#!/usr/bin/env bash
# Runs on the GPU host (see ../shared/device/README.md): builds canopy (-Werror, the carried Debian
# libraries), runs the CUDA tests of chained speculation (the ops against their host twins, the
# forwards and sessions against target-only), compute-sanitizer memcheck and racecheck on them in
# quick mode, then bench_spec_step on the SmolLM2-135M shape with random weights: one session with
# static and dynamic trees (chained against the host path), the same sampled (T 1, and T 0.7 with
# top-p 0.95) with static trees, and 8 sessions stepped together, all speculative and with 2 of them
# plain (a mixed batch). Logs go to $OUT.
#   device run, carry [".devdeps"]: bash tools/device_chain.sh
set -uo pipefail
out="${OUT:-/tmp/out}"
mkdir -p "$out"
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
SECONDS=0
b=/tmp/canopy-chain
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake --build $b -j"$(nproc)" --target test_cuda_ops test_cuda_forward bench_spec_step \
  > "$out/build.log" 2>&1 || { grep -E "error|warning" -A3 "$out/build.log" | head -40; exit 1; }
echo "built in ${SECONDS}s"
src=$PWD
rc=0
cd $b
for t in test_cuda_ops test_cuda_forward; do
  CANOPY_SOURCE_DIR=$src timeout 180 ./$t > "$out/$t.log" 2>&1; r=$?
  echo "$t rc $r at ${SECONDS}s: $(grep -E '^\[  (PASSED|FAILED) ' "$out/$t.log" | tr '\n' ' ')"
  [ $r -ne 0 ] && rc=$r && grep -E "FAILED|MISMATCH|Failure|error" "$out/$t.log" | head -10
done
grep -E "^\[ (dynamic|accept|together|spec|sampled) " "$out"/test_cuda_*.log | head -50
for tool in memcheck racecheck; do
  CANOPY_TEST_QUICK=1 CANOPY_SOURCE_DIR=$src timeout 150 compute-sanitizer --tool $tool --report-api-errors no \
    ./test_cuda_forward > "$out/${tool}_forward.log" 2>&1
  echo "$tool test_cuda_forward (rc $?) at ${SECONDS}s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED' "$out/${tool}_forward.log" | tr '\n' ' ')"
done
cd "$src"
cfg=bench/configs/smollm2-135m.json
timeout 120 $b/bench_spec_step --target-config $cfg --draft-config $cfg --draft-layers 8 --ctx 256 --new 128 --reps 3 \
  --tree chain:2 --tree static:2,1 --tree dynamic:8,depth=3,topk=2 --tree dynamic:16,depth=4,topk=4 \
  > "$out/spec_step_1.txt" 2>&1
echo "== one session (rc $?) at ${SECONDS}s"; tail -12 "$out/spec_step_1.txt"
for rule in "--temp 1" "--temp 0.7 --top-p 0.95"; do
  tag=$(echo "$rule" | tr -d ' -')
  timeout 120 $b/bench_spec_step --target-config $cfg --draft-config $cfg --draft-layers 8 --ctx 256 --new 128 \
    --reps 3 $rule --tree chain:2 --tree static:2,1 --tree static:3,2,1 > "$out/spec_step_1_$tag.txt" 2>&1
  echo "== one session, sampled $rule (rc $?) at ${SECONDS}s"; tail -9 "$out/spec_step_1_$tag.txt"
done
for plain in 0 2; do
  timeout 120 $b/bench_spec_step --target-config $cfg --draft-config $cfg --draft-layers 8 --ctx 256 --new 64 \
    --reps 3 --sessions 8 --plain $plain --tree chain:2 --tree static:3,2,1 --tree dynamic:16,depth=4,topk=4 \
    > "$out/spec_step_8_plain$plain.txt" 2>&1
  echo "== 8 sessions, $plain plain (rc $?) at ${SECONDS}s"; tail -10 "$out/spec_step_8_plain$plain.txt"
done
echo "all done at ${SECONDS}s"
exit $rc
