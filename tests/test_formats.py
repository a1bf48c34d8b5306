"""Formats, encoder options, colour and metadata, through a real `python -m server`.

Every input is made here from the real photographs: HEIC with pillow-heif, AVIF with
Pillow, Display P3 and Adobe RGB (1998) JPEGs tagged with profiles written by
tests/helpers_icc.py, and JPEGs carrying EXIF (GPS, copyright, orientation) and XMP.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import cv2
import numpy as np
import pillow_heif
import pytest
import requests
from helpers_icc import (
    ADOBE_RGB,
    DISPLAY_P3,
    RGBSpace,
    ciede2000,
    icc_profile,
    reference_to_srgb,
    srgb_to_lab,
)
from PIL import ExifTags, Image, JpegImagePlugin

from server.app import result_key
from server.output_options import OutputOptions
from server.pipeline import parse_pipeline

pillow_heif.register_heif_opener()

# Colour error of icc=srgb against the numpy reference conversion (CIEDE2000, PNG
# output so only the conversion is measured): the README states these bounds.
# Measured on three photographs: mean 0.14-0.21, 99th percentile 0.46-0.66, max 0.89.
MAX_MEAN_DE2000 = 0.5
MAX_P99_DE2000 = 1.0
MAX_DE2000 = 1.5

IDENTITY = '[{"op": "invert"}, {"op": "invert"}]'  # the pixels as decoded
COPYRIGHT = "(c) 2026 ImageFleet test photographer"
XMP = f"""<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:exif="http://ns.adobe.com/exif/1.0/"
    xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/"
    xmlns:tiff="http://ns.adobe.com/tiff/1.0/"
    exif:GPSLatitude="48,51.5N" exif:GPSLongitude="2,17.7E" photoshop:City="Paris"
    tiff:Orientation="6">
   <dc:rights><rdf:Alt><rdf:li xml:lang="x-default">{COPYRIGHT}</rdf:li></rdf:Alt></dc:rights>
   <photoshop:Country>France</photoshop:Country>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>""".encode()


@pytest.fixture(scope="module")
def server(module_server_process):
    return module_server_process()


def rgb_of(name: str, images_dir: Path) -> np.ndarray:
    with Image.open(images_dir / name) as img:
        return np.asarray(img.convert("RGB"))


def save(rgb: np.ndarray, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, fmt, **options)
    return out.getvalue()


def process(server, data: bytes, filename: str = "upload", **fields) -> requests.Response:
    if "steps" not in fields:
        fields.setdefault("operation", "invert")
    form = {k: (None, str(v)) for k, v in fields.items()}
    return server.post("/process?response=image",
                       files={**form, "image": (filename, data, "application/octet-stream")})


def ok_image(response: requests.Response) -> Image.Image:
    assert response.status_code == 200, response.text[:500]
    img = Image.open(io.BytesIO(response.content))
    img.load()
    return img


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return cv2.PSNR(np.ascontiguousarray(a), np.ascontiguousarray(b))


def exif_with_location(orientation: int = 6) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.Copyright] = COPYRIGHT
    exif[ExifTags.Base.Artist] = "Test Photographer"
    exif[ExifTags.IFD.Exif] = {ExifTags.Base.DateTimeOriginal: "2026:05:01 10:00:00"}
    exif[ExifTags.IFD.GPSInfo] = {
        ExifTags.GPS.GPSLatitudeRef: "N", ExifTags.GPS.GPSLatitude: (48.0, 51.0, 30.0),
        ExifTags.GPS.GPSLongitudeRef: "E", ExifTags.GPS.GPSLongitude: (2.0, 17.0, 40.0),
    }
    return exif


# --------------------------------------------------------------------------- formats in


def test_heic_in_is_decoded_upright_and_written_as_jpeg_by_default(server, images_dir):
    rgb = rgb_of("chelsea.png", images_dir)  # 451x300
    heic = save(rgb, "HEIF", quality=90, exif=exif_with_location(6).tobytes())
    upright = np.rot90(rgb, -1)  # orientation 6: turn 90° clockwise to view
    default = ok_image(process(server, heic, "cat.heic"))
    assert default.format == "JPEG"
    assert default.size == (300, 451)
    png = ok_image(process(server, heic, "cat.heic", format="png"))
    assert png.size == (300, 451)
    assert psnr(np.asarray(png.convert("RGB")), 255 - upright) > 30


def test_the_app_takes_heic_and_avif_files_as_images(images_dir, tmp_path):
    from gui.imagecheck import not_an_image
    from server.limits import IMAGE_SUFFIXES

    rgb = rgb_of("coffee.png", images_dir)
    for name, fmt in (("photo.heic", "HEIF"), ("photo.avif", "AVIF")):
        (tmp_path / name).write_bytes(save(rgb, fmt, quality=60))
        assert Path(name).suffix in IMAGE_SUFFIXES
        assert not_an_image(tmp_path / name) is None


def test_avif_in_with_exif_orientation_is_turned_upright(server, images_dir):
    rgb = rgb_of("astronaut.png", images_dir)[:, :384]  # not square: the turn shows
    avif = save(rgb, "AVIF", quality=90, exif=exif_with_location(6).tobytes())
    out = ok_image(process(server, avif, "a.avif", format="png"))
    assert out.size == (512, 384)
    assert psnr(np.asarray(out.convert("RGB")), 255 - np.rot90(rgb, -1)) > 30


def test_heic_and_avif_limits_are_checked_from_the_header(server, server_process,
                                                           images_dir):
    """The header's size (HEIF's 'ispe' box) is made to claim 16000x16000 while the coded
    pixels stay 600x400: a 413 naming 16000x16000 can only come from the header."""
    rgb = rgb_of("coffee.png", images_dir)
    for fmt in ("HEIF", "AVIF"):
        data = bytearray(save(rgb, fmt, quality=80))
        ispe = data.index(b"ispe")
        assert struct.unpack_from(">II", data, ispe + 8) == (600, 400)
        struct.pack_into(">II", data, ispe + 8, 16000, 16000)
        response = process(server, bytes(data))
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "too_many_pixels"
        assert "16000x16000" in error["message"] and "at most 100.0 MP" in error["message"]
    tight = server_process("--max-bytes", "20000")
    big = save(rgb, "HEIF", quality=100)
    assert len(big) > 20000
    response = process(tight, big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_bytes"


# --------------------------------------------------------------------------- formats out


def test_avif_out(server, images_dir):
    rgb = rgb_of("coffee.png", images_dir)
    png = save(rgb, "PNG")
    response = server.post("/process", files={"image": ("c.png", png),
                                              "operation": (None, "invert"),
                                              "format": (None, "avif")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["format"] == "avif" and body["key"].endswith(".avif")
    download = requests.get(body["url"], timeout=10)
    assert download.status_code == 200 and download.headers["Content-Type"] == "image/avif"
    out = Image.open(io.BytesIO(download.content))
    assert out.format == "AVIF" and out.size == (600, 400)
    assert psnr(np.asarray(out.convert("RGB")), 255 - rgb) > 30
    # Quality changes the bytes (and the key).
    low = process(server, png, format="avif", quality="20")
    high = process(server, png, format="avif", quality="90")
    assert len(low.content) < len(high.content)
    assert low.headers["X-Result-Key"] != high.headers["X-Result-Key"]


# --------------------------------------------------------------------------- encoder options


def test_progressive_and_subsampling_are_in_the_jpeg(server, images_dir):
    png = save(rgb_of("coffee.png", images_dir), "PNG")
    baseline = ok_image(process(server, png, format="jpeg"))
    assert not baseline.info.get("progressive")
    assert JpegImagePlugin.get_sampling(baseline) == 2  # 4:2:0, the default
    progressive = ok_image(process(server, png, format="jpeg", progressive="true"))
    assert progressive.info.get("progressive") == 1
    for value, sampling in (("4:4:4", 0), ("4:2:2", 1), ("4:2:0", 2)):
        out = ok_image(process(server, png, format="jpeg", subsampling=value))
        assert JpegImagePlugin.get_sampling(out) == sampling, value


def test_lossless_webp_round_trips_exactly(server, images_dir):
    rgb = rgb_of("coffee.png", images_dir)
    out = ok_image(process(server, save(rgb, "PNG"), format="webp", lossless="true"))
    assert np.array_equal(np.asarray(out.convert("RGB")), 255 - rgb)
    lossy = ok_image(process(server, save(rgb, "PNG"), format="webp"))
    assert not np.array_equal(np.asarray(lossy.convert("RGB")), 255 - rgb)


def test_options_are_part_of_the_result_key(server, images_dir):
    png = save(rgb_of("coffee.png", images_dir), "PNG")

    def key(**fields) -> str:
        response = process(server, png, **fields)
        assert response.status_code == 200, response.text
        return response.headers["X-Result-Key"]

    plain = key(format="jpeg")
    different = {key(format="jpeg", progressive="true"), key(format="jpeg", subsampling="4:4:4"),
                 key(format="jpeg", icc="keep"), key(format="jpeg", metadata="keep"),
                 key(format="jpeg", metadata="keep-no-location"), key(format="webp"),
                 key(format="webp", lossless="true"), key(format="avif")}
    assert plain not in different and len(different) == 8
    # Defaults spelt out, and options that do not apply to the format, change nothing.
    assert key(format="jpeg", subsampling="4:2:0", icc="srgb", metadata="strip",
               progressive="false", lossless="true") == plain
    assert key(format="png", progressive="true", subsampling="4:4:4") == key(format="png")
    assert key(format="webp", lossless="true", quality="50") == key(format="webp", lossless="1")


def test_keys_at_the_defaults_are_the_keys_of_before():
    """Results stored before these options existed stay cache hits."""
    import hashlib

    from server.operations import default_registry

    pipeline = parse_pipeline(default_registry(), "invert", None, None)
    digest = "ab" * 32
    for fmt, quality in (("jpeg", 90), ("webp", 90), ("png", 0)):
        old = hashlib.sha256(b"\n".join([b"imagefleet-result-v1", digest.encode(),
                                         pipeline.canonical().encode(), fmt.encode(),
                                         str(quality).encode()])).hexdigest()
        assert result_key(digest, pipeline, fmt, OutputOptions()).split(".")[0] == old
        assert result_key(digest, pipeline, fmt, None) == result_key(digest, pipeline, fmt,
                                                                     OutputOptions())


# --------------------------------------------------------------------------- colour


@pytest.mark.parametrize("space", [DISPLAY_P3, ADOBE_RGB], ids=["display-p3", "adobe-rgb"])
def test_icc_srgb_converts_wide_gamut_within_the_stated_delta_e(server, images_dir,
                                                                 space: RGBSpace):
    # Photograph pixels tagged with the wide-gamut profile: they mean more saturated
    # colours than the same numbers in sRGB, some outside sRGB.
    tagged = save(rgb_of("coffee.png", images_dir), "JPEG", quality=95,
                  icc_profile=icc_profile(space))
    with Image.open(io.BytesIO(tagged)) as img:
        decoded = np.asarray(img.convert("RGB"))
    reference = srgb_to_lab(reference_to_srgb(decoded, space))
    out = ok_image(process(server, tagged, steps=IDENTITY,
                           format="png"))
    assert "icc_profile" not in out.info  # sRGB: untagged, as the web reads it
    result = np.asarray(out.convert("RGB")) / 255.0
    error = ciede2000(reference, srgb_to_lab(result))
    assert error.mean() <= MAX_MEAN_DE2000, error.mean()
    assert np.percentile(error, 99) <= MAX_P99_DE2000, np.percentile(error, 99)
    assert error.max() <= MAX_DE2000, error.max()
    # Not passing by doing nothing: the unconverted pixels are far off.
    untouched = ciede2000(reference, srgb_to_lab(decoded / 255.0))
    assert untouched.mean() > 4 * MAX_MEAN_DE2000


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "avif"])
def test_icc_keep_embeds_the_same_profile_and_keeps_the_pixels(server, images_dir, fmt):
    profile = icc_profile(DISPLAY_P3)
    rgb = rgb_of("coffee.png", images_dir)
    tagged = save(rgb, "PNG", icc_profile=profile)
    out = ok_image(process(server, tagged, steps=IDENTITY,
                           format=fmt, icc="keep"))
    assert out.info.get("icc_profile") == profile
    kept = np.asarray(out.convert("RGB"))
    assert psnr(kept, rgb) > (80 if fmt == "png" else 30)
    converted = ok_image(process(server, tagged, steps=IDENTITY,
                                 format=fmt))
    assert "icc_profile" not in converted.info


def test_icc_keep_on_a_grayscale_result_drops_the_rgb_profile(server, images_dir):
    tagged = save(rgb_of("coffee.png", images_dir), "PNG", icc_profile=icc_profile(ADOBE_RGB))
    out = ok_image(process(server, tagged, operation="grayscale", format="png", icc="keep"))
    assert out.mode == "L" and "icc_profile" not in out.info


def test_ciede2000_matches_the_published_test_data():
    """Pairs from Sharma, Wu and Dalal (2005), Table 1: the yardstick above is right."""
    pairs = np.array([
        [[50.0, 2.6772, -79.7751], [50.0, 0.0, -82.7485]],
        [[50.0, 0.0, 0.0], [50.0, -1.0, 2.0]],
        [[50.0, 2.5, 0.0], [73.0, 25.0, -18.0]],
        [[60.2574, -34.0099, 36.2677], [60.4626, -34.1751, 39.4387]],
        [[2.0776, 0.0795, -1.1350], [0.9033, -0.0636, -0.5514]],
    ])
    expected = [2.0425, 2.3669, 27.1492, 1.2644, 0.9082]
    assert np.allclose(ciede2000(pairs[:, 0], pairs[:, 1]), expected, atol=1e-4)


# --------------------------------------------------------------------------- metadata


def tagged_photo(images_dir: Path) -> bytes:
    rgb = rgb_of("chelsea.png", images_dir)
    return save(rgb, "JPEG", quality=92, exif=exif_with_location(6).tobytes(), xmp=XMP)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "avif"])
def test_metadata_strip_is_the_default(server, images_dir, fmt):
    out = ok_image(process(server, tagged_photo(images_dir), format=fmt))
    assert out.size == (300, 451)
    assert not out.getexif() and not out.info.get("xmp")


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "avif"])
def test_metadata_keep_no_location_removes_gps_keeps_copyright(server, images_dir, fmt):
    out = ok_image(process(server, tagged_photo(images_dir), format=fmt,
                           metadata="keep-no-location"))
    assert out.size == (300, 451)
    exif = out.getexif()
    assert exif[ExifTags.Base.Copyright] == COPYRIGHT
    assert exif[ExifTags.Base.Artist] == "Test Photographer"
    # The pixels are upright already. Pillow writes AVIF's orientation as the container's
    # irot/imir and leaves the tag out of the EXIF, so there absent means 1.
    assert exif.get(ExifTags.Base.Orientation, 1 if fmt == "avif" else None) == 1
    assert ExifTags.IFD.GPSInfo not in exif and not exif.get_ifd(ExifTags.IFD.GPSInfo)
    exif_ifd = exif.get_ifd(ExifTags.IFD.Exif)
    assert exif_ifd[ExifTags.Base.DateTimeOriginal] == "2026:05:01 10:00:00"
    assert (exif_ifd[ExifTags.Base.ExifImageWidth],
            exif_ifd[ExifTags.Base.ExifImageHeight]) == (300, 451)
    xmp = out.info["xmp"]
    xmp = xmp if isinstance(xmp, bytes) else xmp.encode()
    assert COPYRIGHT.encode() in xmp
    for where in (b"GPSLatitude", b"GPSLongitude", b"Paris", b"France"):
        assert where not in xmp, where
    assert b'Orientation="1"' in xmp and b'Orientation="6"' not in xmp


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_metadata_keep_keeps_the_location(server, images_dir, fmt):
    out = ok_image(process(server, tagged_photo(images_dir), format=fmt, metadata="keep"))
    exif = out.getexif()
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    assert gps[ExifTags.GPS.GPSLatitudeRef] == "N"
    assert tuple(float(v) for v in gps[ExifTags.GPS.GPSLatitude]) == (48.0, 51.0, 30.0)
    assert exif[ExifTags.Base.Copyright] == COPYRIGHT
    assert exif[ExifTags.Base.Orientation] == 1
    assert b"Paris" in out.info["xmp"] if isinstance(out.info["xmp"], bytes) \
        else "Paris" in out.info["xmp"]


@pytest.mark.parametrize("policy", ["srgb", "keep"])
def test_a_tiled_request_converts_once_on_the_coordinator(server_process, images_dir, policy):
    """Tiles go to the peer as plain pixels: the coordinator settles the profile before
    tiling and writes it after stitching, so the result equals the untiled one."""
    from server import colour
    from server.operations import default_registry

    peer = server_process()
    coordinator = server_process("--peers", peer.url, "--tile-mp", "1", "--tile-size", "512")
    rgb = cv2.resize(rgb_of("coffee.png", images_dir), (1500, 1000),
                     interpolation=cv2.INTER_CUBIC)
    profile = icc_profile(DISPLAY_P3)
    tagged = save(rgb, "PNG", icc_profile=profile)
    response = coordinator.post("/process", files={"image": ("big.png", tagged)},
                                data={"operation": "box_blur", "format": "png", "icc": policy},
                                timeout=300)
    assert response.status_code == 200, response.text
    assert response.json()["tiles"] > 1
    data = requests.get(response.json()["url"], timeout=30).content
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    settled, kept = colour.apply_policy(bgr, profile, policy)
    expected = parse_pipeline(default_registry(), "box_blur", None, None).run(settled)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(data, np.uint8),
                                               cv2.IMREAD_UNCHANGED), expected)
    with Image.open(io.BytesIO(data)) as out:
        assert out.info.get("icc_profile") == kept.profile
    assert peer.get("/health").json()["processed"] >= 1  # the peer did tiles
