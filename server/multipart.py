"""multipart/form-data for a body that is already in memory, in one pass of
`bytes.find`.

werkzeug's parser streams, and compiles two regular expressions per request because
the boundary is part of each pattern and clients pick a new random boundary for
every request; that and its chunked state machine cost about as much as resizing a
2K photograph. Here the body is in memory anyway (uploads are bounded by the request
size limit and processed whole), so a well-formed body is split directly. Anything
unusual (bare LF line breaks, header continuation lines, a boundary string inside a
part, a charset other than UTF-8, a truncated body) is handed to werkzeug's parser
instead, so the accepted language and every error stay exactly werkzeug's.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from werkzeug.datastructures import FileStorage, Headers
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header

CRLF = b"\r\n"
BLANK_LINE = b"\r\n\r\n"


class NotSimple(Exception):
    """The body is not in the plain form the fast path handles; werkzeug decides."""


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    headers: list[tuple[str, str]]
    data: bytes


def split_parts(body: bytes, boundary: bytes, *, max_parts: int | None = None,
                max_field_bytes: int | None = None) -> list[Part]:
    """The parts of a multipart body with CRLF line breaks. Raises NotSimple for any
    other shape, RequestEntityTooLarge past the part and field limits."""
    if not boundary:
        raise NotSimple("no boundary")
    delimiter = b"--" + boundary
    separator = CRLF + delimiter
    if body.startswith(delimiter):
        pos = len(delimiter)
    elif body.startswith(separator):  # werkzeug's own encoder starts with a line break
        pos = len(separator)
    else:  # clients send no preamble
        raise NotSimple("preamble")
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", pos):  # the close delimiter; the epilogue is ignored
            return parts
        eol = body.find(CRLF, pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise NotSimple("text after a boundary")
        if body.startswith(CRLF, eol + 2):  # a part without headers
            raw_headers, content_start = b"", eol + 4
        else:
            headers_end = body.find(BLANK_LINE, eol + 2)
            if headers_end < 0:
                raise NotSimple("headers never end")
            raw_headers, content_start = body[eol + 2:headers_end], headers_end + 4
        # The line break before a delimiter belongs to the delimiter, so an empty part
        # ends with the blank line's own CRLF.
        end = body.find(separator, content_start - 2)
        if end < 0:
            raise NotSimple("no closing boundary")
        if body.find(delimiter, content_start, end) >= 0:
            # werkzeug also takes a boundary after a bare CR or LF as a delimiter.
            raise NotSimple("boundary inside a part")
        parts.append(_part(raw_headers, body[content_start:max(end, content_start)],
                           max_field_bytes))
        if max_parts is not None and len(parts) > max_parts:
            raise RequestEntityTooLarge()
        pos = end + len(separator)


def _part(raw_headers: bytes, data: bytes, max_field_bytes: int | None) -> Part:
    headers: list[tuple[str, str]] = []
    for line in raw_headers.split(CRLF) if raw_headers else ():
        if line[:1] in (b" ", b"\t") or b":" not in line or b"\n" in line or b"\r" in line:
            raise NotSimple("folded or malformed header")
        try:
            name, _, value = line.decode().partition(":")
        except UnicodeDecodeError as exc:
            raise NotSimple("header is not UTF-8") from exc
        headers.append((name.strip(" \t"), value.strip(" \t")))
    lookup: dict[str, str] = {}
    for name, value in headers:
        lookup.setdefault(name.lower(), value)  # the first of repeated headers counts
    if "content-disposition" not in lookup:
        raise NotSimple("no Content-Disposition")
    _, options = parse_options_header(lookup["content-disposition"])
    charset = parse_options_header(lookup.get("content-type", ""))[1].get("charset")
    if charset is not None and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise NotSimple(f"charset {charset}")
    if "name" not in options:
        raise NotSimple("part without a name")
    filename = options.get("filename")
    if filename is None and max_field_bytes is not None and len(data) > max_field_bytes:
        raise RequestEntityTooLarge()
    return Part(options["name"], filename, headers, data)


class InMemoryFormDataParser(FormDataParser):
    """werkzeug's FormDataParser with the fast path above for multipart bodies; files
    stay in memory (no spooling to temporary files)."""

    def _parse_multipart(self, stream, mimetype, content_length, options):
        body = stream.read()
        try:
            boundary = options.get("boundary", "").encode("ascii")
            parts = split_parts(body, boundary, max_parts=self.max_form_parts,
                                max_field_bytes=self.max_form_memory_size)
        except (NotSimple, UnicodeEncodeError):
            return super()._parse_multipart(io.BytesIO(body), mimetype, content_length,
                                            options)
        fields: list[tuple[str, str]] = []
        files: list[tuple[str, FileStorage]] = []
        for part in parts:
            if part.filename is None:
                fields.append((part.name, part.data.decode("utf-8", "replace")))
            else:
                files.append((part.name, FileStorage(io.BytesIO(part.data), part.filename,
                                                     part.name, headers=Headers(part.headers))))
        return stream, self.cls(fields), self.cls(files)


__all__ = ["InMemoryFormDataParser", "NotSimple", "Part", "split_parts"]
