#!/usr/bin/env bash
set -uo pipefail
out="${OUT:-/tmp/out}"; mkdir -p "$out"
ls /root/devbig || exit 3
source tools/device_env.sh
SECONDS=0
b=/tmp/canopy-e2e
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_BUILD_TESTS=OFF > "$out/configure.log" 2>&1 || { tail -20 "$out/configure.log"; exit 1; }
cmake --build $b -j16 --target canopy_cli > "$out/build.log" 2>&1 || { grep error -A3 "$out/build.log" | head -30; exit 1; }
echo "built at ${SECONDS}s"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev-final/extra/gguf-*.whl || exit 1
m=/tmp/smollm2
PYTHONPATH=/tmp/site python3 tools/convert_smollm2.py --out $m --cache /root/devbig > "$out/convert.log" 2>&1 || { tail -20 "$out/convert.log"; exit 1; }
echo "converted at ${SECONDS}s"
P=.dev-final/extra/dev_prompts.jsonl; D=drafts/SmolLM2-135M-draft
trees="--tree chain:2 --tree chain:3 --tree chain:4 --tree static:2,1 --tree static:3,2,1 --tree dynamic:16"
for mode in chained host chained2; do
  hl=0; [[ $mode == host ]] && hl=1
  CANOPY_SPEC_HOST_LEVELS=$hl timeout 150 $b/canopy bench acceptance -m $m -d $D --prompts $P --chat -n 128 --device cuda $trees \
    --out /tmp/acc_$mode > "$out/canopy_$mode.txt" 2>&1
  echo "== canopy 30 prompts, $mode (rc $?) at ${SECONDS}s"; grep -v "^\s*$" "$out/canopy_$mode.txt" | tail -12
  cp /tmp/acc_$mode/results.json "$out/canopy_$mode.json" 2>/dev/null
done
timeout 60 $b/canopy bench acceptance -m $m -d $D --prompts $P --chat -n 128 --device cuda --max-prompts 8 $trees > "$out/canopy_8.txt" 2>&1
echo "== canopy 8 prompts (rc $?)"; grep -v "^\s*$" "$out/canopy_8.txt" | tail -12
timeout 270 python3 tools/bench_hf_generate.py --model $m --draft $D --prompts $P --max-new-tokens 128 --max-prompts 8 --json "$out/hf.json" > "$out/hf.txt" 2>&1
echo "== transformers (rc $?) at ${SECONDS}s"; grep -v Warning "$out/hf.txt" | tail -12
