"""Waitress integration: JSON for errors waitress answers itself, and counting a
request as finished only once its whole body has been handed to waitress."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

from server.api import ErrorBody

ERROR_CODES = {400: "bad_request", 413: "too_many_bytes", 431: "headers_too_large",
               500: "internal_error"}


class JsonErrorTask(ErrorTask):
    """Waitress refuses some requests before the app sees them (a body over its size
    limit, a malformed request line); the contract says errors are always JSON."""

    def execute(self) -> None:
        error = self.request.error
        code = ERROR_CODES.get(error.code, "bad_request")
        message = f"{error.reason}: {error.body}".strip(": ")
        if error.code == 413:
            limit = self.channel.server.adj.max_request_body_size
            message = f"the request body is larger than {limit} bytes, the limit"
        body = json.dumps(ErrorBody.of(code, message).model_dump(mode="json")).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(HTTPChannel):
    error_task_class = JsonErrorTask


class CountedBody:
    """Wraps a WSGI response iterable; `on_close` runs when the server is done with it,
    i.e. after the last byte was handed to waitress (WSGI calls close() then)."""

    def __init__(self, body: Iterable[bytes], on_close: Callable[[], None]):
        self._body = body
        self._on_close = on_close

    def __iter__(self):
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._on_close()


def unsent_bytes(server) -> int:
    """Response bytes waitress still has to write to sockets, over all connections."""
    return sum(getattr(channel, "total_outbufs_len", 0)
               for channel in list(server._map.values()))
