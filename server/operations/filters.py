"""Smoothing and sharpening."""

from __future__ import annotations

import cv2
import numpy as np

from server.operations.base import Image, Operation, Params
from server.params import float_param, int_param


def gaussian_blur(image: Image, p: Params) -> Image:
    k = p["ksize"]
    return cv2.GaussianBlur(image, (k, k), p["sigma"])


def median_blur(image: Image, p: Params) -> Image:
    return cv2.medianBlur(image, p["ksize"])


def bilateral(image: Image, p: Params) -> Image:
    return cv2.bilateralFilter(image, p["diameter"], p["sigma_color"], p["sigma_space"])


def box_blur(image: Image, p: Params) -> Image:
    k = p["ksize"]
    return cv2.blur(image, (k, k))


def sharpen_sigma_ksize(sigma: float) -> int:
    # OpenCV's own choice for 8-bit images when ksize is (0, 0): round(sigma*3*2 + 1) | 1.
    return round(sigma * 6 + 1) | 1  # round-half-even, like cvRound


def sharpen(image: Image, p: Params) -> Image:
    """Unsharp mask: (1 + amount) x original - amount x blurred, where the difference
    reaches `threshold` (so flat, noisy areas are left alone)."""
    k = sharpen_sigma_ksize(p["radius"])
    blurred = cv2.GaussianBlur(image, (k, k), p["radius"])
    sharp = cv2.addWeighted(image, 1.0 + p["amount"], blurred, -p["amount"], 0)
    if p["threshold"] > 0:
        np.copyto(sharp, image, where=cv2.absdiff(image, blurred) < p["threshold"])
    return sharp


OPERATIONS = (
    Operation(
        "gaussian_blur", "Gaussian blur",
        "Smooths the image with a Gaussian kernel (ksize x ksize).",
        (
            int_param("ksize", 15, 1, 151, "kernel size in pixels", odd=True),
            float_param("sigma", 0.0, 0.0, 100.0, "standard deviation; 0 derives it from ksize"),
        ),
        gaussian_blur,
        halo=lambda p: p["ksize"] // 2,
    ),
    Operation(
        "median_blur", "Median blur",
        "Replaces each pixel with the median of its ksize x ksize neighbourhood; "
        "removes salt-and-pepper noise while keeping edges.",
        (int_param("ksize", 5, 3, 51, "kernel size in pixels", odd=True),),
        median_blur,
        halo=lambda p: p["ksize"] // 2,
    ),
    Operation(
        "bilateral", "Bilateral filter",
        "Edge-preserving smoothing.",
        (
            int_param("diameter", 9, 1, 25, "neighbourhood diameter in pixels"),
            float_param("sigma_color", 75.0, 1.0, 250.0, "how different colours may be mixed"),
            float_param("sigma_space", 75.0, 1.0, 250.0, "how far pixels influence each other"),
        ),
        bilateral,
        halo=lambda p: p["diameter"] // 2,
    ),
    Operation(
        "box_blur", "Box blur",
        "Averages each ksize x ksize neighbourhood.",
        (int_param("ksize", 5, 1, 151, "kernel size in pixels"),),
        box_blur,
        halo=lambda p: p["ksize"] // 2 + 1,
    ),
    Operation(
        "sharpen", "Sharpen (unsharp mask)",
        "Adds back amount x (image - Gaussian blur of the given radius).",
        (
            float_param("amount", 1.0, 0.0, 5.0, "strength of the sharpening"),
            float_param("radius", 1.0, 0.1, 20.0, "Gaussian sigma of the blur, in pixels"),
            int_param("threshold", 0, 0, 255, "minimum difference that is sharpened"),
        ),
        sharpen,
        halo=lambda p: sharpen_sigma_ksize(p["radius"]) // 2,
    ),
)
