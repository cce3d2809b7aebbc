#!/usr/bin/env bash
# moe-train-lm --expert-parallel over P processes prints the validation
# losses of the single-process run of the same recipes: every evaluation of
# every recipe (metrics.csv) and smoe-dropout's sweep over k (summary.csv),
# within 1e-5 relative (float training; the processes' shares of a batch
# round differently from the whole batch in their last bits). So are the
# summary's parameter counts and routing statistics (over every process).
#   train_lm_expert_parallel.sh <moe-train-lm> <dir> <mpiexec> <flags...>
set -euo pipefail
exe=$1 dir=$2
shift 2
rm -rf "$dir"
mkdir -p "$dir"
args=(--quick --recipes all --steps 60 --eval-every 20)
"$exe" "${args[@]}" --out "$dir/one" >"$dir/one.log"
"$@" "$exe" "${args[@]}" --expert-parallel --out "$dir/many" >"$dir/many.log"
grep "expert parallel:" "$dir/many.log"

# compare <csv> <column>: the column's numbers row by row, both runs.
compare() {
  paste -d, "$dir/one/$1" "$dir/many/$1" | awk -F, -v col="$2" -v file="$1" '
    NR == 1 { n = NF / 2; next }
    {
      a = $(col); b = $(col + n)
      if ($1 != $(1 + n)) { print file ": row " NR " is " $1 " and " $(1 + n); bad = 1; next }
      if (a == "" && b == "") next
      if (a == "" || b == "") { print file ": row " NR ": \"" a "\" vs \"" b "\""; bad = 1; next }
      rel = a == b ? 0 : (a - b) / a; if (rel < 0) rel = -rel
      if (rel > worst) worst = rel
      if (rel > 1e-5) { print file ": row " NR " (" $1 "): " a " vs " b ", relative " rel; bad = 1 }
      compared++
    }
    END {
      printf "%s column %d: %d values compared, largest relative difference %.3g\n", file, col, compared, worst
      if (compared == 0) { print file ": nothing compared"; bad = 1 }
      exit bad
    }'
}
status=0
compare metrics.csv 5 || status=1
for column in 4 7 8 9 10; do  # val_loss, active and total parameters, sparsity, load
  compare summary.csv $column || status=1
done
exit $status
