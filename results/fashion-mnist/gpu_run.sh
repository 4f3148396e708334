#!/usr/bin/env bash
# The Fashion-MNIST runs that two CPU cores could not hold, all at once on one lent GPU, in one
# command of a few minutes (this workplace's device tool; $OUT is the folder that comes back).
# JOBS is a file of command lines (gpu_jobs/DATE.txt: one per loan), each run in the background
# with bash from the repository root; `after FOLDER NETWORK` in a line waits for that pre-training
# to finish. The GPU only makes them fit: every job is run_study.sh or finetune_lr_validation.sh,
# unchanged. At the deadline every job gets Ctrl-C (each keeps its last finished epoch), then each
# folder with new fine-tuned checkpoints is evaluated, and everything new is packed into $OUT.
#   bash results/fashion-mnist/gpu_run.sh JOBS [SECONDS_OF_TRAINING]      (default 450)
# Needs the four Fashion-MNIST .gz files in data/fashion-mnist/ (carried with the working tree):
#   mkdir -p data && cp -r .gpu-data/fashion-mnist data/ && bash results/fashion-mnist/gpu_run.sh results/fashion-mnist/gpu_jobs/2026-11-26.txt 420
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -f "${1:-}" ] || { echo "usage: bash $0 JOBS [SECONDS] (JOBS: a file of command lines, such as results/fashion-mnist/gpu_jobs/2026-11-26.txt)"; exit 2; }
jobs_file=$1 budget=${2:-450} started=$(date +%s) OUT=${OUT:?set OUT to the folder that comes back}
[[ "$budget" =~ ^[1-9][0-9]*$ ]] || { echo "SECONDS must be a whole number above 0"; exit 2; }
here=results/fashion-mnist
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
command -v python > /dev/null || { mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/bin/python &&
  chmod +x /tmp/bin/python && export PATH=/tmp/bin:$PATH; }  # the scripts call python
log() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$OUT/progress.log"; }
after() { until [ -f "$here/$1/outputs/train/$2.json" ]; do sleep 5; done; }  # JOBS lines: wait for a pre-training
export -f after; export here
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
  log "MPS on; pre-flight passed"
else
  echo quit | timeout 5 nvidia-cuda-mps-control 2>/dev/null; log "MPS off"
  preflight || { log "pre-flight failed: see preflight.log"; exit 1; }
  log "pre-flight passed"
fi

pids=() n=0
set -m  # job control: each job in its own process group, where Ctrl-C is not ignored
while IFS= read -r line; do
  [[ -z "$line" || "$line" == \#* ]] && continue
  n=$((n + 1)); bash -c "$line" > "/tmp/gpu_job_$n.out" 2>&1 & pids+=($!); log "started job $n: $line (pid $!)"
done < "$jobs_file"

while [ $(( $(date +%s) - started )) -lt "$budget" ] && [ -n "$(jobs -rp)" ]; do
  sleep 15
  log "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader) | $(for f in \
    $(find $here -name '*.log' -newer /tmp/gpu_run.marker -path '*logs/*' ! -name times.log); do \
    printf '%s: %s; ' "${f#$here/}" "$(tail -n 1 "$f" | cut -c1-60)"; done)"
done
if [ -n "$(jobs -rp)" ]; then
  log "deadline: Ctrl-C to every job (each keeps its last finished epoch)"
  for pid in "${pids[@]}"; do kill -INT -- -"$pid" 2>/dev/null; done; sleep 20
  for pid in "${pids[@]}"; do kill -KILL -- -"$pid" 2>/dev/null; done
fi
wait
log "jobs ended"

# one evaluation per folder with new fine-tuned checkpoints, after every job, side by side
for hub in $(find $here -path '*/model_hub/fine_tuned/*.pth' -newer /tmp/gpu_run.marker -printf '%h\n' | sort -u); do
  folder=${hub%/model_hub/fine_tuned}
  timeout 75 python evaluate.py --model all --dataset fashion-mnist --no-download --hub "$folder/model_hub" \
    --outputs "$folder/outputs" >> "$folder/logs/evaluate.log" 2>&1 &
done
# a pre-training whose fine-tuning did not finish is evaluated as it is (test split), so that it counts
for ckpt in $(find $here -path '*/work/pre_trained/*.pth' ! -name '*_last.pth' ! -path '*finetune*' -newer /tmp/gpu_run.marker); do
  folder=${ckpt%/work/pre_trained/*} m=$(basename "$ckpt" .pth)
  [ -f "$folder/model_hub/fine_tuned/${m}_tuned.pth" ] && continue
  timeout 75 python evaluate.py --ckpt "$ckpt" --split test --dataset fashion-mnist --no-download \
    --outputs "$folder/outputs/pre-trained" > /dev/null 2>&1 &
done
wait
log "evaluated"

# what comes back (few files: the device tool returns 8): every new JSON, picture and log, the jobs'
# output; the new fine-tuned checkpoints, and the new pre-trained checkpoints of seed 0 (their
# validation predictions choose an ensemble's members), in 14 MB parts (a 20 MB part was refused)
{ find $here -type f -newer /tmp/gpu_run.marker ! -path '*/work/*' ! -name '*.pth' ! -name '*.lock' ! -name '*.npy' -print0
  printf '%s\0' /tmp/gpu_job_*.out; } | tar -czf "$OUT/results.tar.gz" --null -T -
{ find $here -path '*/model_hub/fine_tuned/*.pth' -newer /tmp/gpu_run.marker -print0
  find $here -path '*/work/pre_trained/*.pth' ! -name '*_last.pth' ! -path '*/seed-*' ! -path '*finetune*' \
    -newer /tmp/gpu_run.marker -print0; } | tar -cf - --null -T - | split -b 14M - "$OUT/checkpoints.tar.part-"
log "packed: $(ls -s "$OUT" | tr '\n' ' ')"
