"""One typed config tree: dataclasses with defaults and docs, strict YAML, `--section.key=value` overrides.

Each component receives only its own section (`cfg.data`, `cfg.model`, ...). Unknown keys are errors, so a
typo in a YAML file or an override never silently falls back to a default. Each field's one-line doc is the
string in its `metadata["doc"]`. The tree owns validation: `Literal` fields list their choices, and each
section's `validate()` holds its range rules; load_config runs them all (library functions given a section
built in code call its validate() themselves). The command line over a tree is config_cli.py.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from sclabel_dist.errors import SclabelError

T = TypeVar("T")


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and a one-line doc (lists and dicts get a fresh copy)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def _at_least(section: str, obj: Any, names: tuple[str, ...], low: int = 1) -> None:
    for name in names:
        if getattr(obj, name) < low:
            raise SclabelError(f"{section}.{name}={getattr(obj, name)}: must be >= {low}")


def _fraction(section: str, obj: Any, names: tuple[str, ...], one: bool = False) -> None:
    """Each field in [0, 1), or [0, 1] with `one`."""
    for name in names:
        value = getattr(obj, name)
        if not (0.0 <= value <= 1.0 if one else 0.0 <= value < 1.0):
            raise SclabelError(f"{section}.{name}={value}: must be in [0, {'1]' if one else '1)'}")


def _in_choices(where: str, value: Any, hint: Any) -> None:
    choices = typing.get_args(hint)
    if value not in choices:
        raise SclabelError(f"{where}={value!r}: choose from {list(choices)}")


def check_choices(section: str, obj: Any) -> None:
    """Every Literal field of dataclass `obj` holds one of its choices (a section built in code, too)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if typing.get_origin(hints[f.name]) is Literal:
            _in_choices(f"{section}.{f.name}", getattr(obj, f.name), hints[f.name])


@dataclass
class DataConfig:
    """Where cells come from and how they are streamed."""

    stores: list[str] = doc([], "paths of cell stores (Zarr store directories or SOMA experiment URIs)")
    weights: list[float] = doc([], "mixing weights, one per store; empty = proportional to size")
    obs_filter: dict[str, list[str]] = doc({}, "keep only cells whose obs column value is in the list")
    val_fraction: float = doc(0.0, "fraction of cells held out for validation (by chunk, seeded)")
    val_datasets: list[str] = doc([], "datasets held out for validation entirely (overrides val_fraction)")
    batch_size: int = doc(32, "cells per micro-batch per rank")
    chunk_size: int = doc(64, "contiguous rows read together; the unit of the shuffle")
    shuffle_chunks: int = doc(32, "chunks mixed in the shuffle buffer")
    read_threads: int = doc(2, "background reader threads")
    read_ahead: int = doc(4, "blocks read ahead per thread (bounds memory)")
    drop_last: bool = doc(True, "drop the ragged last batch so every rank gets equal batches")
    elastic: bool = doc(
        False,
        "world-size-invariant order: each optimizer step trains on the same cells, masks and loss on any number "
        "of ranks, so a resume at another world size continues the exact run (each rank reads a slice of "
        "every shuffle window: less I/O locality)",
    )
    vocab: str = doc(
        "", "vocab.json of the run ('' = the first Zarr store's); needed when all stores are SOMA"
    )

    def validate(self) -> None:
        if self.weights and len(self.weights) != len(self.stores):
            raise SclabelError(f"data.weights has {len(self.weights)} entries for {len(self.stores)} stores")
        if self.weights and (min(self.weights) < 0 or sum(self.weights) <= 0):
            raise SclabelError(f"data.weights {self.weights}: must be >= 0 with a positive sum")
        _fraction("data", self, ("val_fraction",))
        _at_least("data", self, ("batch_size", "chunk_size", "shuffle_chunks", "read_threads", "read_ahead"))


