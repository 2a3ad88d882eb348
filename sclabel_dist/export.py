"""`sclabel export CHECKPOINT OUT`: consolidate a (ZeRO-sharded) DeepSpeed checkpoint into a shareable bundle."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from sclabel_dist.checkpoint import (
    STATE_FILE,
    VOCAB_FILE,
    find_verified_resume,
    is_complete,
    read_state,
    verify_checkpoint,
)
from sclabel_dist.errors import SclabelError


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete step directory whose files match their checksums, or the newest such one under a root."""
    path = Path(path)
    if is_complete(path):
        problems = verify_checkpoint(path)
        if problems:
            raise SclabelError(f"{path}: checkpoint fails verification: {problems[0]}")
        return path
    if not path.is_dir():
        raise SclabelError(f"{path}: checkpoint directory not found")
    found = find_verified_resume(path, "auto")
    if found is None:
        if (path / STATE_FILE).is_file():
            raise SclabelError(f"{path}: checkpoint is incomplete (its save never finished)")
        raise SclabelError(f"{path}: no complete sclabel checkpoint here (expected step_*/COMPLETE)")
    return found


def model_card(state: dict[str, Any], source: Path) -> str:
    """A short Markdown model card: what was trained, on what, for how long, and how it ended."""
    cfg, args = state.get("config", {}), state["model_args"]
    metrics = state.get("metrics", {})
    train = cfg.get("train", {})
    lines = [
        "# ScLabel-Net pretrained encoder",
        "",
        "Masked-expression pretraining of a single-cell transformer (sclabel-dist).",
        "",
        "## Model",
        f"- width {args['dim']}, depth {args['depth']}, heads {args['heads']}, vocabulary {args['vocab_size']} tokens",
        f"- value encoding: {args['value_encoding']} ({args['num_bins']} bins), max {args['max_len']} tokens per cell",
        "",
        "## Data",
        f"- stores: {', '.join(cfg.get('data', {}).get('stores', [])) or 'unknown'}",
        f"- tokenisation: {cfg.get('tokenize', {})}",
        "",
        "## Training",
        f"- steps: {state['step']} (world size {state.get('world_size', '?')}, ZeRO {train.get('zero_stage', '?')}, "
        f"{train.get('precision', '?')}, peak lr {train.get('lr', '?')})",
        f"- final metrics: {', '.join(f'{k} {v:.4g}' for k, v in metrics.items()) or 'none logged'}",
        f"- exported from: {source}",
        "",
        "## Use",
        "```python",
        "from sclabel_dist.bundle import load_bundle",
        "model = load_bundle('THIS_DIR').build_model()",
        "```",
    ]
    return "\n".join(lines) + "\n"


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Consolidate `checkpoint` (a step directory or a checkpoint root) into a bundle at `out_dir`."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    from sclabel_dist.bundle import save_bundle
    from sclabel_dist.distributed.engine import consolidate_checkpoint
    from sclabel_dist.model.args import ModelArgs
    from sclabel_dist.model.net import ScLabelNet
    from sclabel_dist.vocab import GeneVocab

    step_dir = resolve_checkpoint(checkpoint)
    state = read_state(step_dir)
    vocab = GeneVocab.from_json(step_dir / VOCAB_FILE)
    args = ModelArgs.from_dict(state["model_args"])
    weights = consolidate_checkpoint(step_dir.parent, step_dir.name)
    # check the consolidated weights fit the model exactly before anything is written
    expected = ScLabelNet(args).state_dict()
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
        raise SclabelError(f"{step_dir}: consolidated weights do not match the model args saved with it")
    config = {
        "model_args": args.to_dict(),
        "tokenize": state["config"]["tokenize"],
        "pretrain": {"step": state["step"], "metrics": state.get("metrics", {}), "config": state["config"]},
    }
    return save_bundle(out_dir, weights, config, vocab, model_card(state, step_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sclabel export", description=__doc__)
    parser.add_argument(
        "checkpoint", help="a step_XXXXXXXX directory, or a checkpoint root (newest complete)"
    )
    parser.add_argument("out_dir", help="bundle directory to write (replaced if it already holds a bundle)")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"sclabel export: wrote {out}")
    return 0
