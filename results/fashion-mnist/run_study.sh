#!/usr/bin/env bash
# The study's recipe on Fashion-MNIST (Debian: apt-get install dataset-fashion-mnist), from the repository root.
# Resumable: run it again after an interruption and each stage continues (--resume) or is skipped when its
# output exists. Checkpoints go to results/fashion-mnist/work/ (ignored).
#
#   bash results/fashion-mnist/run_study.sh [networks]
set -euo pipefail
cd "$(dirname "$0")/../.."
outputs=results/fashion-mnist/study/outputs hub=results/fashion-mnist/work/model_hub logs=results/fashion-mnist/study/logs
mkdir -p "$logs"
source results/stage.sh  # stage RESULT LOG CHECKPOINT COMMAND...
for m in ${*:-lenet alexnet vggnet resnet spinalnet}; do
  stage "$outputs/search/$m.json" "search_$m" "" python search.py --model "$m" --dataset fashion-mnist --outputs "$outputs"
  stage "$outputs/train/$m.json" "train_$m" "$hub/pre_trained/$m.pth" python train.py --model "$m" \
    --dataset fashion-mnist --params "$outputs/search/$m.json" --hub "$hub" --outputs "$outputs"
  stage "$outputs/finetune/$m.json" "finetune_$m" "$hub/fine_tuned/${m}_tuned.pth" python finetune.py --model "$m" \
    --hub "$hub" --outputs "$outputs"
done
stage "$outputs/eval/comparison.json" evaluate "" python evaluate.py --model all --hub "$hub" --outputs "$outputs"
