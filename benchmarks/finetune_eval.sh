#!/usr/bin/env bash
# Issue 5's measurement: pretrain on the two UNLABELLED shared sets (no labelled cell, so no test cell, is
# ever seen), then `sclabel evaluate` each labelled set with up-sampling on and off against the baseline.
#   bash benchmarks/finetune_eval.sh [WORKDIR] [STEPS] [SEEDS]
set -euo pipefail
work=${1:-.bench/finetune_eval}; steps=${2:-1500}; seeds=${3:-0}
data=${SHARED_DATA:-../shared/data}
rm -rf "$work"; mkdir -p "$work"
# One vocabulary for all seven sets (union), so every labelled set maps onto the pretrained model.
sclabel-data ingest "$data"/*.h5ad -o "$work/all_sets" --no-progress > "$work/vocab.log"
sclabel-data ingest "$data/pbmcA_frozen_unlabeled.h5ad" "$data/celltypist_sample_unlabeled.h5ad" \
  -o "$work/pretrain_store" --vocab "$work/all_sets/vocab.json" --no-progress
start=$(date +%s)
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m sclabel_dist.pretrain \
  --data.stores="[$work/pretrain_store]" --data.batch_size=16 --data.chunk_size=16 --data.val_fraction=0.05 \
  --tokenize.max_len=256 --model.flavour=debug --train.max_steps="$steps" --train.warmup_steps=50 \
  --train.val_every=500 --checkpoint.dir="$work/ckpt" --checkpoint.every="$steps" --log.dir="$work/logs" \
  --log.every=100
echo "pretrain_minutes $(( ($(date +%s) - start) / 60 ))"
sclabel export "$work/ckpt" "$work/export"
for set in pbmc_facs_zheng_fasttopics baron_mouse1_pancreas tabula_muris_immune_actinn zilionis_mouse_lung \
           cellbench_lung_adenocarcinoma_lines; do
  s=$(date +%s)
  sclabel evaluate --model "$work/export" --data "$data/$set.h5ad" --label-key cell_type --seeds $seeds \
    --upsample both --out "$work/eval/$set"
  echo "$set minutes $(( ($(date +%s) - s) ))s"
done
