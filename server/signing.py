"""HMAC-SHA256 signed, expiring links for results served from local storage."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SECRET_ENV = "IMAGEFLEET_LINK_SECRET"
SECRET_FILE = ".link-secret"
MIN_SECRET_CHARS = 32
EXPIRES = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class LinkSigner:
    secret: bytes

    def signature(self, key: str, expires: int) -> str:
        message = f"{key}\n{expires}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: str, signature: str, now: float) -> bool:
        """True when the signature matches and the link has not expired."""
        if not EXPIRES.fullmatch(expires):
            return False
        if int(expires) < now:
            return False
        expected = self.signature(key, int(expires)).encode()
        # Bytes, not str: compare_digest refuses a non-ASCII str with TypeError, and a
        # query parameter can hold anything. surrogatepass: any str encodes.
        return hmac.compare_digest(expected, signature.encode("utf-8", "surrogatepass"))


def load_or_create_secret(folder: Path, environ: dict[str, str] | None = None) -> bytes:
    """The secret from the environment, else from a 0600 file in the storage folder,
    created once. Workers sharing a storage folder thereby share the secret."""
    env = os.environ if environ is None else environ
    value = env.get(SECRET_ENV, "")
    if value:
        if len(value) < MIN_SECRET_CHARS:
            raise ValueError(f"{SECRET_ENV} must be at least {MIN_SECRET_CHARS} characters")
        return value.encode()
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
