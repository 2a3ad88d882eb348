"""The synthetic atlas model: seeded parameters and a vectorised negative-binomial sampler of cell chunks.

Model (all parameters drawn from ``SeedSequence(seed, spawn_key=(0,))``):

* genes have lognormal baseline means and lognormal NB dispersions (size ``r_g``);
* cell types sit in lineages; each lineage and each type up-regulates its own marker genes
  (programmes) on top of the shared baseline, so types are separable but related;
* cell-type proportions are Zipf-like (exponent ``imbalance``): a few common types, a tail of rare ones;
  each tissue re-weights them, and each batch belongs to one tissue;
* batches scale genes (lognormal batch effect) and library sizes; library sizes are lognormal, with
  their median calibrated so that the mean number of non-zeros per cell is ``nnz_per_cell``;
* counts are negative binomial: ``y ~ Poisson(lib * mean_tg * batch_bg * w)``, ``w ~ Gamma(r_g, 1/r_g)``.

Determinism: cells are generated in chunks of ``CHUNK_CELLS``; chunk ``i`` uses its own generator
``SeedSequence(seed, spawn_key=(1, i))``. Cell ``k`` is therefore the same whatever block size the caller
writes with, and the first N cells of a larger run equal a run of N cells.

Sampling cost is O(non-zeros), not O(cells x genes), and the counts are exactly NB per gene:

* which genes are non-zero. A type's "dense" genes (mean >= DENSE_MEAN at the median library) get a
  Bernoulli(P_NB(y > 0)) draw each. The other genes are found by thinning a Poisson process: candidates are
  drawn (alias method, per type) at an upper bound of their rate, and a candidate is kept with probability
  P_NB(y > 0) / P_Poisson(y > 0 | bound), which is <= 1 because an NB has more zeros than a Poisson of the
  same mean (and the bound is above the mean);
* how much. A kept gene's count is drawn from the zero-truncated NB by inverse CDF; the uniform used for the
  keep decision is reused, since given "kept" it is uniform on (0, P_NB(y > 0)). Large means fall back to
  gamma-Poisson draws with zeros redrawn.

numpy notes: np.take / np.compress are several times faster than fancy / boolean indexing on this path,
and int32 keys sort several times faster than int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import brentq
from scipy.special import ndtri

from sclabel_dist.errors import SclabelError

CHUNK_CELLS = 256  # the RNG unit: part of the data definition (changing it changes the data)
_MODEL_KEY, _CHUNK_KEY, _CALIB_KEY = 0, 1, 2
_CALIB_CELLS = 256  # stratified sample for the library-size calibration
GENE_LOG_SD = 1.8  # spread of baseline gene means (log scale)
LIB_LOG_SD = 0.45  # spread of library sizes within a batch
BATCH_GENE_SD = 0.25  # per-gene batch effect (log scale)
BATCH_LIB_SD = 0.25  # per-batch library-size shift (log scale)
DENSE_MEAN = 0.7  # genes whose mean at the median library reaches this are sampled densely
_TRUNC_BIG_MEAN = 6.0  # zero-truncated NB: above this mean, gamma-Poisson with rejection of zeros
_TRUNC_MAX_ITER = 64  # inverse-CDF steps before falling back to rejection


@dataclass(frozen=True)
class SynthParams:
    """What defines a synthetic atlas; equal params and seed give identical data."""

    num_genes: int = 20_000
    num_cell_types: int = 20
    num_batches: int = 4
    num_tissues: int = 3
    nnz_per_cell: float = 1500.0
    imbalance: float = 1.2
    seed: int = 0

    def check(self) -> None:
        """Raise SclabelError on values the model cannot honour."""
        # int32 keys: cell * G + gene within a chunk, and type * G + gene in the alias tables.
        max_genes = 2**31 // max(CHUNK_CELLS, self.num_cell_types)
        if not 10 <= self.num_genes <= max_genes:
            raise SclabelError(f"--genes {self.num_genes}: must be between 10 and {max_genes}")
        for name, v in (("--cell-types", self.num_cell_types), ("--batches", self.num_batches)):
            if v < 1:
                raise SclabelError(f"{name} {v}: must be at least 1")
        if self.num_tissues < 1:
            raise SclabelError(f"--tissues {self.num_tissues}: must be at least 1")
        if not 1 <= self.nnz_per_cell <= 0.6 * self.num_genes:
            raise SclabelError(
                f"--nnz-per-cell {self.nnz_per_cell}: must be between 1 and 60% of --genes ({self.num_genes})"
            )
        if self.imbalance < 0:
            raise SclabelError(f"--imbalance {self.imbalance}: must be >= 0 (0 = balanced)")
        if self.seed < 0:
            raise SclabelError(f"--seed {self.seed}: must be >= 0")


@dataclass
class SynthModel:
    """All parameters of one atlas: names, proportions, gene means per type and batch, alias tables."""

    params: SynthParams
    gene_names: list[str]
    ensembl_ids: list[str]
    type_names: list[str]
    batch_names: list[str]
    tissue_names: list[str]
    batch_cdf: np.ndarray  # [B] cumulative batch proportions
    batch_tissue: np.ndarray  # [B] tissue of each batch
    type_cdf: np.ndarray  # [T, K] cumulative type proportions per tissue
    type_props: np.ndarray  # [K] overall expected type proportions
    type_mean: np.ndarray  # [K, G] float32 gene fractions per type (rows sum to 1)
    batch_factor: np.ndarray  # [B, G] float32 multiplicative batch effect
    batch_factor_max: np.ndarray  # [G] float32 max over batches (the rate bound for thinning)
    batch_lib: np.ndarray  # [B] log library-size shift
    dispersion: np.ndarray  # [G] float32 NB size r_g
    log_lib_median: float  # calibrated log median library size
    dense_genes: list[np.ndarray]  # per type: int32 sorted gene indices sampled densely
    is_dense: np.ndarray  # [K, G] bool
    alias_prob: np.ndarray  # [K, G] float32 alias acceptance for the sparse genes
    alias_idx: np.ndarray  # [K, G] int32 alias targets
    sparse_rate: np.ndarray  # [K] total upper-bound rate of sparse genes per unit library

    @property
    def num_genes(self) -> int:
        return self.params.num_genes


def _alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias table for sampling index i with probability weights[i] / sum (O(n) build)."""
    n = len(weights)
    total = float(weights.sum())
    prob = (weights * (n / total)).astype(np.float64) if total > 0 else np.ones(n)
    alias = np.arange(n, dtype=np.int32)
    small = [int(i) for i in np.flatnonzero(prob < 1.0)]
    large = [int(i) for i in np.flatnonzero(prob >= 1.0)]
    p = prob.tolist()
    while small and large:
        s, g = small.pop(), large[-1]
        alias[s] = g
        p[g] -= 1.0 - p[s]
        if p[g] < 1.0:
            small.append(large.pop())
    out = np.asarray(p, dtype=np.float64)
    out[large] = 1.0  # rounding leftovers keep themselves
    out[small] = 1.0
    return out.astype(np.float32), alias


