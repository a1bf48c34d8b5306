"""Where originals and results live: one small interface, three implementations.

- `FolderStorage`: a local folder; atomic writes; links are HMAC-signed and served by
  the server's own `GET /results/<key>`.
- `S3Storage`: an S3 bucket (or an S3-compatible endpoint); SSE; SigV4 presigned GETs.
- `MemoryStorage`: the null implementation, for tests.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from server.limits import MAX_LINK_SECONDS
from server.signing import SECRET_ENV, LinkSigner, TileCredentials, load_link_keys, parse_keys

log = logging.getLogger(__name__)

SAFE_KEY = re.compile(r"^[a-z]+/[0-9a-f]{16,128}\.[a-z0-9]{2,5}$")


class StorageError(RuntimeError):
    """Storage failed for a reason outside the request (disk full, S3 down)."""


class StorageFull(StorageError):
    """The storage device or the quota is full (ENOSPC, EDQUOT). Not worth retrying
    elsewhere: every instance of a fleet writes to the same place."""


# A write failed with ENOSPC this recently: /health keeps reporting it.
FULL_MEMORY_S = 30.0
# Below this much free space /health reports the disk as almost full: a result of a
# large image is tens of MB.
MIN_FREE_BYTES = 64 * 1024 * 1024
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class _Missing(LookupError):
    """The object does not exist (S3's 404), told apart from real failures."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    content_type: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Link:
    url: str
    expires_at: float  # epoch seconds


def check_key(key: str) -> str:
    if not SAFE_KEY.match(key):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class Storage(ABC):
    """Objects addressed by keys such as `results/<sha256>.png`."""

    #: True when links point at this server's `GET /results/<key>` route.
    serves_links: bool = False

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str,
            metadata: dict[str, str] | None = None) -> None: ...

    @abstractmethod
    def head(self, key: str) -> StoredObject | None: ...

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    def exists(self, key: str) -> bool:
        """Whether `key` is stored complete; implementations may answer more cheaply
        than head()."""
        return self.head(key) is not None

    @abstractmethod
    def link(self, key: str, expires_in: int, base_url: str) -> Link: ...

    def verify_link(self, key: str, expires: str, signature: str) -> bool:
        return False

    def describe(self) -> str:
        return type(self).__name__

    def health_problem(self) -> str | None:
        """What stops this storage from taking writes, cheaply (no I/O beyond a
        statvfs): for /health. None when nothing is known to be wrong."""
        return None

    def link_keys(self) -> tuple[bytes, ...]:
        """The fleet's shared keys, the signing one first; () when there are none."""
        return ()

    @functools.cached_property
    def _tile_credentials(self) -> dict[str | None, TileCredentials]:
        return {}

    def tile_credentials(self, token: str | None = None) -> TileCredentials:
        """What marks a tile request from a peer as internal (answered unstored, in
        uncompressed PNG): derived from the link keys; without any (S3 without
        IMAGEFLEET_LINK_SECRET), from the API token; without a token either, nothing
        does, and tiles are processed as ordinary requests. Computed once per token."""
        found = self._tile_credentials.get(token)
        if found is None:
            keys = self.link_keys() or ((token.encode(),) if token else ())
            found = self._tile_credentials[token] = TileCredentials.from_keys(keys)
        return found


class SignedLinks:
    """Links to this server's `/results/<name>` route, signed with a shared secret."""

    def __init__(self, signer: LinkSigner, clock=time.time):
        self._signer = signer
        self._clock = clock

    def link(self, key: str, expires_in: int, base_url: str) -> Link:
        expires = int(self._clock()) + min(expires_in, MAX_LINK_SECONDS)
        name = key.split("/", 1)[1]
        query = urlencode({"expires": expires, "signature": self._signer.signature(key, expires)})
        return Link(f"{base_url.rstrip('/')}/results/{name}?{query}", float(expires))

    def verify(self, key: str, expires: str, signature: str) -> bool:
        return self._signer.verify(key, expires, signature, self._clock())


