"""Edges, lines, contours and thresholds."""

from __future__ import annotations

import cv2
import numpy as np

from server.operations.base import (
    COLOUR_NAMES,
    COLOURS,
    Image,
    Operation,
    OperationInputError,
    Params,
    to_bgr,
    to_gray,
)
from server.params import bool_param, choice_param, float_param, int_param

THRESHOLD_TYPES = {
    "binary": cv2.THRESH_BINARY,
    "binary_inv": cv2.THRESH_BINARY_INV,
    "trunc": cv2.THRESH_TRUNC,
    "tozero": cv2.THRESH_TOZERO,
    "tozero_inv": cv2.THRESH_TOZERO_INV,
}


def _check_canny(p: Params, low: str = "low", high: str = "high") -> None:
    if p[low] > p[high]:
        raise OperationInputError(
            f"'{low}' ({p[low]:g}) must not be above '{high}' ({p[high]:g})"
        )


def canny(image: Image, p: Params) -> Image:
    return cv2.Canny(to_gray(image), p["low"], p["high"], apertureSize=p["aperture"],
                     L2gradient=p["l2_gradient"])


def threshold(image: Image, p: Params) -> Image:
    _, out = cv2.threshold(to_gray(image), p["threshold"], p["max_value"],
                           THRESHOLD_TYPES[p["type"]])
    return out


def otsu_threshold(image: Image, p: Params) -> Image:
    kind = cv2.THRESH_BINARY_INV if p["invert"] else cv2.THRESH_BINARY
    _, out = cv2.threshold(to_gray(image), 0, 255, kind | cv2.THRESH_OTSU)
    return out


def adaptive_threshold(image: Image, p: Params) -> Image:
    method = (cv2.ADAPTIVE_THRESH_GAUSSIAN_C if p["method"] == "gaussian"
              else cv2.ADAPTIVE_THRESH_MEAN_C)
    kind = cv2.THRESH_BINARY_INV if p["invert"] else cv2.THRESH_BINARY
    return cv2.adaptiveThreshold(to_gray(image), 255, method, kind, p["block_size"], p["c"])


def sobel(image: Image, p: Params) -> Image:
    gray = to_gray(image)
    k = p["ksize"]
    if p["direction"] == "x":
        return cv2.convertScaleAbs(cv2.Sobel(gray, cv2.CV_16S, 1, 0, ksize=k))
    if p["direction"] == "y":
        return cv2.convertScaleAbs(cv2.Sobel(gray, cv2.CV_16S, 0, 1, ksize=k))
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=k)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=k)
    return cv2.convertScaleAbs(cv2.magnitude(gx, gy))


def laplacian(image: Image, p: Params) -> Image:
    return cv2.convertScaleAbs(cv2.Laplacian(to_gray(image), cv2.CV_16S, ksize=p["ksize"]))


def lines(image: Image, p: Params) -> Image:
    """Canny edges, probabilistic Hough transform, segments drawn over the original."""
    edges = cv2.Canny(to_gray(image), p["canny_low"], p["canny_high"])
    found = cv2.HoughLinesP(edges, 1, np.pi / 180, p["votes"],
                            minLineLength=p["min_length"], maxLineGap=p["max_gap"])
    out = to_bgr(image).copy()
    if found is not None:
        for x1, y1, x2, y2 in found[:, 0]:
            cv2.line(out, (int(x1), int(y1)), (int(x2), int(y2)), COLOURS[p["color"]],
                     p["thickness"], cv2.LINE_AA)
    return out


CONTOUR_MODES = {"external": cv2.RETR_EXTERNAL, "tree": cv2.RETR_TREE, "list": cv2.RETR_LIST}


def contours(image: Image, p: Params) -> Image:
    """Binary threshold, contours found, drawn over the original."""
    _, binary = cv2.threshold(to_gray(image), p["threshold"], 255, cv2.THRESH_BINARY)
    found, _ = cv2.findContours(binary, CONTOUR_MODES[p["mode"]], cv2.CHAIN_APPROX_SIMPLE)
    out = to_bgr(image).copy()
    cv2.drawContours(out, found, -1, COLOURS[p["color"]], p["thickness"])
    return out


