#!/usr/bin/env bash
# The evaluation figures the README quotes: the pretrained ResNet-20 on the 1,017 exact CIFAR-10 test
# images, PGD-20 (L2) at eps 0.5 and 0.1, at several batch sizes, the best iterate, and AutoAttack.
#   bash experiments/benchmarks/eval_figures.sh [../shared] [OUT_DIR]
set -euo pipefail
shared=${1:-../shared}
out=${2:-runs/eval_figures}
mkdir -p "$out"
model=(--arch cifar_resnet20 --weights "$shared/models/cifar10-resnet-akamaster/resnet20-12fca82f.th"
       --data "$shared/data/cifar10/cifar10_exact_subset.npz" --split test)
run() { name=$1; shift; echo "== robint eval ... $*"; robint eval "${model[@]}" "$@" --json "$out/$name.json" 2>/dev/null; }
run pgd_eps0.5 --attack pgd --norm l2 --eps 0.5 --step-size 0.1 --steps 20
run pgd_eps0.5_best --attack pgd --norm l2 --eps 0.5 --step-size 0.1 --steps 20 --keep best
for batch in 32 128 1017; do
  run "pgd_eps0.1_b$batch" --attack pgd --norm l2 --eps 0.1 --step-size 0.02 --steps 20 --batch-size "$batch"
done
run pgd_eps0.1_best --attack pgd --norm l2 --eps 0.1 --step-size 0.02 --steps 20 --keep best
run autoattack_eps0.5 --attack autoattack --norm l2 --eps 0.5 --batch-size 256
