"""The fine-tuning loop under Accelerate: seeded batches, cross-entropy on the head, early stopping on val macro-F1."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from sclabel_dist.optim import build_lr_scheduler

# Fine-tuning's cosine ends at a tenth of each group's peak LR.
FINETUNE_MIN_LR_RATIO = 0.1


@dataclass
class TrainResult:
    """The best model (by validation macro-F1, unwrapped, on its device) and the per-epoch history."""

    model: torch.nn.Module
    best_epoch: int
    best_val: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def epoch_batches(
    train: np.ndarray,
    *,
    seed: int,
    epoch: int,
    batch_size: int,
    world: int,
    rank: int,
    max_steps: int,
    min_steps: int = 1,
) -> list[np.ndarray]:
    """This rank's batches of one epoch: seeded global permutations, cut into world x steps full batches.

    Every rank gets exactly the same number of batches (the ragged tail is dropped), so DDP never waits on a
    rank that ran out. A split too small for `min_steps` batches is repeated, each pass a new permutation:
    with 10 cells per class an epoch would otherwise be 2-3 optimizer steps, and the epoch cap would stop
    training long before the head has learnt anything (issue 18).
    """
    rng = np.random.default_rng([seed, 3, epoch])
    need = max(1, min_steps) * batch_size * world
    passes = max(1, -(-need // max(1, len(train))))
    order = np.concatenate([train[rng.permutation(len(train))] for _ in range(passes)])
    steps = len(order) // (batch_size * world)
    if max_steps > 0:
        steps = min(steps, max_steps)
    batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(steps * world)]
    return batches[rank::world]


def train_classifier(
    accelerator: Any,
    model: torch.nn.Module,
    param_groups: list[dict],
    csr: sp.csr_matrix,
    y: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    tok_cfg: Any,
    value_kind: str,
    cfg: Any,
    *,
    writer: Any = None,
    tag: str = "finetune",
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Fine-tune `model` on rows `train` of `csr` (labels `y`), early-stopping on macro-F1 over rows `val`.

    With no validation rows the last epoch's model is kept. TensorBoard curves go under `tag/`.
    """
    from sklearn.metrics import f1_score

    from sclabel_dist.annotate.inference import run_model
    from sclabel_dist.data.tokenize import tokenize_csr

    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = len(
        epoch_batches(
            train,
            seed=cfg.seed,
            epoch=0,
            batch_size=cfg.batch_size,
            world=world,
            rank=0,
            max_steps=cfg.max_steps_per_epoch,
            min_steps=cfg.min_steps_per_epoch,
        )
    )
    total = steps_per_epoch * cfg.epochs
    probe_steps = steps_per_epoch * cfg.probe_epochs
    warmup = max(1, int(cfg.warmup_fraction * total))
    # fused: one kernel over all parameters; the gene-embedding table is most of them, and the unfused
    # step over it cost several times the forward and backward of a short-sequence batch on CPU.
    optimizer = torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay, fused=True)
    # Keep the bare module: prepare() may wrap it (DDP), and accelerator.unwrap_model() would import
    # deepspeed whenever it is installed, which fine-tuning must never do.
    raw_model = model
    model, optimizer = accelerator.prepare(model, optimizer)
    # Not passed to prepare(): Accelerate would step it once per process. LP-FT: the encoder waits (LR 0)
    # while a fresh head learns to read it, so the head's first large, random gradients never reach (and
    # scramble) pretrained features.
    scheduler = build_lr_scheduler(
        optimizer,
        warmup_steps=warmup,
        max_steps=total,
        min_lr_ratio=FINETUNE_MIN_LR_RATIO,
        hold_steps=[probe_steps if g.get("name") == "encoder" else 0 for g in optimizer.param_groups],
    )

    best_score, best_epoch, best_state, best_val, bad = (-1.0, 0.0), -1, None, {}, 0
    history, step, t0 = [], 0, time.perf_counter()
    last_lr = optimizer.param_groups[0]["lr"]
    for epoch in range(cfg.epochs):
        model.train()
        losses = []
        batches = epoch_batches(
            train,
            seed=cfg.seed,
            epoch=epoch,
            batch_size=cfg.batch_size,
            world=world,
            rank=rank,
            max_steps=cfg.max_steps_per_epoch,
            min_steps=cfg.min_steps_per_epoch,
        )
        for i, rows in enumerate(batches):
            # Gene subsets of long cells are drawn per (seed, epoch, batch, rank): reruns see the same tokens.
            rng = np.random.default_rng([cfg.seed, 4, epoch, i, rank])
            batch = tokenize_csr(
                csr[rows], tok_cfg, value_kind=value_kind, train=True, mask=False, rng=rng, labels=y[rows]
            ).to(accelerator.device)
            out = model(batch.gene_ids, batch.values, batch.attention_mask, bag=batch.bag)
            loss = F.cross_entropy(out.logits.float(), batch.labels, label_smoothing=cfg.label_smoothing)
            accelerator.backward(loss)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_([p for g in param_groups for p in g["params"]], cfg.grad_clip)
            optimizer.step()
            last_lr = optimizer.param_groups[0]["lr"]  # the LR this step used, for the epoch's curve
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
        # Mean over ranks (a collective every rank reaches: all run the same number of batches).
        mean_loss = torch.tensor(float(np.mean(losses)) if losses else 0.0, device=accelerator.device)
        record = {
            "epoch": epoch,
            "step": step,
            "train_loss": float(accelerator.reduce(mean_loss, reduction="mean")),
            "seconds": time.perf_counter() - t0,
        }
        if len(val):
            # Every rank scores the whole validation split with the unwrapped model: identical decisions on
            # all ranks, no collective needed, and the same numbers as a single-process run.
            _, prob = run_model(
                raw_model,
                csr[val],
                tok_cfg,
                value_kind,
                batch_size=cfg.eval_batch_size,
                device=accelerator.device,
            )
            pred = prob.argmax(1)
            record["val_accuracy"] = float((pred == y[val]).mean())
            record["val_macro_f1"] = float(f1_score(y[val], pred, average="macro", zero_division=0))
            record["val_loss"] = float(-np.log(np.maximum(prob[np.arange(len(val)), y[val]], 1e-12)).mean())
        # Macro-F1 first; on a tie (common: a small validation split's F1 moves in coarse steps) the lower
        # validation loss wins, so training that keeps sharpening the same decisions is not thrown away.
        # No validation split: the last epoch wins.
        score = (record["val_macro_f1"], -record["val_loss"]) if len(val) else (float(epoch), 0.0)
        history.append(record)
        if writer is not None:
            for key, value in record.items():
                if key not in ("epoch", "step"):
                    writer.add_scalar(f"{tag}/{key}", value, epoch)
            writer.add_scalar(f"{tag}/lr", last_lr, epoch)
        shown = {**record, "epoch": epoch + 1}  # users count epochs from 1; records stay 0-based
        log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
        if score > best_score:
            best_score, best_epoch, bad = score, epoch, 0
            best_val = {k: v for k, v in record.items() if k.startswith("val_")}
            best_state = {k: v.detach().clone() for k, v in raw_model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience and epoch + 1 >= cfg.min_epochs:
                log(
                    f"early stop: no better validation macro-F1 (or equal with lower loss) for {cfg.patience} epochs "
                    f"(best epoch {best_epoch + 1})"
                )
                break
    else:
        if len(val) and best_epoch == cfg.epochs - 1:
            log(
                f"warning: the epoch cap ended fine-tuning while validation was still improving (best epoch "
                f"{best_epoch + 1} of {cfg.epochs}); a larger --train.epochs may score higher"
            )
    raw_model.load_state_dict(best_state)
    raw_model.eval()
    return TrainResult(raw_model, best_epoch, best_val, history, step, time.perf_counter() - t0)
