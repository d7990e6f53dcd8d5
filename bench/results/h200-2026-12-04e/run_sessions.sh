#!/usr/bin/env bash
set -uo pipefail
out="${OUT:-/tmp/out}"; mkdir -p "$out"
source tools/device_env.sh
SECONDS=0
b=/tmp/cb
[[ -d $b ]] || cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_BUILD_TESTS=OFF > "$out/configure.log" 2>&1
cmake --build $b -j16 --target bench_spec_step > "$out/build.log" 2>&1 || { grep -E "error" -A3 "$out/build.log" | head -40; exit 1; }
echo "built at ${SECONDS}s"
r=$PWD; cd $b; c=$r/bench/configs/smollm2-135m.json
for S in 8; do
  ./bench_spec_step --target-config $c --draft $r/drafts/SmolLM2-135M-draft --ctx 256 --new 128 --reps 3 --sessions $S \
    --tree chain:2 --tree chain:4 --tree static:3,2,1 > "$out/spec_draft_s$S.txt" 2>&1; echo "== shipped draft, random target, $S sessions (rc $?)"; tail -8 "$out/spec_draft_s$S.txt"
  ./bench_spec_step --target-config $c --draft-config $c --ctx 256 --new 128 --reps 3 --sessions $S \
    --tree chain:2 --tree chain:4 --tree static:3,2,1 > "$out/spec_same_s$S.txt" 2>&1; echo "== draft = target, $S sessions (rc $?)"; tail -8 "$out/spec_same_s$S.txt"
done
echo "all at ${SECONDS}s"
