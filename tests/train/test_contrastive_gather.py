"""model.contrastive_across_ranks: InfoNCE with every rank's cells as negatives (all_gather with gradients).

Two gloo processes hold 4 and 3 cells (ranks may differ: a short last batch); each one's loss and gradients
must be those of the one-process loss over all 7 cells, split by rank (what DeepSpeed's gradient average then
turns into the gradient of the mean)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sclabel_dist.model.net import info_nce

SPLIT = (slice(0, 4), slice(4, 7))


def _cells() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)


def _rank(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    a_all, b_all = _cells()
    a = a_all[SPLIT[rank]].clone().requires_grad_()
    b = b_all[SPLIT[rank]].clone().requires_grad_()
    loss = info_nce(a, b, across_ranks=True)
    loss.backward()
    torch.save((rank, loss.item(), a.grad, b.grad), f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_negatives_from_every_rank_give_the_one_process_loss_and_gradients(tmp_path) -> None:
    mp.start_processes(_rank, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    a, b = (t.clone().requires_grad_() for t in _cells())
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / 0.1
    target = torch.arange(7)
    per_a = F.cross_entropy(logits, target, reduction="none")
    per_b = F.cross_entropy(logits.T, target, reduction="none")
    local = [0.5 * (per_a[s].mean() + per_b[s].mean()) for s in SPLIT]
    for (rank, loss, _, _), expected in zip(got, local, strict=True):
        assert abs(loss - expected.item()) < 1e-6, rank
    (sum(local) / 2).backward()  # the mean over ranks, as the data-parallel average makes it
    grad_a = torch.cat([g[2] for g in got]) / 2
    grad_b = torch.cat([g[3] for g in got]) / 2
    torch.testing.assert_close(grad_a, a.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_b, b.grad, atol=1e-6, rtol=1e-5)
    # the rank-local loss differs: the test would fail if the gather did nothing
    assert abs(info_nce(_cells()[0][:4], _cells()[1][:4]).item() - got[0][1]) > 1e-3
