"""Run by test_torchrun.py under `torchrun --nproc_per_node=2`: one epoch per rank, gathered and checked."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from sclabel_dist.config import DataConfig, TokenizeConfig
from sclabel_dist.data.dataset import build_dataset


def main() -> None:
    store, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == int(os.environ["WORLD_SIZE"])
    data = DataConfig(stores=[store], batch_size=16, chunk_size=8, shuffle_chunks=4, drop_last=False)
    ds = build_dataset(data, TokenizeConfig(max_len=16), rank=rank, world_size=world, seed=11, raw=True)
    ids, batches = [], 0
    for block in ds:
        if ds.epoch != 0:
            break
        ids.append(block.ids)
        batches += 1
        dist.barrier()  # a collective per step: unequal batch counts would hang here
    ds.close()
    mine = torch.from_numpy(np.concatenate(ids))
    counts = [None] * world
    from sclabel_dist.data.stores import location

    dist.all_gather_object(counts, (batches, mine.tolist(), location.stats()["retries"]))
    if rank == 0:
        all_ids = [i for _, ids_r, _ in counts for i in ids_r]
        retries = [r for _, _, r in counts]  # object-store reads retried by each rank (a store at s3://)
        with open(out, "w") as fh:
            json.dump({"batches": [b for b, _, _ in counts], "ids": all_ids, "retries": retries}, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
