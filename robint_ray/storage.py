"""Where outputs live: a local folder or a URI, through one code path.

A `Location` is a folder named by a local path (`runs/c10`, `/mnt/nfs/runs/c10`), by `file:///abs/path`
(the same as the local path `/abs/path`) or by `s3://bucket/prefix` (S3, or an S3-compatible store such
as MinIO): the storage layer Ray Train itself uses (a pyarrow filesystem), so Ray Train's checkpoints
and our own files land in the same place. Any other URI (`gs://`, `s3a://`, `S3://`, an `s3://` URI
without a bucket or with a query string such as `?region=...`) is an InputError of one line, at once:
nothing is written, no Ray starts.

    out = Location("s3://my-bucket/runs/c10")
    (out / "stage" / "result.json").write_json({"accuracy": 0.9})
    with (out / "figures").local_dir() as d:     # libraries that write only to local paths
        fig.savefig(d / "grid.png")              # uploaded when the block ends

Writes are atomic: a reader sees the old file or the new one, never half of one. On a local (or NFS)
disk through a temporary file in the same folder and a rename; on an object store a PUT (or a
multipart upload) becomes visible only once complete. Credentials are the store's usual ones (for S3:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, or the instance profile; AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL for an S3-compatible store, with AWS_REGION / AWS_DEFAULT_REGION); none is ever
stored or logged here.

S3 requests that fail for a transient reason (a connection refused or reset, a request that makes no
progress for S3_REQUEST_TIMEOUT_S, a 5xx or a throttling reply) are retried up to S3_ATTEMPTS times in
all with the AWS SDK's standard backoff (random, growing, at most 20 s a wait): a store that stalls for
a minute delays a stage, it does not fail it. Retrying is safe: every write is a whole PUT or a
multipart upload that becomes visible only when complete.

Inputs (a dataset, a weights file, an image source) may also live in storage: `local_input` gives a
local path for them, downloading a URI once into a cache on each node (`$ROBINT_CACHE`, default
~/.cache/robint/inputs).

A Location pickles as its URI alone, so it can be handed to Ray tasks; each process opens its own
filesystem client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import uuid
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import unquote

from .errors import InputError, one_line

log = logging.getLogger(__name__)

# Anything that starts like "scheme:/" is read as a URI, never as a local path (Path("s3://b/k") would
# be the relative folder s3:/b/k). Schemes have two or more characters: no Windows drive letter here.
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")
# S3's bucket names (docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html), also MinIO's.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_FORMS = "s3://BUCKET/PREFIX, file:///ABSOLUTE/PATH or a local path"

# S3 retries (see the module docstring). A request that sends or receives nothing for this long is
# dropped and retried (the AWS SDK's default is 3 s, which a busy store or a large upload's completion
# can exceed); a connection that does not open within S3_CONNECT_TIMEOUT_S is retried likewise.
S3_ATTEMPTS = 10
S3_REQUEST_TIMEOUT_S = 20.0
S3_CONNECT_TIMEOUT_S = 10.0


def is_uri(path: str | os.PathLike) -> bool:
    """Whether path is written as a URI ("scheme:/..."), supported or not."""
    return isinstance(path, str) and _URI.match(path) is not None


def parse_location(where: str) -> str:
    """The canonical form of a location: "s3://bucket[/key]" (no trailing slash) or an absolute local
    path (file:///abs/path becomes /abs/path). Anything else is an InputError of one line."""
    match = _URI.match(where)
    if match is None:
        return str(Path(where).expanduser().resolve())
    scheme = match.group(1)
    if scheme.lower() in ("s3", "file") and scheme != scheme.lower():
        raise InputError(f"{where}: write the scheme in lower case ({scheme.lower()}://...)")
    if "?" in where or "#" in where:
        raise InputError(
            f"{where}: a storage URI takes no query string or fragment; set the region with AWS_REGION and "
            "an S3-compatible endpoint with AWS_ENDPOINT_URL"
        )
    if scheme == "file":
        rest = where[len("file:") :]
        if rest.startswith("//localhost/"):
            rest = "//" + rest[len("//localhost") :]
        if not rest.startswith("///"):
            raise InputError(f"{where}: a file URI names an absolute path, file:///ABSOLUTE/PATH (three slashes)")
        return str(Path(unquote(rest[2:])).resolve())
    if scheme != "s3":
        raise InputError(f"{where}: unsupported storage scheme {scheme}://; give {_FORMS}")
    if not where.startswith("s3://"):
        raise InputError(f"{where}: not a storage URI; give {_FORMS}")
    bucket, _, key = where[len("s3://") :].partition("/")
    if not bucket:
        raise InputError(f"{where}: no bucket; give s3://BUCKET/PREFIX")
    if not _BUCKET.match(bucket):
        raise InputError(f"{where}: {bucket!r} is not a bucket name (3-63 lower-case letters, digits, '.' and '-')")
    key = key.strip("/")
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@lru_cache(maxsize=None)
def _filesystem(bucket: str, endpoint: str | None):
    """The pyarrow S3 filesystem for a bucket, with this module's retries (cached per process)."""
    from pyarrow import fs

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint is None:
        try:  # as pyarrow's FileSystem.from_uri does: the bucket's own region
            region = fs.resolve_s3_region(bucket)
        except OSError as err:
            raise InputError(f"s3://{bucket}: cannot find the bucket's region ({one_line(err)})") from err
    return _s3_filesystem(endpoint, region)


def _s3_filesystem(endpoint: str | None, region: str | None):
    """An S3FileSystem with this module's timeouts and retries."""
    from pyarrow import fs

    filesystem = _retrying_s3()(
        endpoint_override=endpoint,
        region=region,
        request_timeout=S3_REQUEST_TIMEOUT_S,
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
    )
    filesystem.made_with = (endpoint, region)
    return filesystem


@lru_cache(maxsize=None)
def _retrying_s3():
    """pyarrow's S3FileSystem, pickled as (endpoint, region) so that it keeps its retries where Ray Train
    ships it to a worker (pyarrow's own pickling drops the retry strategy); credentials are never
    pickled, each process finds its own."""
    from pyarrow import fs

    class RetryingS3FileSystem(fs.S3FileSystem):
        def __reduce__(self):
            return (_s3_filesystem, self.made_with)

    return RetryingS3FileSystem


class Location:
    """A folder or file at a local path or URI. Immutable; `loc / "a" / "b.json"` joins."""

    __slots__ = ("uri",)

    def __init__(self, where: str | os.PathLike | "Location"):
        uri = where.uri if isinstance(where, Location) else parse_location(os.fspath(where))
        object.__setattr__(self, "uri", uri)

    def __setattr__(self, name, value):
        raise AttributeError("Location is immutable")

    def __reduce__(self):
        return (Location, (self.uri,))

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        if not self.is_local:
            raise TypeError(f"{self.uri} is not a local path")
        return self.uri

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __truediv__(self, name: str) -> "Location":
        name = str(name).strip("/")
        if self.is_local:
            return Location(str(Path(self.uri) / name))
        return Location(f"{self.uri}/{name}")

    @property
    def is_local(self) -> bool:
        return not self.uri.startswith("s3://")

    @property
    def name(self) -> str:
        return PurePosixPath(self.uri.split("://", 1)[-1]).name

    @property
    def parent(self) -> "Location":
        if self.is_local:
            return Location(str(Path(self.uri).parent))
        bucket, _, key = self.uri[len("s3://") :].partition("/")
        parent = str(PurePosixPath(key).parent)
        return Location(f"s3://{bucket}/{'' if parent == '.' else parent}")

    @property
    def local_path(self) -> Path | None:
        """The path on this machine's filesystem, or None for a remote store."""
        return Path(self.uri) if self.is_local else None

    def _fs(self):
        """(pyarrow FileSystem, path in it)."""
        if self.is_local:
            from pyarrow import fs

            return fs.LocalFileSystem(), self.uri
        bucket, _, key = self.uri[len("s3://") :].partition("/")
        return _filesystem(bucket, _endpoint()), f"{bucket}/{key}" if key else bucket

    def for_ray_train(self) -> tuple[str, Any]:
        """(storage_path, storage_filesystem) for ray.train.RunConfig: the same store as ours."""
        if self.is_local:
            return self.uri, None
        filesystem, path = self._fs()
        return path, filesystem

    def reachable(self) -> "Location":
        """self, once its store has answered (a local path: at once). A store that does not answer, refuses
        the credentials or has no such bucket is an InputError of one line, before any work starts.
        Asked with few retries (pyarrow's default 3 attempts): a wrong endpoint fails within seconds."""
        if self.is_local:
            return self
        from pyarrow import fs

        bucket = self.uri[len("s3://") :].partition("/")[0]
        made_with = _filesystem(bucket, _endpoint()).made_with
        quick = fs.S3FileSystem(
            endpoint_override=made_with[0], region=made_with[1], connect_timeout=S3_CONNECT_TIMEOUT_S
        )
        try:
            kind = quick.get_file_info(bucket).type
        except OSError as err:
            raise InputError(
                f"{self.uri}: the store does not answer ({one_line(err)}); check the network, the credentials "
                "and AWS_ENDPOINT_URL"
            ) from err
        if kind == fs.FileType.NotFound:
            raise InputError(f"{self.uri}: no bucket {bucket!r} there (create it first: aws s3 mb s3://{bucket})")
        return self

    # reading

    def exists(self) -> bool:
        from pyarrow import fs

        filesystem, path = self._fs()
        return filesystem.get_file_info(path).type != fs.FileType.NotFound

    def is_file(self) -> bool:
        from pyarrow import fs

        filesystem, path = self._fs()
        return filesystem.get_file_info(path).type == fs.FileType.File

    def read_bytes(self) -> bytes:
        filesystem, path = self._fs()
        try:
            with filesystem.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{self.uri}: no such file") from err

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def list(self) -> list[str]:
        """Names directly inside this folder (sorted); [] if it does not exist."""
        from pyarrow import fs

        filesystem, path = self._fs()
        if filesystem.get_file_info(path).type == fs.FileType.NotFound:
            return []
        infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
        return sorted(PurePosixPath(i.path).name for i in infos)

    # writing

    def mkdir(self) -> "Location":
        """Create the folder (and parents). Object stores have no folders: a no-op there."""
        filesystem, path = self._fs()
        if self.is_local:
            filesystem.create_dir(path, recursive=True)
        return self

    def write_bytes(self, data: bytes) -> "Location":
        """Write the whole file atomically (parents created)."""
        filesystem, path = self._fs()
        if self.is_local:
            # POSIX: a temporary file beside the target, then a rename (atomic on one filesystem).
            parent = str(PurePosixPath(path).parent)
            filesystem.create_dir(parent, recursive=True)
            tmp = f"{parent}/.{PurePosixPath(path).name}.{uuid.uuid4().hex}.tmp"
            with filesystem.open_output_stream(tmp) as f:
                f.write(data)
            filesystem.move(tmp, path)
        else:
            with filesystem.open_output_stream(path) as f:  # visible only when complete
                f.write(data)
        return self

    def write_text(self, text: str) -> "Location":
        return self.write_bytes(text.encode())

    def write_json(self, value: Any, **dumps) -> "Location":
        return self.write_text(json.dumps(value, indent=2, **dumps))

    def delete(self) -> None:
        """Remove this file or folder (recursively); nothing happens if it is absent."""
        from pyarrow import fs

        filesystem, path = self._fs()
        kind = filesystem.get_file_info(path).type
        if kind == fs.FileType.Directory:
            filesystem.delete_dir(path)
        elif kind == fs.FileType.File:
            filesystem.delete_file(path)

    # local copies, for libraries that only read or write local paths

    def upload(self, local: str | os.PathLike) -> "Location":
        """Copy a local file or folder here (a folder's files one by one, each atomically)."""
        local = Path(local)
        if local.is_dir():
            for file in sorted(p for p in local.rglob("*") if p.is_file()):
                (self / file.relative_to(local).as_posix()).write_bytes(file.read_bytes())
        else:
            self.write_bytes(local.read_bytes())
        return self

    def download(self, local: str | os.PathLike) -> Path:
        """Copy this file or folder to `local` (a folder is copied recursively)."""
        from pyarrow import fs

        local = Path(local)
        filesystem, path = self._fs()
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.NotFound:
            raise FileNotFoundError(f"{self.uri}: not found")
        if info.type == fs.FileType.File:
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(self.read_bytes())
            return local
        for entry in filesystem.get_file_info(fs.FileSelector(path, recursive=True)):
            if entry.type == fs.FileType.File:
                target = local / PurePosixPath(entry.path).relative_to(PurePosixPath(path))
                target.parent.mkdir(parents=True, exist_ok=True)
                with filesystem.open_input_stream(entry.path) as f:
                    target.write_bytes(f.read())
        return local

    @contextmanager
    def local_dir(self) -> Iterator[Path]:
        """A local folder whose files end up here: this folder itself where it is local, else a
        temporary folder uploaded (file by file, atomically) when the block ends without error."""
        if self.is_local:
            Path(self.uri).mkdir(parents=True, exist_ok=True)
            yield Path(self.uri)
            return
        with tempfile.TemporaryDirectory(prefix="robint-upload-") as tmp:
            yield Path(tmp)
            self.upload(tmp)

    @contextmanager
    def local_copy(self) -> Iterator[Path]:
        """This file or folder as a local path (itself where it is local, else a temporary download)."""
        if self.is_local:
            yield Path(self.uri)
            return
        with tempfile.TemporaryDirectory(prefix="robint-download-") as tmp:
            yield self.download(Path(tmp) / (self.name or "root"))


def local_input(where: str | os.PathLike) -> Path:
    """A local path for an input that may live in storage (a dataset, a weights file, an image source):
    a local path (or file:// URI) as it is; an s3:// file or folder downloaded once into this node's
    cache ($ROBINT_CACHE, else ~/.cache/robint/inputs) and reused while the store's copy is unchanged
    (same names, sizes and modification times). Concurrent callers on one node each download into a
    temporary folder and the first to finish is kept."""
    from pyarrow import fs

    if not is_uri(os.fspath(where)):
        return Path(where)  # as given (relative or not)
    source = Location(where)
    if source.is_local:
        return source.local_path
    filesystem, path = source.reachable()._fs()
    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.Directory:
        listing = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
    elif info.type == fs.FileType.File:
        listing = [info]
    else:
        raise InputError(f"{source}: not found")
    stamp = json.dumps(sorted((i.path, i.size, str(i.mtime)) for i in listing if i.type == fs.FileType.File))
    key = hashlib.sha256(f"{source.uri}\n{stamp}".encode()).hexdigest()[:24]
    cache = Path(os.environ.get("ROBINT_CACHE") or Path.home() / ".cache" / "robint" / "inputs")
    target = cache / key / (source.name or "root")
    if target.exists():
        return target
    (cache / key).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache / key) as tmp:
        downloaded = source.download(Path(tmp) / target.name)
        try:
            downloaded.rename(target)
        except OSError:  # another process on this node was first: its copy is the same
            if not target.exists():
                raise
    log.info("%s: downloaded to %s", source, target)
    return target
