#!/bin/sh
# Runs the adversarial-training experiments of one data set, one after the other (one process
# at a time, one thread each), and keeps each script's printed tables in
#   experiments/at/results/<name>.md           (digits)
#   experiments/at/results/<dataset>/<name>.md (mnist, fashion-mnist)
# Usage: sh experiments/at/run_all.sh [mnist|fashion-mnist|digits]   (default mnist)
# Every run is cached (experiments/at/cache): an interrupted call continues where it stopped, and a
# second call started beside it (another shell) shares the runs. Costs: docs/experiments.md.
set -e
cd "$(dirname "$0")/../.."
dataset="${1:-mnist}"
case "$dataset" in
  digits) scripts="e1_grad_stats e2_lr_sweep e3_overfitting e4_random_labels e5_proxy"; out=experiments/at/results ;;
  mnist) scripts="e2_lr_sweep e1_grad_stats e3_overfitting e5_proxy e6_stability"; out=experiments/at/results/mnist ;;
  fashion-mnist) scripts="e2_lr_sweep e3_overfitting"; out=experiments/at/results/fashion-mnist ;;
  *) echo "unknown data set $dataset (mnist, fashion-mnist, digits)" >&2; exit 2 ;;
esac
mkdir -p "$out"
for e in $scripts; do
    python "experiments/at/$e.py" --dataset "$dataset" > "$out/$e.md"
done
