"""Tokenisation and masking: gene selection, binning, continuous values, CLS/pad, mask rules, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import tokenize_oracle as oracle
import torch
from tokenize_oracle import bin_values, mask_tokens

from sclabel_dist.config import TokenizeConfig
from sclabel_dist.data.masking import num_masked
from sclabel_dist.data.tokenize import tokenize_csr
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import CLS_ID, NUM_SPECIAL, PAD_ID


@pytest.fixture(autouse=True, params=["numba", "numpy"])
def backend(request, monkeypatch) -> str:
    """Every test runs against the compiled kernels and, in their place, their numpy oracle."""
    if request.param == "numpy":
        from sclabel_dist.data import kernels

        monkeypatch.setattr(kernels, "numba_arrays", oracle.numpy_arrays)
        monkeypatch.setattr(kernels, "numba_gene_bag", oracle.gene_bag_arrays)
        monkeypatch.setattr(kernels, "numba_tokens", oracle.numpy_tokens)
    return request.param


def cfg(**kw) -> TokenizeConfig:
    return TokenizeConfig(**{"max_len": 5, "num_bins": 4, **kw})


def csr(rows: list[list[float]]) -> sp.csr_matrix:
    return sp.csr_matrix(np.array(rows, dtype=np.float32))


def test_cls_pad_and_gene_ids_edge_cases():
    m = csr([[0, 0, 0, 0, 0, 0], [0, 0, 7, 0, 0, 0], [1, 2, 0, 0, 0, 3]])  # empty, single gene, few genes
    b = tokenize_csr(m, cfg(), value_kind="counts", train=False, mask=False)
    assert b.gene_ids.dtype == torch.int64 and b.values.dtype == torch.int64
    assert b.gene_ids.shape == (3, 4)  # padded to the longest cell: CLS + 3 genes
    assert (b.gene_ids[:, 0] == CLS_ID).all() and (b.values[:, 0] == 0).all()
    assert b.gene_ids[0].tolist() == [CLS_ID, PAD_ID, PAD_ID, PAD_ID]
    assert b.gene_ids[1].tolist() == [CLS_ID, 2 + NUM_SPECIAL, PAD_ID, PAD_ID]
    assert b.gene_ids[2].tolist() == [CLS_ID, 0 + NUM_SPECIAL, 1 + NUM_SPECIAL, 5 + NUM_SPECIAL]
    assert b.attention_mask.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert b.values[1, 1] == 1  # a single gene is in the lowest bin
    assert b.values[2, 1:].tolist() == [1, 2, 3]  # 1 + floor(4 * r / 3)
    assert not b.masked.any() and b.labels is None
    padded = tokenize_csr(m, cfg(pad_to_max_len=True), value_kind="counts", train=False, mask=False)
    assert padded.gene_ids.shape == (3, 5)


def test_ties_share_a_bin_and_top_selection_breaks_ties_by_gene_index():
    m = csr([[2, 2, 2, 2, 2, 2, 9]])
    b = tokenize_csr(m, cfg(max_len=4), value_kind="counts", train=False, mask=False)
    # Top 3 by value: gene 6 (9) then the lowest-index genes among the tied 2s; output in gene order.
    assert b.gene_ids[0].tolist() == [CLS_ID, 0 + NUM_SPECIAL, 1 + NUM_SPECIAL, 6 + NUM_SPECIAL]
    # Bins over ALL 7 genes, before the subset: the six 2s share bin 1, the 9 is 1 + floor(4 * 6 / 7) = 4.
    assert b.values[0].tolist() == [0, 1, 1, 4]


def test_bin_values_range_and_monotone():
    rng = np.random.default_rng(0)
    m = sp.random(50, 200, density=0.3, format="csr", random_state=1, dtype=np.float32)
    m.data = np.ceil(m.data * 20)
    bins = bin_values(m.indptr.astype(np.int64), m.data, 51)
    assert bins.min() >= 1 and bins.max() <= 51
    for i in rng.choice(50, 5):
        sl = slice(m.indptr[i], m.indptr[i + 1])
        order = np.argsort(m.data[sl], kind="stable")
        assert (np.diff(bins[sl][order]) >= 0).all()


def test_random_selection_is_seeded_and_bounded():
    m = csr([list(range(1, 21))])
    c = cfg(max_len=8)
    a = tokenize_csr(m, c, value_kind="counts", train=True, mask=False, rng=np.random.default_rng(1))
    b = tokenize_csr(m, c, value_kind="counts", train=True, mask=False, rng=np.random.default_rng(1))
    d = tokenize_csr(m, c, value_kind="counts", train=True, mask=False, rng=np.random.default_rng(2))
    assert torch.equal(a.gene_ids, b.gene_ids) and not torch.equal(a.gene_ids, d.gene_ids)
    assert a.attention_mask.sum() == 8
    genes = a.gene_ids[0, 1:]
    assert (genes[1:] > genes[:-1]).all()  # kept in gene order


def test_continuous_uses_total_before_subsetting_and_lognorm_as_is():
    row = np.array([[1, 3, 0, 6, 10]], dtype=np.float32)
    c = cfg(max_len=3, value_encoding="continuous")
    b = tokenize_csr(csr(row), c, value_kind="counts", train=False, mask=False)
    assert b.values.dtype == torch.float32
    expect = np.log1p(np.array([6, 10]) / 20 * 1e4)  # total 20 over all four genes
    np.testing.assert_allclose(b.values[0, 1:].numpy(), expect, rtol=1e-6)
    ln = tokenize_csr(csr(row / 10), c, value_kind="lognorm", train=False, mask=False)
    np.testing.assert_allclose(ln.values[0, 1:].numpy(), [0.6, 1.0], rtol=1e-6)
    # Binning is rank based: a log-normalised copy bins exactly like its counts.
    cb = tokenize_csr(csr(row), cfg(), value_kind="counts", train=False, mask=False)
    lb = tokenize_csr(
        csr(np.log1p(row / row.sum() * 1e4)), cfg(), value_kind="lognorm", train=False, mask=False
    )
    assert torch.equal(cb.values, lb.values)


def test_masking_rules():
    rng = np.random.default_rng(0)
    m = sp.random(40, 30, density=0.4, format="csr", random_state=0, dtype=np.float32)
    m.data = np.ceil(m.data * 10)
    m = m.tolil()
    m[0] = 0
    m[1] = 0
    m[1, 3] = 5
    m = m.tocsr()
    m.eliminate_zeros()
    b = tokenize_csr(m, cfg(max_len=16, mask_ratio=0.25), value_kind="counts", train=True, mask=True, rng=rng)
    assert not (b.masked & ~b.attention_mask).any()  # never pad
    assert not b.masked[:, 0].any()  # never CLS
    real = b.attention_mask.sum(1) - 1
    assert torch.equal(b.masked.sum(1), torch.from_numpy(num_masked(real.numpy(), 0.25)))
    assert b.masked[1].sum() == 1 and b.masked[0].sum() == 0  # one gene -> masked; empty -> none
    assert (b.values[b.masked] == 0).all() and (b.targets[b.masked] > 0).all()
    assert torch.equal(b.values[~b.masked], b.targets[~b.masked])


def test_kernels_agree_with_the_oracle_at_evaluation(backend):
    if backend != "numba":
        pytest.skip("compares the kernels with the oracle")
    from sclabel_dist.data.tokenize import tokenize_block

    rng = np.random.default_rng(3)
    m = sp.random(64, 300, density=0.2, format="csr", random_state=4, dtype=np.float32)
    m.data = np.ceil(m.data * 50)
    m[5] = m[5] * 0.37  # a non-integer row takes the sorting path of the binning
    m = m.tocsr()
    for enc in ("binned", "continuous"):
        c = cfg(max_len=40, value_encoding=enc, num_bins=11)
        lognorm = rng.random(64) < 0.3
        fast = tokenize_block(m.indptr, m.indices, m.data, lognorm, c, train=False, mask=False, rng=None)
        ids, values, *_ = oracle.numpy_arrays(
            m.indptr.astype(np.int64), m.indices, m.data, lognorm, c, "top", False, None
        )
        assert torch.equal(fast.gene_ids, torch.from_numpy(ids))
        torch.testing.assert_close(fast.values, torch.from_numpy(values))


def test_mask_tokens_exact_counts():
    indptr = np.array([0, 0, 1, 11, 111])
    out = mask_tokens(indptr, 0.15, np.random.default_rng(0))
    assert [out[a:b].sum() for a, b in zip(indptr[:-1], indptr[1:], strict=True)] == [0, 1, 2, 15]


def test_eval_output_independent_of_other_cells():
    rng = np.random.default_rng(5)
    m = sp.random(30, 40, density=0.5, format="csr", random_state=2, dtype=np.float32)
    m.data = np.ceil(m.data * 9)
    c = cfg(max_len=12, pad_to_max_len=True)
    whole = tokenize_csr(m, c, value_kind="counts", train=False, mask=False)
    for i in rng.choice(30, 5):
        one = tokenize_csr(m[[i]], c, value_kind="counts", train=False, mask=False)
        assert torch.equal(one.gene_ids[0], whole.gene_ids[i]) and torch.equal(one.values[0], whole.values[i])


def test_labels_and_config_errors():
    b = tokenize_csr(csr([[1, 0]]), cfg(), value_kind="counts", train=False, mask=False, labels=np.array([3]))
    assert b.labels.tolist() == [3]
    with pytest.raises(SclabelError):
        tokenize_csr(csr([[1, 0]]), cfg(max_len=1), value_kind="counts", train=False, mask=False)
    with pytest.raises(SclabelError):
        tokenize_csr(csr([[1, 0]]), cfg(), value_kind="tpm", train=False, mask=False)
    with pytest.raises(SclabelError):
        tokenize_csr(csr([[-1, 0]]), cfg(), value_kind="counts", train=False, mask=False)


def test_gene_bag_holds_every_gene_with_lognorm_weights_and_hides_masked_ones():
    counts = np.array([[5, 1, 0, 3, 2, 4, 0, 6], [0, 0, 2, 0, 0, 0, 0, 0]], dtype=np.float32)
    m = csr(counts.tolist())
    b = tokenize_csr(
        m, cfg(max_len=3), value_kind="counts", train=True, mask=False, rng=np.random.default_rng(0)
    )
    assert b.gene_ids.shape[1] == 3  # two genes per cell in the tokens ...
    ids, offsets, weights = b.bag
    assert offsets.tolist() == [0, 6]  # ... but all six (and one) in the bag
    assert ids.tolist() == [g + NUM_SPECIAL for g in (0, 1, 3, 4, 5, 7, 2)]
    expected = np.log1p(counts[0][[0, 1, 3, 4, 5, 7]] / counts[0].sum() * 1e4)
    np.testing.assert_allclose(weights[:6].numpy(), expected, rtol=1e-6)

    masked = tokenize_csr(
        m,
        cfg(max_len=8, mask_ratio=0.5),
        value_kind="counts",
        train=True,
        mask=True,
        rng=np.random.default_rng(1),
    )
    ids, offsets, weights = masked.bag
    hidden = {(0, int(g)) for g in masked.gene_ids[0][masked.masked[0]]}
    assert hidden  # the test needs a masked gene
    for j in range(6):
        assert (weights[j] == 0) == ((0, int(ids[j])) in hidden)

    off = tokenize_csr(m, cfg(gene_bag=False), value_kind="counts", train=False, mask=False)
    assert off.bag is None and off.bag_ids is None


def test_gene_bag_hides_masked_genes_in_rows_with_unsorted_genes_too(backend):
    from sclabel_dist.data import kernels

    gene_bag_arrays = kernels.numba_gene_bag  # the oracle under the numpy param (the fixture swaps it in)
    indptr = np.array([0, 3, 5])
    data = np.array([1.0, 2.0, 3.0, 4.0, 5.0], dtype=np.float32)
    gene_ids = np.array(
        [[CLS_ID, 5 + NUM_SPECIAL, 9 + NUM_SPECIAL], [CLS_ID, 1 + NUM_SPECIAL, 4 + NUM_SPECIAL]]
    )
    masked = np.array([[False, False, True], [False, True, False]])
    for indices in (np.array([2, 5, 9, 1, 4]), np.array([9, 2, 5, 4, 1])):  # sorted rows, then unsorted
        ids, offsets, weights = gene_bag_arrays(indptr, indices, data, np.zeros(2, bool), gene_ids, masked)
        hidden = {int(ids[j]) - NUM_SPECIAL for j in range(5) if weights[j] == 0}
        assert hidden == {9, 1} and offsets.tolist() == [0, 3]


def test_gene_bag_kernel_matches_the_numpy_reference(backend):
    if backend != "numba":
        pytest.skip("compares the kernel with the oracle")
    from tokenize_oracle import gene_bag_arrays

    from sclabel_dist.data.kernels import numba_gene_bag

    rng = np.random.default_rng(3)
    m = sp.random(
        40, 300, density=0.2, random_state=4, format="csr", data_rvs=lambda n: rng.integers(1, 50, n)
    )
    m = m.astype(np.float32)
    b = tokenize_csr(m, cfg(max_len=20, mask_ratio=0.3), value_kind="counts", train=True, mask=True, rng=rng)
    lognorm = np.zeros(40, bool)
    lognorm[::3] = True  # log-normalised rows are read as they are
    args = (m.indptr.astype(np.int64), m.indices, m.data, lognorm, b.gene_ids.numpy(), b.masked.numpy())
    ref, fast = gene_bag_arrays(*args), numba_gene_bag(*args)
    np.testing.assert_array_equal(ref[0], fast[0])
    np.testing.assert_array_equal(ref[1], fast[1])
    np.testing.assert_allclose(ref[2], fast[2], rtol=1e-6)
    assert (ref[2] == 0).sum() == b.masked.sum() > 0


def test_row_gather_kernel_matches_the_numpy_reference(backend):
    if backend != "numba":
        pytest.skip("compares the kernel with the oracle")
    from sclabel_dist.data.kernels import take_rows

    m = sp.random(50, 80, density=0.3, format="csr", random_state=6, dtype=np.float32)
    rows = np.random.default_rng(7).permutation(50)[:30]
    args = (m.indptr.astype(np.int64), m.indices.astype(np.uint16), m.data, rows)
    for got, want in zip(take_rows(*args), oracle.take_rows(*args), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("encoding", ["binned", "continuous"])
def test_rows_read_in_place_give_the_batch_of_the_gathered_rows(backend, encoding):
    """numba_tokens(rows=..., bag=True) reads a batch's rows where they lie and makes its bag in the same pass:
    bit for bit what take_rows, then the tokeniser, then the gene bag give (sorted and unsorted rows)."""
    if backend != "numba":
        pytest.skip("compares the fused kernel with the kernels it replaces in the loader")
    from sclabel_dist.data.kernels import numba_arrays, numba_gene_bag, numba_tokens, take_rows

    rng = np.random.default_rng(11)
    m = sp.random(
        60, 400, density=0.15, random_state=5, format="csr", data_rvs=lambda n: rng.integers(1, 90, n)
    )
    indptr, indices, data = m.indptr.astype(np.int64), m.indices.astype(np.uint16), m.data.astype(np.float32)
    data[:40] *= 0.37  # non-integer values in the first rows: the sorting path of the binning
    for i in (3, 7):  # unsorted genes, one of them twice
        s, e = indptr[i], indptr[i + 1]
        indices[s:e] = indices[s:e][::-1].copy()
        indices[s] = indices[e - 1]
    lognorm = rng.random(60) < 0.3
    rows = rng.integers(0, 60, size=90)  # repeats and any order, as a shuffled window gives
    for train in (True, False):
        c = cfg(max_len=30, value_encoding=encoding, num_bins=11, mask_ratio=0.3)
        how = "random" if train else "top"
        arrays, bag = numba_tokens(
            indptr, indices, data, lognorm, c, how, train, np.random.default_rng(2), rows=rows, bag=True
        )
        g_indptr, g_indices, g_data = take_rows(indptr, indices, data, rows)
        want = numba_arrays(
            g_indptr, g_indices, g_data, lognorm[rows], c, how, train, np.random.default_rng(2)
        )
        want_bag = numba_gene_bag(g_indptr, g_indices, g_data, lognorm[rows], want[0], want[3])
        assert train is False or want[3].any()
        for got, ref in zip((*arrays, *bag), (*want, *want_bag), strict=True):
            assert got.dtype == ref.dtype and got.shape == ref.shape
            np.testing.assert_array_equal(got, ref)
    with pytest.raises(IndexError):
        numba_tokens(indptr, indices, data, lognorm, cfg(), "top", False, None, rows=np.array([60]))


def test_keyed_cells_draw_the_same_subset_and_mask_in_any_batch(backend):
    """cell_keys (the world-size-invariant order): a cell's random gene subset and mask depend on the rng's
    seeds and its key, not on which batch it is in or where; unkeyed, the place in the batch decides."""
    if backend == "numpy":
        pytest.skip("keyed draws are the compiled kernel's (the oracle draws its own randomness)")
    from sclabel_dist.data.tokenize import tokenize_block

    m = sp.random(12, 200, density=0.3, format="csr", random_state=1, dtype=np.float32)
    m.data = np.ceil(m.data * 20)
    c = cfg(max_len=33, mask_ratio=0.3)  # ~60 genes per cell: a random subset of 32 too

    def tokens(rows, keys):
        b = tokenize_block(
            m.indptr,
            m.indices,
            m.data,
            np.zeros(12, bool),
            c,
            train=True,
            mask=True,
            rng=np.random.default_rng(7),
            rows=np.array(rows),
            cell_keys=None if keys is None else np.array(keys),
        )
        return {r: (b.gene_ids[i].tolist(), b.masked[i].tolist()) for i, r in enumerate(rows)}

    whole = tokens(range(12), [100 + r for r in range(12)])
    part = tokens([7, 2, 9], [107, 102, 109])
    assert all(part[r] == whole[r] for r in part)
    assert len({tuple(v[1]) for v in whole.values()}) == 12
    # the control: without keys a cell's draws follow its place in the batch
    assert tokens([7, 2, 9], None)[7] != tokens(range(12), None)[7]
