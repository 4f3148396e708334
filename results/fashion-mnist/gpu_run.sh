#!/usr/bin/env bash
# The Fashion-MNIST runs that two CPU cores could not hold, all at once on one lent GPU, in one
# command of a few minutes (this workplace's device tool; $OUT is the folder that comes back):
#   VGGNet seed 0 (pre-training and fine-tuning on the search winner found on the CPU),
#   --augment shift-flip for all five networks, seeds 1 and 2 of all five (the study's recipe),
#   --no-augment for ResNet and VGGNet (the CPU ran the other three), and EnsNet as far as the
#   time allows.
# Every job is run_study.sh, unchanged; the GPU only makes them fit. At the deadline the jobs get
# Ctrl-C (each keeps its last finished epoch), then each folder is evaluated and packed into $OUT.
#   bash results/fashion-mnist/gpu_run.sh [SECONDS_OF_TRAINING]      (default 450)
# Needs the four Fashion-MNIST .gz files in data/fashion-mnist/ (carried with the working tree):
#   mkdir -p data && cp -r .gpu-data/fashion-mnist data/ && bash results/fashion-mnist/gpu_run.sh 450
set -uo pipefail
cd "$(dirname "$0")/../.."
budget=${1:-450} started=$(date +%s) OUT=${OUT:?set OUT to the folder that comes back}
here=results/fashion-mnist study=results/fashion-mnist/run_study.sh
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
command -v python > /dev/null || { mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/bin/python &&
  chmod +x /tmp/bin/python && export PATH=/tmp/bin:$PATH; }  # run_study.sh calls python
log() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$OUT/progress.log"; }
touch /tmp/gpu_run.marker

{ nvidia-smi; python -c "import torch, torchvision, sklearn, numpy; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'sklearn', sklearn.__version__, 'numpy', numpy.__version__, \
torch.cuda.get_device_name())"; nproc; } > "$OUT/machine.txt" 2>&1
python -c "import data; [data.load_images('fashion-mnist', t, 'data', download=False) for t in (True, False)]" \
  || { log "no Fashion-MNIST in data/fashion-mnist"; exit 1; }
# a dry run of each script first: if the GPU path fails, stop here and keep the device time
preflight() {
  local tuned=$here/model_hub/fine_tuned/lenet_tuned.pth flags=(--dataset fashion-mnist --no-download --dry-run)
  { python train.py --model lenet "${flags[@]}" && python finetune.py --ckpt $tuned "${flags[@]}" &&
    python evaluate.py --ckpt $tuned "${flags[@]}"; } >> "$OUT/preflight.log" 2>&1
}
# MPS lets the small kernels of many processes share the GPU at once; without it they take turns
echo quit | timeout 5 nvidia-cuda-mps-control > /dev/null 2>&1; sleep 1  # a daemon left by an earlier call on a warm machine
if nvidia-cuda-mps-control -d 2>/dev/null && timeout 60 bash -c "$(declare -f preflight); here=$here OUT=$OUT preflight"; then
  mps=on; log "MPS on; pre-flight passed"
else
  echo quit | timeout 5 nvidia-cuda-mps-control 2>/dev/null; mps=off; log "MPS off"
  preflight || { log "pre-flight failed: see preflight.log"; exit 1; }
  log "pre-flight passed"
fi

pids=()
launch() { bash "$study" "$@" > "/tmp/job_$(echo "$*" | tr ' -' '__').out" 2>&1 & pids+=($!); log "started $* (pid $!)"; }
# with MPS every job at once (19 processes on 16 cores); without it the GPU takes turns between
# processes, so only VGGNet and the shift-flip option run
launch vggnet
grep -q '"complete": true' "$here/outputs/search/vggnet.json" || log "no complete VGGNet search: it runs first"
for m in lenet alexnet resnet spinalnet vggnet; do launch --augment shift-flip $m; done
if [ "$mps" = on ]; then
  for m in lenet alexnet resnet spinalnet vggnet; do launch --seed 1 $m; launch --seed 2 $m; done
  for m in resnet vggnet; do launch --no-augment $m; done
  launch ensnet
fi

while [ $(( $(date +%s) - started )) -lt "$budget" ] && [ -n "$(jobs -rp)" ]; do
  sleep 15
  log "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader) | $(for f in \
    $(find $here -name '*.log' -newer /tmp/gpu_run.marker -path '*logs/*' ! -name times.log); do \
    printf '%s: %s; ' "${f#$here/}" "$(tail -n 1 "$f" | cut -c1-60)"; done)"
done
if [ -n "$(jobs -rp)" ]; then
  log "deadline: Ctrl-C to every job (each keeps its last finished epoch)"
  for pid in "${pids[@]}"; do pkill -INT -P "$pid"; done; sleep 20  # the python under each run_study.sh
  for pid in "${pids[@]}"; do pkill -KILL -P "$pid"; done
fi
wait
log "jobs ended"

# one evaluation per folder, after every job (the jobs' own may have overlapped), side by side
for folder in seed-1 seed-2 shift-flip no-augment; do
  [ -n "$(ls $here/$folder/model_hub/fine_tuned/ 2>/dev/null)" ] && timeout 75 python evaluate.py --model all \
    --dataset fashion-mnist --no-download --hub $here/$folder/model_hub --outputs $here/$folder/outputs \
    >> $here/$folder/logs/evaluate.log 2>&1 &
done
ensnet=$(ls $here/work/fine_tuned/ensnet_tuned.pth $here/work/pre_trained/ensnet.pth 2>/dev/null | head -n 1)
[ -n "$ensnet" ] && timeout 75 python evaluate.py --ckpt "$ensnet" --dataset fashion-mnist --no-download \
  --outputs $here/ensnet/outputs > $here/logs/evaluate_ensnet.log 2>&1 &
# the pre-trained checkpoints too (test split): what Adam fine-tuning adds or costs
for folder in . shift-flip no-augment; do
  for ckpt in $(ls $here/$folder/work/pre_trained/{lenet,alexnet,vggnet,resnet,spinalnet}.pth 2>/dev/null); do
    [ "$folder" = . ] && [[ $ckpt != */vggnet.pth ]] && continue  # the CPU ran the others
    timeout 75 python evaluate.py --ckpt "$ckpt" --split test --dataset fashion-mnist --no-download \
      --outputs $here/$folder/outputs/pre-trained > /dev/null 2>&1 &
  done
done
wait
log "evaluated (EnsNet: ${ensnet:-no checkpoint})"

# what comes back: every new JSON, picture and log; the new fine-tuned checkpoints but the seeds'
# (their metrics are in their eval JSONs) and EnsNet's (100 MB)
find $here -type f -newer /tmp/gpu_run.marker ! -path '*/work/*' ! -name '*.pth' ! -name '*.lock' \
  ! -name '*.npy' -print0 | tar -czf "$OUT/results.tar.gz" --null -T -
find $here/model_hub/fine_tuned/vggnet_tuned.pth $here/shift-flip/model_hub/fine_tuned \
  $here/no-augment/model_hub/fine_tuned -name '*.pth' -newer /tmp/gpu_run.marker -print0 2>/dev/null | tar -cf - --null -T - | split -b 15M - "$OUT/checkpoints.tar.part-"
log "packed: $(ls -s "$OUT" | tr '\n' ' ')"
