"""ScLabelNet: gene + value embeddings, a gene bag into CLS, pre-LN transformer encoder (SDPA), MLM and class heads."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sclabel_dist.model.args import ModelArgs


class ModelOutput(NamedTuple):
    """cell_embedding [B, D] (final-norm CLS output); mlm [B, L, num_bins] logits (binned) or [B, L] values
    (continuous); logits [B, num_classes] with a classification head, else None; hidden [B, L, D] token states;
    mvc: like mlm but predicted from the cell embedding and each gene's identity alone (None without MVC);
    views: [2, B, P] projections of the cell embedding of two views of each cell, for the contrastive loss
    (pretraining with args.contrastive > 0 only, else None).

    A NamedTuple rather than a dataclass so that DeepSpeed ZeRO-3 can find the tensors in it for its hooks.
    """

    cell_embedding: torch.Tensor
    mlm: torch.Tensor
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    mvc: torch.Tensor | None = None
    views: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.heads, self.dropout = args.heads, args.dropout
        self.qkv = nn.Linear(args.dim, 3 * args.dim)
        self.proj = nn.Linear(args.dim, args.dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """Attention over x [B, L, D]; `queries` = n computes only the first n tokens' outputs [B, n, D]."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if queries is not None:
            q = q[:, :, :queries]
        # key_mask [B, 1, 1, L], True = attend: padded keys get no weight, so a cell's output never depends on
        # how much padding its batch needed. Padded queries still see CLS, so no row is all -inf (no NaN).
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(b, q.shape[2], d))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.fc1 = nn.Linear(args.dim, args.mlp_dim)
        self.fc2 = nn.Linear(args.mlp_dim, args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm encoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(args.dim)
        self.attn = Attention(args)
        self.norm2 = nn.LayerNorm(args.dim)
        self.mlp = MLP(args)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D], or only the first `queries` tokens' outputs [B, queries, D]."""
        h = self.attn(self.norm1(x), key_mask, queries)
        x = (x if queries is None else x[:, :queries]) + self.drop(h)
        return x + self.drop(self.mlp(self.norm2(x)))


