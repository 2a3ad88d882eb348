"""Model hyper-parameters: the JSON-able `ModelArgs`, the size-flavour table, parameter and FLOP counts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sclabel_dist.errors import SclabelError

# (dim, depth, heads). small is the paper's scale (~10M parameters with a ~20k-gene vocabulary);
# large needs ZeRO-3 (or at least ZeRO-2 with bf16) to fit optimizer state on one 80 GB GPU.
FLAVOURS: dict[str, tuple[int, int, int]] = {
    "debug": (64, 2, 4),
    "small": (256, 6, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


@dataclass
class ModelArgs:
    """Everything needed to rebuild a ScLabelNet; saved as JSON in checkpoints and bundles."""

    vocab_size: int
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    value_encoding: str = "binned"
    num_bins: int = 51
    max_len: int = 512
    num_classes: int = 0
    activation_checkpointing: bool = False
    # False in bundles written before the gene bag existed (their args have no such key)
    gene_bag: bool = False
    mvc: bool = False
    # weight of the two-view contrastive loss on the cell embedding (0 = off; 0 in bundles written before it)
    contrastive: float = 0.0

    def __post_init__(self) -> None:
        if self.value_encoding not in ("binned", "continuous"):
            raise SclabelError(
                f"value_encoding must be 'binned' or 'continuous', got {self.value_encoding!r}"
            )
        if self.dim % self.heads:
            raise SclabelError(f"model dim {self.dim} is not divisible by heads {self.heads}")
        if self.vocab_size < 3:
            raise SclabelError(f"vocab_size {self.vocab_size} is too small (2 special tokens + genes)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelArgs:
        """Rebuild from JSON; unknown keys are an error so a newer bundle never loads half-understood."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SclabelError(f"model args: unknown key(s) {unknown}")
        return cls(**raw)


def build_model_args(model_cfg: Any, tokenize_cfg: Any, vocab_size: int, num_classes: int = 0) -> ModelArgs:
    """ModelArgs from the `model` and `tokenize` config sections; non-zero dim/depth/heads override the flavour."""
    model_cfg.validate()  # its flavour choices are FLAVOURS' keys (tests/train/test_config.py checks)
    dim, depth, heads = FLAVOURS[model_cfg.flavour]
    return ModelArgs(
        vocab_size=vocab_size,
        dim=model_cfg.dim or dim,
        depth=model_cfg.depth or depth,
        heads=model_cfg.heads or heads,
        mlp_ratio=model_cfg.mlp_ratio,
        dropout=model_cfg.dropout,
        value_encoding=tokenize_cfg.value_encoding,
        num_bins=tokenize_cfg.num_bins,
        max_len=tokenize_cfg.max_len,
        num_classes=num_classes,
        activation_checkpointing=model_cfg.activation_checkpointing,
        gene_bag=tokenize_cfg.gene_bag,
        mvc=model_cfg.mvc,
        contrastive=model_cfg.contrastive,
    )


def count_params(args: ModelArgs, embeddings: bool = True) -> int:
    """Parameter count computed from the args alone (matches `sum(p.numel())` of the built model)."""
    d, h = args.dim, args.mlp_dim
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
    out = args.depth * block + 2 * d  # blocks + final norm
    out_dim = args.num_bins if args.value_encoding == "binned" else 1
    out += (d * d + d) + 2 * d + (d * out_dim + out_dim)  # MLM head
    if args.num_classes:
        out += d * args.num_classes + args.num_classes
    if embeddings:
        value = (args.num_bins + 1) * d if args.value_encoding == "binned" else (d + d) + (d * d + d)
        out += args.vocab_size * d + value + d  # gene, value, mask embeddings
    if args.gene_bag:
        out += 2 * d  # the bag's LayerNorm
    if args.mvc:
        out += (d * d + d) + (d * out_dim + out_dim)  # MVC gene query and value head
    if args.contrastive:
        out += 2 * (d * d + d)  # the contrastive projection head
    return out


def flops_per_token(args: ModelArgs, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 x non-embedding parameters + the attention term.

    Embedding lookups do no matmul work, so they are excluded (as in the PaLM / nanoGPT MFU estimate).
    The attention term 12 * depth * dim * seq_len counts QK^T and AV over the padded sequence the kernel sees.
    """
    seq = seq_len if seq_len is not None else args.max_len
    return 6.0 * count_params(args, embeddings=False) + 12.0 * args.depth * args.dim * seq
