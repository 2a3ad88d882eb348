#!/bin/bash
# Run under flock /tmp/sclabel-heavy.lock; VOCAB: any vocabulary holding the pbmc genes (default: the label-efficiency one).
# fp32 vs bf16 autocast on this CPU: sclabel embed, small flavour (fresh weights), 3,000 real cells, 1 process.
cd "$(dirname "$0")/.." && . .venv/bin/activate
W=.bench/bf16; rm -rf $W; mkdir -p $W
sclabel init-bundle --config configs/pretrain/debug.yaml --vocab ${VOCAB:-.bench/label_efficiency/vocab/vocab.json} --out $W/small --model.flavour=small --overwrite 2>&1 | tail -1
python - <<'PY'
import anndata as ad
a = ad.read_h5ad("../shared/data/pbmc_facs_zheng_fasttopics.h5ad")
a[:3000].copy().write_h5ad(".bench/bf16/cells.h5ad")
print(a.shape)
PY
for p in fp32 bf16 fp32 bf16; do
  uptime
  sclabel embed --model $W/small --data $W/cells.h5ad --out $W/emb_$p.parquet --precision $p --batch-size 256 --overwrite 2>&1 | grep "inference:"
done
python - <<'PY'
import numpy as np, pandas as pd
a = np.stack(pd.read_parquet(".bench/bf16/emb_fp32.parquet")["embedding"]); b = np.stack(pd.read_parquet(".bench/bf16/emb_bf16.parquet")["embedding"])
cos = (a*b).sum(1)/np.linalg.norm(a,axis=1)/np.linalg.norm(b,axis=1)
print(f"cosine fp32 vs bf16: min {cos.min():.4f} median {np.median(cos):.4f}")
PY
