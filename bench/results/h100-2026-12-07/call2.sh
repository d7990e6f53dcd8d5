# gemv16_small.patch: gemv16.patch with the 9-16 row instance only where the input rows fit
# CN_CUDA_GEMV_WIDE_INPUT_BYTES (64 KB; SmolLM2-135M yes, Llama-3-8B no: call1 measured SmolLM2 11-12%
# faster at 9-16 rows, Llama-3-8B 8-25% slower), and its tests adjusted. Apply it, then on the device
# (carry .devdeps): build, test_cuda_ops, test_cuda_forward, two A/B rounds of bench_step against main.
source tools/device_env.sh
d=bench/results/h100-2026-12-07
b=/tmp/canopy-all
t0=$(date +%s)
el() { echo "($(( $(date +%s) - t0 )) s)"; }
(cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON &&
  cmake --build $b -j16 --target test_cuda_ops test_cuda_forward bench_step bench_tree_attention) \
  > $OUT/build.log 2>&1 || { grep -E "error|warning" -A3 $OUT/build.log | head -40; exit 1; }
echo "build $(el)"; nvidia-smi --query-gpu=name --format=csv,noheader
python3 tools/write_smollm2_shape.py /tmp/sm > /dev/null 2>&1
for t in test_cuda_ops test_cuda_forward; do
  CANOPY_TEST_QUICK=1 CANOPY_TEST_BIG_MODEL=/tmp/sm timeout 60 $b/$t > $OUT/$t.log 2>&1; echo "$t rc $? $(el)"
  grep -E "MISMATCH|differ|PASSED|FAILED" $OUT/$t.log | head -8
done
echo "== A/B $(el)"
ROUNDS=2 PATCH=$d/gemv16_small.patch SKIP_BUILD=1 SHAPES="" OUT=$OUT/ab \
  STEP_ARGS="--config bench/configs/llama3-8b.json --config bench/configs/smollm2-135m.json --ctx 4096 --nodes 8,9,12,16,17" \
  bash tools/device_ab.sh > /dev/null 2>&1
for f in $OUT/ab/ab_step_*.txt; do echo "== $(basename $f)"; grep -E "^decode|top ids" $f; done | tee $OUT/ab_steps.txt
rm -rf $OUT/ab

echo "total $(el)"
