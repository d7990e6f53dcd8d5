#!/usr/bin/env bash
# Chained speculative steps: build, CUDA tests, sanitizer, bench_spec_step, 8B/SmolLM2 step check.
set -uo pipefail
out="${OUT:-/tmp/out}"; mkdir -p "$out"
source tools/device_env.sh
SECONDS=0
b=/tmp/cb; rm -rf $b
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake --build $b -j16 > "$out/build.log" 2>&1 || { grep -E "error" -A3 "$out/build.log" | head -40; exit 1; }
echo "built at ${SECONDS}s"
r=$PWD
cd $b
./test_cuda_ops > "$out/t_ops.log" 2>&1; echo "test_cuda_ops rc $?"; grep -E "accept|PASSED|FAILED|MISMATCH" "$out/t_ops.log" | head
./test_cuda_forward > "$out/t_fwd.log" 2>&1; echo "test_cuda_forward rc $?"; grep -E "spec  |PASSED|FAILED|differ" "$out/t_fwd.log" | tail -14
./test_cuda_graphs > "$out/t_graphs.log" 2>&1; echo "test_cuda_graphs rc $?"; grep -E "PASSED|FAILED" "$out/t_graphs.log"
echo "tests at ${SECONDS}s"
for c in smollm2-135m; do
  ./bench_spec_step --target-config $r/bench/configs/$c.json --draft-config $r/bench/configs/$c.json --ctx 256 --new 128 --reps 3 \
    --tree chain:2 --tree chain:4 --tree static:3,2,1 > "$out/spec_same.txt" 2>&1; echo "== draft = target (rc $?)"; tail -8 "$out/spec_same.txt"
  ./bench_spec_step --target-config $r/bench/configs/$c.json --draft $r/drafts/SmolLM2-135M-draft --ctx 256 --new 128 --reps 3 \
    --tree chain:2 --tree chain:4 --tree static:3,2,1 > "$out/spec_draft.txt" 2>&1; echo "== shipped draft, random target (rc $?)"; tail -8 "$out/spec_draft.txt"
done
echo "bench at ${SECONDS}s"
./bench_step --config $r/bench/configs/llama3-8b.json --config $r/bench/configs/smollm2-135m.json --ctx 4096 --nodes 2,16,64 --reps 10 > "$out/step.txt" 2>&1
echo "== bench_step (rc $?)"; grep -E "decode|verify|floor" "$out/step.txt" | head -24
echo "step at ${SECONDS}s"
CANOPY_TEST_QUICK=1 timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 ./test_cuda_forward > "$out/memcheck_fwd.log" 2>&1
echo "memcheck test_cuda_forward rc $?"; tail -3 "$out/memcheck_fwd.log"
timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 ./test_cuda_ops > "$out/memcheck_ops.log" 2>&1
echo "memcheck test_cuda_ops rc $?"; tail -2 "$out/memcheck_ops.log"
timeout 60 compute-sanitizer --tool racecheck --error-exitcode 9 ./test_cuda_ops > "$out/racecheck_ops.log" 2>&1
echo "racecheck test_cuda_ops rc $?"; tail -2 "$out/racecheck_ops.log"
echo "all at ${SECONDS}s"
