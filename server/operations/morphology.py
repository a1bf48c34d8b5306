"""Morphological operations."""

from __future__ import annotations

import cv2

from server.operations.base import Image, Operation, Params
from server.params import choice_param, int_param

SHAPES = {"rect": cv2.MORPH_RECT, "ellipse": cv2.MORPH_ELLIPSE, "cross": cv2.MORPH_CROSS}

MORPH_OPS = {
    "erode": (cv2.MORPH_ERODE, "Erode", "Shrinks bright regions.", 1),
    "dilate": (cv2.MORPH_DILATE, "Dilate", "Grows bright regions.", 1),
    "open": (cv2.MORPH_OPEN, "Open", "Erode then dilate: removes small bright specks.", 2),
    "close": (cv2.MORPH_CLOSE, "Close", "Dilate then erode: fills small dark holes.", 2),
    "gradient": (cv2.MORPH_GRADIENT, "Morphological gradient",
                 "Dilation minus erosion: outlines shapes.", 1),
    "tophat": (cv2.MORPH_TOPHAT, "Top-hat",
               "Image minus its opening: small bright details.", 2),
    "blackhat": (cv2.MORPH_BLACKHAT, "Black-hat",
                 "Closing minus the image: small dark details.", 2),
}


def kernel(p: Params):
    k = p["ksize"]
    return cv2.getStructuringElement(SHAPES[p["shape"]], (k, k))


def _morph(op: int):
    def run(image: Image, p: Params) -> Image:
        return cv2.morphologyEx(image, op, kernel(p), iterations=p["iterations"])
    return run


def morphology_chain(image: Image, p: Params) -> Image:
    """The original tool's chain: dilate, then open, then close."""
    k = kernel(p)
    it = p["iterations"]
    out = cv2.dilate(image, k, iterations=it)
    out = cv2.morphologyEx(out, cv2.MORPH_OPEN, k, iterations=it)
    return cv2.morphologyEx(out, cv2.MORPH_CLOSE, k, iterations=it)


def _params(default_size: int):
    return (
        choice_param("shape", "rect", tuple(SHAPES), "structuring element shape"),
        int_param("ksize", default_size, 1, 51, "structuring element size", odd=True),
        int_param("iterations", 1, 1, 20, "how many times it is applied"),
    )


def _halo(passes: int):
    # Each erosion or dilation reaches ksize//2 pixels; passes x iterations of them chain.
    return lambda p: (p["ksize"] // 2) * p["iterations"] * passes


OPERATIONS = (
    *(
        Operation(name, title, description, _params(5), _morph(op), halo=_halo(passes))
        for name, (op, title, description, passes) in MORPH_OPS.items()
    ),
    Operation(
        "morphology", "Morphology chain",
        "Dilate, open, then close with the same structuring element.",
        _params(5),
        morphology_chain,
        halo=_halo(5),
    ),
)