OPERATIONS = (
    Operation(
        "canny", "Canny edges",
        "Edges by the Canny detector with hysteresis thresholds low/high.",
        (
            float_param("low", 100.0, 0.0, 1000.0, "lower hysteresis threshold"),
            float_param("high", 200.0, 0.0, 1000.0, "upper hysteresis threshold"),
            int_param("aperture", 3, 3, 7, "Sobel aperture size", odd=True),
            bool_param("l2_gradient", False, "use the exact L2 gradient magnitude"),
        ),
        canny,
        # Hysteresis follows weak edges for any distance, so no finite halo is exact.
        tiling="global",
        check=_check_canny,
    ),
    Operation(
        "threshold", "Binary threshold",
        "Pixels above the threshold become max_value, the others 0 (grayscale output).",
        (
            int_param("threshold", 127, 0, 255, "threshold level"),
            int_param("max_value", 255, 0, 255, "value given to pixels above the threshold"),
            choice_param("type", "binary", tuple(THRESHOLD_TYPES), "threshold type"),
        ),
        threshold,
    ),
    Operation(
        "otsu_threshold", "Otsu threshold",
        "Binary threshold at the level Otsu's method picks from the image histogram.",
        (bool_param("invert", False, "swap black and white"),),
        otsu_threshold,
        tiling="two_phase",
    ),
    Operation(
        "adaptive_threshold", "Adaptive threshold",
        "Threshold against the mean or Gaussian-weighted mean of each block, minus c.",
        (
            choice_param("method", "gaussian", ("mean", "gaussian"), "local mean weighting"),
            int_param("block_size", 11, 3, 255, "neighbourhood size in pixels", odd=True),
            float_param("c", 2.0, -100.0, 100.0, "constant subtracted from the mean"),
            bool_param("invert", False, "swap black and white"),
        ),
        adaptive_threshold,
        halo=lambda p: p["block_size"] // 2,
    ),
    Operation(
        "sobel", "Sobel gradient",
        "First derivative along x, y, or the gradient magnitude (grayscale output).",
        (
            choice_param("direction", "magnitude", ("x", "y", "magnitude"), "derivative"),
            int_param("ksize", 3, 1, 7, "kernel size", odd=True),
        ),
        sobel,
        halo=lambda p: max(1, p["ksize"] // 2),
    ),
    Operation(
        "laplacian", "Laplacian",
        "Second derivative (absolute value, grayscale output).",
        (int_param("ksize", 3, 1, 31, "kernel size", odd=True),),
        laplacian,
        halo=lambda p: max(1, p["ksize"] // 2),
    ),
    Operation(
        "lines", "Line detection",
        "Canny edges, then probabilistic Hough line segments drawn over the original.",
        (
            float_param("canny_low", 50.0, 0.0, 1000.0, "Canny lower threshold"),
            float_param("canny_high", 150.0, 0.0, 1000.0, "Canny upper threshold"),
            int_param("votes", 80, 1, 1000, "minimum Hough accumulator votes for a line"),
            int_param("min_length", 50, 0, 10000, "shortest segment kept, in pixels"),
            int_param("max_gap", 10, 0, 1000, "largest gap bridged within a segment, in pixels"),
            int_param("thickness", 2, 1, 20, "drawn line width"),
            choice_param("color", "red", COLOUR_NAMES, "drawn line colour"),
        ),
        lines,
        tiling="global",
        check=lambda p: _check_canny(p, "canny_low", "canny_high"),
    ),
    Operation(
        "contours", "Contour detection",
        "Binary threshold, then the contours found drawn over the original.",
        (
            int_param("threshold", 127, 0, 255, "binary threshold level"),
            choice_param("mode", "tree", tuple(CONTOUR_MODES), "which contours are found"),
            int_param("thickness", 2, 1, 20, "drawn contour width"),
            choice_param("color", "green", COLOUR_NAMES, "drawn contour colour"),
        ),
        contours,
        tiling="global",
    ),
)
