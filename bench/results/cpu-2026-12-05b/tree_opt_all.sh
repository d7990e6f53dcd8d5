#!/usr/bin/env bash
# Re-runs every canopy tree-opt of this folder from the repository root (pure arithmetic over the
# recorded acceptance and cost files): bash bench/results/cpu-2026-12-05b/tree_opt_all.sh
set -euo pipefail
R=bench/results/cpu-2026-12-05b
c=${CANOPY:-build/canopy}
for run in run1 run2; do
  for costs in costs_ctx256 costs_ctx128_a costs_ctx128_b h200_costs_assembled; do
    $c tree-opt --acceptance $R/$run/results.json --costs $R/$costs.json --size 16 2> $R/tree_opt_${run}_$costs.txt >/dev/null
  done
done
# The shipped draft's greedy acceptance (dev prompts, chain:4 and dynamic:64) under the H200 costs,
# as measured and in scenarios: a draft forward 4x or 10x cheaper, a top-1 acceptance of 0.7-0.9
# (--p1, lower ranks decaying by half).
A=drafts/SmolLM2-135M-draft/bench/greedy_results.json
# With --overhead-ms 0.09 too: what the eighth session's end-to-end steps on the H200 cost beyond
# this model's forwards (static:2,1 0.071 ms, chain:2 0.104 ms a step).
for o in 0 0.09; do
  for costs in h200_costs_assembled h200_costs_assembled_draft4x h200_costs_assembled_draft10x; do
    for p in "" "--p1 0.7 --rank-decay 0.5" "--p1 0.8 --rank-decay 0.5" "--p1 0.9 --rank-decay 0.5"; do
      printf "overhead %-4s %-32s %-26s " $o $costs "${p:-measured p}"
      $c tree-opt --acceptance $A --costs $R/$costs.json --overhead-ms $o --size 64 $p 2>&1 >/dev/null |
        grep -E "^tree:|predicted step" | tr '\n' ' '
      echo
    done
  done
done > $R/h200_scenarios.txt
