#!/usr/bin/env bash
# The study on Fashion-MNIST (60,000 + 10,000 images; apt-get install dataset-fashion-mnist), from the
# repository root; resumable: run it again after any interruption.
#
#   bash results/fashion-mnist/run_study.sh study  [networks]   # the study's recipe         -> study/
#   bash results/fashion-mnist/run_study.sh chosen [networks]   # the recipe chosen on validation
#                                                                #                  -> chosen-on-validation/
# study:  search.py (28 draws x 5 epochs on the mini subset) -> train.py --params (SGD, the study's random
#         affine, 20 epochs) -> finetune.py (Adam 1e-3, 5 epochs, 100 %) -> evaluate.py --model all.
# chosen: the study's search winners; the pre-training options that validation picked for each network
#         (CHOSEN below: the best pre-training validation accuracy among the runs in tried/); the
#         fine-tuning rate chosen on the 10 % that pre-training held out (finetune.py --val-fraction 0.1
#         --lr 0.001 0.0001); fine-tuning on 100 % at that rate; evaluate.py --ensemble-from-validation
#         (the ensemble's members chosen on the same held-out images).
# Pre-trained checkpoints stay in the ignored work/ folder; the fine-tuned ones are published in
# model_hub/ without their optimizer state. Each stage's output goes to logs/, its time to logs/times.log.
set -uo pipefail
usage="usage: bash results/fashion-mnist/run_study.sh study|chosen [lenet alexnet vggnet resnet spinalnet ensnet]"
declare -A CHOSEN=(  # pre-training (and fine-tuning augmentation) options picked by validation
  [lenet]="--augment none" [alexnet]="--augment none" [vggnet]="--augment none" [spinalnet]="--augment none"
  [resnet]="--augment shift-flip --schedule cosine --epochs 40 --weight-decay 0.0001" [ensnet]="")
case ${1:-} in
  -h | --help) echo "$usage"; exit 0 ;;
  study | chosen) recipe=$1; shift ;;
  *) echo "${1:+unknown recipe ${1}: }$usage"; exit 2 ;;
esac
for m in "$@"; do
  [[ -v CHOSEN[$m] ]] || { echo "unknown network $m: $usage"; exit 2; }
done
cd "$(dirname "$0")/../.."
study=results/fashion-mnist/study
here=$study; [ "$recipe" = chosen ] && here=results/fashion-mnist/chosen-on-validation
work=$here/work outputs=$here/outputs logs=$here/logs
mkdir -p "$logs" "$here/model_hub/fine_tuned"
data=(--dataset fashion-mnist --no-download)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
trap 'echo "interrupted"; exit 130' INT TERM
failed=0 ran=0  # ran: a stage ran, so the tables are redone; a rerun with nothing to do changes no file
step() {  # name, log, command...: the output to the log, one line on the terminal, the time to times.log
  local name=$1 log=$2; shift 2
  local start=$(date +%s); echo "$name: running (log: $log)"; "$@" >> "$log" 2>&1; local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - start )) $(date -u +%FT%TZ) $(uname -m) $(nproc) cores${gpu:+ $gpu}" \
    >> "$logs/times.log"
  ran=1
  [ $rc -eq 130 ] && { echo "$name: interrupted"; exit 130; }
  [ $rc -eq 0 ] || { echo "$name: failed, exit status $rc: $(tail -n 1 "$log")"; failed=1; }
  return $rc
}
chosen_rate() {  # the rate finetune.py chose on validation, from its {model}_rates.json
  sed -n 's/^ *"chosen": *\([0-9.e-]*\),*$/\1/p' "$outputs/rates/finetune/$1_rates.json" 2>/dev/null
}
for m in ${@:-lenet spinalnet alexnet resnet vggnet}; do
  options=(); [ "$recipe" = chosen ] && read -ra options <<< "${CHOSEN[$m]}"
  augment=(); for i in "${!options[@]}"; do  # fine-tuning keeps pre-training's augmentation and schedule
    case ${options[$i]} in --augment | --schedule) augment+=("${options[$i]}" "${options[$((i + 1))]}") ;; esac
  done
  if ! grep -q '"complete": true' "$study/outputs/search/$m.json" 2>/dev/null; then
    step "search $m" "$study/logs/search_$m.log" python search.py --update-results --model "$m" "${data[@]}" \
      --outputs "$study/outputs" || continue
  fi
  if ! [ -f "$outputs/train/$m.json" ]; then
    if [ -f "$work/pre_trained/${m}_unfinished_last.pth" ]; then
      step "train $m" "$logs/train_$m.log" python train.py --update-results --model "$m" --resume --hub "$work" --outputs "$outputs" \
        --no-download || continue
    else
      step "train $m" "$logs/train_$m.log" python train.py --update-results --model "$m" --params "$study/outputs/search/$m.json" \
        "${options[@]}" "${data[@]}" --hub "$work" --outputs "$outputs" || continue
    fi
  fi
  rate=()
  if [ "$recipe" = chosen ]; then
    if [ -z "$(chosen_rate "$m")" ]; then
      step "choose the fine-tuning rate of $m" "$logs/finetune_rates_$m.log" python finetune.py --update-results \
        --ckpt "$work/pre_trained/$m.pth" --val-fraction 0.1 --lr 0.001 0.0001 "${augment[@]}" --no-download \
        --hub "$work/rates" --outputs "$outputs/rates" || continue
    fi
    rate=(--lr "$(chosen_rate "$m")")
  fi
  if ! [ -f "$outputs/finetune/$m.json" ]; then
    resume=(); [ -f "$work/fine_tuned/${m}_tuned_unfinished_last.pth" ] && resume=(--resume)
    step "finetune $m" "$logs/finetune_$m.log" python finetune.py --update-results --model "$m" "${rate[@]}" "${augment[@]}" \
      --no-download --hub "$work" --outputs "$outputs" "${resume[@]}" || continue
  fi
  tuned=$work/fine_tuned/${m}_tuned.pth published=$here/model_hub/fine_tuned/${m}_tuned.pth
  [ -f "$published" ] && ! [ "$tuned" -nt "$published" ] && continue  # published already (work/ is not committed)
  if ! [ -f "$tuned" ]; then  # committed results whose weights the repository leaves out
    echo "publish $m: nothing to publish, this copy holds $m's results without its fine-tuned weights"; continue
  fi
  step "publish $m" "$logs/publish_$m.log" python - "$tuned" "$published" <<'PY' || continue
import os, sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
state.pop("optimizer", None)  # weights and metadata only: what evaluation needs
temporary = f"{sys.argv[2]}.{os.getpid()}.tmp"
torch.save(state, temporary)
os.replace(temporary, sys.argv[2])
PY
done
ensemble=(); [ "$recipe" = chosen ] && ensemble=(--ensemble-from-validation "$work")
[ $ran = 0 ] && [ -f "$outputs/eval/comparison.json" ] && { echo "nothing to redo: every stage's files are here"; exit 0; }
step "evaluate all" "$logs/evaluate.log" python evaluate.py --update-results --model all "${data[@]}" --hub "$here/model_hub" \
  --outputs "$outputs" "${ensemble[@]}"
exit $failed
