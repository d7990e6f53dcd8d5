#!/usr/bin/env bash
set -uo pipefail
out="${OUT:-/tmp/out}"; mkdir -p "$out"
source tools/device_env.sh
SECONDS=0
b=/tmp/cb; rm -rf $b
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake --build $b -j16 --target test_cuda_ops > "$out/build.log" 2>&1 || { grep -E "error" -A3 "$out/build.log" | head -40; exit 1; }
echo "built at ${SECONDS}s"
cd $b
timeout 120 compute-sanitizer --tool racecheck --error-exitcode 9 ./test_cuda_ops > "$out/racecheck_ops_final.log" 2>&1
echo "racecheck test_cuda_ops rc $?"; grep -E "RACECHECK SUMMARY|Race reported|PASSED|FAILED" "$out/racecheck_ops_final.log" | sort | uniq -c | head
timeout 120 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 ./test_cuda_ops > "$out/memcheck_ops_final.log" 2>&1
echo "memcheck test_cuda_ops rc $?"; tail -2 "$out/memcheck_ops_final.log"
timeout 60 compute-sanitizer --tool synccheck --error-exitcode 9 ./test_cuda_ops > "$out/synccheck_ops_final.log" 2>&1
echo "synccheck test_cuda_ops rc $?"; tail -2 "$out/synccheck_ops_final.log"
rm -f "$out/configure.log"
echo "all at ${SECONDS}s"
