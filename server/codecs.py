"""Image decoding and encoding.

The header is read first (Pillow parses it without decoding pixels) so that size
limits are enforced before a single pixel buffer is allocated.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import pillow_heif
import simplejpeg
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from server import embed
from server.errors import ApiError
from server.metadata import NO_BLOCKS, Embedded, read_embedded
from server.output_options import (
    DEFAULT_QUALITY,
    OUTPUT_FORMATS,
    OutputFormat,
    OutputOptions,
)

log = logging.getLogger(__name__)

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp",
                 "avif": "image/avif"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "avif": "avif"}

# Pillow format name -> our name. Anything else is refused with 415. HEIF comes from
# pillow-heif, AVIF from Pillow's own plugin (pillow-heif 1.x left AVIF to it).
INPUT_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "BMP": "bmp",
                 "TIFF": "tiff", "GIF": "gif", "HEIF": "heic", "AVIF": "avif"}
ALLOWED_INPUTS = "PNG, JPEG, WebP, AVIF, HEIC, BMP, TIFF, GIF"
# Decoded by Pillow only (OpenCV's wheels read neither). Their decoders apply the
# container's rotation (HEIF's irot/imir) or report it as EXIF orientation (Pillow's
# AVIF), so the orientation read in probe() is right for both.
PILLOW_ONLY = frozenset({"heic", "avif"})
# Where a result in the input's format cannot be written: HEIC photographs become JPEG
# (the universal photo format), anything else PNG (lossless, keeps alpha).
FALLBACK_OUTPUT = {"heic": "jpeg"}
# libavif's speed 0..10: 8 is about 2.3x faster than Pillow's default 6 for the same
# bytes at 12 MP (scripts/bench_formats.py); results are encoded on the request path.
AVIF_SPEED = 8
JPEG_SUBSAMPLING = {"4:4:4": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
                    "4:2:2": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
                    "4:2:0": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420}
# zlib level 1 is several times faster than OpenCV's default 3 for a few % more bytes;
# results are stored once and downloaded many times, so 3 would pay off only rarely.
PNG_COMPRESSION = 1

ORIENTATION_TAG = 0x0112

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# libpng's default user_chunk_cache_max: it stops keeping ancillary chunks after this
# many. Pillow has no such cap and walks the chunks before the image data in Python
# (a million empty ones: seconds, outside the processing slots), so we count first.
MAX_PNG_ANCILLARY_CHUNKS = 1000
# Pillow reads a GIF's extension blocks before the first image in Python, one
# sub-block at a time, and joins comments with `bytes +=` (quadratic): a 5 MB file of
# comment blocks took 33 s to open. Real files have a handful of extension blocks
# there and comments of a few hundred bytes; XMP packets make sub-blocks of ~100 bytes.
MAX_GIF_EXTENSIONS = 1000
MAX_GIF_SUB_BLOCKS = 100_000
MAX_GIF_COMMENT_BYTES = 64 * 1024

# Pillow's own bomb check uses one fixed, process-wide limit; ours is configurable and
# runs in probe() from the header, before decoding. Pillow's would refuse images that
# our configuration allows (tiling is meant for 300 MP), so it is switched off here.
PILImage.MAX_IMAGE_PIXELS = None


def load_plugins() -> None:
    """Import Pillow's format plugins now: on first use concurrent requests would
    queue on the import lock."""
    PILImage.init()
    _register_heif()


def _register_heif() -> None:
    # Registration is Pillow's plugin table, process-wide by design; idempotent.
    # Thumbnails are never used here, so pillow-heif need not read them.
    pillow_heif.register_heif_opener(thumbnails=False)


_register_heif()  # probe() is used without create_app() too (tests, tools)


@dataclass(frozen=True)
class ImageInfo:
    format: str  # one of INPUT_FORMATS' values
    width: int   # as displayed, i.e. after EXIF orientation
    height: int
    orientation: int
    grayscale: bool = False
    # ICC, EXIF and XMP as found in the header; used only when a policy keeps them.
    embedded: Embedded = NO_BLOCKS

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _unsupported(detail: str) -> ApiError:
    return ApiError(415, "unsupported_image",
                    f"{detail}; send a PNG, JPEG, WebP, AVIF, HEIC, BMP, TIFF or GIF image")


def probe(data: bytes, max_pixels: int) -> ImageInfo:
    """Read format, size and orientation from the header; enforce the pixel limit."""
    if not data:
        raise _unsupported("the image file is empty")
    if data.startswith(PNG_SIGNATURE):
        check_png_chunks(data)
    elif data.startswith((b"GIF87a", b"GIF89a")):
        check_gif_blocks(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with PILImage.open(io.BytesIO(data)) as img:
                fmt = img.format or ""
                width, height = img.size
                grayscale = img.mode in ("L", "1", "I;16", "I")
                # Limits first: for some formats reading EXIF decodes the pixels.
                _check_size(fmt, width, height, max_pixels)
                orientation = _orientation(img)
                embedded = read_embedded(img)
    except PILImage.DecompressionBombError as exc:
        raise ApiError(413, "too_many_pixels",
                       f"the image is too large to open; at most {max_pixels / 1e6:.1f} MP "
                       "allowed") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise _unsupported("the file is not a decodable image") from exc
    if orientation >= 5:  # 5..8 swap the axes
        width, height = height, width
    return ImageInfo(INPUT_FORMATS[fmt], width, height, orientation, grayscale, embedded)


def check_png_chunks(data: bytes, limit: int = MAX_PNG_ANCILLARY_CHUNKS) -> None:
    """Walk the chunks before the first IDAT (what Pillow's header parser walks) and
    refuse more than `limit` ancillary ones. The walk stops at the limit, so it is
    bounded too. A truncated or malformed chunk list ends the walk: the decoders judge
    such files."""
    ancillary = critical = 0
    pos, end = len(PNG_SIGNATURE), len(data)
    while pos + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT" or length > 0x7FFFFFFF:  # image data, or not a PNG length
            return
        if kind[0] & 0x20:  # lower-case first letter: ancillary
            ancillary += 1
            if ancillary > limit:
                raise ApiError(415, "unsupported_image",
                               f"the PNG has more than {limit} ancillary chunks before its "
                               f"image data; at most {limit} are allowed (libpng's limit too)")
        else:
            critical += 1
            if critical > 2:  # IHDR and PLTE are the only ones allowed there, once each
                raise _unsupported(f"the PNG has an unexpected {kind!r} chunk before its "
                                   "image data (only IHDR and PLTE may come first)")
        pos += 12 + length  # length, type, data, CRC


def _gif_refusal(what: str, limit: str) -> ApiError:
    return ApiError(415, "unsupported_image",
                    f"the GIF has {what} before its first image; at most {limit} allowed")


def check_gif_blocks(data: bytes) -> None:
    """Walk the extension blocks before the first image (what Pillow's open() reads)
    and refuse more than the limits above. Anything else (the image, the trailer,
    damage) ends the walk: the decoder judges it."""
    if len(data) < 13:
        return
    flags, pos, end = data[10], 13, len(data)
    if flags & 0x80:  # a global colour table of 2^(n+1) RGB entries
        pos += 3 * (2 << (flags & 7))
    extensions = sub_blocks = comment_bytes = 0
    while pos + 1 < end and data[pos] == 0x21:  # extension introducer
        label = data[pos + 1]
        pos += 2
        extensions += 1
        if extensions > MAX_GIF_EXTENSIONS:
            raise _gif_refusal(f"more than {MAX_GIF_EXTENSIONS} extension blocks",
                               f"{MAX_GIF_EXTENSIONS} are")
        while pos < end and (size := data[pos]):
            pos += 1 + size
            sub_blocks += 1
            if sub_blocks > MAX_GIF_SUB_BLOCKS:
                raise _gif_refusal(f"more than {MAX_GIF_SUB_BLOCKS} extension data blocks",
                                   f"{MAX_GIF_SUB_BLOCKS} are")
            if label == 0xFE:
                comment_bytes += size
                if comment_bytes > MAX_GIF_COMMENT_BYTES:
                    raise _gif_refusal(f"more than {MAX_GIF_COMMENT_BYTES // 1024} KB of "
                                       "comments", f"{MAX_GIF_COMMENT_BYTES // 1024} KB are")
        pos += 1  # the terminating empty sub-block


def _check_size(fmt: str, width: int, height: int, max_pixels: int) -> None:
    if fmt not in INPUT_FORMATS:
        raise _unsupported(f"{fmt or 'this'} images are not supported")
    if width <= 0 or height <= 0:
        raise _unsupported(f"the image has zero width or height ({width}x{height})")
    if width * height > max_pixels:
        raise ApiError(
            413, "too_many_pixels",
            f"the image is {width}x{height} ({width * height / 1e6:.1f} MP); "
            f"at most {max_pixels / 1e6:.1f} MP allowed",
        )


def _orientation(img: PILImage.Image) -> int:
    """The EXIF orientation (1..8), without decoding pixels: Pillow's getexif() loads
    a PNG whole to find an eXIf chunk after the image data, so for PNG only an eXIf
    chunk before the pixels counts (where writers put it)."""
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = PILImage.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = int(exif.get(ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not refuse the image
        return 1
    return value if 1 <= value <= 8 else 1


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if image.dtype.kind == "f":
        return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    info = np.iinfo(image.dtype)
    scaled = (image.astype(np.float64) - info.min) * 255.0 / (info.max - info.min)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _normalise_channels(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 2:  # gray + alpha
        return np.dstack((cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR), image[:, :, 1]))
    return image


def _decode_with_pillow(data: bytes) -> np.ndarray:
    with PILImage.open(io.BytesIO(data)) as img:
        img.seek(0)  # GIF and multi-page TIFF: the first frame
        has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
        if img.mode in ("L", "I;16", "I") and not has_alpha:
            gray = np.asarray(img.convert("L"))
            return gray
        rgb = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    code = cv2.COLOR_RGBA2BGRA if has_alpha else cv2.COLOR_RGB2BGR
    return cv2.cvtColor(rgb, code)


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn the stored pixels upright per the EXIF orientation tag (1..8)."""
    if orientation == 2:
        return cv2.flip(image, 1)
    if orientation == 3:
        return cv2.rotate(image, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(image, 0)
    if orientation == 5:
        return cv2.transpose(image)
    if orientation == 6:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.rotate(cv2.transpose(image), cv2.ROTATE_180)
    if orientation == 8:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image


REDUCED_FLAGS = {
    (2, False): cv2.IMREAD_REDUCED_COLOR_2, (4, False): cv2.IMREAD_REDUCED_COLOR_4,
    (8, False): cv2.IMREAD_REDUCED_COLOR_8, (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4, (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


def _decode_jpeg(data: bytes, reduce: int) -> np.ndarray | None:
    """libjpeg-turbo through simplejpeg: the same pixels as OpenCV's decoder (the tests
    compare them) in about half the time at full size (README, "Performance"). None
    for what it does not take (CMYK, 12-bit, damaged data): OpenCV decides those."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray"):
            return None
        scaled = ({} if reduce == 1 else
                  {"min_height": -(-height // reduce), "min_width": -(-width // reduce)})
        image = simplejpeg.decode_jpeg(data, colorspace="GRAY" if colorspace == "Gray"
                                       else "BGR", **scaled)
    except ValueError:
        return None
    return image[:, :, 0] if image.shape[2] == 1 else image


def decode(data: bytes, info: ImageInfo, reduce: int = 1) -> np.ndarray:
    """Decode to uint8 gray, BGR or BGRA, upright.

    `reduce` (2, 4 or 8; JPEG only) decodes at that fraction of the size: libjpeg
    scales in the DCT domain, skipping most of the work (shrink-on-load)."""
    image = None
    if info.format == "jpeg":
        image = _decode_jpeg(data, reduce)
        if image is None and reduce > 1:
            flags = REDUCED_FLAGS[reduce, info.grayscale] | cv2.IMREAD_IGNORE_ORIENTATION
            image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None and info.format != "gif" and info.format not in PILLOW_ONLY:
        # IMREAD_UNCHANGED keeps alpha and 16 bits and ignores EXIF orientation,
        # which is applied below from the tag read in probe().
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        try:
            image = _decode_with_pillow(data)
        except Exception as exc:
            raise _unsupported("the image data is damaged or truncated") from exc
    image = _normalise_channels(_to_uint8(image))
    return apply_orientation(image, info.orientation)


def output_format_for(info: ImageInfo) -> OutputFormat:
    """The input's format when we can write it, else PNG (lossless, keeps alpha)."""
    if info.format in OUTPUT_FORMATS:
        return info.format  # type: ignore[return-value]
    return FALLBACK_OUTPUT.get(info.format, "png")  # type: ignore[return-value]


def _flatten_alpha(image: np.ndarray) -> np.ndarray:
    """JPEG has no alpha: composite over white, as browsers and viewers show it."""
    colour = image[:, :, :3].astype(np.float32)
    alpha = image[:, :, 3:4].astype(np.float32) / 255.0
    return np.clip(np.rint(colour * alpha + 255.0 * (1.0 - alpha)), 0, 255).astype(np.uint8)


# Tiles between instances: PNG with neither filtering nor compression is lossless and
# about 10x faster both ways than level 1, for twice the bytes (scripts/bench_tiling.py).
UNCOMPRESSED_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 0, cv2.IMWRITE_PNG_FILTER,
                    cv2.IMWRITE_PNG_FILTER_NONE]


def encode_uncompressed_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image, UNCOMPRESSED_PNG)
    if not ok:
        raise ApiError(500, "encode_failed", "could not encode the tile as PNG")
    return buf.tobytes()


def encode(image: np.ndarray, fmt: OutputFormat, options: OutputOptions | int | None = None,
           blocks: Embedded = NO_BLOCKS) -> bytes:
    """Encode with ``options`` (a bare int: the quality, as before the options) and
    write ``blocks`` (ICC, EXIF, XMP) into the file."""
    if not isinstance(options, OutputOptions):
        options = OutputOptions(quality=options)
    opts = options.effective(fmt)
    alpha = image.ndim == 3 and image.shape[2] == 4
    if fmt == "avif":
        return _encode_avif(image, opts, blocks)
    if fmt == "jpeg":
        if alpha:
            image = _flatten_alpha(image)
            alpha = False
        params = [cv2.IMWRITE_JPEG_QUALITY, opts.quality or DEFAULT_QUALITY["jpeg"]]
        if opts.progressive:
            params += [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
        if opts.subsampling != "4:2:0":  # the default: OpenCV's parameter list stays as before
            params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, JPEG_SUBSAMPLING[opts.subsampling]]
        ok, buf = cv2.imencode(".jpg", image, params)
    elif fmt == "webp":
        # OpenCV writes lossless WebP for a quality above 100.
        quality = 101 if opts.lossless else opts.quality or DEFAULT_QUALITY["webp"]
        ok, buf = cv2.imencode(".webp", image, [cv2.IMWRITE_WEBP_QUALITY, quality])
    else:
        ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise ApiError(500, "encode_failed", f"could not encode the result as {fmt}")
    return embed.embed(buf.tobytes(), fmt, blocks, alpha=alpha)


def _encode_avif(image: np.ndarray, opts: OutputOptions, blocks: Embedded) -> bytes:
    if image.ndim == 2:
        pil = PILImage.fromarray(cv2.cvtColor(image, cv2.COLOR_GRAY2RGB), "RGB")
    elif image.shape[2] == 4:
        pil = PILImage.fromarray(cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA), "RGBA")
    else:
        pil = PILImage.fromarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), "RGB")
    extra: dict[str, bytes] = {}
    if blocks.icc:
        extra["icc_profile"] = blocks.icc
    if blocks.exif:
        extra["exif"] = b"Exif\x00\x00" + blocks.exif
    if blocks.xmp:
        extra["xmp"] = blocks.xmp
    out = io.BytesIO()
    try:
        pil.save(out, "AVIF", quality=opts.quality or DEFAULT_QUALITY["avif"],
                 subsampling=opts.subsampling, speed=AVIF_SPEED, **extra)
    except (OSError, ValueError) as exc:
        raise ApiError(500, "encode_failed", f"could not encode the result as avif: {exc}") from exc
    return out.getvalue()
