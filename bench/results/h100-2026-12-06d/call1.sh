# Seventeenth session, first device call: build, test, A/B of the 128-key warp-specialised form
# (mode 4) against mode 3, and bench_step with modes 4, 3 and 0 (early prefix copies on main).
source tools/device_env.sh
b=/tmp/canopy-all
t0=$(date +%s)
(cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON &&
  cmake --build $b -j16 --target test_tree_attention bench_tree_attention bench_step) > $OUT/build.log 2>&1 ||
  { grep -E "error|warning" -A3 $OUT/build.log | head -40; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"; nvidia-smi --query-gpu=name --format=csv,noheader
$b/test_tree_attention > $OUT/test_tree_attention.log 2>&1; echo "test_tree_attention rc $?"
grep -E "MISMATCH|DIFFERS|UNWRITTEN|BLIND|PASSED|FAILED|wsk" $OUT/test_tree_attention.log | grep -v "wsk.*rel L2" | head -20
grep -c "wsk" $OUT/test_tree_attention.log
echo "== A/B mode 4 (A) vs mode 3 (B), up to 512 rows"
ENV_A="CANOPY_CUDA_TA_WS=4 CANOPY_CUDA_TA_WS_MAX_ROWS=512" ENV_B="CANOPY_CUDA_TA_WS=3 CANOPY_CUDA_TA_WS_MAX_ROWS=512" \
  SKIP_BUILD=1 STEP_ARGS="" OUT=$OUT/ab43 \
  SHAPES="1,64,4096 1,64,16384 1,64,32768 8,64,16384 1,128,16384 1,128,32768 8,128,16384" bash tools/device_ab.sh
echo "== bench_step modes 4 3 0, two rounds"
for r in 1 2; do for w in 4 3 0; do
  echo "mode $w: $(CANOPY_CUDA_TA_WS=$w $b/bench_step --config bench/configs/llama3-8b.json --ctx 4096 --nodes 16,64,128 2>&1 | awk '/^decode /{printf "dec %s ", $3} /^verify, top ids /{printf "n%s %s ", $4, $5}')"
done; done
echo "total $(( $(date +%s) - t0 )) s"
