#!/usr/bin/env bash
# One change measured beside the code without it, on the GPU host, in one call: the two sides run
# alternately (A, B, A, B), each in a process of its own, so that a difference between processes
# shows as spread instead of as a result (bench/RESULTS.md). Two ways to have two sides:
#   PATCH=file   the change as `git diff` output, already applied to this tree: side A is this tree
#                built into /tmp/canopy-all (tools/device_all.sh), side B the same tree with the
#                patch reversed (patch -R), built into /tmp/canopy-base
#   ENV_A=...    one build, two environments: side A runs with the assignments in ENV_A (for
#                example CANOPY_CUDA_TA_PIPELINE=1), side B with those in ENV_B (either may be
#                empty: the defaults)
# SKIP_BUILD=1: side A is already built (and side B too, if an earlier call made it here).
# Then, per round: bench_tree_attention --shape S for each S in SHAPES, and bench_step STEP_ARGS
# (either may be empty, to skip that part).
# Writes under OUT: ab_shapes.txt (a line per run: side, then bench_tree_attention's line),
# ab_step_{A,B}_R.txt, ab_summary.txt (each shape's mean time per side and B/A), build logs.
# Usage (device run, carry [".devdeps", ".dev-final"]):
#   PATCH=.dev-final/change.patch OUT=/tmp/devlogs bash tools/device_ab.sh
#   ENV_A=CANOPY_CUDA_TA_PIPELINE=1 OUT=/tmp/devlogs bash tools/device_ab.sh
set -uo pipefail
out="${OUT:-/tmp/out}"
shapes="${SHAPES-1,1,4096 1,1,16384 1,16,16384 1,64,4096 1,64,32768 8,1,16384 8,64,16384}"
step_args="${STEP_ARGS---config bench/configs/llama3-8b.json --ctx 4096 --nodes 2,4,16,64,128}"
rounds="${ROUNDS:-2}"
mkdir -p "$out"
if [[ -z ${PATCH:-} && -z ${ENV_A:-} && -z ${ENV_B:-} ]]; then
  echo "device_ab.sh: set PATCH (a change applied to this tree) or ENV_A / ENV_B (the environments of the sides)" >&2
  exit 2
fi
if [[ -n ${PATCH:-} && ! -f $PATCH ]]; then
  echo "device_ab.sh: PATCH=$PATCH: no such file" >&2
  exit 2
fi

a=/tmp/canopy-all
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  OUT="$out" STEPS=build bash tools/device_all.sh > "$out/ab_build_A.txt" 2>&1 || { tail -20 "$out/ab_build_A.txt"; exit 1; }
fi
[[ -f ${DEVDEPS:-.devdeps}/env.sh ]] && source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
b=$a
if [[ -n ${PATCH:-} ]]; then
  b=/tmp/canopy-base
  src_b=/tmp/canopy-base-src
  patch_file="$(realpath "$PATCH")"
  # With SKIP_BUILD=1, an earlier call's side B on the same warm machine is kept as it is: a fresh
  # copy would give every file a new time, and the build would start over.
  if [[ ${SKIP_BUILD:-0} != 1 || ! -d $src_b ]]; then
    rm -rf "$src_b" && mkdir -p "$src_b" && cp -r . "$src_b"/
    (cd "$src_b" && patch -R -p1 < "$patch_file") > "$out/ab_patch_B.txt" 2>&1 ||
      { echo "device_ab.sh: $PATCH does not reverse on this tree (ab_patch_B.txt)" >&2; exit 1; }
  fi
  { cmake -S "$src_b" -B "$b" -DCMAKE_BUILD_TYPE=Release &&
    cmake --build "$b" -j"$(nproc)" --target bench_tree_attention bench_step; } > "$out/ab_build_B.txt" 2>&1 ||
    { tail -20 "$out/ab_build_B.txt"; exit 1; }
fi

# side NAME: the binary directory and the environment of a side.
dir_of() { [[ $1 == A ]] && echo "$a" || echo "$b"; }
env_of() { [[ $1 == A ]] && echo "${ENV_A:-}" || echo "${ENV_B:-}"; }
run() { # run SIDE PROGRAM ARGS...: the program of that side, in that side's environment
  local side=$1 prog=$2
  shift 2
  env $(env_of "$side") "$(dir_of "$side")/$prog" "$@"
}

: > "$out/ab_shapes.txt"
for r in $(seq "$rounds"); do
  for s in $shapes; do
    for side in A B; do
      echo "$side $(run $side bench_tree_attention --shape "$s" 2>&1 | tail -1)" >> "$out/ab_shapes.txt"
    done
  done
done
[[ -n $step_args ]] && for r in $(seq "$rounds"); do
  for side in A B; do
    run $side bench_step $step_args > "$out/ab_step_${side}_$r.txt" 2>&1
  done
done

# Mean time per shape and side (bench_tree_attention --shape prints "... splits S tile T: X us").
awk '$2 == "batch" {
       key = $3 " " $5 " " $7; t = $(NF-4); sum[key, $1] += t; cnt[key, $1]++
       if (!(key in seen)) { seen[key] = 1; order[++n] = key }
     }
     END {
       printf "%-18s %10s %10s %8s\n", "batch n L", "A us", "B us", "B/A"
       for (i = 1; i <= n; i++) {
         k = order[i]; ta = sum[k, "A"] / cnt[k, "A"]; tb = sum[k, "B"] / cnt[k, "B"]
         printf "%-18s %10.1f %10.1f %7.2fx\n", k, ta, tb, tb / ta
       }
     }' "$out/ab_shapes.txt" > "$out/ab_summary.txt"
cat "$out/ab_summary.txt"
grep -H -E "^decode|top ids" "$out"/ab_step_*.txt || true
