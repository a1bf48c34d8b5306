"""Shrink-on-load: when a pipeline starts by shrinking a JPEG, decode it at 1/2, 1/4
or 1/8 scale (libjpeg does this in the DCT domain, far faster than a full decode)
and resize from there to the size planned for the full image."""

from __future__ import annotations

from collections.abc import Callable

from server.codecs import ImageInfo
from server.operations import Image
from server.operations.geometry import resize_plan, resize_to_plan
from server.pipeline import Pipeline

# The reduced image stays at least this many times the target size, so the final area
# resize still averages over more than one decoded pixel per output pixel. At 1.0 (what
# thumbor's draft mode does) a 2048 px JPEG fitted to 512 px decodes at 1/4 and must
# then be resampled from 512x342 to 512x341, which blurs it (31.6 dB against a float
# reference, 40.3 dB at 1/2). At 1.5 that case decodes at 1/2 while a 12 MP JPEG still
# decodes at 1/4 (47.0 dB; thumbor's result: 43.5 dB). README, "Performance".
MARGIN = 1.5
FACTORS = (8, 4, 2)


def shrink_factor(pipeline: Pipeline, info: ImageInfo) -> int:
    """Pure decision: 1 (decode at full size) or 2, 4, 8."""
    if info.format != "jpeg" or not pipeline.steps:
        return 1
    first = pipeline.steps[0]
    if first.operation.name != "resize":
        return 1
    params = first.params.as_dict()
    if params["interpolation"] not in ("auto", "area"):
        return 1
    sw, sh, _, _ = resize_plan(info.width, info.height, params)
    for factor in FACTORS:
        if info.width / factor >= MARGIN * sw and info.height / factor >= MARGIN * sh:
            return factor
    return 1


def run_after_shrink(pipeline: Pipeline, image: Image, info: ImageInfo,
                     between_steps: Callable[[], None] | None = None) -> Image:
    """Run a pipeline on an image decoded with shrink_factor(...) > 1: the first
    (resize) step targets the size planned from the full-size header."""
    first = pipeline.steps[0]
    params = first.params.as_dict()
    out = resize_to_plan(image, resize_plan(info.width, info.height, params), params)
    return Pipeline(pipeline.steps[1:]).run(out, between_steps)
