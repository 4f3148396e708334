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
out=$here/study/outputs hub=$here/work/model_hub logs=$here/study/logs carved=data/emnist-byclass-carved
data=(--dataset emnist-byclass --data-dir "$carved" --no-download)
mkdir -p "$logs"
[ -d "$carved" ] || python $here/carve.py "${EMNIST_DIR:-data}" "$carved"
stage() {  # output, log, command...: run unless the output exists; resume a stopped run
  local done=$1 log=$2; shift 2
  [ -e "$done" ] && return 0
  echo "$log: running"; local resume=(); [ -e "${RESUME:-/nonexistent}" ] && resume=(--resume)
  "$@" "${resume[@]}" >> "$logs/$log.log" 2>&1
}
networks=${*:-lenet alexnet vggnet resnet spinalnet}
for m in $networks; do
  stage "$out/search/$m.json" "search_$m" python search.py --model "$m" "${data[@]}" --outputs "$out"
  RESUME=$hub/pre_trained/$m.pth stage "$out/train/$m.json" "train_$m" python train.py --model "$m" \
    --params "$out/search/$m.json" "${data[@]}" --hub "$hub" --outputs "$out"
  RESUME=$hub/fine_tuned/${m}_tuned.pth stage "$out/finetune/$m.json" "finetune_$m" python finetune.py --model "$m" \
    --data-dir "$carved" --no-download --hub "$hub" --outputs "$out"
done
stage "$out/eval/comparison.json" evaluate python evaluate.py --model all --data-dir "$carved" --no-download \
  --hub "$hub" --outputs "$out"
stage "$out/transfer/resnet.json" transfer python transfer_mnist.py --model resnet --data-dir "${MNIST_DIR:-data}" \
  --hub "$hub" --outputs "$out"
stage "$here/study-weights.json" study_weights python $here/study_weights.py --data-dir "$carved"
