#!/usr/bin/env bash
# One GPU-host call (carry .devdeps) for plain_sampled_graphs.patch, which is NOT on main (written
# on 2026-12-05, no device was lent to test it, so main went back to 77e4b5c's behaviour): a plain
# sampled decode captured in CUDA graphs. Builds the tree with the patch applied ("new") and as it
# is ("base"), runs the CUDA tests on new (test_cuda_graphs, test_cuda_sample, test_cuda_forward),
# bench_spec_step side by side (target alone and speculation, greedy, T 1 and top-p), then (unless
# SHORT=1) ncu's durations of the dynamic-tree kernels in chained steps and memcheck on the graph
# test. Logs to $OUT as one archive.
set -uo pipefail
final="${OUT:-/tmp/out}"; out=/tmp/logs; mkdir -p "$final" "$out"
pack() { tar czf "$final/logs.tgz" -C /tmp logs; }
source tools/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$out/gpu.txt"
SECONDS=0
src=$PWD
rm -rf /tmp/new && cp -r . /tmp/new && (cd /tmp/new && patch -p1 < bench/results/h200-2026-12-05d/plain_sampled_graphs.patch > /dev/null) || exit 2
for t in new base; do
  d=$src; [[ $t == new ]] && d=/tmp/new
  cmake -S $d -B /tmp/b-$t -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON > "$out/configure_$t.log" 2>&1 || { tail -30 "$out/configure_$t.log"; exit 1; }
  tg="bench_spec_step"; [[ $t == new ]] && tg="test_cuda_graphs test_cuda_sample test_cuda_forward bench_spec_step"
  cmake --build /tmp/b-$t -j16 --target $tg > "$out/build_$t.log" 2>&1 || { grep -E "error|warning" -A3 "$out/build_$t.log" | head -40; exit 1; }
done
echo "built in ${SECONDS}s"
cd /tmp/b-new
for t in test_cuda_graphs test_cuda_sample test_cuda_forward; do
  q=""; [[ $t == test_cuda_forward ]] && q="CANOPY_TEST_QUICK=1" # its quick mode: one model, two sampled cases
  env $q CANOPY_SOURCE_DIR=$src timeout 150 ./$t > "$out/$t.log" 2>&1; r=$?
  echo "$t rc $r at ${SECONDS}s: $(grep -E '^\[  (PASSED|FAILED) ' "$out/$t.log" | tr '\n' ' ')"
  grep -E "^\[ (graphs|sampled|spec) |FAILED|ERROR|LINE|DIFF" "$out/$t.log" | head -24
done
pack
cd "$src"
cfg=bench/configs/smollm2-135m.json
common="--target-config $cfg --draft-config $cfg --draft-layers 8 --ctx 256 --new 128 --reps 3"
for rule in "" "--temp 1" "--temp 0.7 --top-p 0.95"; do
  tag=$(echo "greedy $rule" | tr -d ' -')
  for r in 1; do for t in new base; do
    timeout 60 /tmp/b-$t/bench_spec_step $common $rule --tree chain:2 --tree static:2,1 > "$out/spec_${tag}_${t}_$r.txt" 2>&1
    echo "== $t $rule (rc $?) at ${SECONDS}s: $(grep -E '^\(target only\)' "$out/spec_${tag}_${t}_$r.txt")"
  done; done
done
pack
[[ ${SHORT:-0} == 1 ]] && exit 0 # SHORT=1: tests and the side-by-side benches only
timeout 90 /tmp/b-new/bench_spec_step $common --tree static:2,2 --tree dynamic:8,depth=3,topk=2 \
  --tree dynamic:16 > "$out/spec_dyn.txt" 2>&1
echo "== dynamic against static (rc $?) at ${SECONDS}s"; tail -9 "$out/spec_dyn.txt"
timeout 90 ncu --clock-control none --kernel-name regex:'dyn_' --metrics gpu__time_duration.sum --csv \
  /tmp/b-new/bench_spec_step --target-config $cfg --draft-config $cfg --draft-layers 8 --ctx 256 --new 16 --reps 1 \
  --tree dynamic:16 > "$out/ncu_dyn.csv" 2> "$out/ncu_dyn.err"
echo "ncu (rc $?) at ${SECONDS}s"
python3 - "$out/ncu_dyn.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
if not rows: print("no ncu rows"); sys.exit()
h = rows[0]; k = h.index("Kernel Name"); v = h.index("Metric Value"); u = h.index("Metric Unit")
agg = collections.defaultdict(list)
for r in rows[1:]:
    scale = {"nsecond": 1e-3, "usecond": 1, "msecond": 1e3}.get(r[u], 1)
    agg[r[k].split("(")[0]].append(float(r[v].replace(",", "")) * scale)
for name, t in sorted(agg.items()):
    print(f"{name}: {len(t)} launches, mean {sum(t)/len(t):.2f} us, max {max(t):.2f} us")
PY
pack
cd /tmp/b-new
CANOPY_TEST_QUICK=1 CANOPY_SOURCE_DIR=$src timeout $(( SECONDS < 260 ? 300 - SECONDS : 40 )) compute-sanitizer --tool memcheck --report-api-errors no \
  ./test_cuda_graphs > "$out/memcheck_graphs.log" 2>&1
echo "memcheck test_cuda_graphs (rc $?) at ${SECONDS}s: $(grep -E 'ERROR SUMMARY|PASSED|FAILED' "$out/memcheck_graphs.log" | tr '\n' ' ')"
pack
