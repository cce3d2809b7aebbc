#!/usr/bin/python3
"""Interleaved rounds of two or more moe_bench binaries on the same rows: the
way to measure a change on a shared machine, where one row moves by up to
20% between runs.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=2 \\
        python3 bench/compare.py --rounds 7 --filter '<regex>' before/moe_bench after/moe_bench

Each round runs every binary once on the rows that --filter selects, every
other round in reverse order. For each row it prints the median tokens/s of
every binary with its yardstick ratio (ratio_vs_dense_gemm, or
fraction_of_copy_bw for the decode rows), and the median over rounds of
tokens/s(binary) / tokens/s(first binary), with its range. With
--relative-to ROW_PART=OTHER_PART it also prints, per binary, the median over
rounds of a row's tokens/s over the same run's other row (e.g. DefaultEMA
over Sparse: a cost measured inside one process).
"""
import argparse
import json
import statistics
import subprocess
import sys


def run(binary, row_filter):
    out = subprocess.run([binary, f"--benchmark_filter={row_filter}", "--benchmark_format=json"],
                         check=True, capture_output=True, text=True).stdout
    rows = {}
    for row in json.loads(out)["benchmarks"]:
        name = row["name"].split("/iterations")[0]
        # Training rows are judged by ratio_vs_dense_gemm, decode rows by
        # fraction_of_copy_bw.
        judge = next((j for j in ("fraction_of_copy_bw", "ratio_vs_dense_gemm") if j in row), None)
        # The copy rows have no tokens/s: their rate is GB/s.
        rate = row["tokens/s"] if "tokens/s" in row else row.get("GB/s", 0.0)
        rows[name] = (rate, row.get(judge, 0.0), judge)
    return rows


def span(values):
    return f"{statistics.median(values):.3f} ({min(values):.3f} to {max(values):.3f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binaries", nargs="+", help="moe_bench binaries; the first is the baseline")
    parser.add_argument("--filter", required=True, help="Google Benchmark row regex")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--relative-to", action="append", default=[], metavar="PART=OTHER",
                        help="also print tokens/s of rows naming PART over the row naming OTHER")
    args = parser.parse_args()
    runs = []
    for r in range(args.rounds):  # every other round in reverse order
        order = list(range(len(args.binaries)))[:: 1 if r % 2 == 0 else -1]
        results = {i: run(args.binaries[i], args.filter) for i in order}
        runs.append([results[i] for i in range(len(args.binaries))])
    names = sorted(runs[0][0])
    if not names:
        sys.exit(f"compare: no row matches {args.filter}")
    for r in runs:
        for i, rows in enumerate(r):
            if sorted(rows) != names:
                sys.exit(f"compare: {args.binaries[i]} runs other rows than {args.binaries[0]}: "
                         f"{sorted(set(rows) ^ set(names))}")
    print(f"{args.rounds} interleaved rounds; medians (range over rounds)")
    for name in names:
        print(name)
        for i, binary in enumerate(args.binaries):
            tokens = [r[i][name][0] for r in runs]
            ratio = [r[i][name][1] for r in runs]
            judge = runs[0][i][name][2]
            unit = "GB/s" if name.startswith("Memory") else "tok/s"
            line = f"  {binary}: {statistics.median(tokens):9.1f} {unit}"
            if judge:
                line += f", {judge} {statistics.median(ratio):.3f}"
            if i > 0:
                line += f", speedup over the first {span([r[i][name][0] / r[0][name][0] for r in runs])}"
            print(line)
    for pair in args.relative_to:
        part, other = pair.split("=")
        for name in (n for n in names if part in n):
            base = name.replace(part, other)
            if base not in names:
                continue
            for i, binary in enumerate(args.binaries):
                cost = [r[i][name][0] / r[i][base][0] for r in runs]
                print(f"{name} / {base}  {binary}: {span(cost)}")


if __name__ == "__main__":
    main()
