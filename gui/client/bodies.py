"""Request bodies: the multipart form of ``POST /process`` with upload progress, and
the local image read and checked before anything is sent."""

from __future__ import annotations

import asyncio
import io
import json
import mimetypes
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractStreamWriter

from gui.client.errors import InvalidRequest, InvalidResponse

_UPLOAD_CHUNK = 64 * 1024




def form_fields(
    *,
    operation: str | None,
    params: Mapping[str, Any] | None,
    steps: Iterable[Mapping[str, Any]] | None,
    format: str | None,
    quality: int | None,
    expires_in: int | None,
    progressive: bool | None = None,
    subsampling: str | None = None,
    lossless: bool | None = None,
    icc: str | None = None,
    metadata: str | None = None,
) -> dict[str, str]:
    """The text fields of a ``POST /process`` form (pure; InvalidRequest on misuse).

    Exactly one of ``operation`` and ``steps`` is required. Values are checked only
    for shape; the server checks names and ranges and answers 400 with the valid ones.
    """
    if (operation is None) == (steps is None):
        raise InvalidRequest("give exactly one of 'operation' or 'steps'")
    fields: dict[str, str] = {}
    if operation is not None:
        if not isinstance(operation, str) or not operation:
            raise InvalidRequest(f"operation must be a non-empty string, got {operation!r}")
        fields["operation"] = operation
        if params:
            fields["params"] = _json_field("params", dict(params))
    else:
        if params:
            raise InvalidRequest("'params' goes with 'operation'; put step params in each step")
        step_list = [dict(step) for step in steps or ()]
        if not step_list:
            raise InvalidRequest("'steps' must list at least one step")
        for i, step in enumerate(step_list):
            if not isinstance(step.get("op"), str):
                raise InvalidRequest(f"steps[{i}] needs an 'op' naming the operation: {step!r}")
        fields["steps"] = _json_field("steps", step_list)
    if format is not None:
        fields["format"] = str(format)
    if quality is not None:
        fields["quality"] = str(int(quality))
    if expires_in is not None:
        fields["expires_in"] = str(int(expires_in))
    for name, flag in (("progressive", progressive), ("lossless", lossless)):
        if flag is not None:
            if not isinstance(flag, bool):
                raise InvalidRequest(f"{name} must be true or false, got {flag!r}")
            fields[name] = "true" if flag else "false"
    for name, text in (("subsampling", subsampling), ("icc", icc), ("metadata", metadata)):
        if text is not None:
            fields[name] = str(text)
    return fields


def _json_field(name: str, value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{name} cannot be sent as JSON: {exc}") from exc


class _ProgressPayload(aiohttp.Payload):
    """Bytes written in chunks, reporting (sent, total) after each one.

    Progress counts bytes handed to the transport (which applies back-pressure),
    a close enough measure of upload progress. aiohttp has no write timeout, so a
    peer that stops reading (a stopped process behind a proxy) would hold the upload
    forever: each chunk must be accepted within ``stall_timeout`` seconds.
    """

    _autoclose = True

    def __init__(
        self,
        value: bytes,
        *,
        on_progress: Callable[[int, int], None],
        stall_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(value, **kwargs)
        self._size = len(value)
        self._on_progress = on_progress
        self._stall_timeout = stall_timeout

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._value.decode(encoding, errors)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self._value

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        view = memoryview(self._value)
        if content_length is not None:
            view = view[:content_length]
        total = len(view)
        for start in range(0, total, _UPLOAD_CHUNK):
            chunk = view[start : start + _UPLOAD_CHUNK]
            try:
                async with asyncio.timeout(self._stall_timeout):
                    await writer.write(chunk)
            except TimeoutError:
                # aiohttp hands a TimeoutError from here to the response unchanged.
                raise TimeoutError(
                    f"upload stalled: the peer read nothing for {self._stall_timeout:g} s"
                ) from None
            self._on_progress(start + len(chunk), total)


def _multipart(
    fields: Mapping[str, str],
    image: bytes,
    filename: str,
    on_progress: Callable[[int, int], None],
    stall_timeout: float,
) -> aiohttp.MultipartWriter:
    writer = aiohttp.MultipartWriter("form-data")
    for name, value in fields.items():
        part = writer.append(value, {"Content-Type": "text/plain; charset=utf-8"})
        part.set_content_disposition("form-data", name=name)
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    payload = _ProgressPayload(
        image, on_progress=on_progress, stall_timeout=stall_timeout, content_type=content_type
    )
    payload.set_content_disposition("form-data", name="image", filename=filename)
    writer.append_payload(payload)
    return writer


def _upload_filename(label: str, image: bytes | Path) -> str:
    """A plain ASCII file name for the form (the server only needs the bytes)."""
    candidate = image.name if isinstance(image, Path) else Path(label).name
    if candidate.isascii() and candidate.isprintable() and '"' not in candidate and candidate:
        return candidate
    suffix = Path(candidate).suffix
    return "image" + (suffix if suffix.isascii() else "")


async def _load_image(image: bytes | bytearray | Path | str) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    path = Path(image)
    try:
        return await asyncio.to_thread(path.read_bytes)
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}") from exc


def check_image_bytes(data: bytes, where: str) -> None:
    """Raise InvalidResponse unless ``data`` is an image Pillow can parse and verify."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Image.DecompressionBombError:
        return  # a header this large parsed fine; the pixel count is the server's business
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidResponse(f"{where}: not a decodable image: {exc}") from exc


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port