class GeneEmbedding(nn.Embedding):
    """The gene-embedding table; also sums it over a cell's whole gene bag in the same call.

    One module call does both so that DeepSpeed ZeRO-3, which gathers a module's partitioned weight around
    that module's forward, has the table present for the bag too (the weight keeps the name gene_embed.weight).
    """

    def forward(
        self, gene_ids: torch.Tensor, bag: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = super().forward(gene_ids)
        if bag is None:
            return tokens, None
        ids, offsets, weights = bag
        summed = F.embedding_bag(
            ids, self.weight, offsets, mode="sum", per_sample_weights=weights.to(self.weight.dtype)
        )
        return tokens, summed


class ScLabelNet(nn.Module):
    """The ScLabel-Net encoder; weight names are plain module paths (no DeepSpeed / DDP prefixes)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        d = args.dim
        self.gene_embed = GeneEmbedding(args.vocab_size, d)
        if args.value_encoding == "binned":
            # id 0 = pad / CLS / masked input, 1..num_bins = expression bins
            self.value_embed: nn.Module = nn.Embedding(args.num_bins + 1, d)
        else:
            self.value_embed = nn.Sequential(nn.Linear(1, d), nn.GELU(), nn.Linear(d, d))
        # learned "value unknown" vector used in place of the value embedding where the MLM masked it
        self.mask_embed = nn.Parameter(torch.zeros(d))
        # The gene bag: sum over ALL the cell's genes of log-value x gene embedding, normalised, added to the
        # CLS input. The tokens hold only max_len genes (a third of a PBMC's variable genes at 128); the
        # bag lets the cell embedding read the rest, and their absolute levels, for the cost of a lookup.
        self.bag_norm = nn.LayerNorm(d) if args.gene_bag else None
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.depth))
        self.norm = nn.LayerNorm(d)
        out_dim = args.num_bins if args.value_encoding == "binned" else 1
        self.mlm_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, out_dim))
        # MVC (scGPT): each token's value predicted from the cell embedding gated by its gene's embedding, so
        # pretraining shapes the very vector the classifier later reads.
        self.mvc_query = nn.Linear(d, d) if args.mvc else None
        self.mvc_head = nn.Linear(d, out_dim) if args.mvc else None
        # Contrastive (SimCLR-style) projection of the cell embedding: MLM alone never trains the CLS output,
        # and it left the pretrained cell embedding collapsed to ~3 effective dimensions (issue 21).
        self.contrast_head = (
            nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d)) if args.contrastive else None
        )
        self.cls_head = nn.Linear(d, args.num_classes) if args.num_classes else None
        self.apply(_init_weights)
        nn.init.normal_(self.mask_embed, std=0.02)
        # scale residual projections by depth (GPT-2) so deep stacks start near identity
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, std=0.02 / (2 * args.depth) ** 0.5)

    def embed(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        masked: torch.Tensor | None,
        bag: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token inputs [B, L, D], the bare gene embeddings [B, L, D] that MVC queries with)."""
        if self.bag_norm is not None and bag is None:
            raise ValueError("this model reads a gene bag: tokenise with tokenize.gene_bag=true")
        genes, summed = self.gene_embed(gene_ids, bag if self.bag_norm is not None else None)
        if self.args.value_encoding == "binned":
            v = self.value_embed(values.long())
        else:
            v = self.value_embed(values.to(genes.dtype).unsqueeze(-1))
        if masked is not None:
            v = torch.where(masked.unsqueeze(-1), self.mask_embed.to(v.dtype), v)
        x = genes + v
        if summed is not None:
            x = torch.cat([x[:, :1] + self.bag_norm(summed.to(x.dtype)).unsqueeze(1), x[:, 1:]], dim=1)
        return x, genes

    def forward(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor,
        masked: torch.Tensor | None = None,
        bag: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> ModelOutput:
        """gene_ids / values / attention_mask / masked as in CellBatch ([B, L]); masked=None at inference;
        bag = CellBatch.bag (required when the model was built with gene_bag, ignored otherwise)."""
        x, genes = self.embed(gene_ids, values, masked, bag)
        x = self.encode(x, attention_mask)
        mlm = self.mlm_head(x)
        if self.args.value_encoding == "continuous":
            mlm = mlm.squeeze(-1)
        cell = x[:, 0]
        logits = self.cls_head(cell) if self.cls_head is not None else None
        mvc = None
        if self.mvc_head is not None and masked is not None:  # a pretraining objective only
            mvc = self.mvc_head(F.gelu(self.mvc_query(genes)) * cell.unsqueeze(1))
            if self.args.value_encoding == "continuous":
                mvc = mvc.squeeze(-1)
        views = None
        if self.contrast_head is not None and masked is not None and self.training:  # pretraining only
            half = half_view(gene_ids, values, attention_mask, masked, bag)
            x2, _ = self.embed(half[0], half[1], None, half[3])
            cell2 = self.encode(x2, half[2])[:, 0]
            views = torch.stack([self.contrast_head(cell), self.contrast_head(cell2)])
        return ModelOutput(cell_embedding=cell, mlm=mlm, logits=logits, hidden=x, mvc=mvc, views=views)

    def cell_outputs(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor,
        bag: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cell_embedding, logits) as forward() gives them at inference, for less compute (annotate, embed).

        Only the CLS token is read, so the MLM head is skipped and the last block computes the CLS row alone
        (its keys and values still come from every token): a depth-d model saves ~3/4 of a block, the same
        numbers up to float rounding.
        """
        x, _ = self.embed(gene_ids, values, None, bag)
        key_mask = attention_mask[:, None, None, :].bool()
        for block in self.blocks[:-1]:
            x = block(x, key_mask)
        if len(self.blocks):
            x = self.blocks[-1](x, key_mask, queries=1)
        cell = self.norm(x[:, 0])
        return cell, (self.cls_head(cell) if self.cls_head is not None else None)

    def encode(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The encoder blocks and the final norm over token inputs x [B, L, D]."""
        key_mask = attention_mask[:, None, None, :].bool()
        for block in self.blocks:
            if self.args.activation_checkpointing and self.training:
                x = checkpoint(block, x, key_mask, use_reentrant=False)
            else:
                x = block(x, key_mask)
        return self.norm(x)


def _half(ids: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    """A deterministic pseudo-random half of the genes `ids` of cells with `salt`: True = in the half."""
    h = (ids.long() * 1103515245 + salt * 12345 + 7) % 2147483647
    return ((h >> 8) & 1).bool()


def half_view(
    gene_ids: torch.Tensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor,
    masked: torch.Tensor,
    bag: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
    """The contrastive second view of a batch: about half of each cell's unmasked tokens and of its bag.

    (gene_ids, values, attention_mask, bag) with the kept tokens moved to the front and the length cut to the
    longest cell's. Which half is drawn from a hash of the gene ids salted by the cell's own genes, not from
    an RNG: a resumed run sees exactly the views an uninterrupted one would, and no RNG state moves.
    """
    real = attention_mask.bool()
    salt = (gene_ids.long() * real).sum(1)
    keep = real & ~masked & _half(gene_ids, salt[:, None])
    keep[:, 0] = True  # CLS
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    length = int(keep.sum(1).max())
    pick = order[:, :length]
    view = (gene_ids.gather(1, pick), values.gather(1, pick), keep.gather(1, pick).to(attention_mask.dtype))
    if bag is None:
        return (*view, None)
    ids, offsets, weights = bag
    cell = torch.searchsorted(offsets, torch.arange(len(ids), device=ids.device), right=True) - 1
    return (*view, (ids, offsets, weights * _half(ids, salt[cell]).to(weights.dtype)))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


def mlm_loss(
    output: ModelOutput,
    batch,
    contrastive: float = 0.0,
    denominator: float | None = None,
    across_ranks: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, masked-value accuracy) over the masked positions of `batch` (a CellBatch).

    Binned: cross-entropy over bins 1..num_bins, accuracy = exact bin. Continuous: MSE, accuracy = fraction of
    predictions within 0.5 of the true log-value. A batch with no masked token gives a zero loss that still
    touches every MLM parameter, so all ranks run the same backward (no collective mismatch). With MVC the
    loss is the sum of both objectives (equal weights, as scGPT); the accuracy stays the MLM head's. With
    views (args.contrastive) `contrastive` x the InfoNCE loss between them is added.

    denominator: divide the masked tokens' summed loss and hits by this instead of their count in `batch`
    (the world-size-invariant step: the step's masked tokens over all ranks and micro-batches, per
    micro-batch, so that every masked token of a step weighs the same however the step is split).
    across_ranks: the contrastive negatives are every rank's cells (see `info_nce`).
    """
    loss, acc = _masked_value_loss(output.mlm, batch, denominator)
    if output.mvc is not None:
        loss = loss + _masked_value_loss(output.mvc, batch, denominator)[0]
    if output.views is not None:
        loss = loss + contrastive * info_nce(output.views[0], output.views[1], across_ranks=across_ranks)
    return loss, acc


def info_nce(
    a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1, across_ranks: bool = False
) -> torch.Tensor:
    """Symmetric InfoNCE (SimCLR's NT-Xent over pairs): row i of `a` should pick row i of `b` among the batch.

    The other cells of the batch are the negatives; the uniformity this forces on the cell embedding is what
    keeps it from collapsing to the few directions MLM needs. across_ranks: the batch is every rank's cells
    (gathered with gradients, as CLIP and SimCLR do at scale), so a rank's cells meet W x B - 1 negatives.
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    offset = 0
    if across_ranks and dist.is_initialized() and dist.get_world_size() > 1:
        all_a, offset = _gather_rows(a)
        all_b, _ = _gather_rows(b)
    else:
        all_a, all_b = a, b
    target = torch.arange(len(a), device=a.device) + offset
    return 0.5 * (
        F.cross_entropy(a @ all_b.T / temperature, target)
        + F.cross_entropy(b @ all_a.T / temperature, target)
    )


def _gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(Every rank's rows of `x` stacked in rank order, where this rank's start); gradients flow back to each
    rank's own rows. Ranks may hold different numbers of rows (a short last batch): padded for the collective."""
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(x)], device=x.device))
    sizes = [int(c) for c in counts]
    padded = F.pad(x, (0, 0, 0, max(sizes) - len(x)))
    parts = _AllGather.apply(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]), sum(sizes[: dist.get_rank()])


class _AllGather(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of every rank's loss for its own rows (summed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        grad = torch.stack(grads).contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def _masked_value_loss(
    prediction: torch.Tensor, batch, denominator: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    sel = batch.masked
    pred = prediction[sel]
    target = batch.targets[sel]
    if pred.numel() == 0:
        zero = prediction.sum() * 0.0
        return zero, zero.detach()
    if pred.dim() == 2:  # binned logits [N, num_bins]; targets are bin ids 1..num_bins
        tgt = target.long() - 1
        losses = F.cross_entropy(pred.float(), tgt, reduction="none" if denominator is not None else "mean")
        hits = (pred.argmax(-1) == tgt).float()
    else:
        err = pred.float() - target.float()
        losses = err**2
        hits = (err.abs() < 0.5).float()
    if denominator is None:
        return losses.mean(), hits.mean().detach()  # (the mean of a cross-entropy's mean is itself)
    return losses.sum() / denominator, (hits.sum() / denominator).detach()
