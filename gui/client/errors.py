"""What the client raises: every failure is one of these (see :mod:`gui.client`)."""

from __future__ import annotations


class ClientError(Exception):
    """Base class of every error raised by :mod:`gui.client`."""

    attempts: int = 1

    def __str__(self) -> str:
        text = super().__str__()
        if self.attempts > 1:
            text += f" (after {self.attempts} attempts)"
        return text


class InvalidRequest(ClientError, ValueError):
    """The call's arguments are invalid or a local input cannot be read; nothing was sent."""


class TransportError(ClientError):
    """No usable HTTP answer was received (after the retries allowed)."""


class ConnectError(TransportError):
    """The connection could not be made: refused, unknown host, unreachable."""


class ConnectionLost(TransportError):
    """The connection dropped before a complete answer arrived."""


class RequestTimeout(TransportError):
    """A timeout from :class:`Timeout` expired."""


class ConnectTimeout(RequestTimeout):
    """Connecting took longer than ``Timeout.connect``."""


class ReadTimeout(RequestTimeout):
    """The server stayed silent longer than ``Timeout.read`` (or ``total`` expired)."""


class ServerError(ClientError):
    """The server answered an error status.

    ``status`` is the HTTP status, ``code`` and ``message`` come from the server's
    ``{"error": {"code", "message"}}`` body (``code`` is ``"http_<status>"`` when the
    body is not that JSON, e.g. from a proxy or S3). ``retry_after`` is the
    ``Retry-After`` header in seconds, when given.
    """

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class InvalidResponse(ClientError):
    """The server's answer does not follow the contract (bad JSON, missing fields, bad image)."""
