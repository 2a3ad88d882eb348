"""Where a store lives: a local directory, or `s3://bucket/prefix` in an S3-compatible object store.

`as_path(x)` gives a `pathlib.Path` for a local path and an `S3Path` for an s3:// URL. S3Path implements the
small part of pathlib the store code uses (`/`, name, parent, is_file, is_dir, exists, read_text/bytes,
write_bytes, iterdir, rglob, stat().st_size, relative_to), so format/validate/inspect read either the same way.

Configuration is only what users already have for the AWS CLI: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, AWS_REGION or AWS_DEFAULT_REGION, AWS_ENDPOINT_URL (MinIO, Ceph, R2, a loopback test server),
AWS_ALLOW_HTTP for a plain-http endpoint, and AWS_PROFILE / ~/.aws (through boto3's credential chain, when
boto3 is installed and no key is in the environment). Nothing here ever writes a credential anywhere: an
s3:// URL carrying user info (`s3://KEY:SECRET@bucket`) is refused rather than echoed into an index or a log.

Reads on the loader's hot path (`fetch_ranges`, `fetch_tails`) go through one background asyncio loop, all
byte ranges of a window in flight at once (obstore `get_ranges_async`, one call per object). obstore's own
retries are off there so each retry is counted here: transient failures (5xx, 429, timeouts, connection
resets) are retried with exponential backoff and counted in `stats()`; permanent ones (403, 404, 400) raise
one SclabelError line naming the object.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sclabel_dist.errors import SclabelError

# zarrs (the Rust codec pipeline) says so once per obstore-backed zarr store it meets; nothing to act on.
warnings.filterwarnings("ignore", message="Successfully reconstructed a store", category=RuntimeWarning)

SCHEME = "s3://"
MAX_ATTEMPTS = 8  # one try + 7 retries, backoff 50 ms doubling to 3.2 s (~6 s in all) before giving up
_BACKOFF0, _BACKOFF_MAX = 0.05, 3.2
_COALESCE = 1 << 16  # byte gap under which get_ranges merges two ranges of one object into one request


def is_remote(x: Any) -> bool:
    """Whether `x` names an object-store location (an s3:// URL or an S3Path)."""
    return isinstance(x, S3Path) or str(x).startswith(SCHEME)


def as_path(x: str | os.PathLike | S3Path) -> Path | S3Path:
    """A Path for a local location, an S3Path for s3://bucket/key."""
    if isinstance(x, S3Path):
        return x
    if str(x).startswith(SCHEME):
        return S3Path.from_url(str(x))
    return Path(x)


# ----------------------------------------------------------------------------------------------------------
# counters (read by the training log and the benchmark)


@dataclass
class _Stats:
    requests: int = 0
    retries: int = 0
    bytes: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    busy_s: float = 0.0  # sum over requests of their duration: / wall time = mean requests in flight


_stats = _Stats()
_stats_lock = threading.Lock()


def stats() -> dict[str, float]:
    """Counters of this process's object-store reads: requests, retries, bytes, peak and busy time."""
    with _stats_lock:
        return dict(vars(_stats))


def log_counters() -> dict[str, int]:
    """For the training log: this process's object-store requests and retries so far ({} if it made none)."""
    with _stats_lock:
        if not _stats.requests:
            return {}
        return {"s3_requests": _stats.requests, "s3_retries": _stats.retries}


def reset_stats() -> None:
    global _stats
    with _stats_lock:
        _stats = _Stats(in_flight=_stats.in_flight)


# ----------------------------------------------------------------------------------------------------------
# stores and the event loop


_stores: dict[tuple, Any] = {}
# The environment a store was built from is part of its key: a process (a test) that changes AWS_ENDPOINT_URL
# gets a store for the new endpoint, not the cached one.
_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_ALLOW_HTTP",
)
_stores_lock = threading.Lock()


