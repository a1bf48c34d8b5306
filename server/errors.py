"""The one error type routes raise; a single Flask handler turns it into JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.api import ErrorBody


@dataclass
class ApiError(Exception):
    """An error with an HTTP status, a stable machine-readable code and a human message.

    The message must say what was wrong and what is allowed, because it is shown to
    users as-is (desktop app, command line).
    """

    status: int
    code: str
    message: str
    # Seconds for a Retry-After header: set on answers that mean "busy, come back".
    retry_after: int | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return ErrorBody.of(self.code, self.message).model_dump(mode="json")


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)
