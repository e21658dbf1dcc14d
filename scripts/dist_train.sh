#!/usr/bin/env bash
# Data-parallel training on every GPU of this machine (or 2 CPU processes without GPUs), like the
# seed replication's ./dist_train.sh:
#
#   scripts/dist_train.sh --output_dir runs/prompt_base --prompt_tuning --epochs 40 \
#       --optimizer "adafactor" --lr 0.3 --weight_decay 1e-5
#
# Every argument goes to `softprompt train`. The global batch stays --global_batch_size (default 32):
# it is split over the devices, so 4 GPUs run 8 examples each. Override the process count with
# NPROC=8, and pass extra torchrun options in TORCHRUN_ARGS. For several nodes use torchrun directly
# (see README: "Multi-GPU and multi-node").
set -euo pipefail

if [[ -n "${NPROC:-}" ]]; then
  nproc="$NPROC"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  nproc=$(nvidia-smi -L | wc -l)
else
  nproc=2
fi

# A random free port, so that several jobs can share a machine.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

exec torchrun --standalone --nnodes 1 --nproc_per_node "$nproc" --master_port "$port" ${TORCHRUN_ARGS:-} \
  -m softprompt train "$@"
