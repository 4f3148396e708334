#!/usr/bin/env bash
# The study on Fashion-MNIST (60,000 + 10,000 real images; apt-get install dataset-fashion-mnist),
# one network at a time, smallest first: search -> SGD pre-training -> Adam fine-tuning ->
# the fine-tuned weights published without optimizer state -> evaluate.py --model all.
# Resumable: run it again after any interruption; each stage continues where it stopped.
#   bash results/fashion-mnist/run_study.sh [networks...]                (from the repository root)
#   bash results/fashion-mnist/run_study.sh [--no-augment | --augment shift-flip] [--schedule cosine] [--seed N]
#        [--epochs N] [--weight-decay X] [--finetune-epochs N] [--finetune-lr X] [networks...]
# --no-augment and --augment shift-flip are the options measured against the recipe: the same
# networks, the same search winners (the study's complete search JSON, copied), epochs and
# fine-tuning, with one change: no augmentation, or shifts and left-right mirrors instead of the
# study's random affine (train.py --augment). They write to results/fashion-mnist/no-augment/ and
# results/fashion-mnist/shift-flip/.
# --schedule cosine anneals the learning rate of pre-training and fine-tuning from the searched (and
# the fine-tuning) --lr down to 0 over their epochs (train.py --schedule); alone or with an
# augmentation option, into .../cosine/ or .../shift-flip-cosine/ (no-augment-cosine/).
# --seed N (N > 0) repeats pre-training and fine-tuning with seed N (splits, initialisation,
# shuffling, augmentation, dropout) on the study's search winners, into .../seed-N/.
# --epochs N and --finetune-epochs N lengthen (or shorten) pre-training and fine-tuning (train.py
# and finetune.py --epochs; the study's 20 and 5 otherwise), into a folder named for them:
# .../shift-flip-cosine-40-epochs/, .../cosine-finetune-3-epochs/.
# --weight-decay X pre-trains with SGD weight decay X instead of the search winner's (train.py
# --weight-decay), into .../shift-flip-cosine-40-epochs-weight-decay-0.0001/.
# --finetune-lr X fine-tunes at Adam rate X instead of the study's 1e-3 (finetune.py --lr), into
# .../shift-flip-cosine-40-epochs-finetune-lr-0.0001/.
# --finetune-epochs and --finetune-lr change fine-tuning only: such a folder reuses the pre-training
# (JSON, plot and checkpoint, copied) of the folder named without them, which must have finished.
set -uo pipefail
cd "$(dirname "$0")/../.."
study=results/fashion-mnist recipe= schedule= seed= epochs= decay= tune_epochs= tune_lr= variant=()
source results/fashion-mnist/numbers.sh  # number: checks and normalises --weight-decay and --finetune-lr
while [ $# -gt 0 ]; do
  case $1 in
    --no-augment) recipe=no-augment variant+=(--no-augment); shift ;;
    --augment)
      [ "${2:-}" = shift-flip ] || { echo "--augment takes shift-flip here (the study's is the default; --no-augment for none)"; exit 2; }
      recipe=$2 variant+=(--augment "$2"); shift 2 ;;
    --schedule)
      [ "${2:-}" = cosine ] || { echo "--schedule takes cosine here (the study's constant rate is the default)"; exit 2; }
      schedule=$2 variant+=(--schedule "$2"); shift 2 ;;
    --epochs | --finetune-epochs)
      [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { echo "$1 needs a whole number above 0"; exit 2; }
      if [ "$1" = --epochs ]; then epochs=$2; else tune_epochs=$2; fi; shift 2 ;;
    --weight-decay)
      decay=$(number "${2:-}" 0) || { echo "--weight-decay needs a number of 0 or more, such as 0.0001"; exit 2; }; shift 2 ;;
    --finetune-lr)
      tune_lr=$(number "${2:-}" above) || { echo "--finetune-lr needs a number above 0, such as 0.0001"; exit 2; }; shift 2 ;;
    --seed)
      [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { echo "--seed needs a whole number above 0 (seed 0 is the study's run)"; exit 2; }
      seed=$2 variant+=(--seed "$2"); shift 2 ;;
    -*) echo "unknown option $1: use --no-augment, --augment shift-flip, --schedule cosine, --seed N, --epochs N," \
          "--weight-decay X, --finetune-epochs N, --finetune-lr X, then network names"; exit 2 ;;
    *) break ;;
  esac
