"""The API tokens a server accepts, and where they come from.

Sources (``ServerConfig``; the first one given wins):

- ``token`` (``IMAGEFLEET_TOKEN``): one token, or several separated by commas for a
  rotation by hand: the first is the current one, all are accepted.
- ``token_file``: a file holding the same, readable by its owner only (mode 0600; a file
  others can read is refused). Re-read every ``token_refresh`` seconds.
- ``token_ssm_parameter``: an SSM Parameter Store SecureString, read with the standard
  boto3 credential chain (on EC2: the instance role) and re-read every ``token_refresh``
  seconds, so a rotation reaches every worker without a restart. Its value is a
  :class:`TokenSet` document (``bootstrap_aws up`` writes it) or a plain token list.

A rotation keeps the previous token accepted until its ``until`` time (the overlap),
checked on every request, so it stops being accepted on time whatever the re-read
interval. A re-read that fails keeps the last tokens read (and logs it); reading at start
fails the start, so a server never runs open because its token source was unreachable.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.backoff import doubling_delays

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 8
DOCUMENT_VERSION = 1


class TokenSourceError(ValueError):
    """The token source is missing, unreadable or holds something that is not tokens."""


def _wire(value: str | bytes) -> bytes:
    # compare_digest refuses a non-ASCII str; a header may hold anything (aiohttp maps
    # undecodable bytes to surrogates), and surrogatepass encodes every str.
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")


def token_matches(supplied: str | bytes, accepted: Iterable[str | bytes]) -> bool:
    """Whether ``supplied`` is one of ``accepted``, in constant time per candidate.

    Every candidate is compared, so the time taken does not tell which one matched;
    never raises, whatever characters ``supplied`` holds."""
    given = _wire(supplied)
    matches = [hmac.compare_digest(given, _wire(token)) for token in accepted]
    return any(matches)


def bearer_accepts(authorization: str | None, accepted: Iterable[str | bytes]) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <one of accepted>``.

    The scheme is case-insensitive (RFC 7235); a missing header, another scheme or an
    empty ``accepted`` is refused."""
    scheme, _, supplied = (authorization or "").partition(" ")
    matched = token_matches(supplied, accepted)
    return scheme.lower() == "bearer" and matched


@dataclass(frozen=True)
class PreviousToken:
    token: str
    until: float  # epoch seconds; accepted strictly before this


@dataclass(frozen=True)
class TokenSet:
    """The current token and the previous ones still inside their overlap."""

    current: str
    previous: tuple[PreviousToken, ...] = ()

    def accepted(self, now: float) -> tuple[str, ...]:
        return (self.current, *(p.token for p in self.previous if now < p.until))

    def accepts(self, supplied: str, now: float) -> bool:
        return token_matches(supplied, self.accepted(now))

    def rotated(self, new: str, now: float, overlap_s: float) -> TokenSet:
        """The set after a rotation: ``new`` current, the old current accepted for
        ``overlap_s`` more seconds, previous ones whose overlap has ended dropped."""
        kept = tuple(p for p in self.previous if now < p.until)
        return TokenSet(new, (PreviousToken(self.current, now + overlap_s), *kept))

    def to_json(self) -> str:
        return json.dumps({"version": DOCUMENT_VERSION, "current": self.current,
                           "previous": [{"token": p.token, "until": round(p.until, 3)}
                                        for p in self.previous]}, sort_keys=True)


def _check_token(token: object, where: str) -> str:
    if not isinstance(token, str) or len(token.strip()) < MIN_TOKEN_CHARS:
        raise TokenSourceError(f"{where}: every token must be a string of at least "
                               f"{MIN_TOKEN_CHARS} characters")
    if "," in token or any(c.isspace() for c in token):
        raise TokenSourceError(f"{where}: a token may not contain commas or spaces")
    return token


def parse_token_list(value: str, where: str) -> TokenSet:
    """``token[,token...]``: the first is current; the others are accepted with no end."""
    tokens = [part.strip() for part in value.split(",") if part.strip()]
    if not tokens:
        raise TokenSourceError(f"{where} holds no token")
    checked = [_check_token(t, where) for t in tokens]
    return TokenSet(checked[0], tuple(PreviousToken(t, float("inf")) for t in checked[1:]))


def parse_token_document(value: str, where: str) -> TokenSet:
    """A :meth:`TokenSet.to_json` document, or (anything not starting with ``{``) a
    plain token list."""
    text = value.strip()
    if not text.startswith("{"):
        return parse_token_list(text, where)
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenSourceError(f"{where}: not a valid token document ({exc.msg})") from None
    if not isinstance(data, dict) or data.get("version") != DOCUMENT_VERSION:
        raise TokenSourceError(f"{where}: expected a token document of version "
                               f"{DOCUMENT_VERSION}")
    previous = data.get("previous", [])
    if not isinstance(previous, list):
        raise TokenSourceError(f"{where}: 'previous' must be a list")
    items = []
    for item in previous:
        if not isinstance(item, dict) or not isinstance(item.get("until"), int | float) \
                or isinstance(item.get("until"), bool):
            raise TokenSourceError(f"{where}: each previous token needs 'token' and a "
                                   "numeric 'until'")
        items.append(PreviousToken(_check_token(item.get("token"), where), float(item["until"])))
    return TokenSet(_check_token(data.get("current"), where), tuple(items))


