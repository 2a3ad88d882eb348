"""Masked-expression pretraining: `torchrun --nproc_per_node=N -m sclabel_dist.pretrain --config X.yaml [--a.b=v]`.

Reads top to bottom: config -> processes -> data -> model and engine -> resume -> loop (step, log, validate,
checkpoint) -> final checkpoint. Every rank runs the same code; only rank 0 writes logs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from sclabel_dist.bundle import load_bundle
from sclabel_dist.checkpoint import find_verified_resume, load_checkpoint, read_state, save_checkpoint
from sclabel_dist.config import PretrainConfig, to_dict
from sclabel_dist.config_cli import add_config_options, load_from_args
from sclabel_dist.data.stores import import_soma_in_background, location
from sclabel_dist.distributed.ds_config import build_deepspeed_config, rescale_batch
from sclabel_dist.distributed.env import prepare_process, read_dist_env
from sclabel_dist.distributed.lifeline import die_with_parent
from sclabel_dist.distributed.run_lock import lock_run
from sclabel_dist.errors import SclabelError
from sclabel_dist.metrics import MetricsLogger, StepTimer, peak_flops, peak_memory_gb
from sclabel_dist.model.args import build_model_args, count_params, flops_per_token
from sclabel_dist.model.net import ScLabelNet, mlm_loss
from sclabel_dist.train_state import TrainState
from sclabel_dist.universal import convert_to_universal


def main(argv: list[str] | None = None, after_step: Callable[[int], None] | None = None) -> int:
    """Run a pretraining. after_step(step) runs after each optimizer step (tests inject faults there)."""
    # -- config ---------------------------------------------------------------------------------------------
    cfg = parse_args(argv)
    tc = cfg.train
    import_soma_in_background(list(cfg.data.stores))

    # -- processes: DS_ACCELERATOR=cpu + gloo without a GPU; deepspeed is imported only after that -----------
    env = read_dist_env()
    if env.under_torchrun:
        die_with_parent()  # a SIGKILLed agent must not leave its workers training on as orphans
    device = prepare_process(env)
    from sclabel_dist.data.dataset import build_dataset
    from sclabel_dist.distributed import engine as ds

    ds.init_distributed(device, env)
    lock_run(cfg.checkpoint.dir, env.rank)  # one run per checkpoint directory, before anything is written
    # the newest checkpoint whose files match the checksums saved with them (a corrupt one is skipped, logged)
    resume_from = find_verified_resume(cfg.checkpoint.dir, cfg.checkpoint.resume, env.rank, env.world_size)
    if resume_from is not None:
        keep_global_batch(cfg, read_state(resume_from), env)
    torch.manual_seed(tc.seed)  # identical initial weights on every rank

    # -- data -------------------------------------------------------------------------------------------------
    # Validation measures the training objective on held-out cells, so it selects genes as training does
    # (the 'top' eval selection is for inference and would score a different task).
    val_tokenize = dataclasses.replace(cfg.tokenize, eval_gene_selection=cfg.tokenize.train_gene_selection)

    def dataset(split: str):
        tok = cfg.tokenize if split == "train" else val_tokenize
        return build_dataset(
            cfg.data,
            tok,
            rank=env.rank,
            world_size=env.world_size,
            seed=tc.seed,
            split=split,
            grad_accum=tc.grad_accum,
        )

    train_data = dataset("train")
    vocab = train_data.vocab
    # Built once: every validation replays the same first val_batches batches of this stream.
    val_data = dataset("val") if tc.val_every else None
    # an empty held-out split would log a meaningless 0 loss: refuse it up front
    if val_data is not None and val_data.num_batches_per_epoch == 0:
        raise SclabelError(
            f"validation split has no batch: data.val_fraction={cfg.data.val_fraction} of the corpus in "
            f"chunks of data.chunk_size={cfg.data.chunk_size} rows gives fewer than "
            f"{cfg.data.batch_size * env.world_size} cells; raise val_fraction, lower chunk_size, "
            "or set train.val_every=0"
        )

    # -- model and engine -------------------------------------------------------------------------------------
    model_args = build_model_args(cfg.model, cfg.tokenize, vocab_size=len(vocab) + 2)
    model = ScLabelNet(model_args)
    if tc.init_from:  # continue pretraining from an exported bundle (e.g. on more data or more ranks)
        model.load_state_dict(load_bundle(tc.init_from).state_dict)
    preset = json.loads(Path(tc.deepspeed).read_text()) if tc.deepspeed else None
    ds_config = build_deepspeed_config(tc, cfg.data.batch_size, env.world_size, device.split(":")[0], preset)
    engine = ds.build_engine(model, tc, ds_config, device)

    # -- resume: model, optimizer, scheduler, RNG and the loader's position in its epoch -----------------------
    step = 0
    if resume_from is not None:
        t0 = time.perf_counter()
        saved = load_checkpoint(engine, resume_from, env.rank, to_universal=convert_to_universal)
        resumed = TrainState.from_state_dict(saved, resume_from)
        resume_s = time.perf_counter() - t0
        vocab.checked(resumed.vocab_hash, resume_from, "the checkpoint's vocabulary")
        train_data.load_state_dict(resumed.loader)
        step = resumed.step

    # -- logging ----------------------------------------------------------------------------------------------
    logger = MetricsLogger(cfg.log.dir, env.is_main, tc.max_steps, step, cfg.log)
    flops = flops_per_token(model_args, seq_len=cfg.tokenize.max_len)
    peak = peak_flops(device)
    if env.is_main:
        where = f"resumed from {resume_from}" if resume_from else "from scratch"
        print(
            f"pretrain: {count_params(model_args) / 1e6:.2f}M params ({model_args.dim}x{model_args.depth}), "
            f"{len(vocab)} genes, world {env.world_size}, ZeRO {tc.zero_stage}, {tc.precision}, {device}, "
            f"{where} at step {step}" + (f" ({resume_s:.2f}s to load)" if resume_from else ""),
            flush=True,
        )
        if cfg.data.elastic and model_args.contrastive > 0:
            print(
                "pretrain: data.elastic keeps each step's cells, masks and MLM loss on any world size; the "
                f"contrastive term (model.contrastive={model_args.contrastive}) takes its negatives from the "
                "micro-batch, so it changes with the split (model.contrastive=0 for an exactly repeatable run)",
                flush=True,
            )

    # -- the loop ---------------------------------------------------------------------------------------------
    batches = iter(train_data)
    timer = StepTimer()
    last: dict[str, float] = {}
    engine.train()
    while step < tc.max_steps:
        loss_sum = torch.zeros(2, device=device)  # stays on the device: no GPU sync until a log step
        t0 = time.perf_counter()
        host_batches = [next(batches) for _ in range(tc.grad_accum)]  # the step's micro-batches (host)
        timer.data_wait += time.perf_counter() - t0
        denominator = step_denominator(host_batches, env.world_size, device) if cfg.data.elastic else None
        for host_batch in host_batches:  # DeepSpeed steps the optimizer only on the accumulation boundary
            timer.cells += host_batch.num_cells
            timer.tokens += host_batch.num_tokens  # counted on the host for the same reason
            batch = host_batch.to(device, non_blocking=True)
            out = engine(batch.gene_ids, batch.values, batch.attention_mask, batch.masked, bag=batch.bag)
            loss, acc = mlm_loss(
                out, batch, model_args.contrastive, denominator, cfg.model.contrastive_across_ranks
            )
            engine.backward(loss)
            engine.step()
            loss_sum += torch.stack([loss.detach().float(), acc.float()])
        step += 1
        timer.steps += 1
        if after_step is not None:
            after_step(step)

        if step % cfg.log.every == 0 or step == tc.max_steps:
            loss_v, acc_v = mean_over_ranks(loss_sum / tc.grad_accum).tolist()
            grad_norm = engine.get_global_grad_norm()
            last = {"loss": loss_v, "mlm_acc": acc_v}
            metrics = {
                **last,
                "lr": float(engine.get_lr()[0]),
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                **timer.rates(env.world_size, flops, peak),
                "peak_mem_gb": peak_memory_gb(device),
                **location.log_counters(),  # stores at s3://: requests and transient errors retried (this rank)
                "loader": train_data.state_dict(),  # consumed-sample accounting, checked by the fault test
            }
            logger.log(step, metrics)
            timer.reset()
        logger.advance(step)

        if tc.val_every and step % tc.val_every == 0:
            val = validate(engine, val_data, tc.val_batches, device)
            last.update({f"val_{k}": v for k, v in val.items()})
            logger.log(step, val, prefix="val")

        if step % cfg.checkpoint.every == 0 or step == tc.max_steps:
            state = TrainState(
                step=step,
                loader=train_data.state_dict(),
                world_size=env.world_size,
                metrics=last,
                config=to_dict(cfg),
                model_args=model_args.to_dict(),
                vocab_hash=vocab.hash,
            )
            t0 = time.perf_counter()
            path = save_checkpoint(
                engine, cfg.checkpoint.dir, step, state.state_dict(), vocab, env.rank, cfg.checkpoint.keep
            )
            if env.is_main:
                print(f"checkpoint: saved {path} in {time.perf_counter() - t0:.2f}s", flush=True)

    # -- done -------------------------------------------------------------------------------------------------
    train_data.close()
    if val_data is not None:
        val_data.close()
    logger.close()
    if env.is_main:
        print(f"pretrain: finished at step {step}; checkpoints in {cfg.checkpoint.dir}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """`--config` and one `--section.key` option per PretrainConfig field (--help shows each default and doc)."""
    parser = argparse.ArgumentParser(
        prog="sclabel_dist.pretrain", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    add_config_options(parser, PretrainConfig)
    return parser


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    """The run config of a command line: configs/pretrain/*.yaml, then `--section.key=value` overrides."""
    return load_from_args(PretrainConfig, build_parser().parse_args(argv))


def keep_global_batch(cfg: PretrainConfig, saved: dict, env) -> None:
    """Resuming on another world size: rescale micro-batch and accumulation (in `cfg`) so that cells per
    optimizer step stay what the checkpoint trained with; the LR schedule and the loader's place depend on it."""
    saved_cfg, saved_world = saved.get("config", {}), int(saved.get("world_size", env.world_size))
    if saved_world == env.world_size:
        return
    micro = int(saved_cfg.get("data", {}).get("batch_size", cfg.data.batch_size))
    accum = int(saved_cfg.get("train", {}).get("grad_accum", cfg.train.grad_accum))
    global_batch = micro * accum * saved_world
    cfg.data.batch_size, cfg.train.grad_accum = rescale_batch(global_batch, micro, env.world_size)
    if env.is_main:
        print(
            f"pretrain: world size {saved_world} -> {env.world_size}: keeping {global_batch} cells per step as "
            f"{cfg.data.batch_size} cells x {cfg.train.grad_accum} micro-batches x {env.world_size} ranks",
            flush=True,
        )


def step_denominator(host_batches: list, world_size: int, device: str) -> float:
    """data.elastic: the per-micro-batch loss denominator that makes a step's loss the mean over ALL its
    masked tokens (every rank, every micro-batch), however the step is split.

    DeepSpeed averages the micro-batch losses' gradients over micro-batches and ranks (divides by
    grad_accum x world), so each micro-batch divides its summed token loss by masked_total / (grad_accum x
    world). One all-reduce of one number per step; the micro-batches' own means would weigh a token by how
    many masked tokens happen to share its micro-batch, which depends on the split."""
    count = torch.tensor(
        [float(sum(int(b.masked.sum()) for b in host_batches))], dtype=torch.float64, device=device
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count)
    return max(float(count.item()), 1.0) / (len(host_batches) * world_size)


def validate(engine, val_data, num_batches: int, device: str) -> dict[str, float]:
    """Mean MLM loss and accuracy over the first `num_batches` held-out batches (same count on every rank).

    `val_data` is built once per run; a validation stream restarts at its first batch on every iteration."""
    engine.eval()
    total, n = torch.zeros(2, device=device), 0
    with torch.no_grad():
        for i, batch in enumerate(val_data):
            if i >= num_batches:
                break
            batch = batch.to(device)
            loss, acc = mlm_loss(
                engine(batch.gene_ids, batch.values, batch.attention_mask, batch.masked, bag=batch.bag), batch
            )
            total += torch.stack([loss.float(), acc.float()])
            n += 1
    engine.train()
    loss, acc = mean_over_ranks(total / max(n, 1)).tolist()
    return {"loss": loss, "mlm_acc": acc}


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a small tensor over ranks (each rank's loss is over its own batch); returned on the CPU."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values.cpu()


def cli(after_step: Callable[[int], None] | None = None) -> int:
    """Entry point: a user error (config, data, checkpoint) becomes one line on stderr and exit code 2."""
    import sys

    try:
        return main(after_step=after_step)
    except SclabelError as exc:
        print(f"sclabel_dist.pretrain: error: {exc}", file=sys.stderr)
        # An error raised after the process group is up: free it before exiting, or gloo's threads can abort
        # the interpreter's shutdown (SIGABRT) and torchrun reports that instead of the exit code 2.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        return 2


if __name__ == "__main__":
    raise SystemExit(cli())
