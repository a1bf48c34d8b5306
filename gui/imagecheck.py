"""The header check made when images are added: is this file an image at all?

Pillow's ``Image.open`` reads only the header (format, size, mode) and decodes no pixels,
so the check is cheap enough for thousands of files on the worker thread. A file that
fails it is listed as "not an image" and never uploaded. A file whose header is fine but
whose pixels are damaged passes: the server decides about those, and its answer is shown.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import pillow_heif
from PIL import Image, UnidentifiedImageError

# Pillow imports its format plugins on the first file it cannot name at once; doing
# that here, at import on the Tk thread, keeps the worker thread's header checks cheap.
Image.init()
# HEIC/HEIF (phone photographs) is read by pillow-heif; registering it is process-wide, so
# thumbnails and previews of HEIC inputs work too. AVIF is Pillow's own.
pillow_heif.register_heif_opener(thumbnails=False)

_SNIFF_BYTES = 16
_SIGNATURES = {  # the first bytes of the formats the servers read
    b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP",
    b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
}


def _describe_start(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            start = handle.read(_SNIFF_BYTES)
    except OSError:
        return ""
    if not start:
        return "the file is empty"
    kind = next((name for magic, name in _SIGNATURES.items() if start.startswith(magic)),
                "WebP" if start[:4] == b"RIFF" and start[8:12] == b"WEBP" else None)
    if kind is not None:
        return f"a {kind} whose header is cut short or damaged"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in start):
        return "it starts with text, not an image header"
    return "no known image header"


def _sniff_format(path: Path) -> str | None:
    """Pillow's name of the format the first bytes announce, or None."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(_SNIFF_BYTES)
    except OSError:
        return None
    kind = next((name for magic, name in _SIGNATURES.items() if start.startswith(magic)), None)
    return kind or ("WEBP" if start[:4] == b"RIFF" and start[8:12] == b"WEBP" else None)


def not_an_image(path: Path) -> str | None:
    """Why ``path`` is not a readable image (one short phrase), or None when its header
    names an image format with a plausible size."""
    # Pillow tries its plugins in turn; naming the announced one first makes the check
    # about 2x cheaper for a folder of thousands (one plugin's parser instead of four).
    kind = _sniff_format(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. DecompressionBombWarning: the server judges
            with Image.open(path, formats=[kind] if kind else None) as img:
                width, height = img.size
    except FileNotFoundError:
        return "the file is gone"
    except PermissionError:
        return "permission denied"
    except UnidentifiedImageError:
        return _describe_start(path)
    except Image.DecompressionBombError as exc:
        return str(exc)
    except (OSError, ValueError, SyntaxError) as exc:
        # Pillow reports a header cut short as OSError/SyntaxError ("truncated", ...)
        return f"damaged or cut-short header ({exc})"
    if width <= 0 or height <= 0:
        return f"the header gives a size of {width}×{height}"
    return None


def check_headers(paths: Iterable[Path]) -> dict[Path, str]:
    """The files of ``paths`` that are not images, with why."""
    problems = {}
    for path in paths:
        why = not_an_image(path)
        if why is not None:
            problems[path] = why
    return problems
