#!/usr/bin/env bash
# The study on real EMNIST ByClass at the study's scale, from the repository root; resumable: run it
# again after any interruption, and each stage continues where it stopped.
#
#   EMNIST_DIR=DIR bash results/emnist-byclass/run_study.sh study  [networks]  # the study's recipe -> study/
#   EMNIST_DIR=DIR bash results/emnist-byclass/run_study.sh chosen [networks]  # chosen on validation
#                                                                              #   -> chosen-on-validation/
# DIR holds the official ByClass test files (default: data). carve.py splits them into 96,323 training
# and 20,000 test images in data/emnist-byclass-carved/ (stratified, seed 0); every stage then reads
# that folder with --dataset emnist-byclass. This is not the official protocol (697,932 training images).
# study:  search.py (28 draws x 5 epochs on the mini subset) -> train.py --params (SGD, the study's random
#         affine, 20 epochs, 90 %) -> finetune.py (Adam 1e-3, 5 epochs, 100 %); once every network of the
#         recipe is fine-tuned: evaluate.py of the five (test: the 20,000) and transfer_mnist.py of the
#         network with the best validation accuracy to MNIST (MNIST_DIR, default data: DIR/MNIST/raw/).
# chosen: the study's search winners, pre-trained again with each option set of TRIED below; of those and
#         the study's own pre-training, the one with the best validation accuracy on the 9,632 images that
#         pre-training held out (the study's wins ties; it is pre-trained again here only if it wins); the
#         fine-tuning rate chosen on the same images (finetune.py --val-fraction 0.1 --lr RATES);
#         fine-tuning on 100 % at that rate; evaluate.py --ensemble-from-validation (members chosen on the
#         same images); transfer_mnist.py of the network whose pre-training validated best (once its weights
#         are published, whether or not the others' are); seeds 1 and 2 of that network, for its mean +- std,
#         as soon as all five are pre-trained (their fine-tuning once its rate is chosen); a seed another copy
#         of this script is running is left to it.
# ensnet runs only when named (run_study.sh study ensnet, on a GPU): its stages, then its evaluation on
# its own; the five's comparison, ensemble, transfer and seeds stay the five's.
# THREADS=N sets each stage's threads (default: all cores; chosen: 1, as its committed runs had: more
# threads add up in another order); two copies of this script on different networks can run side by side.
# Pre-trained checkpoints stay in the ignored work/ folders; the fine-tuned ones are published in model_hub/
# without their optimizer state. A network whose results are committed without its weights (chosen: all but
# VGGNet, for the folder's 30 MB) is trained again in work/remade/ (checkpoints, outputs and logs; the
# committed files untouched) and published only if every epoch's losses and accuracies are the committed
# ones. Each stage's output goes to logs/, its time to logs/times.log.
set -uo pipefail
usage="usage: EMNIST_DIR=DIR bash results/emnist-byclass/run_study.sh study|chosen [networks: lenet alexnet vggnet \
resnet spinalnet, ensnet]"
all="lenet spinalnet alexnet resnet vggnet"
named_only="ensnet"  # runs only when named (about 3 training images a second on two CPU cores: a GPU's run)
RATES="0.001 0.0001"  # the fine-tuning rates the chosen recipe tries on validation
declare -A TRIED=(  # option sets tried against the study's pre-training: name -> train.py options
  [cosine]="--schedule cosine")
case ${1:-} in
  -h | --help) echo "$usage"; exit 0 ;;
  study | chosen) recipe=$1; shift ;;
  *) echo "${1:+unknown recipe ${1}: }$usage"; exit 2 ;;
esac
for m in "$@"; do
  [[ " $all $named_only " == *" $m "* ]] || { echo "unknown network $m: $usage"; exit 2; }
