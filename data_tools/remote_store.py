"""Committing a store staged on local disk to object storage (s3://bucket/prefix), with the disk's crash safety.

Object storage has neither rename nor flock, so the order of writes and a conditional put of index.json do
what the temp-dir rename and the store lock do on disk:

1. every new shard is uploaded under a name no other writer uses (`shards/<dataset>/part_NNNNN.<token>`, a
   random token per run), then the datasets' match reports (and, for a new store, vocab.json);
2. index.json is put LAST and conditionally: If-None-Match for a new store, If-Match on the ETag read at the
   start for an append or an overwrite. Of two writers racing on one store exactly one wins; the other gets
   a precondition failure, deletes what it uploaded and says so in one line (rerun it);
3. after the commit, objects under the committed datasets' prefixes that index.json does not reference
   (uploads of killed or losing runs) are deleted: once index.json names the dataset, a concurrent writer of
   the same name can no longer commit, so nothing deleted there can still become live.

A run killed before step 2 leaves the store as it was (or no index.json at all): validate and the loader
refuse a prefix without index.json and never read unreferenced shards; a rerun succeeds. Two concurrent
creations of one new store with different vocabularies can leave the winner's vocab.json overwritten by the
loser's; the hash check at open (and validate) then refuses the store loudly rather than reading it wrongly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sclabel_dist.data import format as fmt
from sclabel_dist.data.stores.location import S3Path
from sclabel_dist.errors import SclabelError

_UPLOAD_THREADS = 8
_OURS = {fmt.INDEX_FILE, fmt.VOCAB_FILE, fmt.REPORTS_DIR, fmt.SHARDS_DIR}


def has_index(store: S3Path) -> bool:
    return (store / fmt.INDEX_FILE).is_file()


def read_index_versioned(store: S3Path) -> tuple[fmt.StoreIndex, dict]:
    """The store's index and the version (ETag) an append's conditional commit must match."""
    import json

    try:
        raw, version = (store / fmt.INDEX_FILE).read_versioned()
    except FileNotFoundError:
        raise SclabelError(
            f"{store}: not a cell store (no {fmt.INDEX_FILE}; the ingest may not have finished)"
        ) from None
    try:
        parsed = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SclabelError(f"{store / fmt.INDEX_FILE}: unreadable JSON ({exc})") from None
    return fmt.StoreIndex.from_dict(parsed, where=str(store / fmt.INDEX_FILE)), version


def check_target(store: S3Path, *, overwrite: bool) -> dict | None:
    """Refuse a prefix holding anything but a cell store (or a killed ingest's leftovers); return the ETag
    of its index.json when there is one (what --overwrite's commit must match), else None."""
    foreign = sorted(p.name for p in store.iterdir() if p.name not in _OURS)
    if foreign:
        raise SclabelError(
            f"{store}: holds objects the store writer did not write ({', '.join(foreign[:5])}); "
            "refusing to write a store there: choose another prefix"
        )
    if not has_index(store):
        return None
    if not overwrite:
        raise SclabelError(
            f"{store}: already exists; use --append to add datasets or --overwrite to replace it"
        )
    _, version = read_index_versioned(store)
    return version


def _upload_all(pairs: list[tuple[Path, S3Path]]) -> None:
    with ThreadPoolExecutor(_UPLOAD_THREADS) as pool:
        for f in [pool.submit(remote.upload, local) for local, remote in pairs]:
            f.result()


def publish(
    local: Path, store: S3Path, datasets: list[str], *, commit: Any, new_store: bool
) -> fmt.StoreIndex:
    """Upload the given datasets of the local store `local`, then commit its index.json at `store`.

    commit: "create" (no index.json may exist) or the {"e_tag", "version"} the current index.json must
    still have. new_store: also put vocab.json (a create or an overwrite)."""
    from obstore.exceptions import AlreadyExistsError, PreconditionError

    index = fmt.read_index(local)
    token = secrets.token_hex(6)
    mine = set(datasets)
    renamed: dict[str, str] = {}
    shards = []
    for s in index.shards:
        if s.dataset in mine:
            renamed[s.path] = f"{s.path}.{token}"
            s = dataclasses.replace(s, path=renamed[s.path])
        shards.append(s)
    index = dataclasses.replace(index, shards=shards)
    pairs = []
    for old, new in renamed.items():
        for f in sorted(p for p in (local / old).rglob("*") if p.is_file()):
            pairs.append((f, store / new / f.relative_to(local / old).as_posix()))
    for d in index.datasets:
        if d.name in mine and (local / d.report).is_file():
            pairs.append((local / d.report, store / d.report))
    uploaded = [remote for _, remote in pairs]
    try:
        _upload_all(pairs)
        if new_store:
            _put_vocab(local, store, index)
        body = _index_bytes(index)
        try:
            (store / fmt.INDEX_FILE).write_bytes(body, mode=commit)
        except (AlreadyExistsError, PreconditionError):
            raise SclabelError(
                f"{store}: another writer committed to this store while this ingest ran (its index.json "
                "changed); nothing of this run was committed: rerun it"
            ) from None
    except BaseException:
        _delete_quietly(uploaded)
        raise
    _remove_unreferenced(store, index, mine if not new_store else None)
    return index


def _index_bytes(index: fmt.StoreIndex) -> bytes:
    import json

    return json.dumps(index.to_dict(), indent=1).encode()


def _put_vocab(local: Path, store: S3Path, index: fmt.StoreIndex) -> None:
    """vocab.json of a new store: kept when the one there already matches (a killed run's), else replaced."""
    from sclabel_dist.vocab import GeneVocab

    target = store / fmt.VOCAB_FILE
    if target.is_file():
        try:
            if GeneVocab.from_json(target).hash == index.vocab_hash:
                return
        except SclabelError:
            pass
    target.upload(local / fmt.VOCAB_FILE)


def _delete_quietly(paths: list[S3Path]) -> None:
    # A leftover is unreferenced: validate reports it, the next commit of that dataset removes it.
    for p in paths:
        with contextlib.suppress(Exception):
            p.unlink(missing_ok=True)


def _remove_unreferenced(store: S3Path, index: fmt.StoreIndex, datasets: set[str] | None) -> None:
    """Delete shard objects index.json does not reference, under the given datasets (None: all of shards/)."""
    live = {s.path for s in index.shards}
    roots = [store / fmt.SHARDS_DIR] if datasets is None else [store / fmt.SHARDS_DIR / d for d in datasets]
    stale = []
    for root in roots:
        for obj in root.rglob("*"):
            shard_dir = "/".join(obj.relative_to(store).parts[:3])  # shards/<dataset>/<part>
            if shard_dir not in live:
                stale.append(obj)
    if datasets is None:
        reports = {d.report for d in index.datasets}
        stale += [
            o for o in (store / fmt.REPORTS_DIR).rglob("*") if o.relative_to(store).as_posix() not in reports
        ]
    _delete_quietly(stale)