def _zipf_props(k: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, k + 1, dtype=np.float64) ** exponent
    return p / p.sum()


def _expected_nnz(lib: np.ndarray, means: np.ndarray, r: np.ndarray) -> float:
    """Mean over cells of sum_g P_NB(y > 0) with rate lib_c * means[c, g] and size r_g."""
    lam = lib[:, None] * means
    return float((-np.expm1(-r * np.log1p(lam / r))).sum(axis=1, dtype=np.float64).mean())


def build_model(params: SynthParams) -> SynthModel:
    """Draw every parameter of the atlas from the seed (deterministic; ~0.1 s per 1,000 genes x 20 types)."""
    params.check()
    rng = np.random.default_rng(np.random.SeedSequence(params.seed, spawn_key=(_MODEL_KEY,)))
    g, k, b = params.num_genes, params.num_cell_types, params.num_batches
    t = min(params.num_tissues, b)
    log_base = rng.normal(0.0, GENE_LOG_SD, g)
    dispersion = np.clip(np.exp(rng.normal(np.log(2.0), 0.6, g)), 0.2, 50.0)

    # Programmes: markers are lifted to a high baseline quantile times a fold, so they are visibly "on".
    lift = np.quantile(log_base, 0.9)
    n_markers = max(3, g // 150)
    num_lineages = max(1, round(np.sqrt(k)))
    lineage_of_type = np.arange(k) % num_lineages
    log_type = np.repeat(log_base[None, :], k, axis=0)
    for lin in range(num_lineages):
        genes = rng.choice(g, n_markers, replace=False)
        fold = rng.normal(np.log(3.0), 0.4, n_markers)
        rows = np.flatnonzero(lineage_of_type == lin)
        log_type[np.ix_(rows, genes)] = np.maximum(log_base[genes], lift) + fold
    for ti in range(k):
        genes = rng.choice(g, n_markers, replace=False)
        log_type[ti, genes] = np.maximum(log_base[genes], lift) + rng.normal(np.log(6.0), 0.5, n_markers)
    log_type += rng.normal(0.0, 0.1, (k, g))  # small type-specific noise on every gene
    type_mean = np.exp(log_type - log_type.max(axis=1, keepdims=True))
    type_mean /= type_mean.sum(axis=1, keepdims=True)

    batch_factor = np.exp(rng.normal(0.0, BATCH_GENE_SD, (b, g)))
    batch_lib = rng.normal(0.0, BATCH_LIB_SD, b)
    batch_props = rng.dirichlet(np.full(b, 4.0))
    batch_tissue = np.arange(b) % t
    # Tissues re-weight the global Zipf proportions; type 0 is the most common overall.
    global_props = _zipf_props(k, params.imbalance)
    tissue_w = global_props[None, :] * np.exp(rng.normal(0.0, 0.8, (t, k)))
    tissue_props = tissue_w / tissue_w.sum(axis=1, keepdims=True)
    type_props = (batch_props[:, None] * tissue_props[batch_tissue]).sum(axis=0)

    # Calibrate the median library size: a stratified sample of cells (systematic over the (type, batch)
    # proportions, library quantiles in a seeded order) and a root find of mean expected nnz = target.
    crng = np.random.default_rng(np.random.SeedSequence(params.seed, spawn_key=(_CALIB_KEY,)))
    joint = (batch_props[:, None] * tissue_props[batch_tissue]).ravel()  # [B * K], batch-major
    strata = (np.arange(_CALIB_CELLS) + 0.5) / _CALIB_CELLS
    combo = np.minimum(np.searchsorted(np.cumsum(joint), strata), len(joint) - 1)
    cal_batch, cal_type = combo // k, combo % k
    cal_means = (type_mean[cal_type] * batch_factor[cal_batch]).astype(np.float32)
    cal_lib = np.exp(batch_lib[cal_batch] + LIB_LOG_SD * ndtri(crng.permutation(strata))).astype(np.float32)
    r32 = dispersion.astype(np.float32)

    def excess(log_scale: float) -> float:
        lib = np.float32(np.exp(log_scale)) * cal_lib
        return _expected_nnz(lib, cal_means, r32) - params.nnz_per_cell

    log_lib_median = float(brentq(excess, -5.0, 30.0, xtol=1e-4))

    # Dense genes of a type: mean count >= DENSE_MEAN at the median library (upper bound over batches).
    bound = type_mean * batch_factor.max(axis=0)[None, :]
    is_dense = bound * np.exp(log_lib_median) >= DENSE_MEAN
    sparse_w = np.where(is_dense, 0.0, bound)
    alias_prob = np.empty((k, g), np.float32)
    alias_idx = np.empty((k, g), np.int32)
    for ti in range(k):
        alias_prob[ti], alias_idx[ti] = _alias_table(sparse_w[ti])

    return SynthModel(
        params=params,
        gene_names=[f"SYN{i + 1:05d}" for i in range(g)],
        ensembl_ids=[f"ENSSYNG{i + 1:011d}" for i in range(g)],
        type_names=[f"celltype_{i:02d}" for i in range(k)],
        batch_names=[f"batch_{i:02d}" for i in range(b)],
        tissue_names=[f"tissue_{i:02d}" for i in range(t)],
        batch_cdf=np.cumsum(batch_props),
        batch_tissue=batch_tissue,
        type_cdf=np.cumsum(tissue_props, axis=1),
        type_props=type_props,
        type_mean=type_mean.astype(np.float32),
        batch_factor=batch_factor.astype(np.float32),
        batch_factor_max=batch_factor.max(axis=0).astype(np.float32),
        batch_lib=batch_lib,
        dispersion=dispersion.astype(np.float32),
        log_lib_median=log_lib_median,
        dense_genes=[np.flatnonzero(row).astype(np.int32) for row in is_dense],
        is_dense=is_dense,
        alias_prob=alias_prob,
        alias_idx=alias_idx,
        sparse_rate=sparse_w.sum(axis=1),
    )


def _truncated_nb(
    rng: np.random.Generator,
    lam: np.ndarray,
    r: np.ndarray,
    log_p0: np.ndarray,
    target: np.ndarray,
    keep: np.ndarray,
) -> np.ndarray:
    """Zero-truncated NB(mean lam, size r) draws (int32) where `keep`, given log P(y = 0) and a uniform on
    (0, P(y > 0)); elements not kept are left at 1 (the caller drops them: cheaper than compacting first).

    Small means (the vast majority): inverse CDF of `target`, walking the pmf recursion for all elements at
    once (most stop at y = 1). Large means: gamma-Poisson draws with zeros redrawn (fresh randomness).
    """
    y = np.ones(len(lam), np.int32)
    q = lam / (lam + r)
    pmf = r * q * np.exp(log_p0)  # P(y = 1)
    small = lam <= _TRUNC_BIG_MEAN
    idx = np.flatnonzero(small & keep & (target > pmf))
    pmf, q, r_a, target = (np.take(a, idx) for a in (pmf, q, r, target))
    cum = pmf.copy()
    ya = np.ones(len(idx), np.float32)
    more = np.ones(len(idx), bool)
    for _ in range(_TRUNC_MAX_ITER):
        num_more = int(np.count_nonzero(more))
        if num_more == 0:
            break
        if num_more < len(more) // 4:  # compact: write back finished elements, walk on with the rest
            y[idx] = ya
            idx, pmf, cum, q, r_a, target, ya = (
                np.compress(more, a) for a in (idx, pmf, cum, q, r_a, target, ya)
            )
            more = np.ones(num_more, bool)
        pmf *= (ya + r_a) / (ya + 1.0) * q  # pmf(y + 1) from pmf(y); finished elements' cum only grows
        cum += pmf
        ya += more
        more = target > cum
    y[idx] = ya
    rest = np.concatenate([np.flatnonzero(~small & keep), np.compress(more, idx)])  # `more`: float round-off
    if len(rest):
        lam_b, r_b = np.take(lam, rest).astype(np.float64), np.take(r, rest).astype(np.float64)
        draw = rng.poisson(lam_b * rng.standard_gamma(r_b) / r_b)
        while (zero := np.flatnonzero(draw == 0)).size:
            draw[zero] = rng.poisson(lam_b[zero] * rng.standard_gamma(r_b[zero]) / r_b[zero])
        y[rest] = draw
    return y


def _cells(model: SynthModel, rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """Per cell: batch, tissue, type (int32 codes) and library size (float32)."""
    batch = np.minimum(
        np.searchsorted(model.batch_cdf, rng.random(n), side="right"), len(model.batch_cdf) - 1
    )
    tissue = model.batch_tissue[batch]
    cdf = model.type_cdf[tissue]
    ctype = np.minimum((rng.random(n)[:, None] >= cdf).sum(axis=1), cdf.shape[1] - 1)
    lib = np.exp(model.log_lib_median + model.batch_lib[batch] + rng.normal(0.0, LIB_LOG_SD, n))
    return batch.astype(np.int32), tissue.astype(np.int32), ctype.astype(np.int32), lib.astype(np.float32)


def _dense_hits(model: SynthModel, rng: np.random.Generator, ctype, batch, lib) -> list[np.ndarray]:
    """Keys (cell * G + gene) of non-zero dense genes: Bernoulli(P_NB(y > 0)) per type's [cells, D_t]."""
    g = np.int32(model.num_genes)
    keys = []
    for t in np.unique(ctype):
        cells = np.flatnonzero(ctype == t).astype(np.int32)
        d = model.dense_genes[t]
        bf = np.take(np.take(model.batch_factor, d, axis=1), np.take(batch, cells), axis=0)
        lam = np.take(lib, cells)[:, None] * np.take(model.type_mean[t], d) * bf
        r = np.take(model.dispersion, d)
        p_nb = -np.expm1(-r * np.log1p(lam / r))
        hit = np.flatnonzero(rng.random(lam.shape, dtype=np.float32) < p_nb).astype(np.int32)
        row, col = hit // np.int32(len(d)), hit % np.int32(len(d))
        keys.append(np.take(cells, row) * g + np.take(d, col))
    return keys


def _sparse_candidates(model: SynthModel, rng: np.random.Generator, ctype, lib) -> np.ndarray:
    """Keys of candidate sparse genes: a Poisson process at the bound rate, alias draws per cell type."""
    g = np.int32(model.num_genes)
    num_draws = rng.poisson(lib * np.take(model.sparse_rate, ctype))
    cell = np.repeat(np.arange(len(lib), dtype=np.int32), num_draws)
    j = rng.integers(0, g, len(cell), dtype=np.int32)
    flat = np.take(ctype, cell) * g + j  # int32: K * G < 2**31 (checked in SynthParams)
    keep_j = rng.random(len(cell), dtype=np.float32) < np.take(model.alias_prob, flat)
    alias = np.take(model.alias_idx, flat)
    return cell * g + alias + keep_j * (j - alias)


def sample_chunk(
    model: SynthModel, chunk: int, num_cells: int
) -> tuple[sp.csr_matrix, dict[str, np.ndarray]]:
    """Cells [chunk * CHUNK_CELLS, + num_cells) as CSR counts (int32, sorted indices) and obs codes.

    obs codes: {"cell_type", "batch", "tissue"} -> int32 indices into the model's name lists. A whole chunk
    is always drawn and then cut, so a cell never depends on how many cells were asked for.
    """
    assert 0 < num_cells <= CHUNK_CELLS
    if num_cells < CHUNK_CELLS:
        matrix, obs = sample_chunk(model, chunk, CHUNK_CELLS)
        return matrix[:num_cells], {c: v[:num_cells] for c, v in obs.items()}
    rng = np.random.default_rng(np.random.SeedSequence(model.params.seed, spawn_key=(_CHUNK_KEY, chunk)))
    n, g = num_cells, np.int32(model.num_genes)
    batch, tissue, ctype, lib = _cells(model, rng, n)
    keys = _dense_hits(model, rng, ctype, batch, lib)
    keys.append(_sparse_candidates(model, rng, ctype, lib))

    # One sort of int32 keys (n * G < 2**31), then drop repeated candidates.
    keys = np.sort(np.concatenate(keys))
    if len(keys):
        keys = np.compress(np.concatenate([[True], keys[1:] != keys[:-1]]), keys)
    cell = np.repeat(np.arange(n, dtype=np.int32), np.diff(np.searchsorted(keys, np.arange(n + 1) * g)))
    gene = keys - cell * g
    tg = np.take(ctype, cell) * g + gene
    base = np.take(lib, cell) * np.take(model.type_mean, tg)
    lam = base * np.take(model.batch_factor, np.take(batch, cell) * g + gene)
    r = np.take(model.dispersion, gene)
    # One uniform per candidate serves twice. Sparse: target ~ U(0, P_Poisson(y > 0 | bound)) is kept iff
    # below P_NB(y > 0) (thinning), and is then uniform on (0, P_NB(y > 0)): the truncated-NB inverse CDF
    # uses it as is. Dense genes were already kept by their Bernoulli draw, so they scale it by P_NB(y > 0).
    log_p0 = -r * np.log1p(lam / r)
    p_nb = -np.expm1(log_p0)
    p_bound = -np.expm1(-base * np.take(model.batch_factor_max, gene))
    p_ref = p_bound + np.take(model.is_dense, tg) * (p_nb - p_bound)
    target = rng.random(len(keys), dtype=np.float32) * p_ref
    keep = target < p_nb
    counts = np.compress(keep, _truncated_nb(rng, lam, r, log_p0, target, keep))
    gene, cell = np.compress(keep, gene), np.compress(keep, cell)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(cell, minlength=n), out=indptr[1:])
    matrix = sp.csr_matrix((counts, gene, indptr), shape=(n, int(g)), copy=False)
    return matrix, {"cell_type": ctype, "batch": batch, "tissue": tissue}
