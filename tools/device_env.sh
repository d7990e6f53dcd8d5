# Sourced by the tools/device_*.sh scripts on the GPU host. It unpacks the carried Debian libraries
# (../shared/device/pack-deps.sh makes .devdeps; DEVDEPS names another folder; ../.devdeps is tried
# for scripts run from a subfolder) and puts them on the search paths. It points their pkg-config
# files at /opt/devdeps: they name /usr, where the host has none of them, and CMake's imported
# targets check that the include directories exist. It also puts CUDA's tools on PATH. Running it
# twice on one machine is harmless.
_device_deps="${DEVDEPS:-.devdeps}"
[[ -f $_device_deps/env.sh ]] || _device_deps=../.devdeps
source "$_device_deps/env.sh"
sed -i -e 's#=/usr$#=/opt/devdeps/usr#' -e 's#=/usr/#=/opt/devdeps/usr/#' \
       -e 's#-I/usr/#-I/opt/devdeps/usr/#' -e 's#-L/usr/#-L/opt/devdeps/usr/#' $(find /opt/devdeps -name '*.pc')
export PATH=/usr/local/cuda/bin:$PATH
unset _device_deps

# sanitizer_run TOOL SECONDS LOG PROGRAM: compute-sanitizer's TOOL on PROGRAM in quick mode
# (--report-api-errors no: the tests ask for impossible allocations on purpose), then one line:
# its summary, the test program's verdict, and how many race reports fall outside cuBLAS's own
# kernels (nvjet_*). Racecheck
# reports hazards inside those, which are not ours to change; leaving them out with a kernel
# filter made compute-sanitizer 2025.3.1 fault (bench/RESULTS.md, 2026-12-06), so every kernel is
# checked and canopy's are counted apart. Racecheck takes about 420 s on test_cuda_ops.
sanitizer_run() {
  local tool=$1 secs=$2 log=$3 prog=$4
  CANOPY_TEST_QUICK=1 timeout "$secs" compute-sanitizer --tool "$tool" --print-limit 0 --report-api-errors no \
    "$prog" > "$log" 2>&1
  echo "$tool $(basename "$prog") (rc $?): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED' "$log" | tr '\n' ' ')" \
    "races outside cuBLAS: $(grep 'Race reported between' "$log" | grep -vc ' at nvjet_')"
}
