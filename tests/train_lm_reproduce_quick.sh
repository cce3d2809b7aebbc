#!/usr/bin/env bash
# The reproductions' path in CI: examples/reproduce.sh --quick (2 seeds, a
# few seconds per run) for every setting, then the outputs a person reads are
# checked: each setting's seed statistics name every measure of its claim,
# with both seeds, and the plots exist where gnuplot does.
#   train_lm_reproduce_quick.sh <moe-train-lm> <reproduce.sh> <dir>
set -euo pipefail
exe=$1 script=$2 dir=$3
rm -rf "$dir"
bash "$script" --quick "$exe" "$dir" >"$dir.log" 2>&1 || { cat "$dir.log"; exit 1; }

status=0
# expect <setting> <recipe> <measure> [k]: a row with n = 2 and a finite mean.
expect() {
  local file="$dir/$1/seeds.csv"
  if ! awk -F, -v r="$2" -v m="$3" -v k="${4:-}" '
      $1 == r && $2 == m && $3 == k && $4 == 2 && $6 != "" { found = 1 }
      END { exit !found }' "$file"; then
    echo "$file: no row '$2,$3,${4:-}' over 2 seeds with a value"
    status=1
  fi
}
expect default-moe topk val_loss
expect default-moe default-moe val_loss_minus_topk
expect default-moe default-moe tokens_per_s_ratio_to_topk
expect default-moe default-moe tokens_to_same_loss_ratio_to_topk
expect remoe remoe val_loss_minus_topk
expect remoe remoe sparsity
expect acmoe acmoe val_loss_minus_topk
expect acmoe acmoe expert_dispersion_minus_topk
for recipe in smoe-dropout smoe-learned; do
  for k in 1 4 8; do expect smoe-dropout "$recipe" val_loss_at_k "$k"; done
  expect smoe-dropout "$recipe" val_loss_step_to_next_k 7
done
expect smoe-dropout smoe-dropout val_loss_minus_smoe-learned
for setting in default-moe remoe acmoe smoe-dropout; do
  grep -q "Over 2 seeds" "$dir/$setting/log.txt" || { echo "$setting: no seed report"; status=1; }
  [ -s "$dir/$setting/val_curve.csv" ] || { echo "$setting: no val_curve.csv"; status=1; }
  if command -v gnuplot >/dev/null && [ ! -s "$dir/$setting/val_loss_seeds.svg" ]; then
    echo "$setting: val_loss_seeds.svg missing although gnuplot exists"
    status=1
  fi
done
[ -s "$dir/smoe-dropout/inference_k_seeds.svg" ] || ! command -v gnuplot >/dev/null ||
  { echo "smoe-dropout: inference_k_seeds.svg missing"; status=1; }
[ $status -eq 0 ] && echo "reproduce.sh --quick: outputs checked"
exit $status
