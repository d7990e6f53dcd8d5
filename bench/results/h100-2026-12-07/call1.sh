# The few-row GEMM on tensor cores at 9-16 rows: gemv16.patch, the eighteenth session's patch less
# its README hunk, already applied to the tree. On the device (carry .devdeps): build, test_cuda_ops
# (its 1-16 row bit-exactness, batch-independence and CPU-twin tests) and test_cuda_forward, then one
# A/B round of bench_step against the tree without the patch (device_ab.sh reverses it for side B).
# As it ran, with the defaults; call2.sh runs it for another patch through CHANGE, NODES, ROUNDS and
# SPLITS (empty: no split sweep).
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
ROUNDS=${ROUNDS:-1} PATCH=$d/${CHANGE:-gemv16.patch} SKIP_BUILD=1 SHAPES="" OUT=$OUT/ab \
  STEP_ARGS="--config bench/configs/llama3-8b.json --config bench/configs/smollm2-135m.json --ctx 4096 --nodes ${NODES:-4,8,9,12,16}" \
  bash tools/device_ab.sh > /dev/null 2>&1
for f in $OUT/ab/ab_step_*.txt; do echo "== $(basename $f)"; grep -E "^decode|top ids" $f; done | tee $OUT/ab_steps.txt
rm -rf $OUT/ab

# Batch 1, 64 nodes: the split count the plan takes (8 at 4k-32k) against others, side A's build.
echo "== splits $(el)"
for L in 16384; do for s in ${SPLITS-0 12 16}; do
  sp=$([[ $s == 0 ]] && echo "" || echo ",$s")
  echo "L $L splits $([[ $s == 0 ]] && echo auto || echo $s): $($b/bench_tree_attention --shape 1,64,$L$sp 2>&1 | tail -1)"
done; done | tee $OUT/splits.txt
echo "total $(el)"
