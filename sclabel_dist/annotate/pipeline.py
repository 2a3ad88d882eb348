"""The annotation pipeline behind `sclabel finetune` and `sclabel evaluate`: read the labelled input, match
it to a bundle, split, fine-tune (with refit), score and write the run. Typed arguments only: the entry points
parse their command lines and call these."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sclabel_dist.config import FinetuneConfig
from sclabel_dist.errors import SclabelError

if TYPE_CHECKING:  # bundle.py imports torch: not needed to parse a command line
    from sclabel_dist.bundle import Bundle


@dataclass
class Prepared:
    """The input in the model's gene space, with everything needed to tokenise it as in pretraining."""

    csr: Any  # scipy CSR, vocabulary gene space
    tok_cfg: Any  # TokenizeConfig from the bundle
    value_kind: str
    match_report: dict
    value_note: str


@dataclass
class FitOutput:
    """What one fine-tuning produced."""

    model: Any
    classes: list[str]
    genes: np.ndarray | None  # vocabulary columns the classifier reads (None = all)
    test_metrics: dict | None
    train: Any  # TrainResult
    upsample: dict
    test_prob: np.ndarray | None


def finetune_config(
    config: str | Path | None,
    overrides: list[str],
    *,
    upsample: bool = True,
    train_mode: str | None = None,
    seed: int | None = None,
) -> FinetuneConfig:
    """FinetuneConfig from a YAML file, then `section.key=value` overrides, then the dedicated flags."""
    from sclabel_dist.config import load_config

    extra = list(overrides)
    if not upsample:
        extra.append("upsample.enabled=false")
    if train_mode:
        extra.append(f"train.train_mode={train_mode}")
    if seed is not None:
        extra.append(f"train.seed={seed}")
    return load_config(FinetuneConfig, config, extra)


@dataclass
class LabelledInput:
    """A labelled .h5ad read for annotation, and the bundle it is annotated with."""

    bundle: Bundle
    inp: Any  # annotate.h5ad.H5adInput
    labels: np.ndarray  # object: str or None (unlabelled)


def read_labelled(model: str | Path, data: str | Path, label_key: str, layer: str = "") -> LabelledInput:
    """Load and verify the bundle at `model` (or RUN_DIR/model), read `data` and its labels."""
    from sclabel_dist.annotate.classifier import resolve_bundle_dir
    from sclabel_dist.annotate.h5ad import read_h5ad, read_labels
    from sclabel_dist.bundle import load_bundle

    bundle = load_bundle(resolve_bundle_dir(str(model)))
    inp = read_h5ad(data, layer=layer or None)
    return LabelledInput(bundle, inp, read_labels(inp, label_key))


def describe(li: LabelledInput) -> str:
    """The one line every annotation command starts with."""
    inp = li.inp
    return (
        f"data: {inp.path} ({inp.X.shape[0]:,} cells x {inp.X.shape[1]:,} genes, {inp.value_kind}); "
        f"model: {li.bundle.path}"
    )


def prepare_input(bundle: Bundle, inp: Any, cfg: FinetuneConfig, log: Any = print) -> Prepared:
    """Match genes to the bundle's vocabulary (refusing a poor match) and check the value kind fits the model."""
    from sclabel_dist.annotate.prepare import check_value_kind, format_match_report, match_to_vocab

    csr, report, _ = match_to_vocab(
        inp, bundle.vocab, min_genes=cfg.data.min_matched_genes, min_fraction=cfg.data.min_matched_fraction
    )
    log(format_match_report(report))
    note = check_value_kind(inp.X, inp.value_kind, bundle.config["tokenize"], str(inp.path))
    log(note)
    tok_cfg = bundle.tokenize
    if cfg.data.max_len:
        # No positional embeddings: a fine-tuned classifier may read more (or fewer) genes than pretraining did.
        tok_cfg.max_len = cfg.data.max_len
    # 'top' trains on exactly the tokens prediction will see; 'random' subsets are an augmentation that
    # pretraining wants but that leaves a train / test gap for a classifier.
    tok_cfg.train_gene_selection = cfg.data.train_gene_selection
    return Prepared(csr, tok_cfg, inp.value_kind, report, note)


