#!/usr/bin/env bash
# The study's recipe on Fashion-MNIST (Debian: apt-get install dataset-fashion-mnist), from the repository root.
# Resumable: each stage is skipped when its output exists. Checkpoints go to results/fashion-mnist/work/ (ignored).
#
#   bash results/fashion-mnist/run_study.sh [networks]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=results/fashion-mnist/study/outputs hub=results/fashion-mnist/work/model_hub logs=results/fashion-mnist/study/logs
mkdir -p "$logs"
for m in ${*:-lenet alexnet vggnet resnet spinalnet}; do
  [ -e "$out/search/$m.json" ] || python search.py --model "$m" --dataset fashion-mnist --outputs "$out" >> "$logs/search_$m.log" 2>&1
  [ -e "$out/train/$m.json" ] || python train.py --model "$m" --dataset fashion-mnist --params "$out/search/$m.json" \
    --hub "$hub" --outputs "$out" >> "$logs/train_$m.log" 2>&1
  [ -e "$out/finetune/$m.json" ] || python finetune.py --model "$m" --hub "$hub" --outputs "$out" >> "$logs/finetune_$m.log" 2>&1
done
[ -e "$out/eval/comparison.json" ] || python evaluate.py --model all --hub "$hub" --outputs "$out" >> "$logs/evaluate.log" 2>&1
