#!/usr/bin/env bash
# Pretraining with the DeepSpeed launcher: many hosts from a hostfile (pdsh/ssh), or this host alone.
#
#   HOSTFILE=hosts.txt launch/deepspeed_hostfile.sh             # hosts.txt lines: "node1 slots=8"
#   HOSTFILE=hosts.txt CONFIG=configs/pretrain/atlas.yaml MASTER_ADDR=node1 launch/deepspeed_hostfile.sh
#   HOSTFILE=hosts.txt INCLUDE="node1:0,1@node2:0,1" launch/deepspeed_hostfile.sh --train.max_steps=100
#   NUM_GPUS=2 launch/deepspeed_hostfile.sh                     # no hostfile: this host only (CPU works too)
#
# The DeepSpeed launcher sets RANK / LOCAL_RANK / WORLD_SIZE like torchrun, so the same entry point runs.
# It does not restart failed workers: rerun the command, and training resumes from the newest checkpoint.
set -euo pipefail

HOSTFILE="${HOSTFILE:-hostfile}"                           # "hostname slots=N" per line; absent = this host
CONFIG="${CONFIG:-configs/pretrain/atlas.yaml}"            # run config (YAML)
MASTER_PORT="${MASTER_PORT:-29500}"                        # rendezvous port
INCLUDE="${INCLUDE:-}"                                     # optional host:gpu selection (deepspeed --include)
LAUNCHER="${LAUNCHER:-pdsh}"                               # pdsh, openmpi, mvapich, ...
OMP_THREADS="${OMP_THREADS:-8}"                            # CPU threads per process
PYTHON="${PYTHON:-python}"                                 # interpreter of the environment with sclabel-dist

export OMP_NUM_THREADS="$OMP_THREADS"
args=(--master_port "$MASTER_PORT" --no_local_rank)
if [[ -f "$HOSTFILE" ]]; then
  MASTER_ADDR="${MASTER_ADDR:-$(head -n 1 "$HOSTFILE" | awk '{print $1}')}"   # first host by default
  args+=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --launcher "$LAUNCHER")
  [[ -n "$INCLUDE" ]] && args+=(--include "$INCLUDE")
else
  NUM_GPUS="${NUM_GPUS:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")}"
  # DeepSpeed picks its accelerator at import: tell it there is no GPU before it looks
  [[ "$("$PYTHON" -c "import torch; print(torch.cuda.is_available())")" == "False" ]] && export DS_ACCELERATOR=cpu
  args+=(--num_gpus "$NUM_GPUS")
fi
exec deepspeed "${args[@]}" --module sclabel_dist.pretrain --config "$CONFIG" "$@"