def make_split(labels: np.ndarray, inp: Any, cfg: FinetuneConfig, split_key: str | None) -> Any:
    """Stratified seeded split, or the user's split column."""
    from sclabel_dist.annotate.splits import column_split, stratified_split

    d = cfg.data
    if split_key:
        if split_key not in inp.obs.columns:
            raise SclabelError(f"{inp.path}: split key {split_key!r} not in obs")
        return column_split(
            labels,
            inp.obs[split_key].to_numpy(dtype=object),
            seed=cfg.train.seed,
            val_fraction=d.val_fraction,
            min_cells=d.min_cells_per_class,
            where=str(inp.path),
        )
    return stratified_split(
        labels,
        seed=cfg.train.seed,
        test_fraction=d.test_fraction,
        val_fraction=d.val_fraction,
        min_cells=d.min_cells_per_class,
        where=str(inp.path),
    )


def fit(
    bundle: Bundle,
    prep: Prepared,
    split: Any,
    cfg: FinetuneConfig,
    accelerator: Any,
    *,
    writer: Any = None,
    log: Any = print,
) -> FitOutput:
    """Up-sample the training split, fine-tune with early stopping on validation, refit on train + validation
    for the chosen epoch count (train.refit), and score the test split."""
    from sclabel_dist.annotate.classifier import build_classifier, set_trainable
    from sclabel_dist.annotate.genes import classifier_input, select_genes
    from sclabel_dist.annotate.inference import run_model
    from sclabel_dist.annotate.report import classification_metrics
    from sclabel_dist.annotate.trainer import train_classifier
    from sclabel_dist.annotate.upsample import upsample_indices

    t = cfg.train
    log(
        f"split: train {len(split.train)}, val {len(split.val)}, test {len(split.test)}; "
        f"{len(split.classes)} classes"
    )
    log(split_note(len(split.test), t.refit and len(split.val) > 0))
    for note in split.notes:
        log(f"note: {note}")
    non_test = np.sort(np.concatenate([split.train, split.val]))
    genes = select_genes(prep.csr, non_test, prep.value_kind, cfg.data.genes, cfg.data.num_genes)
    csr = classifier_input(prep.csr, prep.value_kind, genes)
    if genes is not None:
        log(
            f"genes: the classifier reads the {len(genes):,} most variable genes of the non-test cells "
            f"(median {np.median(np.diff(csr.indptr)):.0f} expressed per cell, max_len {prep.tok_cfg.max_len})"
        )

    def train_on(cells: np.ndarray, val: np.ndarray, train_cfg: Any, tag: str) -> tuple[Any, dict]:
        """Up-sample `cells`, build the classifier from the bundle and fine-tune it (early stop on `val`)."""
        train = cells
        if cfg.upsample.enabled:
            train = upsample_indices(
                cells, split.y, seed=t.seed, target=cfg.upsample.target, cap=cfg.upsample.cap
            )
        upsample = {
            "enabled": cfg.upsample.enabled,
            "train_cells": len(cells),
            "train_cells_upsampled": len(train),
            "counts": np.bincount(split.y[train], minlength=len(split.classes)).tolist(),
        }
        log(f"training on {len(cells)} cells ({len(train)} after up-sampling), validating on {len(val)}")
        model = build_classifier(
            bundle.config["model_args"], bundle.state_dict, len(split.classes), t.seed, dropout=t.dropout
        )
        encoder, head = set_trainable(model, t.train_mode)
        groups = [
            g
            for g in (
                {"name": "encoder", "params": encoder, "lr": t.lr},
                {"name": "head", "params": head, "lr": t.head_lr},
            )
            if g["params"]
        ]
        result = train_classifier(
            accelerator,
            model,
            groups,
            csr,
            split.y,
            train,
            val,
            prep.tok_cfg,
            "lognorm",
            train_cfg,
            writer=writer,
            tag=tag,
            log=log,
        )
        return result, upsample

    result, upsample = train_on(split.train, split.val, t, "finetune")
    if t.refit and len(split.val):
        # Validation has done its job (choosing the epoch count); the baseline learns from every non-test
        # cell, and so should the model: 15% more cells is worth ~0.01 macro-F1 to logistic regression on pbmc.
        epochs = result.best_epoch + 1  # best_epoch is an index; users count epochs from 1
        log(
            f"refit: training again on train + validation cells for {epochs} epochs (the count validation chose)"
        )
        selection = result
        result, upsample = train_on(non_test, split.val[:0], dataclasses.replace(t, epochs=epochs), "refit")
        result.best_val = selection.best_val
        result.history = [*selection.history, *({**h, "refit": True} for h in result.history)]
        result.best_epoch = selection.best_epoch
        result.steps += selection.steps
        result.seconds += selection.seconds
    metrics, prob = None, None
    if len(split.test):
        _, prob = run_model(
            result.model,
            csr[split.test],
            prep.tok_cfg,
            "lognorm",
            batch_size=t.eval_batch_size,
            device=accelerator.device,
        )
        metrics = classification_metrics(split.y[split.test], prob.argmax(1), split.classes)
        log(
            f"test: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} ({len(split.test)} cells)"
        )
    return FitOutput(result.model, split.classes, genes, metrics, result, upsample, prob)


