"""ScLabelNet: shapes, padding invariance, parameter / FLOP counts, losses, flavours."""

from __future__ import annotations

import pytest
import torch

from sclabel_dist.config import ModelConfig, TokenizeConfig
from sclabel_dist.errors import SclabelError
from sclabel_dist.model.args import FLAVOURS, ModelArgs, build_model_args, count_params, flops_per_token
from sclabel_dist.model.net import ScLabelNet, mlm_loss


def make_args(**kw) -> ModelArgs:
    return ModelArgs(**{"vocab_size": 60, "dim": 32, "depth": 2, "heads": 4, "num_bins": 7, **kw})


def cells(lengths: list[int], width: int, continuous: bool = False, seed: int = 0):
    """Cells with the given real lengths, padded to `width`; cell i is the same whatever the width."""
    ids, vals = [], []
    for i, n in enumerate(lengths):
        g = torch.Generator().manual_seed(seed + i)
        row_ids = torch.cat([torch.tensor([1]), torch.randint(2, 60, (n - 1,), generator=g)])
        row_vals = torch.cat([torch.tensor([0]), torch.randint(1, 8, (n - 1,), generator=g)])
        ids.append(torch.nn.functional.pad(row_ids, (0, width - n)))
        vals.append(torch.nn.functional.pad(row_vals, (0, width - n)))
    ids, vals = torch.stack(ids), torch.stack(vals)
    am = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    return ids, (vals.float() / 3 if continuous else vals), am


@pytest.mark.parametrize("encoding", ["binned", "continuous"])
def test_shapes_and_param_count(encoding):
    args = make_args(value_encoding=encoding, num_classes=5)
    model = ScLabelNet(args)
    ids, vals, am = cells([10, 6], 10, continuous=encoding == "continuous")
    out = model(ids, vals, am)
    assert out.cell_embedding.shape == (2, 32)
    assert out.mlm.shape == ((2, 10, 7) if encoding == "binned" else (2, 10))
    assert out.logits.shape == (2, 5)
    assert sum(p.numel() for p in model.parameters()) == count_params(args)


@pytest.mark.parametrize("encoding", ["binned", "continuous"])
def test_padding_never_changes_a_cells_output(encoding):
    torch.manual_seed(0)
    model = ScLabelNet(make_args(value_encoding=encoding, num_classes=3)).eval()
    cont = encoding == "continuous"
    alone = model(*cells([7], 7, cont))
    batched = model(*cells([7, 19, 12], 19, cont))
    torch.testing.assert_close(batched.cell_embedding[0], alone.cell_embedding[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.mlm[0, :7], alone.mlm[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.logits[0], alone.logits[0], atol=1e-5, rtol=0)


def test_masked_values_use_the_mask_embedding_and_loss_reads_only_masked():
    torch.manual_seed(0)
    model = ScLabelNet(make_args())
    ids, vals, am = cells([8, 8], 8)
    masked = torch.zeros_like(am)
    masked[:, 3] = True
    out = model(ids, vals.masked_fill(masked, 0), am, masked)

    class B:  # the fields mlm_loss reads
        pass

    b = B()
    b.masked, b.targets = masked, vals
    loss, acc = mlm_loss(out, b)
    expected = torch.nn.functional.cross_entropy(out.mlm[:, 3], vals[:, 3] - 1)
    torch.testing.assert_close(loss, expected)
    assert 0.0 <= float(acc) <= 1.0
    loss.backward()
    assert model.mask_embed.grad.abs().sum() > 0
    # no masked token: zero loss, still differentiable
    b.masked = torch.zeros_like(am)
    zero, _ = mlm_loss(model(ids, vals, am), b)
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_activation_checkpointing_gives_same_gradients():
    ids, vals, am = cells([9, 5], 9)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = ScLabelNet(make_args(activation_checkpointing=ckpt))
        model(ids, vals, am).mlm.square().mean().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_flavours_and_flops():
    tok = TokenizeConfig(max_len=256, num_bins=51)
    small = build_model_args(ModelConfig(flavour="small"), tok, vocab_size=20_002)
    assert 8e6 < count_params(small) < 12e6  # the paper's scale
    base = build_model_args(ModelConfig(flavour="base"), tok, vocab_size=20_002)
    assert 50e6 < count_params(base, embeddings=False) < 110e6
    large = build_model_args(ModelConfig(flavour="large"), tok, vocab_size=20_002)
    assert count_params(large) > 300e6
    n = count_params(small, embeddings=False)
    assert flops_per_token(small, 256) == 6 * n + 12 * small.depth * small.dim * 256
    override = build_model_args(ModelConfig(flavour="debug", dim=48, heads=6), tok, vocab_size=100)
    assert (override.dim, override.heads, override.depth) == (48, 6, FLAVOURS["debug"][1])
    with pytest.raises(SclabelError, match="flavour"):
        build_model_args(ModelConfig(flavour="huge"), tok, vocab_size=100)


def test_args_json_round_trip_and_neutral_names():
    args = make_args(num_classes=2)
    assert ModelArgs.from_dict(args.to_dict()) == args
    with pytest.raises(SclabelError, match="unknown"):
        ModelArgs.from_dict({**args.to_dict(), "extra": 1})
    names = list(ScLabelNet(args).state_dict())
    assert not any(n.startswith(("module.", "_orig_mod.")) for n in names)
    assert "blocks.0.attn.qkv.weight" in names and "cls_head.weight" in names


def test_gene_bag_reaches_the_cell_embedding_and_is_required():
    torch.manual_seed(0)
    model = ScLabelNet(make_args(gene_bag=True, num_classes=3)).eval()
    assert sum(p.numel() for p in model.parameters()) == count_params(model.args)
    ids, vals, am = cells([6, 4], 6)
    bag_ids = torch.tensor([5, 9, 40, 41, 7])  # genes outside the tokens too
    offsets = torch.tensor([0, 3])
    weights = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0])
    out = model(ids, vals, am, bag=(bag_ids, offsets, weights))
    changed = weights.clone()
    changed[2] = 2.5  # cell 0 only
    out2 = model(ids, vals, am, bag=(bag_ids, offsets, changed))
    assert not torch.allclose(out.cell_embedding[0], out2.cell_embedding[0])
    torch.testing.assert_close(out.cell_embedding[1], out2.cell_embedding[1])
    with pytest.raises(ValueError, match="gene bag"):
        model(ids, vals, am)
    # bundles written before the bag existed have no such key: they load without one and ignore a bag
    old = ModelArgs.from_dict({k: v for k, v in make_args().to_dict().items() if k != "gene_bag"})
    assert not old.gene_bag and ScLabelNet(old).bag_norm is None


