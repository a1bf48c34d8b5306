"""Geometry: resize, rotate, flip, crop. They act on every channel, alpha included.

Each declares `output_size(width, height, params)` so a pipeline's sizes are known
(and limited) from the image header, before any pixel is decoded.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from server.operations.base import Image, Operation, OperationInputError, Params
from server.params import bool_param, choice_param, float_param, int_param

MAX_SIDE = 32768

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}

BACKGROUNDS = ("black", "white", "transparent")


def _check_resize(p: Params) -> None:
    if p["width"] == 0 and p["height"] == 0:
        raise OperationInputError("resize needs 'width', 'height' or both above 0")


def resize_plan(width: int, height: int, p: Params) -> tuple[int, int, int, int]:
    """(scaled_w, scaled_h, out_w, out_h): the size to scale to, then the final size
    after the centre crop that `fill` needs."""
    tw, th = p["width"], p["height"]
    if tw == 0 or th == 0:
        scale = tw / width if tw else th / height
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        return w, h, w, h
    if p["mode"] == "exact":
        return tw, th, tw, th
    sx, sy = tw / width, th / height
    if p["mode"] == "fit":
        scale = min(sx, sy)
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        return min(w, tw), min(h, th), min(w, tw), min(h, th)
    scale = max(sx, sy)  # fill: cover the box, then crop its centre
    w, h = max(tw, round(width * scale)), max(th, round(height * scale))
    return w, h, tw, th


def resize_size(width: int, height: int, p: Params) -> tuple[int, int]:
    _, _, w, h = resize_plan(width, height, p)
    return w, h


def interpolation_for(p: Params, src_w: int, src_h: int, dst_w: int, dst_h: int) -> int:
    if p["interpolation"] != "auto":
        return INTERPOLATIONS[p["interpolation"]]
    shrinking = dst_w * dst_h < src_w * src_h
    return cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC


def resize(image: Image, p: Params) -> Image:
    height, width = image.shape[:2]
    return resize_to_plan(image, resize_plan(width, height, p), p)


def resize_to_plan(image: Image, plan: tuple[int, int, int, int], p: Params) -> Image:
    """Resize per a plan made for this image or, after shrink-on-load, for the
    full-size original: the output size is the plan's either way."""
    height, width = image.shape[:2]
    sw, sh, ow, oh = plan
    out = cv2.resize(image, (sw, sh), interpolation=interpolation_for(p, width, height, sw, sh))
    if (sw, sh) != (ow, oh):
        x, y = (sw - ow) // 2, (sh - oh) // 2
        out = out[y:y + oh, x:x + ow]
    return out


def _rotated_size(width: int, height: int, angle: float) -> tuple[int, int]:
    rad = math.radians(angle)
    c, s = abs(math.cos(rad)), abs(math.sin(rad))
    # Round away float noise before ceil (cos(90°) is 6e-17, not 0).
    w = math.ceil(round(width * c + height * s, 6))
    h = math.ceil(round(width * s + height * c, 6))
    return max(1, w), max(1, h)


def rotate_size(width: int, height: int, p: Params) -> tuple[int, int]:
    if not p["expand"]:
        return width, height
    return _rotated_size(width, height, p["angle"])


QUARTER_TURNS = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180,
                 270: cv2.ROTATE_90_CLOCKWISE}


def rotate(image: Image, p: Params) -> Image:
    """Rotate counter-clockwise by `angle` degrees about the centre."""
    angle = p["angle"] % 360.0
    height, width = image.shape[:2]
    if angle == 0:
        return image.copy()
    if angle in QUARTER_TURNS and (p["expand"] or angle == 180 or width == height):
        return cv2.rotate(image, QUARTER_TURNS[int(angle)])
    out_w, out_h = rotate_size(width, height, p)
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), angle, 1.0)
    matrix[0, 2] += (out_w - width) / 2.0
    matrix[1, 2] += (out_h - height) / 2.0
    background = p["background"]
    if background == "transparent" and (image.ndim == 2 or image.shape[2] == 3):
        code = cv2.COLOR_GRAY2BGRA if image.ndim == 2 else cv2.COLOR_BGR2BGRA
        image = cv2.cvtColor(image, code)
    fill = 255 if background == "white" else 0
    channels = 1 if image.ndim == 2 else image.shape[2]
    border = (fill,) * min(channels, 3) + ((0,) if channels == 4 and background == "transparent"
                                           else (255,) if channels == 4 else ())
    return cv2.warpAffine(image, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=border)