# ------------------------------------------------------------------------------ readers

def read_token_file(path: Path) -> str:
    try:
        info = path.stat()
    except OSError as exc:
        raise TokenSourceError(f"token file {path}: {exc.strerror or exc}") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise TokenSourceError(f"token file {path} is readable by others (mode "
                               f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenSourceError(f"token file {path}: {exc}") from None


def ssm_reader(parameter: str, region: str | None = None) -> Callable[[], str]:
    """A function that reads ``parameter`` (decrypted) from SSM. boto3 finds the
    credentials (the instance role on EC2) and the endpoint (``AWS_ENDPOINT_URL_SSM``
    points it at a stand-in such as moto)."""
    import boto3
    from botocore.config import Config

    client = boto3.client("ssm", region_name=region, config=Config(
        retries={"mode": "standard", "max_attempts": 3}, connect_timeout=3, read_timeout=5))

    def read() -> str:
        try:
            return client.get_parameter(Name=parameter, WithDecryption=True)["Parameter"]["Value"]
        except Exception as exc:  # botocore's tree: credentials, access, not found, network
            raise TokenSourceError(f"SSM parameter {parameter}: {exc}") from exc

    return read


class RefreshingTokens:
    """Tokens read by ``read`` at start (failures raise) and again every ``interval_s``
    seconds on a daemon thread (failures keep the last good set)."""

    def __init__(self, read: Callable[[], str], where: str, interval_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._read, self._where, self._clock = read, where, clock
        self._current = parse_token_document(read(), where)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval_s
        self._thread = threading.Thread(target=self._loop, name="token-refresh", daemon=True)
        self._thread.start()

    def token_set(self) -> TokenSet:
        with self._lock:
            return self._current

    def refresh(self) -> None:
        try:
            fresh = parse_token_document(self._read(), self._where)
        except TokenSourceError as exc:
            log.warning("keeping the tokens read before: %s", exc)
            return
        with self._lock:
            changed = fresh != self._current
            self._current = fresh
        if changed:
            log.info("tokens from %s changed (%d accepted now)", self._where,
                     len(fresh.accepted(self._clock())))

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.refresh()

    def close(self) -> None:
        self._stop.set()


class StaticTokens:
    def __init__(self, tokens: TokenSet | None) -> None:
        self._tokens = tokens

    def token_set(self) -> TokenSet | None:
        return self._tokens

    def close(self) -> None:
        pass


@dataclass
class TokenGate:
    """What a request's ``Authorization`` header is checked against (None: no token)."""

    source: StaticTokens | RefreshingTokens
    clock: Callable[[], float] = time.time

    @property
    def required(self) -> bool:
        return self.source.token_set() is not None

    def current(self) -> str | None:
        tokens = self.source.token_set()
        return tokens.current if tokens else None

    def accepts(self, authorization: str | None) -> bool:
        tokens = self.source.token_set()
        if tokens is None:
            return True
        return bearer_accepts(authorization, tokens.accepted(self.clock()))

    def close(self) -> None:
        self.source.close()


def open_token_gate(*, token: str | None, token_file: str | None,
                    ssm_parameter: str | None, refresh_s: float,
                    region: str | None = None) -> TokenGate:
    """The gate for a server's configuration; raises TokenSourceError when the source
    named cannot be read now."""
    given = [name for name, value in (("token", token), ("token_file", token_file),
                                      ("token_ssm_parameter", ssm_parameter)) if value]
    if len(given) > 1:
        raise TokenSourceError(f"give one token source, not {' and '.join(given)}")
    if ssm_parameter:
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        read = ssm_reader(ssm_parameter, region)
        return TokenGate(RefreshingTokens(_retrying(read, 30.0), f"SSM parameter "
                                          f"{ssm_parameter}", refresh_s))
    if token_file:
        path = Path(token_file)
        return TokenGate(RefreshingTokens(lambda: read_token_file(path),
                                          f"token file {path}", refresh_s))
    return TokenGate(StaticTokens(parse_token_list(token, "IMAGEFLEET_TOKEN")
                                  if token else None))


def _retrying(read: Callable[[], str], first_for_s: float) -> Callable[[], str]:
    """``read``, retried with backoff for ``first_for_s`` seconds on its first call only:
    an instance's role credentials can lag its boot by a few seconds."""
    first = [True]

    def call() -> str:
        if not first[0]:
            return read()
        first[0] = False
        deadline, delays = time.monotonic() + first_for_s, doubling_delays(0.5, 5.0)
        while True:
            try:
                return read()
            except TokenSourceError as exc:
                delay = next(delays)
                if time.monotonic() + delay > deadline:
                    raise
                log.info("token not readable yet (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)

    return call
