# gemv16_small.patch: gemv16.patch with the 9-16 row instance only where the input rows fit
# CN_CUDA_GEMV_WIDE_INPUT_BYTES (64 KB; SmolLM2-135M yes, Llama-3-8B no: call1 measured SmolLM2 10-12%
# faster at 9-16 rows, Llama-3-8B 8-25% slower), and its tests adjusted. Apply it, then on the device
# (carry .devdeps): call1.sh's build and tests, two A/B rounds of bench_step against main at 8-17
# nodes, no split sweep.
CHANGE=gemv16_small.patch NODES=8,9,12,16,17 ROUNDS=2 SPLITS= bash "$(dirname "${BASH_SOURCE[0]}")/call1.sh"
