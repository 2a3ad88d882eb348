#!/usr/bin/env bash
# Single-node pretraining under torchrun (one process per GPU; on a CPU-only machine, gloo + DS_ACCELERATOR=cpu).
#
#   launch/torchrun_pretrain.sh                                   # debug config, all local GPUs (or 2 CPU procs)
#   CONFIG=configs/pretrain/lung_100k.yaml NPROC=8 launch/torchrun_pretrain.sh
#   MAX_RESTARTS=3 launch/torchrun_pretrain.sh --train.max_steps=500 --checkpoint.every=100
#
# Extra arguments are config overrides (--section.key=value). Restarts resume from the newest complete checkpoint.
set -euo pipefail

CONFIG="${CONFIG:-configs/pretrain/debug.yaml}"          # run config (YAML)
if [[ -z "${NPROC:-}" ]]; then                            # processes: GPUs if any, else 2 CPU processes
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
MAX_RESTARTS="${MAX_RESTARTS:-0}"                          # torchrun restarts after a worker failure
MASTER_PORT="${MASTER_PORT:-29500}"                        # rendezvous port on this host
OMP_THREADS="${OMP_THREADS:-1}"                            # CPU threads per process
PYTHON="${PYTHON:-python}"                                 # interpreter of the environment with sclabel-dist

export OMP_NUM_THREADS="$OMP_THREADS"
exec "$PYTHON" -m torch.distributed.run \
  --nproc_per_node="$NPROC" \
  --max-restarts="$MAX_RESTARTS" \
  --rdzv-backend=c10d --rdzv-endpoint="127.0.0.1:$MASTER_PORT" \
  -m sclabel_dist.pretrain --config "$CONFIG" "$@"
