#!/bin/sh
# Runs E1-E5 one after the other (one process at a time, one thread each) and keeps each
# script's printed tables in experiments/at/results/<name>.md. About 30 min on a busy 2-core CPU.
set -e
cd "$(dirname "$0")/../.."
mkdir -p experiments/at/results
for e in e1_grad_stats e2_lr_sweep e3_overfitting e4_random_labels e5_proxy; do
    python "experiments/at/$e.py" > "experiments/at/results/$e.md"
done
