"""Writing ICC, EXIF and XMP blocks into encoded JPEG, PNG and WebP bytes.

OpenCV encodes the pixels (fast, and the same bytes whatever the metadata policy) but
cannot write these blocks, so they are spliced into its output here, where each
format's specification puts them. AVIF is written by Pillow, which takes them itself.
"""

from __future__ import annotations

import struct
import zlib

from server.metadata import Embedded

JPEG_ICC_CHUNK = 65_519  # 65535 - 2 (length) - 12 ("ICC_PROFILE\0") - 2 (sequence)
JPEG_SEGMENT = 65_533    # 65535 - 2 (length)
XMP_JPEG_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"


def embed(data: bytes, fmt: str, blocks: Embedded, *, alpha: bool) -> bytes:
    if not blocks:
        return data
    if fmt == "jpeg":
        return _jpeg(data, blocks)
    if fmt == "png":
        return _png(data, blocks)
    if fmt == "webp":
        return _webp(data, blocks, alpha)
    raise ValueError(f"cannot embed metadata in {fmt}")


def _segment(marker: int, payload: bytes) -> bytes | None:
    if len(payload) > JPEG_SEGMENT:
        return None
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _jpeg(data: bytes, blocks: Embedded) -> bytes:
    """After SOI and the JFIF APP0 (which must come first): APP1 EXIF, APP1 XMP, APP2 ICC
    (split into numbered chunks, as ICC.1 Annex B describes)."""
    segments: list[bytes] = []
    if blocks.exif and (seg := _segment(0xE1, b"Exif\x00\x00" + blocks.exif)):
        segments.append(seg)
    if blocks.xmp and (seg := _segment(0xE1, XMP_JPEG_HEADER + blocks.xmp)):
        segments.append(seg)
    if blocks.icc:
        chunks = [blocks.icc[i:i + JPEG_ICC_CHUNK]
                  for i in range(0, len(blocks.icc), JPEG_ICC_CHUNK)]
        if len(chunks) <= 255:
            for n, chunk in enumerate(chunks, 1):
                segments.append(_segment(0xE2, b"ICC_PROFILE\x00" + bytes((n, len(chunks)))
                                         + chunk) or b"")
    pos = 2
    if data[2:4] == b"\xff\xe0":  # JFIF APP0
        pos = 4 + struct.unpack_from(">H", data, 4)[0]
    return data[:pos] + b"".join(segments) + data[pos:]


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def _png(data: bytes, blocks: Embedded) -> bytes:
    """After IHDR: iCCP (zlib-compressed), eXIf, iTXt XML:com.adobe.xmp (all before IDAT)."""
    chunks: list[bytes] = []
    if blocks.icc:
        chunks.append(_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(blocks.icc)))
    if blocks.exif:
        chunks.append(_chunk(b"eXIf", blocks.exif))
    if blocks.xmp:
        chunks.append(_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + blocks.xmp))
    end_of_ihdr = 8 + 8 + 13 + 4  # signature, length + type, IHDR data, CRC
    return data[:end_of_ihdr] + b"".join(chunks) + data[end_of_ihdr:]


def _riff_chunk(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) % 2 else b"")


def _webp_size(kind: bytes, payload: bytes) -> tuple[int, int]:
    if kind == b"VP8X":
        w = int.from_bytes(payload[4:7], "little") + 1
        h = int.from_bytes(payload[7:10], "little") + 1
        return w, h
    if kind == b"VP8L":  # signature 0x2f, then 14 bits width-1, 14 bits height-1
        bits = int.from_bytes(payload[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    # VP8 key frame: 3 bytes frame tag, 3 bytes start code, then 14-bit width and height
    w, h = struct.unpack_from("<HH", payload, 6)
    return w & 0x3FFF, h & 0x3FFF


def _webp(data: bytes, blocks: Embedded, alpha: bool) -> bytes:
    """The extended format: VP8X (with the flags), ICCP, the image chunks, EXIF, XMP."""
    pos, image_chunks = 12, []
    width = height = 0
    while pos + 8 <= len(data):
        kind = data[pos:pos + 4]
        size = struct.unpack_from("<I", data, pos + 4)[0]
        payload = data[pos + 8:pos + 8 + size]
        if kind in (b"VP8X", b"VP8 ", b"VP8L") and not width:
            width, height = _webp_size(kind, payload)
        if kind != b"VP8X":
            image_chunks.append(_riff_chunk(kind, payload))
        pos += 8 + size + (size % 2)
    flags = ((0x20 if blocks.icc else 0) | (0x10 if alpha else 0)
             | (0x08 if blocks.exif else 0) | (0x04 if blocks.xmp else 0))
    vp8x = _riff_chunk(b"VP8X", bytes((flags, 0, 0, 0)) + (width - 1).to_bytes(3, "little")
                       + (height - 1).to_bytes(3, "little"))
    body = b"WEBP" + vp8x
    if blocks.icc:
        body += _riff_chunk(b"ICCP", blocks.icc)
    body += b"".join(image_chunks)
    if blocks.exif:
        body += _riff_chunk(b"EXIF", blocks.exif)
    if blocks.xmp:
        body += _riff_chunk(b"XMP ", blocks.xmp)
    return b"RIFF" + struct.pack("<I", len(body)) + body
