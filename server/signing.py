"""HMAC-SHA256 signed, expiring links for results served from local storage, and the
credential that marks a fleet's internal tile requests.

Where the link secret comes from (`load_link_keys`):

- `IMAGEFLEET_LINK_SECRET`: one key, or several separated by commas for rotation. The
  first signs, all verify: put the new key first and keep the old one after it until
  the links it signed have expired (at most 7 days). A fleet sets this for its workers.
- `IMAGEFLEET_LINK_SECRET_REQUIRED=1` (set by a fleet too): without the variable above
  the server refuses to start, rather than make a secret of its own that its fleet's
  other workers do not share.
- Otherwise (a standalone server): a 0600 `.link-secret` file in the storage folder,
  created once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from server.tokens import token_matches

log = logging.getLogger(__name__)

SECRET_ENV = "IMAGEFLEET_LINK_SECRET"
SECRET_REQUIRED_ENV = "IMAGEFLEET_LINK_SECRET_REQUIRED"
SECRET_FILE = ".link-secret"
MIN_SECRET_CHARS = 32
EXPIRES = re.compile(r"[0-9]{1,12}")
TILE_LABEL = b"imagefleet-tile-v1"


def _ascii(text: str) -> bytes:
    """Bytes for compare_digest, which refuses a non-ASCII str with TypeError; a query
    parameter or a header can hold anything. surrogatepass: any str encodes."""
    return text.encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class LinkSigner:
    """Signs with `secret`; verifies with it and with each of `previous` (rotation)."""

    secret: bytes
    previous: tuple[bytes, ...] = ()

    @classmethod
    def from_keys(cls, keys: tuple[bytes, ...]) -> LinkSigner:
        if not keys:
            raise ValueError("a link signer needs at least one key")
        return cls(keys[0], tuple(keys[1:]))

    @property
    def keys(self) -> tuple[bytes, ...]:
        return (self.secret, *self.previous)

    def signature(self, key: str, expires: int) -> str:
        return self._signature(self.secret, key, expires)

    @staticmethod
    def _signature(secret: bytes, key: str, expires: int) -> str:
        message = f"{key}\n{expires}".encode()
        return hmac.new(secret, message, hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: str, signature: str, now: float) -> bool:
        """True when the signature matches one of the keys and the link has not
        expired."""
        if not EXPIRES.fullmatch(expires):
            return False
        if int(expires) < now:
            return False
        supplied = _ascii(signature)
        # Every key is tried, so the time taken does not tell which one matched.
        matches = [hmac.compare_digest(self._signature(secret, key, int(expires)).encode(),
                                       supplied) for secret in self.keys]
        return any(matches)


def tile_credential(key: bytes) -> str:
    """What a coordinator sends in the tile header: derived from a key the fleet
    shares, so it is never the key itself and a client cannot make one."""
    return hmac.new(key, TILE_LABEL, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class TileCredentials:
    """The tile header values a server accepts (one per key, for rotation) and the one
    it sends (the first). Empty: tiles are not marked internal at all."""

    accepted: tuple[bytes, ...] = ()
    send: str | None = field(default=None)

    @classmethod
    def from_keys(cls, keys: tuple[bytes, ...]) -> TileCredentials:
        values = tuple(tile_credential(key) for key in keys)
        return cls(tuple(v.encode() for v in values), values[0] if values else None)

    def accepts(self, header: str | None) -> bool:
        return bool(header) and token_matches(header or "", self.accepted)


def parse_keys(value: str, source: str = SECRET_ENV) -> tuple[bytes, ...]:
    """`key[,key...]`: each at least MIN_SECRET_CHARS; empty items are skipped."""
    keys = tuple(part.strip() for part in value.split(",") if part.strip())
    if not keys:
        raise ValueError(f"{source} holds no key; give one, or several separated by commas")
    for index, key in enumerate(keys, 1):
        if len(key) < MIN_SECRET_CHARS:
            raise ValueError(f"{source}: key {index} of {len(keys)} has {len(key)} characters; "
                             f"each key must be at least {MIN_SECRET_CHARS} characters")
    return tuple(key.encode() for key in keys)


def secret_required(environ: Mapping[str, str]) -> bool:
    return environ.get(SECRET_REQUIRED_ENV, "").strip().lower() in ("1", "true", "yes")


def load_link_keys(folder: Path, environ: Mapping[str, str] | None = None) -> tuple[bytes, ...]:
    """The link keys, the signing one first: from the environment, else (unless the
    environment requires it there) from the storage folder's secret file."""
    env = os.environ if environ is None else environ
    value = env.get(SECRET_ENV, "")
    if value:
        return parse_keys(value)
    if secret_required(env):
        raise ValueError(
            f"{SECRET_REQUIRED_ENV}=1 but {SECRET_ENV} is not set: this server belongs to a "
            f"fleet, which hands its workers the link secret; set {SECRET_ENV} (one key or "
            f"several separated by commas, each at least {MIN_SECRET_CHARS} characters) or "
            f"unset {SECRET_REQUIRED_ENV} to keep a secret in the storage folder")
    return (_load_or_create_file_secret(folder),)


def load_or_create_secret(folder: Path, environ: Mapping[str, str] | None = None) -> bytes:
    """The signing key (see load_link_keys)."""
    return load_link_keys(folder, environ)[0]


def _load_or_create_file_secret(folder: Path) -> bytes:
    """A 0600 file in the storage folder, created once: workers sharing a storage
    folder and no fleet thereby share the secret."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SECRET_FILE
    if not path.exists():
        # Written whole to a private temporary file, then hard-linked into place: the
        # link fails if another worker won the race, and nobody sees a partial file.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".secret-")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.link(tmp, path)
            log.info("created link secret %s", path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    text = path.read_text().strip()
    if len(text) < MIN_SECRET_CHARS:
        raise ValueError(f"link secret file {path} is too short; delete it to regenerate")
    return text.encode()