@dataclass
class TokenizeConfig:
    """How a cell becomes tokens: the exact settings are saved in the export bundle."""

    max_len: int = doc(512, "tokens per cell including CLS; more non-zero genes are subsampled")
    value_encoding: Literal["binned", "continuous"] = doc(
        "binned", "'binned' (per-cell quantile bins, as scGPT) or 'continuous' (log1p per 10k)"
    )
    num_bins: int = doc(51, "number of expression bins for the binned encoding")
    train_gene_selection: Literal["random", "top"] = doc(
        "random", "'random' (seeded subset) or 'top' when a cell has > max_len genes"
    )
    eval_gene_selection: Literal["random", "top"] = doc(
        "top", "gene selection at evaluation / inference (deterministic)"
    )
    mask_ratio: float = doc(0.15, "fraction of a cell's real tokens whose value is masked for MLM")
    pad_to_max_len: bool = doc(
        False, "pad every batch to max_len (static shapes) instead of its longest cell"
    )
    gene_bag: bool = doc(
        True,
        "add a value-weighted sum of the embeddings of ALL the cell's genes (beyond max_len too) to CLS",
    )

    def validate(self) -> None:
        check_choices("tokenize", self)
        if self.max_len < 2:
            raise SclabelError(f"tokenize.max_len={self.max_len}: needs room for CLS and one gene (>= 2)")
        if self.value_encoding == "binned" and self.num_bins < 1:
            raise SclabelError(f"tokenize.num_bins={self.num_bins}: must be >= 1")
        _fraction("tokenize", self, ("mask_ratio",))


