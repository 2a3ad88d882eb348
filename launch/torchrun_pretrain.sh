#!/usr/bin/env bash
# Single-node pretraining under torchrun (one process per GPU; on a CPU-only machine, gloo + DS_ACCELERATOR=cpu).
#
#   launch/torchrun_pretrain.sh                                   # debug config, all local GPUs (or 2 CPU procs)
#   CONFIG=configs/pretrain/lung_100k.yaml NPROC=8 launch/torchrun_pretrain.sh
#   MAX_RESTARTS=3 launch/torchrun_pretrain.sh --train.max_steps=500 --checkpoint.every=100
#   # elastic, on each of up to 4 nodes: the run goes on with 2 to 4 nodes; when a node is lost the survivors
#   # re-rendezvous, resume the newest complete checkpoint on the smaller world and keep cells per step
#   NNODES=2:4 MAX_RESTARTS=3 RDZV_ENDPOINT=node0:29500 RDZV_ID=job42 ELASTIC=1 launch/torchrun_pretrain.sh
#   # ELASTIC=1 adds --data.elastic=true: the resumed steps train on exactly the cells, masks and loss the full
#   # world would have (without it the rest of the epoch is repartitioned: same cells overall, other steps)
#
# Extra arguments are config overrides (--section.key=value). Restarts resume from the newest complete checkpoint.
set -euo pipefail

CONFIG="${CONFIG:-configs/pretrain/debug.yaml}"          # run config (YAML)
if [[ -z "${NPROC:-}" ]]; then                            # processes: GPUs if any, else 2 CPU processes
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
MAX_RESTARTS="${MAX_RESTARTS:-0}"                          # torchrun restarts after a worker failure
MASTER_PORT="${MASTER_PORT:-29500}"                        # rendezvous port on this host
NNODES="${NNODES:-1}"                                      # nodes, or MIN:MAX for an elastic run
RDZV_ENDPOINT="${RDZV_ENDPOINT:-127.0.0.1:$MASTER_PORT}"   # c10d rendezvous host:port (one of the nodes)
RDZV_ID="${RDZV_ID:-sclabel}"                              # same on every node of one run
OMP_THREADS="${OMP_THREADS:-1}"                            # CPU threads per process
PYTHON="${PYTHON:-python}"                                 # interpreter of the environment with sclabel-dist
ELASTIC="${ELASTIC:-0}"                                    # 1: world-size-invariant data order (data.elastic)

export OMP_NUM_THREADS="$OMP_THREADS"
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" \
  --nproc_per_node="$NPROC" \
  --max-restarts="$MAX_RESTARTS" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID" \
  -m sclabel_dist.pretrain --config "$CONFIG" \
  $([[ "$ELASTIC" == 1 ]] && echo --data.elastic=true) "$@"