def split_note(num_test: int, refit: bool) -> str:
    """What the user's labelled cells are used for, said once in the output (issue 18: a silent 30% hold-out)."""
    if num_test:
        return (
            f"test: {num_test} labelled cells held out of training to measure the model "
            "(data.test_fraction or --split-key); the model never learns from them"
        )
    if refit:
        return (
            "every labelled cell trains the model (validation cells choose the epoch count, then the refit "
            "learns from them too); no test score: measure with `sclabel evaluate`"
        )
    return (
        "every labelled cell but the validation ones trains the model (train.refit=false); no test score: "
        "measure with `sclabel evaluate`"
    )


def one_based(history: list[dict]) -> list[dict]:
    """The training history with epochs numbered from 1, as every line a user reads counts them."""
    return [{**h, "epoch": h["epoch"] + 1} for h in history]


def save_outputs(
    out: Path,
    bundle: Bundle,
    prep: Prepared,
    split: Any,
    fitted: FitOutput,
    cfg: FinetuneConfig,
    info: dict,
    *,
    save_model: bool = True,
) -> dict:
    """Write OUT/model (fine-tuned bundle), metrics.json, gene_match.json and the plots; returns the metrics."""
    from sclabel_dist.annotate.genes import gene_names
    from sclabel_dist.annotate.report import plot_confusion, plot_f1_bars
    from sclabel_dist.bundle import save_bundle
    from sclabel_dist.config import to_dict

    tr = fitted.train
    metrics = {
        **info,
        "test": fitted.test_metrics,
        "best_epoch": tr.best_epoch + 1,
        "val_best": tr.best_val,
        "history": one_based(tr.history),
        "split": split.summary(),
        "upsample": fitted.upsample,
        "input_genes": "all" if fitted.genes is None else len(fitted.genes),
        "gene_match": prep.match_report,
        "value_kind": prep.value_kind,
        "value_note": prep.value_note,
        "config": to_dict(cfg),
        "train_seconds": tr.seconds,
        "steps": tr.steps,
    }
    (out / "gene_match.json").write_text(json.dumps(prep.match_report, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if fitted.test_metrics and cfg.log.plots:
        plot_confusion(fitted.test_metrics, out / "confusion_matrix.png")
        plot_f1_bars(fitted.test_metrics, out / "per_class_f1.png")
    if save_model:
        config = {
            "model_args": fitted.model.args.to_dict(),
            "tokenize": to_dict(prep.tok_cfg),
            "labels": fitted.classes,
            "input_genes": gene_names(bundle.vocab, fitted.genes),
            "finetune": {
                "base_model": str(bundle.path),
                "base_vocab_hash": bundle.vocab.hash,
                "value_kind": prep.value_kind,
                "config": to_dict(cfg),
                "best_epoch": tr.best_epoch + 1,
                "label_key": info.get("label_key"),
                "data": info.get("data"),
            },
            "pretrain": bundle.config.get("pretrain", {}),
        }
        save_bundle(out / "model", fitted.model.state_dict(), config, bundle.vocab, model_card(info, fitted))
    return metrics


def model_card(info: dict, fitted: FitOutput) -> str:
    test = fitted.test_metrics or {}
    lines = [
        "# sclabel fine-tuned cell-type classifier",
        "",
        f"- base model: {info.get('model')}",
        f"- data: {info.get('data')} (labels from obs[{info.get('label_key')!r}])",
        f"- classes ({len(fitted.classes)}): {', '.join(fitted.classes)}",
        f"- best epoch: {fitted.train.best_epoch + 1}; up-sampling: {fitted.upsample['enabled']}",
        f"- test accuracy: {test.get('accuracy')}, macro-F1: {test.get('macro_f1')}"
        if test
        else "- trained on every labelled cell: no held-out test score (see `sclabel evaluate`)",
        "",
        "Use: `sclabel predict --model THIS_DIR --data new.h5ad --out annotated.h5ad`",
    ]
    return "\n".join(lines) + "\n"


def open_writer(out: Path, cfg: FinetuneConfig, accelerator: Any) -> Any:
    """A TensorBoard writer on the main process when cfg.log.tensorboard, else None."""
    if not (cfg.log.tensorboard and accelerator.is_main_process):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"))
