#!/usr/bin/env bash
# The README's single-GPU tables, in one run (about 5 minutes on an H100):
#   bash experiments/benchmarks/gpu_tables.sh [OUT_DIR]
# 1. CIFAR ResNet18 training, standard and PGD-20, fp32 eager vs bf16 + channels_last (issue 3);
# 2. attributions: ours against captum's IG and shap's GradientExplainer, 64 images (issue 5);
# 3. ResNet50 at 128 px, 150 classes, batch 200, PGD-20 eps 1.5 (the Small ImageNet 150 models);
# 4. the torch.compile rows of 1 (compilation takes minutes, so last).
# Each step has its own time limit, so that one slow step leaves the others' figures.
set -uo pipefail
out=${1:-gpu_tables}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
timeout 100 $py experiments/benchmarks/bench_train_gpu.py --variants eager --json "$out/train_eager.json" 2>&1 \
  | tee "$out/train_eager.txt"
timeout 150 $py experiments/benchmarks/bench_attributions.py --device cuda --images 64 --ig-batch 816 --skip-ray \
  --repeats 3 2>&1 | grep -v -i warn | tee "$out/attributions.txt"
timeout 90 $py experiments/benchmarks/bench_train_gpu.py --arch resnet50 --size 128 --classes 150 --batch-size 200 \
  --eps 1.5 --batches 10 --warmup 3 --variants eager --json "$out/train_resnet50.json" 2>&1 | tee "$out/train_resnet50.txt"
timeout 200 $py experiments/benchmarks/bench_train_gpu.py --variants compiled --json "$out/train_compiled.json" 2>&1 \
  | grep -v -i warn | tee "$out/train_compiled.txt"
