#!/usr/bin/env bash
# The chained-step change against main before it (8c8ab04): decode and verification steps, both models.
set -uo pipefail
out="${OUT:-/tmp/out}"; mkdir -p "$out"
rm -rf /tmp/canopy-all /tmp/canopy-base /tmp/canopy-base-src
SHAPES="1,1,4096" ROUNDS=3 PATCH=.dev-final/chained.patch \
  STEP_ARGS="--config bench/configs/llama3-8b.json --config bench/configs/smollm2-135m.json --ctx 4096 --nodes 2,16,64 --reps 10" \
  OUT="$out" bash tools/device_ab.sh > "$out/ab.txt" 2>&1
echo "ab rc $?"; tail -5 "$out/ab.txt"
cat "$out/ab_summary.txt"
for f in "$out"/ab_step_*; do echo "== $f"; grep -E "^decode|top ids" "$f"; done
cd "$out" && tar czf ab_steps.tgz ab_step_* && rm -f ab_step_* ab_build_*
