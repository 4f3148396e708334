#!/usr/bin/env bash
# The study on Fashion-MNIST (60,000 + 10,000 real images; apt-get install dataset-fashion-mnist).
# Resumable: run it again after any interruption; each stage continues where it stopped.
#   bash results/fashion-mnist/run_study.sh            (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=results/fashion-mnist/outputs hub=results/fashion-mnist/model_hub logs=results/fashion-mnist/logs
mkdir -p "$logs"
common=(--dataset fashion-mnist --no-download)
stamp() { echo "$1 rc=$2 seconds=$3 $(date -u +%FT%TZ) $(uname -m) $(nproc) cores" >> "$logs/times.log"; }
for m in lenet spinalnet resnet alexnet vggnet; do
  start=$(date +%s); python search.py --model $m "${common[@]}" --outputs "$out" >> "$logs/search_$m.log" 2>&1
  stamp "search $m" $? $(( $(date +%s) - start ))
done
for m in lenet spinalnet resnet alexnet vggnet; do
  resume=(); [ -f "$hub/pre_trained/${m}_last.pth" ] && resume=(--resume)
  start=$(date +%s); python train.py --model $m "${common[@]}" --hub "$hub" --outputs "$out" "${resume[@]}" >> "$logs/train_$m.log" 2>&1
  stamp "train $m" $? $(( $(date +%s) - start ))
  resume=(); [ -f "$hub/fine_tuned/${m}_tuned_last.pth" ] && resume=(--resume)
  start=$(date +%s); python finetune.py --model $m --hub "$hub" --outputs "$out" "${resume[@]}" >> "$logs/finetune_$m.log" 2>&1
  stamp "finetune $m" $? $(( $(date +%s) - start ))
done
start=$(date +%s); python evaluate.py --model all "${common[@]}" --hub "$hub" --outputs "$out" > "$logs/evaluate.log" 2>&1
stamp "evaluate all" $? $(( $(date +%s) - start ))
