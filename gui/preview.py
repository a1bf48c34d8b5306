"""Image helpers for the Process view (Pillow only, no Tk): thumbnails, the downscaled
copy sent for a quick preview, and the before/after compositions.

These run on the worker thread; the UI thread only wraps the finished PIL images in
CTkImage objects.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

QUICK_PREVIEW_SIDE = 480
THUMBNAIL_SIDE = 56


class PreviewError(ValueError):
    """An image could not be opened or decoded; the message names the file."""


def open_image(source: Path | bytes, name: str | None = None,
               reduce_to: int | None = None) -> Image.Image:
    """Open and decode an image, applying its EXIF orientation. ``reduce_to``: a JPEG
    may be decoded at a reduced scale that still covers that many pixels a side."""
    label = name or (source.name if isinstance(source, Path) else "image")
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
            if reduce_to and img.format == "JPEG":
                img.draft("RGB", (reduce_to, reduce_to))
            img.load()
            oriented = ImageOps.exif_transpose(img)
            result = oriented if oriented is not None else img.copy()
            # copies lose .format; info travels with copies and thumbnails
            result.info["source_format"] = img.format
            return result
    except FileNotFoundError:
        raise PreviewError(f"{label}: file not found") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise PreviewError(f"{label}: not a readable image ({exc})") from exc


def displayable(img: Image.Image) -> Image.Image:
    """RGB or RGBA, the modes Tk shows correctly (16-bit and palette images are not)."""
    if img.mode in ("RGB", "RGBA"):
        return img
    if img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return img.point(lambda v: v / 256).convert("L").convert("RGB")
    return img.convert("RGB")


def thumbnail(img: Image.Image, side: int = THUMBNAIL_SIDE) -> Image.Image:
    """A square thumbnail (centre-cropped) so the list rows line up."""
    return ImageOps.fit(displayable(img), (side, side), Image.Resampling.LANCZOS)


def fit_within(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scaled (down or up) to fit the box, keeping the aspect ratio."""
    scale = min(width / img.width, height / img.height)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return displayable(img).resize(size, Image.Resampling.LANCZOS)


def downscaled_bytes(img: Image.Image, side: int = QUICK_PREVIEW_SIDE) -> tuple[bytes, str]:
    """The small copy sent to the server for a quick preview, and its format.

    PNG keeps transparency and grey levels exact; photos go as high-quality JPEG so the
    round trip stays fast on a remote endpoint.
    """
    small = displayable(img).copy()
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    source_format = str(img.info.get("source_format") or img.format or "").upper()
    if small.mode == "RGBA" or source_format == "PNG":
        small.save(buffer, format="PNG", optimize=False)
        return buffer.getvalue(), "png"
    small.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue(), "jpeg"


def _checkerboard(size: tuple[int, int], cell: int = 8) -> Image.Image:
    board = Image.new("RGB", size, "#d0d0d0")
    draw = ImageDraw.Draw(board)
    for y in range(0, size[1], cell):
        for x in range((y // cell % 2) * cell, size[0], cell * 2):
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill="#f0f0f0")
    return board


def flatten(img: Image.Image) -> Image.Image:
    """Transparent areas over a checkerboard, so they read as transparent."""
    img = displayable(img)
    if img.mode != "RGBA":
        return img
    board = _checkerboard(img.size)
    board.paste(img, mask=img.getchannel("A"))
    return board


def compose_split(before: Image.Image, after: Image.Image, split: float,
                  box: tuple[int, int]) -> Image.Image:
    """The slider view: ``before`` left of ``split`` (0..1), ``after`` right of it, both
    fitted into the same box (operations may change the size), with a divider line."""
    width, height = box
    left = flatten(fit_within(before, width, height))
    right = flatten(fit_within(after, width, height))
    canvas_size = (max(left.width, right.width), max(left.height, right.height))
    canvas = Image.new("RGB", canvas_size, "#808080")
    right_canvas = canvas.copy()
    canvas.paste(left, ((canvas_size[0] - left.width) // 2, (canvas_size[1] - left.height) // 2))
    right_canvas.paste(right, ((canvas_size[0] - right.width) // 2,
                               (canvas_size[1] - right.height) // 2))
    x = round(min(1.0, max(0.0, split)) * canvas_size[0])
    canvas.paste(right_canvas.crop((x, 0, canvas_size[0], canvas_size[1])), (x, 0))
    draw = ImageDraw.Draw(canvas)
    draw.line((x, 0, x, canvas_size[1]), fill="#ffffff", width=2)
    return canvas


def app_icon(side: int = 64) -> Image.Image:
    """The window icon, drawn rather than shipped: a white diamond on a blue tile."""
    scale = 4  # draw large and shrink, for smooth edges
    big = side * scale
    icon = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(icon)
    draw.rounded_rectangle((0, 0, big - 1, big - 1), radius=big // 5, fill="#1f6aa5")
    c, r = big // 2, big * 0.3
    draw.polygon([(c, c - r), (c + r, c), (c, c + r), (c - r, c)], fill="#ffffff")
    return icon.resize((side, side), Image.Resampling.LANCZOS)


def load_thumbnail(path: Path, side: int = THUMBNAIL_SIDE) -> Image.Image:
    """A list thumbnail straight from the file, decoding as little as possible.

    JPEGs are decoded at a reduced scale (``draft``: 1/2 to 1/8 of the size, done by
    the JPEG decoder itself), so a 24-megapixel photo costs a fraction of a full decode.
    """
    return thumbnail(open_image(path, reduce_to=side * 2), side)


def load_for_preview(path: Path, side: int) -> Image.Image:
    """The selected image for the before/after view, at most ``side`` pixels wide/high."""
    img = open_image(path, reduce_to=side)
    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    return img
