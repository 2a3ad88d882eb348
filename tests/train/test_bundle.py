"""The export bundle: round trip, checksums, and refusal of anything that is not a bundle."""

from __future__ import annotations

import json

import pytest
import torch

from sclabel_dist.bundle import load_bundle, save_bundle
from sclabel_dist.errors import SclabelError
from sclabel_dist.model.args import ModelArgs
from sclabel_dist.model.net import ScLabelNet
from sclabel_dist.vocab import GeneVocab


@pytest.fixture
def bundle_dir(tmp_path):
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=12, dim=16, depth=1, heads=2, num_bins=5)
    model = ScLabelNet(args)
    vocab = GeneVocab([f"G{i}" for i in range(10)])
    config = {"model_args": args.to_dict(), "tokenize": {"max_len": 8}, "labels": ["a", "b"]}
    out = save_bundle(tmp_path / "bundle", model.state_dict(), config, vocab, "# card")
    return out, model


def test_round_trip(bundle_dir):
    out, model = bundle_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "SHA256SUMS",
        "config.json",
        "model.safetensors",
        "vocab.json",
    ]
    bundle = load_bundle(out)
    assert bundle.config["labels"] == ["a", "b"] and bundle.config["format"] == "sclabel-bundle"
    assert bundle.vocab.hash == bundle.config["vocab_hash"] and len(bundle.vocab) == 10
    loaded = bundle.build_model()
    ids = torch.tensor([[1, 3, 4, 0]])
    vals = torch.tensor([[0, 2, 5, 0]])
    am = ids != 0
    model.eval()
    torch.testing.assert_close(loaded(ids, vals, am).mlm, model(ids, vals, am).mlm, atol=0, rtol=0)
    # a new classification head for fine-tuning starts fresh; the encoder weights are kept
    head = bundle.build_model(num_classes=3)
    assert head.cls_head.out_features == 3
    torch.testing.assert_close(head.gene_embed.weight, model.gene_embed.weight)


def test_tampering_and_non_bundles_are_refused(bundle_dir, tmp_path):
    out, _ = bundle_dir
    (out / "vocab.json").rename(out / "vocab.bak")
    with pytest.raises(SclabelError, match="vocab.json: missing"):
        load_bundle(out)
    (out / "vocab.bak").rename(out / "vocab.json")
    config = json.loads((out / "config.json").read_text())
    config["model_args"]["dim"] = 32
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SclabelError, match="config.json: checksum mismatch"):
        load_bundle(out)
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hello")
    with pytest.raises(SclabelError, match="no SHA256SUMS"):
        load_bundle(tmp_path / "random")
    with pytest.raises(SclabelError, match="not found"):
        load_bundle(tmp_path / "missing")
    with pytest.raises(SclabelError, match="refusing to overwrite"):
        save_bundle(tmp_path / "random", {}, {"model_args": {}, "tokenize": {}}, GeneVocab(["A"]), "")


def test_rewrite_replaces_a_bundle_atomically(bundle_dir):
    out, model = bundle_dir
    bundle = load_bundle(out)
    save_bundle(out, bundle.state_dict, {**bundle.config, "labels": ["c"]}, bundle.vocab, "# v2")
    assert load_bundle(out).config["labels"] == ["c"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
