#!/usr/bin/env bash
# The main job's cost: wall time of the tuned per-weight arm over the untuned arm at equal inner
# steps (both arms in one run, so machine noise hits both), and their test losses, for the
# hyper-step settings compared when the weight-decay defaults were chosen.
#   bash benchmarks/main_job_cost.sh            (about 2 minutes on 2 idle cores)
set -euo pipefail
cd "$(dirname "$0")/.."
HG=${HG:-.venv/bin/hypergradients}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() {
    local name=$1; shift
    "$HG" run weight-decay --out "$out/$name" --quiet --json --set 'arms=["none","weight"]' "$@" | python3 -c "
import json, sys
d = json.load(sys.stdin); n, w = d['rows']
print(f\"{'$name':44s} {w['wall_s'] / n['wall_s']:5.2f}x   test loss untuned {n['test_loss']:.4f}  per-weight {w['test_loss']:.4f}\")"
}
echo "settings                                     tuned/untuned wall time, test losses"
run "defaults (warm start, val batch 256)"
run "whole val set, fresh lambda_max (old)"       --set hyper.warm_start=false --set hyper.val_batch_size=0
run "warm start, whole val set"                   --set hyper.val_batch_size=0
run "+ a hyper step every 20 steps, Neumann-5"    --set train.rounds=100 --set train.inner_steps=20 --set hyper.iters=5
run "+ every 40 steps, Neumann-5"                 --set train.rounds=50 --set train.inner_steps=40 --set hyper.iters=5