done
pretrain=(${epochs:+--epochs $epochs} ${decay:+--weight-decay $decay})
tune=(${tune_epochs:+--epochs $tune_epochs} ${tune_lr:+--lr $tune_lr})
name=$recipe${schedule:+${recipe:+-}$schedule}
[ -n "$epochs" ] && name=${name:+$name-}$epochs-epochs
[ -n "$decay" ] && name=${name:+$name-}weight-decay-$decay
base=$study${name:+/$name}${seed:+/seed-$seed}  # where this recipe's pre-training lives
[ -n "$tune_epochs" ] && name=${name:+$name-}finetune-$tune_epochs-epochs
[ -n "$tune_lr" ] && name=${name:+$name-}finetune-lr-$tune_lr
here=$study${name:+/$name}${seed:+/seed-$seed}
out=$here/outputs work=$here/work hub=$here/model_hub logs=$here/logs
mkdir -p "$logs" "$hub/fine_tuned" "$out/search"
data=(--dataset fashion-mnist --no-download)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
stamp() { echo "$1 rc=$2 seconds=$3 $(date -u +%FT%TZ) $(uname -m) $(nproc) cores${gpu:+ $gpu}" >> "$logs/times.log"; }
step() {  # name, log, command...
  local name=$1 log=$2; shift 2
  local start=$(date +%s); "$@" >> "$log" 2>&1; local rc=$?
  stamp "$name" $rc $(( $(date +%s) - start )); return $rc
}
for m in ${@:-lenet spinalnet alexnet resnet vggnet}; do
  if [ "$here" = "$study" ]; then  # the study's own run searches; every option reuses its winners
    if ! grep -q '"complete": true' "$out/search/$m.json" 2>/dev/null; then
      step "search $m" "$logs/search_$m.log" python search.py --model $m "${data[@]}" --outputs "$out" || continue
    fi
  elif grep -q '"complete": true' "$study/outputs/search/$m.json" 2>/dev/null; then
    cp "$study/outputs/search/$m.json" "$out/search/$m.json"
  else
    echo "$m: the study's search is not complete: run bash $0 $m first"; continue
  fi
  # a stage is done when its JSON (the search's: "complete": true; the others' are written only
  # at their end) and checkpoint are there
  if [ "$base" != "$here" ] && { ! [ -f "$out/train/$m.json" ] || ! [ -f "$work/pre_trained/$m.pth" ]; }; then
    if ! [ -f "$base/outputs/train/$m.json" ] || ! [ -f "$base/work/pre_trained/$m.pth" ]; then
      echo "$m: the pre-training in $base has not finished: run bash $0 without the fine-tuning options first"
      continue
    fi
    mkdir -p "$out/train" "$work/pre_trained"
    for pair in "outputs/train/$m.png $out/train/$m.png" "work/pre_trained/$m.pth $work/pre_trained/$m.pth" \
                "outputs/train/$m.json $out/train/$m.json"; do  # each copy whole or not at all
      read -r from to <<< "$pair"; [ -f "$base/$from" ] && cp "$base/$from" "$to.$$.tmp" && mv "$to.$$.tmp" "$to"
    done
    { grep "^train $m rc=0 " "$base/logs/times.log" 2>/dev/null | tail -n 1
      echo "reused $m pre-training from $base $(date -u +%FT%TZ)"; } >> "$logs/times.log"
  fi
  if ! [ -f "$out/train/$m.json" ] || ! [ -f "$work/pre_trained/$m.pth" ]; then
    resume=(); [ -f "$work/pre_trained/${m}_last.pth" ] && resume=(--resume)
    step "train $m" "$logs/train_$m.log" python train.py --model $m "${data[@]}" "${variant[@]}" "${pretrain[@]}" \
      --hub "$work" --outputs "$out" "${resume[@]}" || continue
  fi
  if ! [ -f "$out/finetune/$m.json" ] || ! [ -f "$work/fine_tuned/${m}_tuned.pth" ]; then
    resume=(); [ -f "$work/fine_tuned/${m}_tuned_last.pth" ] && resume=(--resume)
    step "finetune $m" "$logs/finetune_$m.log" python finetune.py --model $m "${variant[@]}" "${tune[@]}" \
      --hub "$work" --outputs "$out" "${resume[@]}" || continue
  fi
  python - "$work/fine_tuned/${m}_tuned.pth" "$hub/fine_tuned/${m}_tuned.pth" <<'PY'
import os, sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
state.pop("optimizer", None)  # weights and metadata only: what evaluation needs
temporary = f"{sys.argv[2]}.{os.getpid()}.tmp"
torch.save(state, temporary)
os.replace(temporary, sys.argv[2])
PY
  step "evaluate all" "$logs/evaluate.log" python evaluate.py --model all --hub "$hub" --outputs "$out"
done
