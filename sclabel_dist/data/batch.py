"""CellBatch: the model-ready tensors one step consumes (the contract between loader and model)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class CellBatch:
    """A batch of tokenised cells, shape [B, L] unless noted.

    gene_ids:       int64, token ids from GeneVocab (PAD_ID on padding, CLS_ID at position 0).
    values:         int64 bin ids (binned encoding: 0 = pad/CLS/no value, 1..num_bins = bins) or
                    float32 (continuous encoding: log1p of counts per 10k; 0 on pad/CLS).
                    At masked positions the input value is zeroed so nothing leaks.
    attention_mask: bool, True on real tokens (CLS included), False on padding.
    masked:         bool, True where the value was masked for the MLM objective (never CLS or pad).
    targets:        same dtype as values: the true value at every real position; the loss reads masked ones.
    labels:         int64 [B], class index for fine-tuning, or None.
    bag_ids, bag_offsets, bag_weights: the gene bag (tokenize.gene_bag), else None: every expressed gene of
                    every cell as flat token ids [N] with each cell's start [B] and its log1p-per-10k value
                    [N] (0 for genes whose value is masked), the input of torch's embedding_bag.
    """

    gene_ids: torch.Tensor
    values: torch.Tensor
    attention_mask: torch.Tensor
    masked: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor | None = None
    bag_ids: torch.Tensor | None = None
    bag_offsets: torch.Tensor | None = None
    bag_weights: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CellBatch:
        moved = {
            f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return CellBatch(**moved)

    def pin_memory(self) -> CellBatch:
        return CellBatch(
            **{
                f.name: (v.pin_memory() if isinstance(v, torch.Tensor) else v)
                for f in fields(self)
                for v in [getattr(self, f.name)]
            }
        )

    @property
    def bag(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(ids, offsets, weights) for the model's `bag` argument, or None without a gene bag."""
        if self.bag_ids is None:
            return None
        return self.bag_ids, self.bag_offsets, self.bag_weights

    @property
    def num_cells(self) -> int:
        return int(self.gene_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Non-pad tokens, CLS included: what tokens/s counts."""
        return int(self.attention_mask.sum())
