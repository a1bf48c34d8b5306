"""The encoder, colour and metadata options of ``POST /process``: parsed once, canonical.

Pure: no Flask, no I/O. Every option has a default; an option that does not apply to
the output format (``progressive`` on a PNG) is ignored, and :meth:`OutputOptions.effective`
drops it, so such requests share a result key with the plain one. A request at every
default gives exactly the key material of the versions before these options existed,
so results stored by them stay cache hits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from server.api import parse_bool
from server.errors import bad_request

OutputFormat = Literal["png", "jpeg", "webp", "avif"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("png", "jpeg", "webp", "avif")
SUBSAMPLINGS = ("4:4:4", "4:2:2", "4:2:0")
ICC_POLICIES = ("srgb", "keep")
METADATA_POLICIES = ("strip", "keep-no-location", "keep")
DEFAULT_QUALITY = {"jpeg": 90, "webp": 90, "avif": 75}
# Chroma subsampling applies where the encoder takes it (libjpeg, libavif); both default
# to 4:2:0, as OpenCV and Pillow do.
SUBSAMPLED_FORMATS = frozenset({"jpeg", "avif"})


@dataclass(frozen=True)
class OutputOptions:
    """How to write the result. ``quality`` None: the format's default."""

    quality: int | None = None
    progressive: bool = False
    subsampling: str = "4:2:0"
    lossless: bool = False
    icc: str = "srgb"
    metadata: str = "strip"

    def effective(self, fmt: str) -> OutputOptions:
        """The options that change ``fmt``'s bytes, the rest at their defaults."""
        quality = self.quality or DEFAULT_QUALITY.get(fmt)
        lossless = self.lossless and fmt == "webp"
        if fmt == "png" or lossless:
            quality = None  # PNG and lossless WebP have no quality
        return replace(
            self,
            quality=quality,
            progressive=self.progressive and fmt == "jpeg",
            subsampling=self.subsampling if fmt in SUBSAMPLED_FORMATS else "4:2:0",
            lossless=lossless,
        )

    def key_material(self, fmt: str) -> list[bytes]:
        """Lines for the result key: the quality as before, then only the options that
        differ from their defaults, by name (so adding an option never changes old keys)."""
        eff = self.effective(fmt)
        lines = [str(eff.quality or 0).encode()]
        defaults = OutputOptions()
        for name in ("progressive", "subsampling", "lossless", "icc", "metadata"):
            value = getattr(eff, name)
            if value != getattr(defaults, name):
                lines.append(f"{name}={value}".encode())
        return lines


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise bad_request("invalid_parameter",
                              f"'{name}' got {raw[:20]!r}; allowed: {', '.join(choices)}")
        return raw

    return parse


def _bool(name: str) -> Callable[[str], bool]:
    def parse(raw: str) -> bool:
        flag = parse_bool(raw)  # the words every parameter takes for true and false
        if flag is None:
            raise bad_request("invalid_parameter",
                              f"'{name}' got {raw[:20]!r}; allowed: true or false")
        return flag

    return parse


FIELDS: dict[str, Callable[[str], object]] = {
    "progressive": _bool("progressive"),
    "subsampling": _choice("subsampling", SUBSAMPLINGS),
    "lossless": _bool("lossless"),
    "icc": _choice("icc", ICC_POLICIES),
    "metadata": _choice("metadata", METADATA_POLICIES),
}


def parse_format(raw: str | None) -> OutputFormat | None:
    """The ``format`` field: None (the input's format) or one we write."""
    if raw is None or raw == "":
        return None
    if raw in OUTPUT_FORMATS:
        return raw  # type: ignore[return-value]
    allowed = ", ".join(OUTPUT_FORMATS)
    if raw.lower() in ("heic", "heif"):
        # HEIC is read, not written: browsers other than Safari cannot show it and its
        # HEVC encoder is patent-encumbered; AVIF is the same container with an open codec.
        raise bad_request("invalid_parameter",
                          f"'format' got {raw[:20]!r}: HEIC is accepted as input but not "
                          f"written; use avif for the same efficiency. Allowed: {allowed}")
    raise bad_request("invalid_parameter", f"'format' got {raw[:20]!r}; allowed: {allowed}")


def parse_options(get: Callable[[str], str | None], quality: int | None) -> OutputOptions:
    """Read the optional fields with ``get`` (a form's ``get``); 400 names what is allowed.
    ``quality`` is parsed by the caller, as before these options."""
    values: dict[str, object] = {}
    for name, parse in FIELDS.items():
        raw = get(name)
        if raw is not None and raw != "":
            values[name] = parse(raw)
    return OutputOptions(quality=quality, **values)  # type: ignore[arg-type]
