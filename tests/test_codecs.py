"""Decoding every accepted input format and mode; EXIF orientation; encoding."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from conftest import IMAGES_DIR
from PIL import Image, ImageOps

from server import codecs
from server.errors import ApiError

IMAGES = IMAGES_DIR
MAX_PIXELS = 100_000_000


def pil_bytes(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return codecs.decode(data, codecs.probe(data, MAX_PIXELS))


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return Image.open(IMAGES / "chelsea.png").convert("RGB")


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_decode_exactly(chelsea, fmt):
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    data = pil_bytes(chelsea, fmt, **kwargs)
    out = decode(data)
    np.testing.assert_array_equal(out, cv2.cvtColor(np.asarray(chelsea), cv2.COLOR_RGB2BGR))


def test_jpeg_decodes_like_opencv():
    data = (IMAGES / "rocket.jpg").read_bytes()
    info = codecs.probe(data, MAX_PIXELS)
    assert (info.format, info.width, info.height) == ("jpeg", 640, 427)
    np.testing.assert_array_equal(decode(data), cv2.imread(str(IMAGES / "rocket.jpg")))


def test_gif_first_frame(chelsea):
    frames = [chelsea.convert("P"), chelsea.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = decode(buf.getvalue())
    expected = cv2.cvtColor(np.asarray(frames[0].convert("RGB")), cv2.COLOR_RGB2BGR)
    np.testing.assert_array_equal(out, expected)


def test_grayscale_stays_one_channel():
    out = decode((IMAGES / "camera.png").read_bytes())
    assert out.ndim == 2 and out.dtype == np.uint8


def test_rgba_keeps_alpha(chelsea):
    rgba = chelsea.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(chelsea.size))
    out = decode(pil_bytes(rgba, "PNG"))
    assert out.shape == (300, 451, 4)
    np.testing.assert_array_equal(out[:, :, 3], np.asarray(rgba)[:, :, 3])


def test_gray_alpha_becomes_bgra():
    la = Image.open(IMAGES / "camera.png").convert("LA")
    out = decode(pil_bytes(la, "PNG"))
    assert out.shape == (512, 512, 4)


def test_sixteen_bit_png_is_scaled_to_eight_bits():
    ramp = (np.arange(256 * 64, dtype=np.uint16).reshape(64, 256) * 4).astype(np.uint16)
    ok, buf = cv2.imencode(".png", ramp)
    assert ok
    out = decode(buf.tobytes())
    np.testing.assert_array_equal(out, (ramp >> 8).astype(np.uint8))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(chelsea, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = pil_bytes(chelsea, "PNG", exif=exif)
    info = codecs.probe(data, MAX_PIXELS)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert (info.width, info.height) == upright.size
    np.testing.assert_array_equal(decode(data),
                                  cv2.cvtColor(np.asarray(upright), cv2.COLOR_RGB2BGR))


def test_exif_orientation_on_jpeg():
    img = Image.open(IMAGES / "rocket.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    data = pil_bytes(img, "JPEG", exif=exif, quality=95)
    out = decode(data)
    assert out.shape[:2] == (640, 427)  # rotated: portrait now


def test_pixel_limit_is_checked_from_the_header():
    data = pil_bytes(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(ApiError) as info:
        codecs.probe(data, max_pixels=5_000_000)
    assert info.value.status == 413
    assert "3000x2000" in info.value.message and "at most 5.0 MP" in info.value.message


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_round_trip(fmt):
    image = cv2.imread(str(IMAGES / "coffee.png"))
    data = codecs.encode(image, fmt, 95)
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.shape == image.shape
    if fmt == "png":
        np.testing.assert_array_equal(back, image)
    else:
        assert cv2.PSNR(back, image) > 35


def test_jpeg_output_of_rgba_is_composited_on_white():
    image = np.zeros((10, 10, 4), np.uint8)  # fully transparent black
    data = codecs.encode(image, "jpeg", 95)
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert back.min() >= 250


def test_webp_keeps_alpha():
    image = np.zeros((16, 16, 4), np.uint8)
    image[:, :8, 3] = 255
    data = codecs.encode(image, "webp", 100)
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.shape == (16, 16, 4)


def test_output_format_defaults_to_input_or_png():
    for fmt, expected in [("png", "png"), ("jpeg", "jpeg"), ("webp", "webp"), ("bmp", "png"),
                          ("tiff", "png"), ("gif", "png")]:
        assert codecs.output_format_for(codecs.ImageInfo(fmt, 1, 1, 1)) == expected


# --- the JPEG decoder is OpenCV's, pixel for pixel ------------------------------------------


def _jpeg_variants() -> dict[str, bytes]:
    colour = cv2.imread(str(IMAGES_DIR / "chelsea.png"))
    variants = {p.name: p.read_bytes() for p in sorted(IMAGES_DIR.glob("*.jpg"))}
    sampling = cv2.IMWRITE_JPEG_SAMPLING_FACTOR
    variants.update({
        "gray": cv2.imencode(".jpg", cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY))[1].tobytes(),
        "444": cv2.imencode(".jpg", colour, [sampling, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])[1]
        .tobytes(),
        "422": cv2.imencode(".jpg", colour, [sampling, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422])[1]
        .tobytes(),
        "progressive": cv2.imencode(".jpg", colour, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1]
        .tobytes(),
        "odd size": cv2.imencode(".jpg", colour[:301, :437])[1].tobytes(),
    })
    return variants


REDUCED = {(2, False): cv2.IMREAD_REDUCED_COLOR_2, (4, False): cv2.IMREAD_REDUCED_COLOR_4,
           (8, False): cv2.IMREAD_REDUCED_COLOR_8, (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
           (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4, (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8}


@pytest.mark.parametrize("name", list(_jpeg_variants()))
@pytest.mark.parametrize("reduce", [1, 2, 4, 8])
def test_jpeg_decoding_matches_opencv_at_every_scale(name: str, reduce: int) -> None:
    data = _jpeg_variants()[name]
    info = codecs.probe(data, 10**9)
    flags = (cv2.IMREAD_UNCHANGED if reduce == 1
             else REDUCED[reduce, info.grayscale] | cv2.IMREAD_IGNORE_ORIENTATION)
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    assert codecs._decode_jpeg(data, reduce) is not None, "the fast decoder was not used"
    decoded = codecs.decode(data, info, reduce)
    assert decoded.shape == expected.shape and np.array_equal(decoded, expected)


def test_jpegs_the_fast_decoder_does_not_take_go_to_opencv() -> None:
    rgb = Image.open(IMAGES_DIR / "chelsea.png").convert("RGB")
    cmyk = pil_bytes(rgb.convert("CMYK"), "JPEG")
    truncated = _jpeg_variants()["444"][:3000]
    assert codecs._decode_jpeg(cmyk, 1) is None and codecs._decode_jpeg(truncated, 1) is None
    expected = cv2.imdecode(np.frombuffer(cmyk, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(codecs.decode(cmyk, codecs.probe(cmyk, 10**9)), expected)
