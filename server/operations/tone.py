"""Colour and tone: point operations and histogram-based ones."""

from __future__ import annotations

import cv2
import numpy as np

from server.operations.base import Image, Operation, Params, to_bgr, to_gray
from server.params import float_param, int_param

# Sepia as the commonly used RGB matrix, rewritten for OpenCV's BGR channel order.
SEPIA_BGR = np.array(
    [
        [0.131, 0.534, 0.272],
        [0.168, 0.686, 0.349],
        [0.189, 0.769, 0.393],
    ],
    dtype=np.float32,
)


def invert(image: Image, _: Params) -> Image:
    return cv2.bitwise_not(image)


def grayscale(image: Image, _: Params) -> Image:
    return to_gray(image)


def brightness_contrast(image: Image, p: Params) -> Image:
    # out = saturate(contrast * in + brightness), the classic linear transform.
    return cv2.convertScaleAbs(image, alpha=p["contrast"], beta=p["brightness"])


def gamma_lut(gamma: float) -> np.ndarray:
    levels = np.arange(256, dtype=np.float64) / 255.0
    return np.clip(np.rint(np.power(levels, 1.0 / gamma) * 255.0), 0, 255).astype(np.uint8)


def gamma(image: Image, p: Params) -> Image:
    return cv2.LUT(image, gamma_lut(p["gamma"]))


def sepia(image: Image, p: Params) -> Image:
    bgr = to_bgr(image)
    toned = cv2.transform(bgr, SEPIA_BGR)
    if p["strength"] >= 1.0:
        return toned
    return cv2.addWeighted(toned, p["strength"], bgr, 1.0 - p["strength"], 0)


def equalize(image: Image, _: Params) -> Image:
    """Histogram equalisation; colour images are equalised on luma (YCrCb) only."""
    if image.ndim == 2:
        return cv2.equalizeHist(image)
    ycrcb = cv2.cvtColor(image, cv2.COLOR_BGR2YCrCb)
    ycrcb[:, :, 0] = cv2.equalizeHist(ycrcb[:, :, 0])
    return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2BGR)


def clahe(image: Image, p: Params) -> Image:
    """Contrast-limited adaptive equalisation; colour images on L of Lab."""
    tool = cv2.createCLAHE(clipLimit=p["clip_limit"], tileGridSize=(p["grid"], p["grid"]))
    if image.ndim == 2:
        return tool.apply(image)
    lab = cv2.cvtColor(image, cv2.COLOR_BGR2LAB)
    lab[:, :, 0] = tool.apply(lab[:, :, 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)


OPERATIONS = (
    Operation("invert", "Invert colours", "Negative: every channel becomes 255 - value.",
              (), invert),
    Operation("grayscale", "Grayscale", "Converts to one luma channel (ITU-R BT.601).",
              (), grayscale),
    Operation(
        "brightness_contrast", "Brightness / contrast",
        "out = contrast x in + brightness, saturated to 0..255.",
        (
            float_param("brightness", 0.0, -255.0, 255.0, "added to every value"),
            float_param("contrast", 1.0, 0.0, 5.0, "multiplies every value"),
        ),
        brightness_contrast,
    ),
    Operation(
        "gamma", "Gamma", "out = 255 x (in/255)^(1/gamma): above 1 brightens mid-tones.",
        (float_param("gamma", 1.0, 0.1, 10.0, "gamma value"),),
        gamma,
    ),
    Operation(
        "sepia", "Sepia", "Warm brown tone, blended with the original by strength.",
        (float_param("strength", 1.0, 0.0, 1.0, "0 keeps the original, 1 is full sepia"),),
        sepia,
    ),
    Operation("equalize", "Histogram equalisation",
              "Spreads the intensity histogram (on luma for colour images).", (), equalize,
              # Its lookup table comes from the whole histogram; processed whole.
              tiling="global"),
    Operation(
        "clahe", "CLAHE",
        "Contrast-limited adaptive histogram equalisation on a grid x grid layout.",
        (
            float_param("clip_limit", 2.0, 0.1, 40.0, "contrast limit"),
            int_param("grid", 8, 1, 64, "tiles per side"),
        ),
        clahe,
        # The grid is laid out relative to the whole image.
        tiling="global",
    ),
)