done
cd "$(dirname "$0")/../.."
study=results/emnist-byclass/study
here=$study; [ "$recipe" = chosen ] && here=results/emnist-byclass/chosen-on-validation
work=$here/work outputs=$here/outputs logs=$here/logs
carved=data/emnist-byclass-carved
mkdir -p "$logs" "$study/logs" "$here/model_hub/fine_tuned"
data=(--dataset emnist-byclass --data-dir "$carved" --no-download)
[ "$recipe" = chosen ] && : "${THREADS:=1}"
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
fp32=()  # chosen: fp32 on AVX2 kernels, the same numbers on the AMD EPYCs it ran on (AVX2-only, AVX512-BF16)
if [ "$recipe" = chosen ]; then export ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2; fp32=(--precision fp32); fi
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
pretrain() {  # network, label, hub, outputs, options...: the search winners' SGD pre-training, resumed if unfinished
  local m=$1 label=$2 hub=$3 folder=$4; shift 4
  [ -f "$folder/train/$m.json" ] && return 0
  if [ -f "$hub/pre_trained/${m}_unfinished_last.pth" ]; then
    step "$label" "$logs/${label// /_}.log" python train.py --update-results --model "$m" --resume --data-dir "$carved" \
      --no-download --hub "$hub" --outputs "$folder" "${fp32[@]}"
  else
    step "$label" "$logs/${label// /_}.log" python train.py --update-results --model "$m" \
      --params "$study/outputs/search/$m.json" "$@" "${data[@]}" --hub "$hub" --outputs "$folder" "${fp32[@]}"
  fi
}
finetune() {  # network, label, checkpoint, hub, outputs, options...: Adam on 100 %, resumed if unfinished
  local m=$1 label=$2 ckpt=$3 hub=$4 folder=$5; shift 5
  [ -f "$folder/finetune/$m.json" ] && return 0
  local resume=(); [ -f "$hub/fine_tuned/${m}_tuned_unfinished_last.pth" ] && resume=(--resume)
  step "$label" "$logs/${label// /_}.log" python finetune.py --update-results --model "$m" --ckpt "$ckpt" "$@" \
    --data-dir "$carved" --no-download --hub "$hub" --outputs "$folder" "${resume[@]}" "${fp32[@]}"
}
best_of() {  # label=train JSON pairs: the label whose pre-training validated best (the first wins ties)
  python - "$@" <<'PY'
import json, sys  # validation accuracy only: the test split chooses nothing
pairs = [pair.split("=", 1) for pair in sys.argv[1:]]
accuracy = {label: json.load(open(path))["best_val_acc"] for label, path in pairs}
print(max(accuracy, key=lambda label: (accuracy[label], -list(accuracy).index(label))))
PY
}
train_json() {  # network, label: the JSON of that pre-training (the study's own: study/, unless run here again)
  if [ "$2" != study ]; then echo "$outputs/tried/$2/train/$1.json"
  elif [ -f "$outputs/tried/study/train/$1.json" ]; then echo "$outputs/tried/study/train/$1.json"
  else echo "$study/outputs/train/$1.json"; fi
}
winner_of() {  # network: the label of its chosen pre-training, the study's or one of TRIED
  local pairs=("study=$study/outputs/train/$1.json") name
  for name in "${!TRIED[@]}"; do pairs+=("$name=$outputs/tried/$name/train/$1.json"); done
  best_of "${pairs[@]}"
}
best_pretrained() {  # the network whose chosen pre-training validated best, once all five are pre-trained
  local pairs=() m json name
  for m in $all; do
    json=$outputs/train/$m.json
    if [ "$recipe" = chosen ]; then
      [ -f "$study/outputs/train/$m.json" ] || return 1
      for name in "${!TRIED[@]}"; do [ -f "$outputs/tried/$name/train/$m.json" ] || return 1; done
      json=$(train_json "$m" "$(winner_of "$m")") || return 1
    fi
    [ -f "$json" ] || return 1
    pairs+=("$m=$json")
  done
  best_of "${pairs[@]}"
}
busy() {  # outputs...: whether another run (a second copy of this script) holds the lock of one of them
  local path; for path; do [ -e "$path.lock" ] && ! flock -n "$path.lock" true && return 0; done; return 1
}
tried_options() {  # label: its train.py options (the study's own: none)
  [ "$1" = study ] || echo "${TRIED[$1]}"
}
fine_tuning_options() {  # label: what fine-tuning keeps of its pre-training's options (augmentation, schedule)
  local options=() kept=() i; read -ra options <<< "$(tried_options "$1")"
  for i in "${!options[@]}"; do
    case ${options[$i]} in --augment | --schedule) kept+=("${options[$i]}" "${options[$((i + 1))]}") ;; esac
  done
  echo "${kept[*]}"
}
same_runs() {  # network: whether its runs remade in $stage_outputs have the committed histories, epoch by epoch
  local pairs=() remade committed
  for remade in "$stage_outputs"/{train,tried/*/train,finetune}/"$1.json"; do
    [ -f "$remade" ] || continue
    committed=$outputs/${remade#"$stage_outputs"/}
    [[ $remade == "$stage_outputs/tried/study/"* ]] && committed=$(train_json "$1" study)
    pairs+=("$committed=$remade")
  done
  python - "$checkpoints/fine_tuned/$1_tuned.pth" "${pairs[@]}" <<'PY'
import json, sys
fields = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")  # all but the clock's
for pair in sys.argv[2:]:
    committed, remade = pair.split("=", 1)
    runs = [[{key: epoch.get(key) for key in fields} for epoch in json.load(open(path))["history"]]
            for path in (committed, remade)]
    if runs[0] != runs[1]:
        epoch = next((i + 1 for i, (a, b) in enumerate(zip(*runs)) if a != b), min(map(len, runs)) + 1)
        sys.exit(f"{remade} differs from the committed {committed} from epoch {epoch} on (another kind of CPU "
                 f"or other threads compute another run): not published; its weights: {sys.argv[1]}")
    print(f"{remade}: the committed run {committed}, epoch by epoch")
PY
}
chosen_rate() {  # the rate finetune.py chose on validation, from its {model}_rates.json
  sed -n 's/^ *"chosen": *\([0-9.e-]*\),*$/\1/p' "$outputs/rates/finetune/$1_rates.json" 2>/dev/null
}
if ! [ -d "$carved" ]; then
  step "carve" "$logs/carve.log" python results/emnist-byclass/carve.py "${EMNIST_DIR:-data}" "$carved" || exit 1
fi
for m in ${@:-$all}; do
  checkpoints=$work stage_outputs=$outputs logs=$here/logs remaking=""  # where this network's stages write
  if [ -f "$outputs/finetune/$m.json" ] && ! [ -f "$here/model_hub/fine_tuned/${m}_tuned.pth" ] \
    && ! [ -f "$work/fine_tuned/${m}_tuned.pth" ]; then  # committed results without their weights: remade
    checkpoints=$work/remade/work stage_outputs=$work/remade/outputs logs=$work/remade/logs remaking=1
    mkdir -p "$logs"
    echo "$m: its results are committed without its weights; training it again in $work/remade"
  fi
  if ! grep -q '"complete": true' "$study/outputs/search/$m.json" 2>/dev/null; then
    step "search $m" "$study/logs/search_$m.log" python search.py --update-results --model "$m" "${data[@]}" \
      --outputs "$study/outputs" || continue
  fi
  if [ "$recipe" = study ]; then
    pretrain "$m" "train $m" "$checkpoints" "$stage_outputs" || continue
    finetune "$m" "finetune $m" "$checkpoints/pre_trained/$m.pth" "$checkpoints" "$stage_outputs" || continue
  else
    if ! [ -f "$study/outputs/train/$m.json" ]; then
      echo "chosen $m waits for the study's pre-training of $m: run_study.sh study $m"; continue
    fi
    ok=1
    for name in "${!TRIED[@]}"; do
      [ -z "$remaking" ] || break  # remaking: the committed choice stands, only its pre-training runs
      read -ra options <<< "$(tried_options "$name")"
      pretrain "$m" "train $name $m" "$checkpoints/tried/$name" "$outputs/tried/$name" "${options[@]}" \
        || { ok=0; break; }
    done
    [ $ok = 1 ] || continue
    winner=$(winner_of "$m") || continue
    read -ra augment <<< "$(fine_tuning_options "$winner")"
    pretrained=$checkpoints/tried/$winner/pre_trained/$m.pth
    if [ "$winner" = study ]; then  # the study's checkpoint, if this clone has it; else the same run again
      if [ -f "$study/work/pre_trained/$m.pth" ]; then pretrained=$study/work/pre_trained/$m.pth
      else pretrain "$m" "train study $m" "$checkpoints/tried/study" "$stage_outputs/tried/study" || continue; fi
    elif [ -n "$remaking" ]; then
      read -ra options <<< "$(tried_options "$winner")"
      pretrain "$m" "train $winner $m" "$checkpoints/tried/$winner" "$stage_outputs/tried/$winner" \
        "${options[@]}" || continue
    fi
    mkdir -p "$work/chosen/pre_trained"  # the chosen pre-trainings side by side: the ensemble's validation hub
    ln -sfn "$(realpath -m "$pretrained")" "$work/chosen/pre_trained/$m.pth"
    if [ -z "$(chosen_rate "$m")" ]; then
      resume=()  # a stopped choice: any rate's file (finetune.py names them as Python prints the rate)
      compgen -G "$work/rates/fine_tuned/${m}_tuned_unfinished_last_lr*.pth" > /dev/null && resume=(--resume)
      step "choose the fine-tuning rate of $m" "$logs/finetune_rates_$m.log" python finetune.py --update-results \
        --model "$m" --ckpt "$pretrained" --val-fraction 0.1 --lr $RATES "${augment[@]}" --data-dir "$carved" \
        --no-download --hub "$work/rates" --outputs "$outputs/rates" "${resume[@]}" "${fp32[@]}" || continue
    fi
    rate=$(chosen_rate "$m")
    [ -n "$rate" ] || { echo "finetune $m: no chosen rate in $outputs/rates/finetune/${m}_rates.json"; failed=1; continue; }
    finetune "$m" "finetune $m" "$pretrained" "$checkpoints" "$stage_outputs" --lr "$rate" "${augment[@]}" || continue
  fi
  if [ -n "$remaking" ]; then
    step "check $m against the committed runs" "$logs/check_$m.log" same_runs "$m" || continue
  fi
  if ! [ -f "$here/model_hub/fine_tuned/${m}_tuned.pth" ]; then
    step "publish $m" "$logs/publish_$m.log" python - "$checkpoints/fine_tuned/${m}_tuned.pth" \
      "$here/model_hub/fine_tuned/${m}_tuned.pth" <<'PY' || continue
import os, sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
state.pop("optimizer", None)  # weights and what inference needs: the published copy
temporary = f"{sys.argv[2]}.{os.getpid()}.tmp"
torch.save(state, temporary)
os.replace(temporary, sys.argv[2])
PY
  fi
  if [[ " $named_only " == *" $m "* ]] && ! [ -f "$outputs/eval/$m.json" ]; then  # not one of the five: on its own
    step "evaluate $m" "$logs/evaluate_$m.log" python evaluate.py --update-results --model "$m" "${data[@]}" \
      --hub "$here/model_hub" --outputs "$outputs" --split test || continue
  fi
done
logs=$here/logs
waiting=""; for m in $all; do [ -f "$here/model_hub/fine_tuned/${m}_tuned.pth" ] || waiting+=" $m"; done
best=$(best_pretrained) || best=""  # the test split chooses nothing: validation on the pre-trainings' held-out images
ensemble=(); [ "$recipe" = chosen ] && ensemble=(--ensemble-from-validation "$work/chosen")
if [ -n "$waiting" ]; then
  if [ "$recipe" = study ]; then echo "evaluation and transfer wait for:$waiting"; else echo "evaluation waits for:$waiting"; fi
elif ! [ -f "$outputs/eval/comparison.json" ]; then  # $all in models.MODELS order, as --model all took them
  step "evaluate all" "$logs/evaluate.log" python evaluate.py --update-results --model lenet alexnet vggnet resnet \
    spinalnet "${data[@]}" --hub "$here/model_hub" --outputs "$outputs" "${ensemble[@]}" || failed=1
fi
if [ -n "$best" ] && [ -f "$here/model_hub/fine_tuned/${best}_tuned.pth" ] && ! [ -f "$outputs/transfer/$best.json" ] \
  && { [ "$recipe" = chosen ] || [ -z "$waiting" ]; }; then  # chosen: its best network's weights are enough
  step "transfer $best" "$logs/transfer_$best.log" python transfer_mnist.py --update-results --model "$best" \
    --ckpt "$here/model_hub/fine_tuned/${best}_tuned.pth" --data-dir "${MNIST_DIR:-data}" --no-download \
    --hub "$work" --outputs "$outputs" "${fp32[@]}" || failed=1
fi
if [ "$recipe" = chosen ] && [ -z "$best" ]; then echo "the seeds wait for the pre-training of all five networks"
elif [ "$recipe" = chosen ]; then  # the best network's recipe and rate with seeds 1 and 2, for its mean +- std
  winner=$(winner_of "$best") || exit 1
  read -ra options <<< "$(tried_options "$winner")"
  read -ra augment <<< "$(fine_tuning_options "$winner")"
  for seed in 1 2; do
    s=$here/seeds/seed-$seed
    if busy "$s/outputs/train/$best.json" "$s/outputs/finetune/$best.json" "$s/outputs/eval/$best.json"; then
      echo "seed $seed of $best: another run holds it, so this one goes on to the next"; continue
    fi
    pretrain "$best" "train $best seed $seed" "$s/work" "$s/outputs" "${options[@]}" --seed "$seed" || break
    rate=$(chosen_rate "$best")
    [ -n "$rate" ] || { echo "the seeds of $best fine-tune once its rate is chosen"; break; }
    finetune "$best" "finetune $best seed $seed" "$s/work/pre_trained/$best.pth" "$s/work" "$s/outputs" \
      --lr "$rate" "${augment[@]}" --seed "$seed" || break
    if ! [ -f "$s/outputs/eval/$best.json" ]; then
      step "evaluate $best seed $seed" "$logs/evaluate_seed_$seed.log" python evaluate.py --update-results --model "$best" \
        "${data[@]}" --hub "$s/work" --outputs "$s/outputs" --split test || break
    fi
  done
fi
exit $failed
