#!/usr/bin/env bash
# Runs on the GPU host (see ../shared/device/README.md): builds canopy with -Werror and the carried
# Debian libraries, writes a random-weight model of SmolLM2-135M's shape (the host has no models/),
# runs the whole ctest suite there (the CUDA tests run instead of skipping), then
# compute-sanitizer memcheck on the CUDA forward test and memcheck + racecheck on the CUDA ops
# test. Logs go to $OUT.
#   device run, carry [".devdeps"]: bash tools/device_test.sh
set -uo pipefail
out="${OUT:-/tmp/out}"
mkdir -p "$out"
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
SECONDS=0
cmake -S . -B /tmp/canopy-build -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake --build /tmp/canopy-build -j"$(nproc)" > "$out/build.log" 2>&1 || { grep -E "error|warning" -A3 "$out/build.log" | head -40; exit 1; }
echo "built in ${SECONDS}s"

# Random weights of SmolLM2-135M-Instruct's shape (bf16, tied embeddings, std 0.04 as its
# initializer_range): CUDA against CPU and decode speed at a real size.
big=/tmp/smollm2-shape
python3 tools/write_smollm2_shape.py "$big" > "$out/bigmodel.log" 2>&1 && export CANOPY_TEST_BIG_MODEL=$big
tail -2 "$out/bigmodel.log"

(cd /tmp/canopy-build && ctest -j8 --output-on-failure > "$out/ctest.log" 2>&1); rc=$?
tail -28 "$out/ctest.log"
# Every comparison and speed line of the CUDA forward test.
/tmp/canopy-build/test_cuda_forward > "$out/cuda_forward.log" 2>&1
grep -E "^\[ (cuda|spec|speed) " "$out/cuda_forward.log" | awk '/rel L2/ {f=$4; v=$NF+0; if (v>mx[f]) mx[f]=v; next} {print} END {for (f in mx) printf "max rel L2 %-12s %.2e\n", f, mx[f]}'
echo "ctest done at ${SECONDS}s"
unset CANOPY_TEST_BIG_MODEL
sanitizer_run memcheck 150 "$out/memcheck_forward.log" /tmp/canopy-build/test_cuda_forward
for tool in memcheck racecheck; do
  tmo=120
  [[ $tool == racecheck ]] && tmo=480
  sanitizer_run $tool $tmo "$out/$tool.log" /tmp/canopy-build/test_cuda_ops
done
echo "all done at ${SECONDS}s"
exit $rc
