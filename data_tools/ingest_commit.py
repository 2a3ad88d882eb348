"""`sclabel-data commit OUT`: check every part of a planned ingest, then write the store's index.json once.

Each part's manifest lists its shards with their sha256; commit checks that the parts cover every shard of
the plan and that every shard on disk still has its checksum. A missing part, or a part with a missing or
corrupt shard, is refused in one line naming it (exit 2); the corrupt part's manifest is removed so that
rerunning that part rewrites it. Then the match reports, vocab.json (new store) and index.json, LAST.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from data_tools.ingest_parts import existing_part_counts, manifest_path, read_manifests
from data_tools.ingest_plan import PLAN_FILE, Plan, index_sha256, load_plan, plan_dir
from data_tools.store_lock import StoreLock
from sclabel_dist.atomic import write_json_atomic
from sclabel_dist.checksums import sha256_tree
from sclabel_dist.data import format as fmt
from sclabel_dist.errors import SclabelError


def commit(out: str | Path) -> fmt.StoreIndex | None:
    """Check the parts of the planned ingest in `out` and commit its index (holding the store's lock).

    None when there is nothing to commit because the store is committed already (another array task did it).
    """
    out = Path(out)
    with StoreLock(out):
        if not (plan_dir(out) / PLAN_FILE).is_file() and (out / fmt.INDEX_FILE).is_file():
            return None
        return commit_locked(out)


def commit_locked(out: Path) -> fmt.StoreIndex:
    plan = load_plan(out)
    base = _base_index(out, plan)
    entries = _checked_entries(out, plan)
    index = base if base is not None else fmt.StoreIndex(vocab_hash=plan.vocab_hash, num_genes=plan.num_genes)
    index.obs_columns = {k: list(v) for k, v in plan.categories.items()}
    (out / fmt.REPORTS_DIR).mkdir(exist_ok=True)
    for ds in plan.datasets:
        mine = [fmt.ShardEntry(**e) for e in entries if e["dataset"] == ds["name"]]
        report = f"{fmt.REPORTS_DIR}/{ds['name']}.json"
        write_json_atomic(out / report, ds["report"] or {})
        nnz = sum(s.nnz for s in mine)
        index.datasets.append(
            fmt.DatasetEntry(ds["name"], ds["source"], ds["value_kind"], ds["num_rows"], nnz, report)
        )
        index.shards.extend(mine)
        index.num_rows += ds["num_rows"]
        index.nnz += nnz
        _remove_unreferenced(out / fmt.SHARDS_DIR / ds["name"], {s.path.rsplit("/", 1)[1] for s in mine})
    if base is None:
        shutil.copyfile(plan_dir(out) / fmt.VOCAB_FILE, out / f"{fmt.VOCAB_FILE}.tmp-{os.getpid()}")
        os.replace(out / f"{fmt.VOCAB_FILE}.tmp-{os.getpid()}", out / fmt.VOCAB_FILE)
    fmt.write_index(out, index)  # the commit point
    shutil.rmtree(plan_dir(out), ignore_errors=True)
    return index


def _base_index(out: Path, plan: Plan) -> fmt.StoreIndex | None:
    """The index an append extends, refused when the store changed since the plan; None for a new store."""
    has_index = (out / fmt.INDEX_FILE).is_file()
    if plan.base_index_sha256 is None:
        if has_index:
            raise SclabelError(f"{out}: already holds a committed store; this plan was for a new store")
        return None
    if not has_index or index_sha256(out) != plan.base_index_sha256:
        raise SclabelError(
            f"{out}: the store changed since this append was planned (another writer committed); "
            f"remove {plan_dir(out)} and the new datasets' shards, then plan again"
        )
    return fmt.read_index(out)


def _checked_entries(out: Path, plan: Plan) -> list[dict]:
    """Every part present, covering the plan's shards, every shard with its checksum; entries in store order."""
    counts = existing_part_counts(out)
    if not counts:
        raise SclabelError(
            f"{out}: no part of the planned ingest is written yet; run the parts (--part i/N) first"
        )
    if len(counts) > 1:
        raise SclabelError(f"{out}: parts written with different N ({sorted(counts)}); rerun them with one N")
    (n,) = counts
    manifests = read_manifests(out)
    for i in range(n):
        if i not in manifests:
            raise SclabelError(
                f"{out}: part {i}/{n} is missing (not run, or killed before it finished); run `sclabel-data "
                f"ingest ... --part {i}/{n}` again"
            )
    entries = [e | {"_part": i} for i in range(n) for e in manifests[i]["shards"]]
    by_path = {e["path"]: e for e in entries}
    expected = [
        f"{fmt.SHARDS_DIR}/{plan.datasets[s.dataset]['name']}/{fmt.part_name(s.k)}" for s in plan.shards()
    ]
    lost = [p for p in expected if p not in by_path]
    if lost or len(by_path) != len(expected):
        raise SclabelError(f"{out}: the parts' manifests do not cover the plan (e.g. {lost[:1]}); plan again")
    for e in entries:
        shard = out / e["path"]
        problem = (
            "missing"
            if not shard.is_dir()
            else None
            if sha256_tree(shard) == e["sha256"]
            else "corrupt (checksum mismatch)"
        )
        if problem:
            i = e["_part"]
            manifest_path(out, i, n).unlink(missing_ok=True)  # so that rerunning the part rewrites it
            raise SclabelError(
                f"{out}: part {i}/{n}: shard {e['path']} is {problem}; nothing committed: rerun "
                f"`sclabel-data ingest ... --part {i}/{n}` (it will rewrite the part), then commit"
            )
    return [{k: v for k, v in by_path[p].items() if k != "_part"} for p in expected]


def _remove_unreferenced(dataset_dir: Path, live: set[str]) -> None:
    """Shard dirs of a new dataset the index will not list: temps or leftovers of killed runs."""
    if dataset_dir.is_dir():
        for p in dataset_dir.iterdir():
            if p.name not in live:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sclabel-data commit", description=__doc__.splitlines()[0])
    p.add_argument(
        "out", help="the output directory (or --stage) of `sclabel-data ingest --plan-only` and its parts"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from data_tools.ingest_stage import publish_staged, publish_target

    args = build_parser().parse_args(argv)
    index = commit(args.out)
    target = publish_target(Path(args.out))
    if target is not None:  # a stage of an s3:// output (--plan-only --stage): publish what was committed
        with StoreLock(Path(args.out)):
            index = publish_staged(Path(args.out), target)
        if index is None:
            print(f"{args.out}: already published to {target['to']}; nothing to do")
            return 0
        print(f"{args.out}: published to {target['to']}")
    elif index is None:
        print(f"{args.out}: nothing to commit: no ingest plan there, and the store is committed")
        return 0
    print(
        f"{args.out}: committed {index.num_rows} cells, {index.num_genes} genes, {index.nnz} non-zeros, "
        f"{index.num_shards} shards"
    )
    return 0
