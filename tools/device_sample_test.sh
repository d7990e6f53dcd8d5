#!/usr/bin/env bash
# Runs on the GPU host (see ../shared/device/README.md), from a copy of the tree: builds the CUDA
# sampling and losslessness tests, test_cuda_ops and test_cuda_forward (with the random-weight
# SmolLM2-shape model of tools/device_test.sh), bench_sample, and `canopy bench acceptance` on that
# model (its own weights as the draft; a tokenizer folder given as $1 supplies tokenizer.json)
# with and without CANOPY_CUDA_BATCH_INVARIANT. Logs go to $OUT (8 files at most come back).
#   device run, carry [".devdeps", DIR]: cd DIR && bash tools/device_sample_test.sh TOKENIZER_DIR PROMPTS
set -uo pipefail
out="${OUT:-/tmp/out}"
tok="${1:-}"
prompts="${2:-}"
mkdir -p "$out"
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
SECONDS=0
b=/tmp/canopy-sample-build
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON > /tmp/configure.log 2>&1 || { tail -30 /tmp/configure.log; exit 1; }
cmake --build $b -j"$(nproc)" --target test_cuda_sample test_cuda_ops test_cuda_forward bench_sample canopy_cli \
  > /tmp/build.log 2>&1 || { grep -E "error|warning" -A3 /tmp/build.log | head -40; exit 1; }
echo "built in ${SECONDS}s"

big=/tmp/smollm2-shape
python3 tools/write_smollm2_shape.py "$big" > /tmp/bigmodel.log 2>&1 && export CANOPY_TEST_BIG_MODEL=$big
echo "model at ${SECONDS}s: $(tail -1 /tmp/bigmodel.log)"

timeout 100 $b/test_cuda_sample > "$out/cuda_sample.log" 2>&1
echo "test_cuda_sample rc $? at ${SECONDS}s"
grep -E "^(sample vs|chi-square|sampled gen|greedy spec|matmul )|FAILED|PASSED|MISMATCH|NOT A" "$out/cuda_sample.log" | head -30
timeout 40 $b/test_cuda_ops > "$out/cuda_ops.log" 2>&1
echo "test_cuda_ops rc $? at ${SECONDS}s: $(grep -E "PASSED|FAILED" "$out/cuda_ops.log" | tr '\n' ' ')"
timeout 50 $b/test_cuda_forward > "$out/cuda_forward.log" 2>&1
echo "test_cuda_forward rc $? at ${SECONDS}s: $(grep -E "PASSED|FAILED" "$out/cuda_forward.log" | tr '\n' ' ')"
timeout 20 $b/bench_sample --reps 50 > "$out/bench_sample.log" 2>&1
echo "bench_sample rc $?"; cat "$out/bench_sample.log"
if [ -n "$tok" ] && [ -n "$prompts" ]; then
  cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json $big/
  for inv in 0 1; do
    CANOPY_CUDA_BATCH_INVARIANT=$inv timeout 30 $b/canopy bench acceptance -m $big -d $big --prompts "$prompts" \
      -n 48 --max-prompts 8 --tree chain:4 --tree dynamic:16 --tree dynamic:64 --device cuda -o /tmp/acc$inv \
      > "$out/acceptance$inv.log" 2>&1
    echo "bench acceptance (CANOPY_CUDA_BATCH_INVARIANT=$inv) rc $? at ${SECONDS}s"; grep -v "^\[" "$out/acceptance$inv.log" | tail -30
    cp /tmp/acc$inv/results.json "$out/acc$inv.json"
  done
fi
echo "all done at ${SECONDS}s"
