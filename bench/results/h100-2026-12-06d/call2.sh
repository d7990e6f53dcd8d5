# Seventeenth session, second device call: mode 3 taking 128-key tiles at one split of 8192+ keys
# (CN_CUDA_TA_WS_LONG_KEYS): build, tests, A/B against long keys off, benchmark 6a.
source tools/device_env.sh
b=/tmp/canopy-all
t0=$(date +%s)
(cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DCANOPY_WERROR=ON &&
  cmake --build $b -j16 --target test_tree_attention bench_tree_attention bench_step test_cuda_forward test_cuda_graphs) \
  > $OUT/build.log 2>&1 || { grep -E "error|warning" -A3 $OUT/build.log | head -40; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"; nvidia-smi --query-gpu=name --format=csv,noheader
$b/test_tree_attention > $OUT/test_tree_attention.log 2>&1; echo "test_tree_attention rc $?"
grep -E "MISMATCH|DIFFERS|UNWRITTEN|BLIND|PASSED|FAILED" $OUT/test_tree_attention.log | head -20
echo "== A/B default (A) vs CANOPY_CUDA_TA_WS_LONG_KEYS=0 (B)"
ENV_A="" ENV_B="CANOPY_CUDA_TA_WS_LONG_KEYS=0" SKIP_BUILD=1 STEP_ARGS="" OUT=$OUT/ab \
  SHAPES="8,64,4096 8,64,16384 8,64,32768 8,128,4096 8,128,16384 8,128,32768 1,64,16384 1,128,32768" \
  bash tools/device_ab.sh
echo "== benchmark 6a"
$b/bench_tree_attention > $OUT/bench_tree_attention.log 2>&1; echo "rc $?"
grep -E "^ *(1|8) +(1|16|64|128) " $OUT/bench_tree_attention.log | head -40
echo "total $(( $(date +%s) - t0 )) s"