def test_mvc_predicts_masked_values_from_the_cell_embedding_in_pretraining_only():
    torch.manual_seed(0)
    model = ScLabelNet(make_args(mvc=True))
    assert sum(p.numel() for p in model.parameters()) == count_params(model.args)
    ids, vals, am = cells([8, 5], 8)
    masked = torch.zeros_like(am)
    masked[:, 2] = True

    class B:  # the fields mlm_loss reads
        pass

    b = B()
    b.masked, b.targets = masked, vals
    out = model(ids, vals.masked_fill(masked, 0), am, masked)
    assert out.mvc.shape == out.mlm.shape
    with_mvc, _ = mlm_loss(out, b)
    mlm_only, _ = mlm_loss(out._replace(mvc=None), b)
    assert with_mvc > mlm_only  # both objectives count
    # gradients reach the encoder through the cell embedding: the MVC head alone trains the CLS path
    out.mvc[masked].sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model(ids, vals, am).mvc is None  # inference: no masked positions, no MVC


def test_contrastive_views_are_deterministic_halves_and_train_the_cell_embedding():
    from sclabel_dist.model.net import half_view, info_nce

    torch.manual_seed(0)
    model = ScLabelNet(make_args(contrastive=1.0, gene_bag=True))
    assert sum(p.numel() for p in model.parameters()) == count_params(model.args)
    ids, vals, am = cells([12, 9, 5], 12)
    masked = torch.zeros_like(am)
    masked[:, 2] = True
    bag_ids = torch.arange(2, 32)
    offsets = torch.tensor([0, 10, 20])
    bag = (bag_ids, offsets, torch.rand(30) + 0.5)
    view = half_view(ids, vals, am, masked, bag)
    again = half_view(ids, vals, am, masked, bag)
    for a, b in zip(view[:3], again[:3], strict=True):
        assert torch.equal(a, b)  # no RNG: a resumed run sees the same views
    kept = view[2].sum(1) - 1  # real tokens of each cell in the half view, CLS aside
    real = am.sum(1) - 1
    assert (kept < real).all() and (kept >= 1).all()
    for i in range(3):  # a masked gene's value is the MLM's target: it never shows in the other view
        assert ids[i, 2] not in view[0][i][view[2][i].bool()][1:]
    assert (view[3][2] == 0).any() and (view[3][2] > 0).any()  # about half the bag kept

    class B:
        pass

    b = B()
    b.masked, b.targets = masked, vals
    model.train()
    out = model(ids, vals.masked_fill(masked, 0), am, masked, bag=bag)
    assert out.views.shape == (2, 3, 32)
    with_views, _ = mlm_loss(out, b, contrastive=1.0)
    mlm_only, _ = mlm_loss(out._replace(views=None), b)
    torch.testing.assert_close(with_views - mlm_only, info_nce(out.views[0], out.views[1]))
    info_nce(out.views[0], out.views[1]).backward()
    assert model.gene_embed.weight.grad.abs().sum() > 0 and model.bag_norm.weight.grad.abs().sum() > 0
    model.eval()
    assert model(ids, vals, am, bag=bag).views is None  # inference: no views, and no head in a classifier
    # bundles written before the objective existed have no such key and build without the head
    old = ModelArgs.from_dict({k: v for k, v in make_args().to_dict().items() if k != "contrastive"})
    assert old.contrastive == 0.0 and ScLabelNet(old).contrast_head is None
