# Eighteenth session, first device call: q and the attention output in bf16 on the tree kernel's
# path (b3b0bc4; attn_bf16.patch is that change). Build, the CUDA tests (also a GPU run of
# ccfe4a7's removal of the warp-specialised modes 1 and 2), an A/B of bench_step against the tree
# without the change (Llama-3-8B and SmolLM2-135M shapes), then test_cuda_forward of both sides from
# one seed, whose printed errors must be the same digits (the change keeps every bit).
source tools/device_env.sh
d=bench/results/h100-2026-12-06e
b=/tmp/canopy-all
t0=$(date +%s)
el() { echo "($(( $(date +%s) - t0 )) s)"; }
(cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON &&
  cmake --build $b -j16 --target test_tree_attention test_cuda_ops test_cuda_forward test_cuda_graphs bench_step bench_tree_attention) \
  > $OUT/build.log 2>&1 || { grep -E "error|warning" -A3 $OUT/build.log | head -40; exit 1; }
echo "build $(el)"; nvidia-smi --query-gpu=name --format=csv,noheader
for t in test_tree_attention test_cuda_ops; do
  timeout 150 $b/$t > $OUT/$t.log 2>&1; echo "$t rc $? $(el)"
  grep -E "MISMATCH|DIFFERS|UNWRITTEN|BLIND|PASSED|FAILED" $OUT/$t.log | head -12
done
echo "== A/B $(el)"
PATCH=$d/attn_bf16.patch SKIP_BUILD=1 SHAPES="" OUT=$OUT/ab \
  STEP_ARGS="--config bench/configs/llama3-8b.json --config bench/configs/smollm2-135m.json --ctx 4096 --nodes 3,4,8,16,64,128" \
  bash tools/device_ab.sh
echo "== forward tests $(el)"
python3 tools/write_smollm2_shape.py /tmp/sm > /dev/null 2>&1
(cd $b && CANOPY_TEST_BIG_MODEL=/tmp/sm timeout 120 ctest -R "test_cuda_forward|test_cuda_graphs" > $OUT/ctest_fwd.log 2>&1); echo "ctest fwd/graphs rc $? $(el)"
tail -4 $OUT/ctest_fwd.log
cmake --build /tmp/canopy-base -j16 --target test_cuda_forward > $OUT/build_B_fwd.log 2>&1 || tail -5 $OUT/build_B_fwd.log
for side in all base; do
  CANOPY_TEST_QUICK=1 CANOPY_TEST_SEED=12345 CANOPY_TEST_BIG_MODEL=/tmp/sm timeout 60 /tmp/canopy-$side/test_cuda_forward > $OUT/fwd_seed_$side.log 2>&1
  echo "test_cuda_forward (quick) $side rc $? $(el)"
done
# The printed errors without the timings must match.
strip() { grep -vE " ms|tok/s| us\b" "$1"; }
if diff <(strip $OUT/fwd_seed_all.log) <(strip $OUT/fwd_seed_base.log) > $OUT/fwd_seed_diff.txt; then echo "test_cuda_forward: the same output both sides"
else echo "test_cuda_forward outputs differ: $(wc -l < $OUT/fwd_seed_diff.txt) lines"; head -20 $OUT/fwd_seed_diff.txt; fi
echo "total $(el)"
