"""Shrink-on-load: the decision is pure; the result has the planned size and stays
close to a full-size decode."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import IMAGES_DIR

from server import codecs
from server.operations import default_registry
from server.pipeline import parse_pipeline
from server.shrink import run_after_shrink, shrink_factor

IMAGES = IMAGES_DIR
REGISTRY = default_registry()


def info(fmt: str, width: int, height: int) -> codecs.ImageInfo:
    return codecs.ImageInfo(fmt, width, height, 1)


def steps(*raw: dict) -> object:
    return parse_pipeline(REGISTRY, None, None, json.dumps(list(raw)))


FIT_512 = {"op": "resize", "width": 512, "height": 512}


@pytest.mark.parametrize(("image", "pipeline", "factor"), [
    (info("jpeg", 4000, 3000), steps(FIT_512), 4),            # 1000x750 >= 1.5 x 512x384
    (info("jpeg", 2048, 1365), steps(FIT_512), 2),            # 512x341 at 1/4 is too tight
    (info("jpeg", 8000, 6000), steps(FIT_512), 8),
    (info("jpeg", 1000, 800), steps(FIT_512), 1),             # barely shrinking
    (info("png", 4000, 3000), steps(FIT_512), 1),             # only JPEG decodes scaled
    (info("jpeg", 4000, 3000), steps({"op": "grayscale"}, FIT_512), 1),  # resize not first
    (info("jpeg", 4000, 3000), steps({**FIT_512, "interpolation": "cubic"}), 1),
    (info("jpeg", 4000, 3000), steps({**FIT_512, "width": 4000, "height": 3000}), 1),
    # fill covers the box: 683x512 before its centre crop, so 1/4 (1000x750) is too small
    (info("jpeg", 4000, 3000), steps({**FIT_512, "mode": "fill"}), 2),
])
def test_shrink_factor(image, pipeline, factor):
    assert shrink_factor(pipeline, image) == factor


@pytest.mark.parametrize("params", [
    {"width": 512, "height": 512},
    {"width": 300, "height": 300, "mode": "fill"},
    {"width": 333},
    {"width": 400, "height": 250, "mode": "exact"},
])
def test_result_has_the_planned_size_and_is_close_to_a_full_decode(params):
    photo = cv2.imread(str(IMAGES / "retina.jpg"))
    big = cv2.resize(photo, (2822, 2822), interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    data = buf.tobytes()
    head = codecs.probe(data, 10**9)
    pipeline = steps({"op": "resize", **params}, {"op": "sharpen"})
    factor = shrink_factor(pipeline, head)
    assert factor > 1
    fast = run_after_shrink(pipeline, codecs.decode(data, head, factor), head)
    exact = pipeline.run(codecs.decode(data, head))
    assert fast.shape == exact.shape
    assert cv2.PSNR(fast, exact) > 33  # sharpened, so small differences are amplified
    plain = steps({"op": "resize", **params})
    assert cv2.PSNR(run_after_shrink(plain, codecs.decode(data, head, factor), head),
                    plain.run(codecs.decode(data, head))) > 38


def test_exif_rotated_jpeg_shrinks_upright():
    photo = cv2.imread(str(IMAGES / "rocket.jpg"))
    big = cv2.resize(photo, (2560, 1708))
    from PIL import Image

    pil = Image.fromarray(cv2.cvtColor(big, cv2.COLOR_BGR2RGB))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    import io

    out = io.BytesIO()
    pil.save(out, "JPEG", quality=92, exif=exif)
    data = out.getvalue()
    head = codecs.probe(data, 10**9)
    assert (head.width, head.height) == (1708, 2560)
    pipeline = steps({"op": "resize", "width": 256, "height": 256})
    factor = shrink_factor(pipeline, head)
    assert factor == 4
    fast = run_after_shrink(pipeline, codecs.decode(data, head, factor), head)
    exact = pipeline.run(codecs.decode(data, head))
    assert fast.shape == exact.shape == (256, 171, 3)
    assert cv2.PSNR(fast, exact) > 35
    assert np.abs(fast.astype(int) - exact).mean() < 3
