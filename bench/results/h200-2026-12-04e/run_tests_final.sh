#!/usr/bin/env bash
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
./test_cuda_forward > "$out/t_fwd.log" 2>&1; echo "test_cuda_forward rc $?"; grep -E "spec  |together|PASSED|FAILED|differ|ERROR|LINE" "$out/t_fwd.log" | tail -22
./test_cuda_graphs > "$out/t_graphs.log" 2>&1; echo "test_cuda_graphs rc $?"; grep -E "PASSED|FAILED" "$out/t_graphs.log"
echo "tests at ${SECONDS}s"
c=$r/bench/configs/smollm2-135m.json
for S in 1 8; do
  ./bench_spec_step --target-config $c --draft $r/drafts/SmolLM2-135M-draft --ctx 256 --new 128 --reps 3 --sessions $S \
    --tree chain:2 --tree chain:4 --tree static:3,2,1 > "$out/spec_draft_s$S.txt" 2>&1; echo "== shipped draft, random target, $S sessions (rc $?)"; tail -8 "$out/spec_draft_s$S.txt"
done
./bench_spec_step --target-config $c --draft-config $c --ctx 256 --new 128 --reps 3 --sessions 8 \
  --tree chain:2 --tree chain:4 --tree static:3,2,1 > "$out/spec_same_s8.txt" 2>&1; echo "== draft = target, 8 sessions (rc $?)"; tail -8 "$out/spec_same_s8.txt"
echo "bench at ${SECONDS}s"
CANOPY_TEST_QUICK=1 timeout 200 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 ./test_cuda_forward > "$out/memcheck_fwd.log" 2>&1
echo "memcheck test_cuda_forward rc $?"; tail -2 "$out/memcheck_fwd.log"
CANOPY_TEST_QUICK=1 timeout 150 compute-sanitizer --tool racecheck --error-exitcode 9 ./test_cuda_forward > "$out/racecheck_fwd.log" 2>&1
echo "racecheck test_cuda_forward rc $?"; grep -E "RACECHECK SUMMARY|Race reported" "$out/racecheck_fwd.log" | sort | uniq -c | head
cd "$out" && tar czf logs.tgz t_*.log && rm -f t_*.log configure.log
echo "all at ${SECONDS}s"
