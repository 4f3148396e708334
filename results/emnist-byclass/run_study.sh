#!/usr/bin/env bash
# The study's recipe on EMNIST ByClass, as its commands, from the repository root. Resumable: run it again
# after an interruption and each stage continues (--resume) or is skipped when its output exists.
#
#   EMNIST_DIR=DIR bash results/emnist-byclass/run_study.sh [networks]    # default: lenet alexnet vggnet resnet spinalnet
#
# DIR holds the official ByClass test files; carve.py cuts them into 96,323 training and 20,000 test images.
# Checkpoints go to results/emnist-byclass/work/ (ignored); JSON, pictures and logs to study/.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=results/emnist-byclass
outputs=$here/study/outputs hub=$here/work/model_hub logs=$here/study/logs carved=data/emnist-byclass-carved
data=(--dataset emnist-byclass --data-dir "$carved" --no-download)
mkdir -p "$logs"
[ -d "$carved" ] || python $here/carve.py "${EMNIST_DIR:-data}" "$carved"
source results/stage.sh  # stage RESULT LOG CHECKPOINT COMMAND...
for m in ${*:-lenet alexnet vggnet resnet spinalnet}; do
  stage "$outputs/search/$m.json" "search_$m" "" python search.py --model "$m" "${data[@]}" --outputs "$outputs"
  stage "$outputs/train/$m.json" "train_$m" "$hub/pre_trained/$m.pth" python train.py --model "$m" \
    --params "$outputs/search/$m.json" "${data[@]}" --hub "$hub" --outputs "$outputs"
  stage "$outputs/finetune/$m.json" "finetune_$m" "$hub/fine_tuned/${m}_tuned.pth" python finetune.py \
    --model "$m" --data-dir "$carved" --no-download --hub "$hub" --outputs "$outputs"
done
stage "$outputs/eval/comparison.json" evaluate "" python evaluate.py --model all --data-dir "$carved" --no-download \
  --hub "$hub" --outputs "$outputs"
stage "$outputs/transfer/resnet.json" transfer "$hub/transfer/resnet_mnist.pth" python transfer_mnist.py \
  --model resnet --data-dir "${MNIST_DIR:-data}" --hub "$hub" --outputs "$outputs"
stage "$here/study-weights.json" study_weights "" python $here/study_weights.py --data-dir "$carved"
