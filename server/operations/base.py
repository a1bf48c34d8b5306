"""The operation model: a pure `ndarray -> ndarray` function plus its declared parameters.

Images everywhere in the server are uint8 arrays in OpenCV's layout: 2-D grayscale,
3-channel BGR or 4-channel BGRA.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from server.api import OperationSpec
from server.params import ParamSpec

Params = Mapping[str, Any]
Image = np.ndarray

# How an operation treats an alpha channel:
#   "keep":  it works on the colour channels; the alpha channel is put back afterwards.
#   "all":   it works on every channel (geometry: resize, rotate, flip, crop).
AlphaPolicy = Literal["keep", "all"]

# How an operation may be split across tiles (see server/tiling.py):
#   "local":  each output pixel depends on input pixels within `halo(params)`.
#   "global": it needs the whole image (resize, rotate, contours, Hough lines, ...).
#   "two_phase": a statistic of the whole image first, then a local apply (Otsu,
#               histogram equalisation).
TileKind = Literal["local", "global", "two_phase"]


class OperationInputError(ValueError):
    """The parameters are valid one by one but not for this image or together."""


def no_halo(_: Params) -> int:
    return 0


@dataclass(frozen=True)
class Operation:
    name: str
    title: str
    description: str
    params: tuple[ParamSpec, ...]
    func: Callable[[Image, Params], Image]
    alpha: AlphaPolicy = "keep"
    tiling: TileKind = "local"
    halo: Callable[[Params], int] = no_halo
    check: Callable[[Params], None] | None = None
    # (width, height, params) -> output (width, height); None: same size as the input.
    output_size: Callable[[int, int, Params], tuple[int, int]] | None = None

    @property
    def tileable(self) -> bool:
        return self.tiling != "global"

    def size_after(self, width: int, height: int, params: Params) -> tuple[int, int]:
        if self.output_size is None:
            return width, height
        return self.output_size(width, height, params)

    def spec(self) -> OperationSpec:
        """What ``GET /operations`` says about this operation."""
        return OperationSpec(name=self.name, title=self.title, description=self.description,
                             params=self.params, tileable=self.tileable)

    def to_json(self) -> dict[str, Any]:
        return self.spec().model_dump(mode="json")

    def apply(self, image: Image, params: Params) -> Image:
        """Run the operation, handling the alpha channel per the operation's policy."""
        if self.alpha == "all" or image.ndim == 2 or image.shape[2] == 3:
            return self.func(image, params)
        colour, alpha = image[:, :, :3], image[:, :, 3]
        result = self.func(np.ascontiguousarray(colour), params)
        if result.shape[:2] != alpha.shape:
            return result  # defensive: a "keep" operation must not change the size
        if result.ndim == 2:
            result = cv2.cvtColor(result, cv2.COLOR_GRAY2BGR)
        return np.dstack((result, alpha))


# Small shared helpers for operation functions.

def to_gray(image: Image) -> Image:
    if image.ndim == 2:
        return image
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def to_bgr(image: Image) -> Image:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return image


COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (0, 0, 255),
    "green": (0, 255, 0),
    "blue": (255, 0, 0),
    "yellow": (0, 255, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOUR_NAMES = tuple(COLOURS)