class FolderStorage(Storage):
    serves_links = True
    META_SUFFIX = ".meta.json"

    def __init__(self, root: Path, signer: LinkSigner | None = None, clock=time.time, *,
                 min_free_bytes: int = MIN_FREE_BYTES, monotonic=time.monotonic):
        self.root = Path(root).resolve()
        self.min_free_bytes = min_free_bytes
        self._monotonic = monotonic
        # When a write last failed for want of space (monotonic seconds); None once a
        # later write succeeded. One float, replaced whole: no lock needed.
        self._full_at: float | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        self._signer = signer or LinkSigner.from_keys(load_link_keys(self.root))
        self._links = SignedLinks(self._signer, clock)
        # Temporary names need only be unique among this folder's writers: the pid
        # tells processes apart, the counter writes within one (next() is atomic
        # under the GIL). Cheaper than tempfile's random names, on every request.
        self._temp_prefix = f".tmp-{os.getpid()}-"
        self._temp_counter = itertools.count()

    def describe(self) -> str:
        return f"folder {self.root}"

    def link_keys(self) -> tuple[bytes, ...]:
        return self._signer.keys

    def _path(self, key: str) -> str:
        return os.path.join(self.root, check_key(key))

    def _write_atomic(self, path: str, data: bytes) -> None:
        folder = os.path.dirname(path)
        tmp = os.path.join(folder, f"{self._temp_prefix}{next(self._temp_counter)}")
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:  # the first object under this prefix
                os.makedirs(folder, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            name = os.path.basename(path)
            if exc.errno in DISK_FULL_ERRNOS:
                self._full_at = self._monotonic()
                raise StorageFull(f"disk full: could not write {name}: "
                                  f"{self._free_text()}") from exc
            raise StorageError(f"could not write {name}: {exc.strerror or exc}") from exc
        self._full_at = None

    def _free_bytes(self) -> int | None:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def _free_text(self) -> str:
        free = self._free_bytes()
        where = f"free in {self.root}"
        return f"{free / 1e6:.1f} MB {where}" if free is not None else f"unknown space {where}"

    def health_problem(self) -> str | None:
        full_at = self._full_at
        ago = None if full_at is None else self._monotonic() - full_at
        if ago is not None and ago < FULL_MEMORY_S:
            return f"disk full: a write failed {ago:.0f} s ago; {self._free_text()}"
        free = self._free_bytes()
        if free is not None and free < self.min_free_bytes:
            return (f"disk almost full: {free / 1e6:.1f} MB free in {self.root} "
                    f"(below {self.min_free_bytes / 1e6:.0f} MB)")
        return None

    def put(self, key: str, data: bytes, content_type: str,
            metadata: dict[str, str] | None = None) -> None:
        path = self._path(key)
        meta = {"content_type": content_type, "size": len(data), "metadata": metadata or {}}
        # Data first, metadata last: head() only reports objects whose metadata exists,
        # so a crash in between leaves an object that is simply recomputed.
        self._write_atomic(path, data)
        self._write_atomic(path + self.META_SUFFIX, json.dumps(meta).encode())

    def head(self, key: str) -> StoredObject | None:
        """The object, or None when it is missing or its metadata is damaged: such an
        object is recomputed and written again, rather than failing every request."""
        path = self._path(key)
        try:
            with open(path + self.META_SUFFIX, "rb") as handle:
                raw = handle.read()
            size = os.stat(path).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:  # a directory in its place, a bad sector, ...
            log.warning("ignoring unreadable metadata of %s: %s", key, exc)
            return None
        obj = _stored_object(key, size, raw)
        if obj is None:
            log.warning("ignoring damaged metadata of %s", key)
        return obj

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key) + self.META_SUFFIX)

    def get(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def link(self, key: str, expires_in: int, base_url: str) -> Link:
        return self._links.link(key, expires_in, base_url)

    def verify_link(self, key: str, expires: str, signature: str) -> bool:
        return self._links.verify(key, expires, signature)


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a nearly full disk does exactly that); the
    rest is written, or its error (ENOSPC) raised, instead of keeping a short file."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _stored_object(key: str, size: int, raw: bytes) -> StoredObject | None:
    """Parse a `.meta.json`; None unless it is what put() writes and matches `size`."""
    try:
        meta = json.loads(raw)
    except ValueError:  # not UTF-8, not JSON
        return None
    if not isinstance(meta, dict):
        return None
    content_type, metadata = meta.get("content_type"), meta.get("metadata", {})
    if (type(meta.get("size")) is not int or meta["size"] != size
            or not isinstance(content_type, str) or not isinstance(metadata, dict)
            or not all(isinstance(k, str) and isinstance(v, str)
                       for k, v in metadata.items())):
        return None
    return StoredObject(key, size, content_type, dict(metadata))