@dataclass
class ModelConfig:
    """ScLabel-Net architecture; `flavour` picks a size from the table, non-zero fields override it."""

    flavour: Literal["debug", "small", "base", "large"] = doc(
        "debug", "size flavour: debug, small, base, large"
    )
    dim: int = doc(0, "hidden width (0 = from flavour)")
    depth: int = doc(0, "encoder blocks (0 = from flavour)")
    heads: int = doc(0, "attention heads (0 = from flavour)")
    mlp_ratio: float = doc(4.0, "MLP hidden width / dim")
    dropout: float = doc(0.0, "dropout in attention output and MLP")
    activation_checkpointing: bool = doc(False, "recompute block activations in backward to save memory")
    mvc: bool = doc(
        False, "also predict each masked value from the cell embedding alone (scGPT's MVC objective)"
    )
    contrastive: float = doc(
        1.0,
        "weight of a contrastive loss between the cell embeddings of two views of each cell (0 = MLM only)",
    )
    contrastive_across_ranks: bool = doc(
        False,
        "contrastive negatives: every rank's cells of the micro-batch (all_gather), not only this rank's",
    )

    def validate(self) -> None:
        check_choices("model", self)
        _at_least("model", self, ("dim", "depth", "heads"), low=0)
        _fraction("model", self, ("dropout",))
        if self.mlp_ratio <= 0 or self.contrastive < 0:
            raise SclabelError(f"model.mlp_ratio={self.mlp_ratio} must be > 0, model.contrastive >= 0")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    seed: int = doc(0, "seed for model init, data order and masking")
    max_steps: int = doc(100, "optimizer steps to run")
    lr: float = doc(1e-3, "peak learning rate")
    min_lr_ratio: float = doc(0.1, "final lr as a fraction of the peak (cosine decay)")
    warmup_steps: int = doc(10, "linear warmup steps")
    weight_decay: float = doc(0.01, "AdamW weight decay")
    grad_accum: int = doc(1, "micro-batches per optimizer step")
    grad_clip: float = doc(1.0, "gradient norm clip (0 = off)")
    precision: Literal["fp32", "bf16"] = doc("fp32", "'fp32' or 'bf16'")
    zero_stage: Literal[0, 1, 2, 3] = doc(2, "DeepSpeed ZeRO stage: 0, 1, 2 or 3")
    val_every: int = doc(0, "validation loss every N steps (0 = off)")
    val_batches: int = doc(4, "batches per validation")
    deepspeed: str = doc(
        "", "optional DeepSpeed JSON preset merged under the generated config (configs/deepspeed/)"
    )
    init_from: str = doc(
        "", "export bundle whose weights start a new run (ignored when resuming a checkpoint)"
    )

    def validate(self) -> None:
        check_choices("train", self)
        _at_least("train", self, ("max_steps", "grad_accum", "val_batches"))
        _at_least("train", self, ("warmup_steps", "val_every"), low=0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise SclabelError(f"train.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")


@dataclass
class CheckpointConfig:
    """Where and how often the run is checkpointed."""

    dir: str = doc("runs/pretrain/checkpoints", "checkpoint directory")
    every: int = doc(50, "save every N steps (and always at the end)")
    keep: int = doc(3, "keep the last K checkpoints")
    resume: str = doc("auto", "'auto' (newest complete checkpoint if any), 'never', or a checkpoint path")

    def validate(self) -> None:
        _at_least("checkpoint", self, ("every", "keep"))


@dataclass
class LogConfig:
    """Logging on rank 0."""

    dir: str = doc("runs/pretrain/logs", "JSONL and TensorBoard directory")
    every: int = doc(10, "log every N steps")
    tensorboard: bool = doc(True, "write TensorBoard event files")
    progress: bool = doc(True, "progress bar when attached to a terminal")

    def validate(self) -> None:
        _at_least("log", self, ("every",))


@dataclass
class PretrainConfig:
    """The root of a pretraining run."""

    data: DataConfig = field(default_factory=DataConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ----------------------------------------------------------------------------------------------------------
# loading


def validate(cfg: Any) -> Any:
    """Run every section's validate() (depth first) over a config tree; returns `cfg`."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def from_dict(cls: type[T], raw: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise SclabelError."""
    if not isinstance(raw, dict):
        raise SclabelError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SclabelError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is Literal:
        _in_choices(where, value, hint)
        return value
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise SclabelError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SclabelError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise SclabelError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float, str):
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value)
        except (TypeError, ValueError):
            raise SclabelError(f"{where}: expected {hint.__name__}, got {value!r}") from None
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able data (saved in checkpoints and bundles)."""
    return dataclasses.asdict(cfg)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (a leading `--` is allowed) onto a nested dict; values are YAML."""
    import yaml

    raw = dict(raw)
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise SclabelError(f"override {item!r}: expected section.key=value")
        dotted, value_text = text.split("=", 1)
        keys = dotted.split(".")
        node = raw
        for key in keys[:-1]:
            node[key] = dict(node.get(key) or {})
            node = node[key]
        try:
            node[keys[-1]] = yaml.safe_load(value_text)
        except yaml.YAMLError as exc:  # a tag (!!python/...), an unclosed bracket or quote
            reason = str(exc).splitlines()[0]
            raise SclabelError(f"override {item!r}: the value is not plain YAML ({reason})") from None
    return raw


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read a YAML file (or nothing: all defaults), apply overrides, check types and keys, then validate()."""
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SclabelError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SclabelError(f"{path}: invalid YAML: {exc}") from None
    raw = apply_overrides(raw, overrides or [])
    return validate(from_dict(cls, raw, where=str(path) if path else "config"))


# ----------------------------------------------------------------------------------------------------------
# fine-tuning, prediction and evaluation (sclabel finetune / predict / evaluate)


@dataclass
class FinetuneDataConfig:
    """The labelled .h5ad: which matrix, how cells are split, how well genes must match the model."""

    layer: str = doc("", "layer to read instead of X ('' = X)")
    test_fraction: float = doc(
        0.0,
        "fraction of labelled cells held out of fine-tuning for a test score (stratified, seeded; 0 = train on "
        "every labelled cell; `sclabel evaluate` sets its own --test-fraction)",
    )
    val_fraction: float = doc(0.15, "fraction of the remaining cells for validation (early stopping)")
    min_cells_per_class: int = doc(2, "classes with fewer labelled cells are left out and reported")
    min_matched_genes: int = doc(100, "refuse data with fewer genes found in the model vocabulary")
    min_matched_fraction: float = doc(0.5, "refuse data whose matched genes carry less of the expression")
    genes: Literal["hvg", "all"] = doc(
        "hvg",
        "genes the classifier reads: 'hvg' (the num_genes most variable of the non-test cells) or 'all'",
    )
    num_genes: int = doc(2000, "how many most-variable genes with genes=hvg (the baseline's 2,000)")
    max_len: int = doc(128, "tokens per cell in fine-tuning and prediction (0 = the bundle's max_len)")
    train_gene_selection: Literal["top", "random"] = doc(
        "top",
        "genes kept when a cell has more than max_len in training: 'top' (as in prediction) or 'random'",
    )

    def validate(self) -> None:
        check_choices("data", self)
        _fraction("data", self, ("test_fraction", "val_fraction"))
        _fraction("data", self, ("min_matched_fraction",), one=True)
        _at_least("data", self, ("min_cells_per_class", "min_matched_genes", "max_len"), low=0)
        if self.genes == "hvg" and self.num_genes < 1:
            raise SclabelError(f"data.num_genes {self.num_genes}: must be >= 1 with data.genes=hvg")


@dataclass
class UpsampleConfig:
    """Random up-sampling of rare classes in the training split only."""

    enabled: bool = doc(True, "repeat cells of rare classes (drawn with replacement) in the training split")
    target: str = doc("max", "cells per class to reach: 'max' (largest class) or a number")
    cap: int = doc(1000, "upper bound on the per-class target (0 = none)")

    def validate(self) -> None:
        if self.target != "max" and not (str(self.target).isdigit() and int(self.target) >= 1):
            raise SclabelError(f"upsample.target={self.target!r}: 'max' or a number of cells >= 1")
        _at_least("upsample", self, ("cap",), low=0)


@dataclass
class FinetuneTrainConfig:
    """The fine-tuning loop."""

    seed: int = doc(0, "seed for the split, up-sampling, head init, data order and gene selection")
    train_mode: str = doc("full", "'full', 'frozen' (head only) or 'top:N' (top N encoder blocks + head)")
    epochs: int = doc(12, "maximum passes over the (up-sampled) training split")
    max_steps_per_epoch: int = doc(0, "cap optimizer steps per epoch (0 = the whole split)")
    min_steps_per_epoch: int = doc(
        25, "a small split is repeated (reshuffled) within an epoch up to this many optimizer steps"
    )
    batch_size: int = doc(32, "cells per micro-batch per process")
    lr: float = doc(1e-3, "peak learning rate of the encoder")
    head_lr: float = doc(1e-2, "peak learning rate of the classification head (new, so larger)")
    probe_epochs: int = doc(
        0, "first train the head alone on the frozen encoder for this many epochs, then everything (LP-FT)"
    )
    weight_decay: float = doc(0.01, "AdamW weight decay")
    warmup_fraction: float = doc(0.05, "linear warmup as a fraction of all steps, then cosine decay")
    grad_clip: float = doc(1.0, "gradient norm clip (0 = off)")
    label_smoothing: float = doc(0.0, "label smoothing of the cross-entropy")
    dropout: float = doc(0.0, "dropout in the encoder while fine-tuning (whatever pretraining used)")
    patience: int = doc(4, "stop after this many epochs without a better validation macro-F1")
    min_epochs: int = doc(6, "never stop early before this many epochs (a fresh head needs a start)")
    refit: bool = doc(
        True,
        "after validation has chosen the epoch count, train again from the bundle on train + validation "
        "cells for that many epochs and keep that model",
    )
    eval_batch_size: int = doc(64, "cells per batch for validation, test and prediction")

    def validate(self) -> None:
        _at_least("train", self, ("epochs", "batch_size", "eval_batch_size"))
        _at_least(
            "train",
            self,
            ("max_steps_per_epoch", "min_steps_per_epoch", "probe_epochs", "patience", "min_epochs"),
            low=0,
        )
        _fraction("train", self, ("dropout",))
        _fraction("train", self, ("warmup_fraction", "label_smoothing"), one=True)


@dataclass
class FinetuneLogConfig:
    """What the run writes beside the fine-tuned bundle."""

    tensorboard: bool = doc(True, "write TensorBoard curves to RUN_DIR/tensorboard")
    plots: bool = doc(True, "write the confusion-matrix PNG and per-class F1 bar chart")


@dataclass
class FinetuneConfig:
    """The root of a fine-tuning run (also used by evaluate)."""

    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    upsample: UpsampleConfig = field(default_factory=UpsampleConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    log: FinetuneLogConfig = field(default_factory=FinetuneLogConfig)
