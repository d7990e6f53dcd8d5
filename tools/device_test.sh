#!/usr/bin/env bash
# Runs on the GPU host (see ../shared/device/README.md): builds canopy with the carried Debian
# libraries, runs the whole ctest suite there (the CUDA tests run instead of skipping), then
# compute-sanitizer memcheck and racecheck on the CUDA ops test. Logs go to $OUT.
#   device run, carry [".devdeps"]: bash tools/device_test.sh
set -uo pipefail
out="${OUT:-/tmp/out}"
mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH
source .devdeps/env.sh
# The carried .pc files name /usr; the libraries were unpacked under /opt/devdeps.
sed -i -e 's#=/usr$#=/opt/devdeps/usr#' -e 's#=/usr/#=/opt/devdeps/usr/#' \
       -e 's#-I/usr/#-I/opt/devdeps/usr/#' -e 's#-L/usr/#-L/opt/devdeps/usr/#' $(find /opt/devdeps -name '*.pc')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
cmake -S . -B /tmp/canopy-build -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake --build /tmp/canopy-build -j"$(nproc)" > "$out/build.log" 2>&1 || { grep -E "error" "$out/build.log" | head -30; exit 1; }
(cd /tmp/canopy-build && ctest --output-on-failure > "$out/ctest.log" 2>&1); rc=$?
tail -25 "$out/ctest.log"
sed -n '/^op /,$p' /tmp/canopy-build/Testing/Temporary/LastTest.log | head -40
# --report-api-errors no: the test asks for 4 PiB on purpose to check the out-of-memory status.
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --report-api-errors no /tmp/canopy-build/test_cuda_ops > "$out/$tool.log" 2>&1
  echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/$tool.log" | tr '\n' ' ')"
done
exit $rc