def _aws_kwargs() -> dict[str, Any]:
    """S3Store keywords from the standard AWS environment (obstore reads the AWS_* variables itself)."""
    kw: dict[str, Any] = {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kw["region"] = region
    if not os.environ.get("AWS_ACCESS_KEY_ID"):
        # No key in the environment: profiles, SSO and instance roles through boto3's chain when present.
        try:
            from obstore.auth.boto3 import Boto3CredentialProvider

            kw["credential_provider"] = Boto3CredentialProvider()
        except Exception:  # no boto3, or no credentials at all: obstore's own chain (instance metadata...)
            pass
    return kw


def object_store(bucket: str, *, counted: bool = True) -> Any:
    """The obstore S3Store of a bucket (one per process). counted=True: no internal retries (ours count them);
    counted=False: obstore's own retries (zarr's reads at open and validate, the writer's uploads)."""
    key = (bucket, counted, *(os.environ.get(k) for k in _ENV_KEYS))
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            from obstore.store import S3Store

            retry = {"max_retries": 0} if counted else {"max_retries": 6}
            client: dict[str, Any] = {"connect_timeout": "10s", "timeout": "120s"}
            if os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true", "yes"):
                client["allow_http"] = (
                    True  # a plain-http endpoint (MinIO on a LAN, the loopback test server)
                )
            store = S3Store(bucket, retry_config=retry, client_options=client, **_aws_kwargs())
            _stores[key] = store
        return store


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    """One asyncio loop in a daemon thread: the reader threads hand it their windows' requests."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="sclabel-s3", daemon=True).start()
            _loop = loop
        return _loop


def run(coro: Any) -> Any:
    """Run a coroutine on the background loop and wait for its result (from any thread but that loop's)."""
    return asyncio.run_coroutine_threadsafe(coro, _event_loop()).result()


def tiledb_s3_config() -> dict[str, str]:
    """TileDB's S3 settings for the same endpoint and region as obstore's (a SOMA experiment at s3://).

    Credentials are not copied: TileDB's AWS SDK reads AWS_ACCESS_KEY_ID / ..._SECRET_ACCESS_KEY / profiles
    from the environment itself, so no secret passes through a config that could be logged."""
    out: dict[str, str] = {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        out["vfs.s3.region"] = region
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        out["vfs.s3.endpoint_override"] = host.rstrip("/")
        out["vfs.s3.scheme"] = scheme
        out["vfs.s3.use_virtual_addressing"] = "false"  # path-style, as MinIO / Ceph / moto expect
    return out


# ----------------------------------------------------------------------------------------------------------
# errors


_STATUS = re.compile(r"status code: (\d{3})")


def is_transient(exc: BaseException) -> bool:
    """5xx, 429, 408, timeouts and connection errors are worth retrying; 4xx and missing keys are not."""
    from obstore import exceptions as ox

    if isinstance(exc, FileNotFoundError | ox.NotFoundError | ox.PermissionDeniedError):
        return False
    if isinstance(exc, ox.UnauthenticatedError | ox.PreconditionError | ox.AlreadyExistsError):
        return False
    m = _STATUS.search(str(exc))
    if m:
        code = int(m.group(1))
        return code >= 500 or code in (408, 429)
    return isinstance(exc, ox.GenericError | TimeoutError | ConnectionError | OSError)


def describe(exc: BaseException) -> str:
    """A short reason for one line of error: the HTTP status or the exception's first line."""
    m = _STATUS.search(str(exc))
    if isinstance(exc, FileNotFoundError):
        return "no such object"
    if m:
        return f"HTTP {m.group(1)}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__


async def _with_retries(what: str, make: Any) -> Any:
    """await make() with counted retries on transient errors; one SclabelError line naming `what` otherwise."""
    delay = _BACKOFF0
    for attempt in range(MAX_ATTEMPTS):
        t0 = time.perf_counter()
        with _stats_lock:
            _stats.requests += 1
            _stats.in_flight += 1
            _stats.peak_in_flight = max(_stats.peak_in_flight, _stats.in_flight)
        try:
            return await make()
        except Exception as exc:
            if not is_transient(exc):
                raise SclabelError(f"{what}: {describe(exc)}") from None
            if attempt == MAX_ATTEMPTS - 1:
                raise SclabelError(
                    f"{what}: {describe(exc)}, still failing after {MAX_ATTEMPTS} attempts"
                ) from None
            with _stats_lock:
                _stats.retries += 1
        finally:
            with _stats_lock:
                _stats.in_flight -= 1
                _stats.busy_s += time.perf_counter() - t0
        await asyncio.sleep(delay * (0.5 + random.random()))  # jitter: retries of a window do not align
        delay = min(delay * 2, _BACKOFF_MAX)
    raise AssertionError("unreachable")


def _count_bytes(parts: Sequence[Any]) -> None:
    with _stats_lock:
        _stats.bytes += sum(len(p) for p in parts)


# ----------------------------------------------------------------------------------------------------------
# batched reads (the loader's hot path)


def fetch_ranges(requests: Sequence[tuple[S3Path, Sequence[int], Sequence[int]]]) -> list[list[memoryview]]:
    """For each (object, starts, ends): its byte ranges, every object's ranges in flight at once."""
    import obstore

    async def one(p: S3Path, starts: Sequence[int], ends: Sequence[int]) -> list[memoryview]:
        store = object_store(p.bucket)
        parts = await _with_retries(
            str(p),
            lambda: obstore.get_ranges_async(
                store, p.key, starts=list(starts), ends=list(ends), coalesce=_COALESCE
            ),
        )
        _count_bytes(parts)
        return [memoryview(b) for b in parts]

    async def all_() -> list[list[memoryview]]:
        return await asyncio.gather(*(one(p, s, e) for p, s, e in requests))

    return run(all_()) if requests else []


def fetch_tails(paths: Sequence[S3Path], sizes: Sequence[int]) -> list[memoryview | None]:
    """The last sizes[i] bytes of each object (None where it does not exist), all requested at once."""
    import obstore

    async def one(p: S3Path, n: int) -> memoryview | None:
        store = object_store(p.bucket)

        async def get() -> Any:
            result = await obstore.get_async(store, p.key, options={"range": {"suffix": n}})
            return await result.bytes_async()

        try:
            data = await _with_retries(str(p), get)
        except SclabelError as exc:
            if str(exc).endswith("no such object"):
                return None
            raise
        _count_bytes([data])
        return memoryview(data)

    async def all_() -> list[memoryview | None]:
        return await asyncio.gather(*(one(p, n) for p, n in zip(paths, sizes, strict=True)))

    return run(all_()) if paths else []


# ----------------------------------------------------------------------------------------------------------
# S3Path


@dataclass(frozen=True)
class _Stat:
    st_size: int
    e_tag: str | None = None


class S3Path:
    """A key (file) or key prefix (directory) in a bucket, with the pathlib calls the store code uses."""

    def __init__(self, bucket: str, key: str = "", *, _size: int | None = None, _etag: str | None = None):
        self.bucket = bucket
        self.key = key.strip("/")
        self._size = _size
        self._etag = _etag

    @classmethod
    def from_url(cls, url: str) -> S3Path:
        rest = url[len(SCHEME) :]
        bucket, _, key = rest.partition("/")
        if "@" in bucket or ":" in bucket:
            # Credentials come from the environment only; never accept (and later print) them in a URL.
            raise SclabelError(
                "s3:// URL with user info or a port: give credentials and the endpoint through AWS_* "
                "environment variables (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...), not in the URL"
            )
        if not bucket:
            raise SclabelError(f"{url}: no bucket name (expected s3://bucket/prefix)")
        return cls(bucket, key)

    # -- names ----------------------------------------------------------------------------------------

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Path({str(self)!r})"

    def __fspath__(self) -> str:
        raise TypeError(f"{self}: an object-store location, not a local file")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Path) and (self.bucket, self.key) == (other.bucket, other.key)

    def __hash__(self) -> int:
        return hash((self.bucket, self.key))

    def __lt__(self, other: S3Path) -> bool:
        return (self.bucket, self.key.split("/")) < (other.bucket, other.key.split("/"))

    def __truediv__(self, other: str | os.PathLike) -> S3Path:
        part = str(PurePosixPath(other) if not isinstance(other, str) else other).strip("/")
        return S3Path(self.bucket, f"{self.key}/{part}" if self.key else part)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> S3Path:
        return S3Path(self.bucket, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    def with_name(self, name: str) -> S3Path:
        return self.parent / name

    def relative_to(self, other: S3Path) -> PurePosixPath:
        return PurePosixPath(self.key).relative_to(PurePosixPath(other.key))

    def as_posix(self) -> str:
        return str(self)

    @property
    def _prefix(self) -> str:
        return f"{self.key}/" if self.key else ""

    # -- queries --------------------------------------------------------------------------------------

    def _head(self) -> dict | None:
        import obstore

        try:
            return obstore.head(object_store(self.bucket, counted=False), self.key)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise SclabelError(f"{self}: {describe(exc)}") from None

    def is_file(self) -> bool:
        if self._size is not None:
            return True
        return self._head() is not None

    def is_dir(self) -> bool:
        import obstore

        try:
            page = next(
                iter(obstore.list(object_store(self.bucket, counted=False), self._prefix, chunk_size=1))
            )
        except StopIteration:
            return False
        except Exception as exc:
            raise SclabelError(f"{self}: {describe(exc)}") from None
        return len(page) > 0

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def stat(self) -> _Stat:
        if self._size is not None:
            return _Stat(self._size, self._etag)
        head = self._head()
        if head is None:
            raise FileNotFoundError(str(self))
        return _Stat(int(head["size"]), head.get("e_tag"))

    def iterdir(self) -> Iterator[S3Path]:
        """The objects and sub-prefixes directly under this prefix."""
        import obstore

        try:
            res = obstore.list_with_delimiter(object_store(self.bucket, counted=False), self._prefix or None)
        except Exception as exc:
            raise SclabelError(f"{self}: {describe(exc)}") from None
        for p in res["common_prefixes"]:
            yield S3Path(self.bucket, p)
        for o in res["objects"]:
            yield S3Path(self.bucket, o["path"], _size=int(o["size"]), _etag=o.get("e_tag"))

    def rglob(self, pattern: str = "*") -> Iterator[S3Path]:
        """Every object under this prefix (pattern '*' only; objects, no directory entries)."""
        import obstore

        if pattern != "*":
            raise NotImplementedError("S3Path.rglob supports '*' only")
        try:
            for page in obstore.list(object_store(self.bucket, counted=False), self._prefix or None):
                for o in page:
                    yield S3Path(self.bucket, o["path"], _size=int(o["size"]), _etag=o.get("e_tag"))
        except Exception as exc:
            raise SclabelError(f"{self}: {describe(exc)}") from None

    # -- content --------------------------------------------------------------------------------------

    def read_bytes(self) -> bytes:
        import obstore

        try:
            return bytes(obstore.get(object_store(self.bucket, counted=False), self.key).bytes())
        except FileNotFoundError:
            raise FileNotFoundError(f"{self}: no such object") from None
        except Exception as exc:
            raise SclabelError(f"{self}: {describe(exc)}") from None

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def read_versioned(self) -> tuple[bytes, dict]:
        """(content, {"e_tag", "version"}): what a conditional put of the next version needs."""
        import obstore

        try:
            res = obstore.get(object_store(self.bucket, counted=False), self.key)
            meta = res.meta
            version = {k: meta.get(k) for k in ("e_tag", "version") if meta.get(k) is not None}
            return bytes(res.bytes()), version
        except FileNotFoundError:
            raise FileNotFoundError(f"{self}: no such object") from None
        except Exception as exc:
            raise SclabelError(f"{self}: {describe(exc)}") from None

    def write_bytes(self, data: bytes, *, mode: Any = "overwrite") -> dict:
        """Put the object (mode 'create' = only if absent, {'e_tag': ...} = only if unchanged)."""
        import obstore

        return obstore.put(object_store(self.bucket, counted=False), self.key, data, mode=mode)

    def write_text(self, text: str) -> dict:
        return self.write_bytes(text.encode())

    def upload(self, local: Path) -> None:
        import obstore

        obstore.put(object_store(self.bucket, counted=False), self.key, Path(local))

    def unlink(self, missing_ok: bool = False) -> None:
        import obstore

        try:
            obstore.delete(object_store(self.bucket, counted=False), self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no directories: a prefix exists once an object is under it."""

    def zarr_group(self) -> Any:
        """The zarr group at this prefix, opened read-only through zarr's obstore-backed ObjectStore."""
        import zarr

        return zarr.open_group(store=_zarr_store(self.bucket), path=self.key, mode="r")


_zarr_stores: dict[int, Any] = {}  # by id of the S3Store (kept alive by _stores)


def _zarr_store(bucket: str) -> Any:
    from zarr.storage import ObjectStore

    inner = object_store(bucket, counted=False)
    store = _zarr_stores.get(id(inner))
    if store is None:  # a race only builds a second wrapper of the same S3Store
        store = _zarr_stores.setdefault(id(inner), ObjectStore(inner, read_only=True))
    return store