class MemoryStorage(Storage):
    """Keeps objects in a dict. For tests and as the null implementation."""

    serves_links = True

    def __init__(self, secret: bytes = b"memory-storage-secret-for-tests-only", clock=time.time):
        self._objects: dict[str, tuple[bytes, StoredObject]] = {}
        self._lock = threading.Lock()
        self._secret = secret
        self._links = SignedLinks(LinkSigner(secret), clock)

    def link_keys(self) -> tuple[bytes, ...]:
        return (self._secret,)

    def put(self, key: str, data: bytes, content_type: str,
            metadata: dict[str, str] | None = None) -> None:
        obj = StoredObject(check_key(key), len(data), content_type, dict(metadata or {}))
        with self._lock:
            self._objects[key] = (bytes(data), obj)

    def head(self, key: str) -> StoredObject | None:
        with self._lock:
            entry = self._objects.get(key)
        return entry[1] if entry else None

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._objects.get(key)
        return entry[0] if entry else None

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._objects)

    def link(self, key: str, expires_in: int, base_url: str) -> Link:
        return self._links.link(key, expires_in, base_url)

    def verify_link(self, key: str, expires: str, signature: str) -> bool:
        return self._links.verify(key, expires, signature)


class S3Storage(Storage):
    """An S3 bucket, optionally under a prefix. Credentials come from the standard AWS
    chain (environment, profile, instance role) — never from our configuration."""

    def __init__(self, bucket: str, prefix: str = "", *, client=None,
                 endpoint_url: str | None = None, region: str | None = None, clock=time.time):
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                config=Config(
                    retries={"mode": "standard", "max_attempts": 5},
                    signature_version="s3v4",
                    connect_timeout=5,
                    read_timeout=60,
                    max_pool_connections=32,
                ),
            )
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client
        self._clock = clock
        # S3 links are presigned and need no secret; a fleet may still hand its workers
        # one (IMAGEFLEET_LINK_SECRET), from which tile credentials are derived.
        value = os.environ.get(SECRET_ENV, "")
        self._keys = parse_keys(value) if value else ()

    def link_keys(self) -> tuple[bytes, ...]:
        return self._keys

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _object_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _mapped_errors(self, doing: str, key: str) -> Iterator[None]:
        """botocore's exceptions become ours here, and only here: a missing object is
        `_Missing`, anything else `StorageError` naming what was being done."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise _Missing(key) from exc
            raise StorageError(f"could not {doing} {key} in s3://{self.bucket}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"could not {doing} {key} in s3://{self.bucket}: {exc}") from exc

    def put(self, key: str, data: bytes, content_type: str,
            metadata: dict[str, str] | None = None) -> None:
        with self._mapped_errors("store", key):
            self.client.put_object(
                Bucket=self.bucket, Key=self._object_key(key), Body=data,
                ContentType=content_type, Metadata=metadata or {},
                ServerSideEncryption="AES256",
            )

    def head(self, key: str) -> StoredObject | None:
        try:
            with self._mapped_errors("look up", key):
                answer = self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except _Missing:
            return None
        return StoredObject(key, int(answer["ContentLength"]),
                            answer.get("ContentType", "application/octet-stream"),
                            dict(answer.get("Metadata", {})))

    def get(self, key: str) -> bytes | None:
        try:
            with self._mapped_errors("read", key):
                answer = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
                return answer["Body"].read()
        except _Missing:
            return None

    def _credentials_expire_at(self) -> float | None:
        """When the signing credentials expire (instance roles, SSO sessions), if they
        do: a presigned URL stops working then, whatever its X-Amz-Expires says."""
        # botocore has no public accessor for the signer's credentials.
        credentials = getattr(getattr(self.client, "_request_signer", None), "_credentials", None)
        expiry = getattr(credentials, "_expiry_time", None)
        return expiry.timestamp() if expiry is not None else None

    def link(self, key: str, expires_in: int, base_url: str) -> Link:
        seconds = min(expires_in, MAX_LINK_SECONDS)
        credentials_expire_at = self._credentials_expire_at()
        if credentials_expire_at is not None:
            # Promise only what the link will honour; at least a minute, because
            # botocore refreshes such credentials well before they lapse.
            seconds = max(60, min(seconds, int(credentials_expire_at - self._clock())))
        url = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._object_key(key)},
            ExpiresIn=seconds,
        )
        return Link(url, self._clock() + seconds)


def open_storage(location: str, *, s3_endpoint_url: str | None = None) -> Storage:
    """`s3://bucket[/prefix]` or a folder path."""
    if location.startswith("s3://"):
        rest = location[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"storage {location!r} names no bucket; use s3://bucket[/prefix]")
        return S3Storage(bucket, prefix, endpoint_url=s3_endpoint_url)
    if "://" in location:
        raise ValueError(f"storage {location!r}: use a folder path or s3://bucket[/prefix]")
    return FolderStorage(Path(location))
