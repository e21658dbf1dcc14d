#!/usr/bin/env bash
# Data-parallel training on every GPU of this machine (or 2 CPU processes without GPUs), like the
# seed replication's ./dist_train.sh:
#
#   scripts/dist_train.sh --dataset_name squad --output_dir runs/prompt_base --prompt_tuning --epochs 40 \
#       --optimizer "adafactor" --lr 0.3 --weight_decay 1e-5
#
# (--dataset_name squad needs the internet once; give --train_file/--validation_file for local data.)
# Every argument goes to `softprompt train`; they are checked once, in one process, before the ranks
# start, so a bad flag or file is one line and a clean exit rather than one error per rank. The global batch stays --global_batch_size (default 32):
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

# --help is printed by one process, not by every rank.
for arg in "$@"; do
  if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
    exec python3 -m softprompt train "$@"
  fi
done

# WORLD_SIZE: the checks that depend on the process count (the batch split) see the job's.
WORLD_SIZE="$nproc" python3 -c 'import sys; from softprompt.cli import check_command; sys.exit(check_command("train", sys.argv[1:]))' "$@"

exec torchrun --standalone --nnodes 1 --nproc_per_node "$nproc" --master_port "$port" ${TORCHRUN_ARGS:-} \
  -m softprompt train "$@"
