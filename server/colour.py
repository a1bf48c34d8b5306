"""Embedded ICC profiles: converting the pixels to sRGB, or keeping the profile.

The operations work on pixels and know nothing of colour spaces, so the profile is
settled at the two ends of the pipeline: right after decoding, ``icc=srgb`` converts
the pixels to sRGB with the input's profile (then the output needs no profile, sRGB
being what an untagged web image means); ``icc=keep`` leaves the pixels in the
profile's space and the profile rides beside them, in the job, to the encoder. Tiles
sent to peers are pixels only; the coordinator holds the profile.

An image without a profile, or with an sRGB one, costs nothing here.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image as PILImage
from PIL import ImageCms

log = logging.getLogger(__name__)

# Relative colorimetric, as libvips and the browsers use: in-gamut colours are kept
# exactly, out-of-gamut ones clipped. Phone and camera profiles are matrix/TRC profiles,
# for which perceptual falls back to colorimetric anyway.
INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC
# The ICC header's data colour space field (bytes 16..19).
RGB, GRAY = b"RGB ", b"GRAY"


@dataclass(frozen=True)
class Colour:
    """What the colour stage did: the profile the output must carry (None: sRGB)."""

    profile: bytes | None = None


def colour_space(profile: bytes) -> bytes:
    return profile[16:20] if len(profile) >= 128 else b""


def fits(profile: bytes, image: np.ndarray) -> bool:
    """Whether ``profile`` describes ``image``'s pixels: RGB for colour, GRAY for gray.
    (A CMYK JPEG's profile describes ink values OpenCV has already turned into BGR.)"""
    gray = image.ndim == 2
    return colour_space(profile) == (GRAY if gray else RGB)


def _open(profile: bytes) -> ImageCms.ImageCmsProfile | None:
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(profile))
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        log.info("ignoring an unreadable ICC profile (%d bytes): %s", len(profile), exc)
        return None


def is_srgb(opened: ImageCms.ImageCmsProfile) -> bool:
    """sRGB profiles (the IEC 61966-2.1 one and its many copies) by their description,
    as most tools decide it: converting with them changes nothing but costs time."""
    description = (opened.profile.profile_description or "").strip().lower()
    return description.startswith("srgb")


def apply_policy(image: np.ndarray, profile: bytes | None,
                 policy: str) -> tuple[np.ndarray, Colour]:
    """Settle the colour of freshly decoded pixels: ``srgb`` converts them, ``keep``
    keeps them and hands the profile on. A profile that does not fit the pixels, or
    that cannot be read, is dropped (the pixels are taken as sRGB, as before)."""
    if not profile:
        return image, Colour()
    if not fits(profile, image):
        log.info("ignoring an ICC profile for %r data on %s pixels", colour_space(profile),
                 "gray" if image.ndim == 2 else "colour")
        return image, Colour()
    if policy == "keep":
        return image, Colour(profile)
    opened = _open(profile)
    if opened is None or is_srgb(opened):
        return image, Colour()
    return to_srgb(image, opened), Colour()


def to_srgb(image: np.ndarray, source: ImageCms.ImageCmsProfile) -> np.ndarray:
    """uint8 gray, BGR or BGRA pixels in ``source``'s space → the same layout in sRGB."""
    srgb = ImageCms.createProfile("sRGB")
    if image.ndim == 2:
        # Gray through sRGB gives R = G = B for neutral input; one channel is the gray.
        transform = ImageCms.buildTransform(source, srgb, "L", "RGB", INTENT)
        out = ImageCms.applyTransform(PILImage.fromarray(image, "L"), transform)
        return np.ascontiguousarray(np.asarray(out)[:, :, 1])
    transform = ImageCms.buildTransform(source, srgb, "RGB", "RGB", INTENT)
    rgb = PILImage.fromarray(cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2RGB), "RGB")
    ImageCms.applyTransform(rgb, transform, inPlace=True)
    bgr = cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR)
    if image.shape[2] == 4:
        return np.dstack((bgr, image[:, :, 3]))
    return bgr


NO_COLOUR = Colour()  # frozen: pixels in sRGB, no profile to write
