"""The many-machine ingest into object storage: `--plan-only` / `--part i/N` build the store in a staging
directory (`--stage DIR`, a filesystem every task sees), and `sclabel-data commit DIR` commits it there and
then publishes it to the s3:// output.

Parts cannot write straight into a bucket and still be redone and checked the way parts on disk are (no
rename, no lock), so they stage exactly as `--workers N -o s3://...` does on one machine; what the stage adds
is STAGE/publish.json, written with the plan: where the store goes, and the version of its index.json that
the publish must still find (remote_store.publish: a conditional put, so a writer that committed meanwhile
makes this one refuse instead of losing data). A commit killed after the local commit publishes on rerun; a
published stage says so and publishes nothing twice.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from data_tools import remote_store
from data_tools.ingest import IngestOptions, dataset_names
from data_tools.store_lock import StoreLock
from sclabel_dist.atomic import write_json_atomic
from sclabel_dist.data import format as fmt
from sclabel_dist.data.stores.location import S3Path, as_path
from sclabel_dist.errors import SclabelError

PUBLISH_FILE = "publish.json"


def plan_staged(opts: IngestOptions) -> None:
    """--plan-only for an s3:// output: plan in the stage (seeded with the store's index for --append)."""
    from data_tools.ingest_parallel import ensure_plan

    stage, out = Path(opts.stage), as_path(opts.out)
    stage.mkdir(parents=True, exist_ok=True)
    with StoreLock(stage):
        target = stage / PUBLISH_FILE
        if not target.is_file():
            version = seed_stage(out, stage, opts.append)
        staged = dataclasses.replace(opts, out=str(stage))
        ensure_plan(staged, stage, 1)
        if not target.is_file():
            names = dataset_names(opts.inputs, opts.dataset_name)
            write_json_atomic(
                target,
                {"to": str(opts.out), "version": version, "datasets": names, "new_store": not opts.append},
            )
    print(
        f"{stage}: plan for {opts.out} written; now run the parts (--part i/N --stage {stage}), then "
        f"`sclabel-data commit {stage}`"
    )


def seed_stage(out: S3Path, stage: Path, append: bool) -> dict | None:
    """Ready `stage` to build a store bound for `out`; the version of out's index.json that the publish must
    still find (None: a new store, created only where none exists). An append copies out's index and
    vocabulary into the stage, for the plan to extend."""
    if not append:
        return remote_store.check_target(out, overwrite=False)
    index, version = remote_store.read_index_versioned(out)
    (stage / fmt.SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    fmt.write_index(stage, index)
    (stage / fmt.VOCAB_FILE).write_bytes((out / fmt.VOCAB_FILE).read_bytes())
    return version


def publish_target(stage: Path) -> dict | None:
    """The stage's publish.json (None: a store on disk, nothing to publish)."""
    path = stage / PUBLISH_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def publish_staged(stage: Path, target: dict) -> fmt.StoreIndex | None:
    """Publish the committed stage to its s3:// output; None when an earlier commit already did."""
    if target.get("published"):
        return None
    store = as_path(target["to"])
    assert isinstance(store, S3Path)
    index = remote_store.publish(
        stage,
        store,
        target["datasets"],
        commit=target["version"] if target["version"] is not None else "create",
        new_store=target["new_store"],
    )
    write_json_atomic(stage / PUBLISH_FILE, {**target, "published": True})
    return index


def check_stage_option(opts: IngestOptions) -> None:
    """--stage goes with --plan-only / --part and an s3:// output, and those need it."""
    if opts.stage and not (opts.plan_only or opts.part):
        raise SclabelError(
            "--stage is where --plan-only / --part build an s3:// store; --workers stages by itself"
        )
    if (opts.plan_only or opts.part) and not opts.stage:
        raise SclabelError(
            f"{opts.out}: --plan-only/--part into object storage need --stage DIR (a filesystem every part "
            "sees; `sclabel-data commit DIR` then publishes), or use --workers N on one machine"
        )
