"""The metadata policies and the block writer, as pure functions: what is kept, what is
dropped when it cannot be trusted, and files that Pillow reads back with every block."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from helpers_icc import DISPLAY_P3, icc_profile
from PIL import ExifTags, Image
from test_formats import XMP, exif_with_location

from server import codecs, colour
from server.metadata import Embedded, for_output
from server.output_options import OutputOptions

PROFILE = icc_profile(DISPLAY_P3)


def exif_bytes(exif: Image.Exif) -> bytes:
    return exif.tobytes()[6:]  # TIFF data, as read_embedded() keeps it


def test_strip_writes_nothing_but_the_profile_decided() -> None:
    blocks = Embedded(PROFILE, exif_bytes(exif_with_location()), XMP)
    assert for_output(blocks, "strip", None, 10, 10) == Embedded()
    assert for_output(blocks, "strip", PROFILE, 10, 10) == Embedded(PROFILE)


def test_the_thumbnail_never_survives() -> None:
    """The EXIF thumbnail shows the original picture (before a blur, a crop)."""
    with Image.open(io.BytesIO(_jpeg_with_thumbnail())) as img:
        raw = img.info["exif"][6:]
        assert img.getexif().get_ifd(ExifTags.IFD.IFD1)  # the source has one
    kept = for_output(Embedded(exif=raw), "keep", None, 64, 48).exif
    assert kept is not None
    out = Image.Exif()
    out.load(kept)
    assert not out.get_ifd(ExifTags.IFD.IFD1)
    assert out[ExifTags.Base.Copyright] == "thumb test"


def _jpeg_with_thumbnail() -> bytes:
    """A JPEG whose EXIF has IFD1 pointing at an embedded JPEG thumbnail."""
    thumb = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(thumb, "JPEG")
    exif = Image.Exif()
    exif[ExifTags.Base.Copyright] = "thumb test"
    head = exif.tobytes()
    # Rebuild with an IFD1 by hand: Pillow writes no IFD1, so append one after IFD0.
    tiff = bytearray(head[6:])
    order = "little" if tiff[:2] == b"II" else "big"

    def u(value: int, size: int) -> bytes:
        return value.to_bytes(size, order)

    ifd1_offset = len(tiff)
    thumb_offset = ifd1_offset + 2 + 2 * 12 + 4
    # JPEGInterchangeFormat (0x0201) and its length (0x0202), LONG values
    entries = (u(0x0201, 2) + u(4, 2) + u(1, 4) + u(thumb_offset, 4)
               + u(0x0202, 2) + u(4, 2) + u(1, 4) + u(len(thumb.getvalue()), 4))
    ifd1 = u(2, 2) + entries + u(0, 4)
    count = int.from_bytes(tiff[8:10], order)
    next_pointer = 10 + 12 * count
    tiff[next_pointer:next_pointer + 4] = u(ifd1_offset, 4)
    tiff += ifd1 + thumb.getvalue()
    out = io.BytesIO()
    Image.new("RGB", (64, 48), "blue").save(out, "JPEG", exif=b"Exif\x00\x00" + bytes(tiff))
    return out.getvalue()


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("raw", [b"II*\x00\xff\xff\xff\xff", b"not exif at all", b"MM\x00*"])
def test_an_exif_block_that_does_not_parse_is_left_out(raw: bytes) -> None:
    out = for_output(Embedded(exif=raw), "keep", None, 10, 10)
    assert out.exif is None or b"GPS" not in out.exif


def test_an_xmp_packet_with_a_dtd_or_broken_xml_is_left_out() -> None:
    bomb = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
            b'<x:xmpmeta xmlns:x="adobe:ns:meta/">&b;</x:xmpmeta>')
    assert for_output(Embedded(xmp=bomb), "keep", None, 1, 1).xmp is None
    broken = XMP[: len(XMP) // 2]
    assert for_output(Embedded(xmp=broken), "keep-no-location", None, 1, 1).xmp is None


def test_xmp_keeps_its_prefixes_and_drops_location_elements_and_attributes() -> None:
    xmp = for_output(Embedded(xmp=XMP), "keep-no-location", None, 1, 1).xmp
    assert xmp is not None
    assert b"<x:xmpmeta" in xmp and b"<dc:rights>" in xmp and b'tiff:Orientation="1"' in xmp
    for gone in (b"GPSLatitude", b"photoshop:City", b"Country"):
        assert gone not in xmp


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "avif"])
@pytest.mark.parametrize("alpha", [False, True], ids=["opaque", "alpha"])
def test_every_block_reads_back_and_alpha_survives(fmt: str, alpha: bool) -> None:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (48, 64, 4 if alpha else 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[ExifTags.Base.Copyright] = "blocks"
    blocks = Embedded(PROFILE, exif_bytes(exif), XMP)
    data = codecs.encode(image, fmt, OutputOptions(), blocks)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.size == (64, 48)
        assert img.info["icc_profile"] == PROFILE
        assert img.getexif()[ExifTags.Base.Copyright] == "blocks"
        xmp = img.info.get("xmp") or img.info.get("XML:com.adobe.xmp")
        assert xmp and b"photographer" in (xmp if isinstance(xmp, bytes) else xmp.encode())
        assert ("A" in img.mode) == (alpha and fmt != "jpeg")
    # OpenCV's decoder reads the same pixels as without the blocks
    if fmt in ("png", "webp"):
        plain = codecs.encode(image, fmt, OutputOptions())
        a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        b = cv2.imdecode(np.frombuffer(plain, np.uint8), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(a, b)


def test_a_profile_larger_than_one_jpeg_segment_is_split_and_rejoined() -> None:
    big = PROFILE + b"\0" * 150_000  # padding after the tags: still the same profile
    big = len(big).to_bytes(4, "big") + big[4:]
    data = codecs.encode(np.zeros((8, 8, 3), np.uint8), "jpeg", OutputOptions(),
                         Embedded(icc=big))
    assert data.count(b"ICC_PROFILE\x00") == 3
    with Image.open(io.BytesIO(data)) as img:
        assert img.info["icc_profile"] == big


def test_colour_policy_skips_srgb_and_drops_a_profile_that_does_not_fit() -> None:
    image = np.full((4, 4, 3), 200, np.uint8)
    srgb = Image.new("RGB", (1, 1))
    buffer = io.BytesIO()
    from PIL import ImageCms

    srgb.save(buffer, "PNG", icc_profile=ImageCms.ImageCmsProfile(
        ImageCms.createProfile("sRGB")).tobytes())
    with Image.open(buffer) as img:
        srgb_profile = img.info["icc_profile"]
    same, kept = colour.apply_policy(image, srgb_profile, "srgb")
    assert same is image and kept.profile is None  # no work for sRGB
    gray = np.full((4, 4), 100, np.uint8)
    out, kept = colour.apply_policy(gray, PROFILE, "keep")  # an RGB profile on gray pixels
    assert out is gray and kept.profile is None
    out, kept = colour.apply_policy(image, b"garbage" * 30, "srgb")
    assert out is image and kept.profile is None
