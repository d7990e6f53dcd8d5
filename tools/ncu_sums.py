#!/usr/bin/env python3
"""Sums an ncu CSV of per-kernel durations by kernel, largest first, to compare where two runs of
the same program spend their GPU time (for example a forward with and without a kernel change).

  ncu --metrics gpu__time_duration.sum --csv --print-units base PROGRAM ... > run.csv
  tools/ncu_sums.py run.csv [TOP]

Kernel names lose their template and parameter lists, so every instantiation of a kernel counts
as one. Prints microseconds, launches and name, then the total."""
import collections
import csv
import re
import sys


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    top = int(sys.argv[2]) if len(sys.argv) == 3 else 16
    time, count = collections.defaultdict(float), collections.Counter()
    with open(sys.argv[1], newline="") as f:
        for row in csv.DictReader(line for line in f if line.startswith('"')):
            if row.get("Metric Name") != "gpu__time_duration.sum":
                continue
            name = re.sub(r"[<(].*", "", row["Kernel Name"]).replace("void ", "")
            time[name] += float(row["Metric Value"].replace(",", "")) / 1000.0
            count[name] += 1
    for name, us in sorted(time.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{us:12.1f} us {count[name]:7d}  {name[:80]}")
    print(f"{sum(time.values()):12.1f} us total, {sum(count.values())} launches")


if __name__ == "__main__":
    main()
