"""The error code of a botocore ``ClientError`` (or anything with its ``response``)."""
from __future__ import annotations


def error_code(exc: BaseException) -> str:
    """``exc.response["Error"]["Code"]``, or "" when there is none."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
