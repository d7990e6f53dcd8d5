#!/usr/bin/env bash
# Installs, builds and runs every test: a Release build with warnings as errors, then the whole
# suite again under AddressSanitizer + UndefinedBehaviorSanitizer. CUDA tests skip without a GPU.
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
source "$root/tools/install_deps.sh"

canopy_install_debs
py="$(canopy_python "$root")"
# The SmolLM2 reference test needs the converted model (a 93 MB download, once).
"$py" "$root/tools/convert_smollm2.py" --out "$root/models/SmolLM2-135M-Instruct"

jobs="$(nproc)"
echo "== Release build, warnings as errors"
canopy_build "$root" "$root/build" -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON
(cd "$root/build" && ctest --output-on-failure -j"$jobs")

echo "== AddressSanitizer + UndefinedBehaviorSanitizer build"
canopy_build "$root" "$root/build-asan" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCANOPY_SANITIZE=ON -DCANOPY_WERROR=ON
# protect_shadow_gap=0: the CUDA runtime maps memory where ASan's shadow gap would be.
# CANOPY_TEST_QUICK shortens the long model tests, which the Release run has covered in full.
(cd "$root/build-asan" && ASAN_OPTIONS=protect_shadow_gap=0:detect_leaks=1 CANOPY_TEST_QUICK=1 \
   ctest --output-on-failure -j"$jobs")