FLIP_CODES = {"horizontal": 1, "vertical": 0, "both": -1}


def flip(image: Image, p: Params) -> Image:
    return cv2.flip(image, FLIP_CODES[p["direction"]])


def crop_box(width: int, height: int, p: Params) -> tuple[int, int, int, int]:
    x, y = p["x"], p["y"]
    if x >= width or y >= height:
        raise OperationInputError(
            f"crop origin ({x}, {y}) is outside the {width}x{height} image; "
            f"x must be below {width} and y below {height}"
        )
    w = p["width"] or width - x
    h = p["height"] or height - y
    if x + w > width or y + h > height:
        raise OperationInputError(
            f"crop {w}x{h} at ({x}, {y}) reaches beyond the {width}x{height} image; "
            f"at most {width - x}x{height - y} fits there (0 means: to the edge)"
        )
    return x, y, w, h


def crop_size(width: int, height: int, p: Params) -> tuple[int, int]:
    _, _, w, h = crop_box(width, height, p)
    return w, h


def crop(image: Image, p: Params) -> Image:
    height, width = image.shape[:2]
    x, y, w, h = crop_box(width, height, p)
    return np.ascontiguousarray(image[y:y + h, x:x + w])


OPERATIONS = (
    Operation(
        "resize", "Resize",
        "Scales to width and/or height. fit: within the box, keeping the aspect ratio; "
        "fill: covers the box, centre-cropped; exact: stretched. With one side 0 the "
        "other follows the aspect ratio.",
        (
            int_param("width", 0, 0, MAX_SIDE, "target width in pixels; 0 = from height"),
            int_param("height", 0, 0, MAX_SIDE, "target height in pixels; 0 = from width"),
            choice_param("mode", "fit", ("fit", "fill", "exact"), "how the box is used"),
            choice_param("interpolation", "auto", ("auto", *INTERPOLATIONS),
                         "auto: area when shrinking, cubic when enlarging"),
        ),
        resize,
        alpha="all",
        tiling="global",
        check=_check_resize,
        output_size=resize_size,
    ),
    Operation(
        "rotate", "Rotate",
        "Rotates counter-clockwise by angle degrees; expand grows the canvas to fit.",
        (
            float_param("angle", 90.0, -360.0, 360.0, "degrees, counter-clockwise"),
            bool_param("expand", True, "grow the canvas so nothing is cut off"),
            choice_param("background", "black", BACKGROUNDS, "fill for uncovered corners"),
        ),
        rotate,
        alpha="all",
        tiling="global",
        output_size=rotate_size,
    ),
    Operation(
        "flip", "Flip", "Mirrors the image.",
        (choice_param("direction", "horizontal", tuple(FLIP_CODES), "mirror axis"),),
        flip,
        alpha="all",
        tiling="global",
    ),
    Operation(
        "crop", "Crop",
        "Keeps the width x height rectangle at (x, y); 0 width/height reaches the edge.",
        (
            int_param("x", 0, 0, MAX_SIDE, "left edge"),
            int_param("y", 0, 0, MAX_SIDE, "top edge"),
            int_param("width", 0, 0, MAX_SIDE, "width; 0 = to the right edge"),
            int_param("height", 0, 0, MAX_SIDE, "height; 0 = to the bottom edge"),
        ),
        crop,
        alpha="all",
        tiling="global",
        output_size=crop_size,
    ),
)
