"""What a pipeline will cost before it runs: estimated CPU seconds from the image size
and each step's parameters.

A 67-byte PNG can ask for a 2000x2000 resize followed by twenty 51-pixel elliptical
morphology chains: about 24 s of CPU here (67 s on a loaded machine). The pixel cap
alone cannot see that, so each step is
priced as ``pixels x nanoseconds per pixel``, where the per-pixel price grows with the
parameters that drive the work (kernel area, iterations, diameter). The prices are
single-thread measurements on 1000x1000 colour photographs (cv2.setNumThreads(1), best
of two runs of each operation); they are an estimate to refuse the absurd, not a promise.

Pure: no I/O, no Flask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from server.errors import ApiError

Params = Mapping[str, Any]
PerPixel = Callable[[Params], float]  # nanoseconds per pixel of the larger of in/out

MORPH_PASSES = {"erode": 1, "dilate": 1, "open": 2, "close": 2, "gradient": 2,
                "tophat": 2, "blackhat": 2, "morphology": 5}


def _flat(ns: float) -> PerPixel:
    return lambda _p: ns


def _morph(passes: int) -> PerPixel:
    def price(p: Params) -> float:
        k = p["ksize"]
        # Rectangles and crosses are separable in OpenCV (cost grows with k); an
        # ellipse is not (cost grows with its area).
        one = 1.0 + (0.023 * k * k if p["shape"] == "ellipse" else 0.06 * k)
        return one * passes * p["iterations"]
    return price


def _median(p: Params) -> float:
    return 5.0 if p["ksize"] <= 5 else 70.0  # above 5 OpenCV switches to a histogram


PRICES: dict[str, PerPixel] = {
    "invert": _flat(3), "grayscale": _flat(1), "threshold": _flat(1), "sepia": _flat(1),
    "brightness_contrast": _flat(1), "gamma": _flat(2), "flip": _flat(1),
    "rotate": _flat(2), "crop": _flat(1), "resize": _flat(5), "canny": _flat(5),
    "contours": _flat(5), "equalize": _flat(4), "otsu_threshold": _flat(2),
    "box_blur": _flat(2), "lines": _flat(30), "clahe": _flat(25), "sobel": _flat(15),
    "laplacian": _flat(16),
    "gaussian_blur": lambda p: 3.0 + 0.0105 * p["ksize"] ** 2,
    "median_blur": _median,
    "bilateral": lambda p: 1.2 * p["diameter"] ** 2,
    "adaptive_threshold": lambda p: 3.0 + 0.0014 * p["block_size"] ** 2,
    "sharpen": lambda p: 5.0 + 0.25 * p["radius"] ** 2,
    **{name: _morph(passes) for name, passes in MORPH_PASSES.items()},
}
UNPRICED_NS = 50.0  # an operation without a price: assume a heavy one


@dataclass(frozen=True)
class StepCost:
    name: str
    seconds: float


@dataclass(frozen=True)
class CostEstimate:
    steps: tuple[StepCost, ...]

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    def heaviest(self) -> StepCost:
        return max(self.steps, key=lambda s: s.seconds)


def estimate(steps: list[tuple[str, Params]], sizes: list[tuple[int, int]], width: int,
             height: int) -> CostEstimate:
    """Price each ``(name, params)`` step; ``sizes`` is the size after each step."""
    priced = []
    for (name, params), (out_w, out_h) in zip(steps, sizes, strict=True):
        pixels = max(width * height, out_w * out_h)
        ns = PRICES.get(name, lambda _p: UNPRICED_NS)(params)
        priced.append(StepCost(name, pixels * ns * 1e-9))
        width, height = out_w, out_h
    return CostEstimate(tuple(priced))


def check_cost(cost: CostEstimate, limit_s: float) -> None:
    if cost.seconds <= limit_s:
        return
    worst = cost.heaviest()
    raise ApiError(
        413, "too_costly",
        f"this pipeline would take an estimated {cost.seconds:.0f} CPU seconds "
        f"({worst.name}: {worst.seconds:.0f} s); at most {limit_s:g} s allowed per request. "
        "Use a smaller image, a smaller kernel or fewer iterations")
