#!/usr/bin/env bash
# Fine-tuning's Adam learning rate, chosen on validation instead of the test split: fine-tune a
# finished pre-training on the same 90 % it trained on, validating every epoch on the 10 % it held
# out (finetune.py --val-fraction 0.1 with the run's seed draws the same split), once per rate.
#   bash results/fashion-mnist/finetune_lr_validation.sh OPTION-FOLDER NETWORK RATE...   (from the repository root)
#   bash results/fashion-mnist/finetune_lr_validation.sh shift-flip-cosine-40-epochs resnet 0.0001 0.001
# The folder's recipe (augmentation, schedule) comes from its pre-training's JSON. Writes
# results/fashion-mnist/finetune-lr-validation/OPTION-FOLDER/; table.py prints each epoch's validation
# accuracy. A rate that finished is not run again.
set -uo pipefail
cd "$(dirname "$0")/../.."
study=results/fashion-mnist
[ $# -ge 3 ] || { echo "usage: bash $0 OPTION-FOLDER NETWORK RATE... (such as shift-flip-cosine-40-epochs resnet 0.0001 0.001)"; exit 2; }
folder=$1 m=$2; shift 2
source $study/numbers.sh
rates=()
for lr in "$@"; do  # every rate checked before any runs
  rates+=("$(number "$lr" above)") || { echo "each RATE is a number above 0, such as 0.0001"; exit 2; }
done
ckpt=$study/$folder/work/pre_trained/$m.pth
[ -f "$ckpt" ] && [ -f "$study/$folder/outputs/train/$m.json" ] ||
  { echo "$ckpt is missing: finish that pre-training first (run_study.sh with the folder's options)"; exit 2; }
recipe=($(python -c 'import json, sys; a = json.load(open(sys.argv[1]))["args"]  # older JSONs: augment true/false
augment = {True: "study", False: "none"}.get(a["augment"], a["augment"])
print("--augment", augment, "--schedule", a.get("schedule", "constant"), "--seed", a["seed"])' \
  "$study/$folder/outputs/train/$m.json")) || exit 2
v=$study/finetune-lr-validation/$folder
mkdir -p "$v/logs"
for lr in "${rates[@]}"; do
  [ -f "$v/outputs/lr-$lr/finetune/$m.json" ] && continue
  python finetune.py --model $m --ckpt "$ckpt" "${recipe[@]}" --lr $lr --val-fraction 0.1 --no-download \
    --hub "$v/work/lr-$lr" --outputs "$v/outputs/lr-$lr" >> "$v/logs/finetune_${m}_lr-$lr.log" 2>&1
  echo "lr $lr rc=$? $(date -u +%FT%TZ)" >> "$v/logs/times.log"
done
