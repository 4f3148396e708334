#!/usr/bin/env bash
# The study on real EMNIST ByClass at the study's scale, from the repository root; resumable: run it
# again after any interruption, and each stage continues where it stopped.
#
#   EMNIST_DIR=DIR bash results/emnist-byclass/run_study.sh study [networks]   # the study's recipe -> study/
#
# DIR holds the official ByClass test files (default: data). carve.py splits them into 96,323 training
# and 20,000 test images in data/emnist-byclass-carved/ (stratified, seed 0); every stage then reads
# that folder with --dataset emnist-byclass. This is not the official protocol (697,932 training images).
# study: search.py (28 draws x 5 epochs on the mini subset) -> train.py --params (SGD, the study's random
#        affine, 20 epochs, 90 %) -> finetune.py (Adam 1e-3, 5 epochs, 100 %); once every network of the
#        recipe is fine-tuned: evaluate.py --model all (test: the 20,000) and transfer_mnist.py of the
#        network with the best validation accuracy to MNIST (MNIST_DIR, default data: DIR/MNIST/raw/).
# THREADS=N sets each stage's threads (default: all cores); two copies of this script on different
# networks can run side by side with THREADS=1 each. Pre-trained checkpoints stay in the ignored work/
# folder; the fine-tuned ones are published in model_hub/ without their optimizer state. Each stage's
# output goes to logs/, its time to logs/times.log.
set -uo pipefail
usage="usage: EMNIST_DIR=DIR bash results/emnist-byclass/run_study.sh study [lenet alexnet vggnet resnet spinalnet]"
all="lenet spinalnet alexnet resnet vggnet"
case ${1:-} in
  -h | --help) echo "$usage"; exit 0 ;;
  study) recipe=$1; shift ;;
  *) echo "${1:+unknown recipe ${1}: }$usage"; exit 2 ;;
esac
for m in "$@"; do
  [[ " $all " == *" $m "* ]] || { echo "unknown network $m: $usage"; exit 2; }
done
cd "$(dirname "$0")/../.."
here=results/emnist-byclass/$recipe
work=$here/work outputs=$here/outputs logs=$here/logs
carved=data/emnist-byclass-carved
mkdir -p "$logs" "$here/model_hub/fine_tuned"
data=(--dataset emnist-byclass --data-dir "$carved" --no-download)
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
trap 'echo "interrupted"; exit 130' INT TERM
failed=0
step() {  # name, log, command...: the output to the log, one line on the terminal, the time to times.log
  local name=$1 log=$2; shift 2
  local start=$(date +%s); echo "$name: running (log: $log)"; "$@" >> "$log" 2>&1; local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - start )) $(date -u +%FT%TZ) $(uname -m) ${OMP_NUM_THREADS:-$(nproc)} threads${gpu:+ $gpu}" \
    >> "$logs/times.log"
  [ $rc -eq 130 ] && { echo "$name: interrupted"; exit 130; }
  [ $rc -eq 0 ] || { echo "$name: failed, exit status $rc: $(tail -n 1 "$log")"; failed=1; }
  return $rc
}
if ! [ -d "$carved" ]; then
  step "carve" "$logs/carve.log" python results/emnist-byclass/carve.py "${EMNIST_DIR:-data}" "$carved" || exit 1
fi
for m in ${@:-$all}; do
  if ! grep -q '"complete": true' "$outputs/search/$m.json" 2>/dev/null; then
    step "search $m" "$logs/search_$m.log" python search.py --update-results --model "$m" "${data[@]}" --outputs "$outputs" || continue
  fi
  if ! [ -f "$outputs/train/$m.json" ]; then
    if [ -f "$work/pre_trained/${m}_unfinished_last.pth" ]; then
      step "train $m" "$logs/train_$m.log" python train.py --update-results --model "$m" --resume --data-dir "$carved" --no-download \
        --hub "$work" --outputs "$outputs" || continue
    else
      step "train $m" "$logs/train_$m.log" python train.py --update-results --model "$m" --params "$outputs/search/$m.json" \
        "${data[@]}" --hub "$work" --outputs "$outputs" || continue
    fi
  fi
  if ! [ -f "$outputs/finetune/$m.json" ]; then
    resume=(); [ -f "$work/fine_tuned/${m}_tuned_unfinished_last.pth" ] && resume=(--resume)
    step "finetune $m" "$logs/finetune_$m.log" python finetune.py --update-results --model "$m" --data-dir "$carved" --no-download \
      --hub "$work" --outputs "$outputs" "${resume[@]}" || continue
  fi
  if ! [ -f "$here/model_hub/fine_tuned/${m}_tuned.pth" ]; then
    step "publish $m" "$logs/publish_$m.log" python - "$work/fine_tuned/${m}_tuned.pth" \
      "$here/model_hub/fine_tuned/${m}_tuned.pth" <<'PY' || continue
import os, sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
state.pop("optimizer", None)  # weights and what inference needs: the published copy
temporary = f"{sys.argv[2]}.{os.getpid()}.tmp"
torch.save(state, temporary)
os.replace(temporary, sys.argv[2])
PY
  fi
done
waiting=""; for m in $all; do [ -f "$here/model_hub/fine_tuned/${m}_tuned.pth" ] || waiting+=" $m"; done
if [ -n "$waiting" ]; then
  echo "evaluation and transfer wait for:$waiting"
  exit $failed
fi
if ! [ -f "$outputs/eval/comparison.json" ]; then
  step "evaluate all" "$logs/evaluate.log" python evaluate.py --update-results --model all "${data[@]}" --hub "$here/model_hub" \
    --outputs "$outputs" || exit 1
fi
best=$(python - "$outputs" $all <<'PY'
import json, sys  # the network whose pre-training validated best: the test split chooses nothing
accuracy = {m: json.load(open(f"{sys.argv[1]}/train/{m}.json"))["best_val_acc"] for m in sys.argv[2:]}
print(max(accuracy, key=accuracy.get))
PY
) || exit 1
if ! [ -f "$outputs/transfer/$best.json" ]; then
  step "transfer $best" "$logs/transfer_$best.log" python transfer_mnist.py --update-results --model "$best" \
    --ckpt "$here/model_hub/fine_tuned/${best}_tuned.pth" --data-dir "${MNIST_DIR:-data}" --no-download \
    --hub "$work" --outputs "$outputs" || exit 1
fi
exit $failed
