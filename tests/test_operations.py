"""Every operation against a direct OpenCV call on the real test photographs.

The expected arrays are computed here independently of server/operations, with the
documented defaults, so a change of default or behaviour shows up as a failure.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import IMAGES_DIR

from server.errors import ApiError
from server.operations import default_registry
from server.params import parse_param
from server.pipeline import parse_pipeline, parse_step

IMAGES = IMAGES_DIR
PHOTOS = ["astronaut.png", "camera.png", "rocket.jpg"]
REGISTRY = default_registry()


def load(name: str) -> np.ndarray:
    image = cv2.imread(str(IMAGES / name), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"missing test photograph {name}"
    return image


def gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def bgr(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image


def run(name: str, image: np.ndarray, **params) -> np.ndarray:
    step = parse_step(REGISTRY, name, params)
    return step.operation.apply(image, step.params.as_dict())


def _lines(img, low=50, high=150, votes=80, min_length=50, max_gap=10, thickness=2):
    edges = cv2.Canny(gray(img), low, high)
    found = cv2.HoughLinesP(edges, 1, np.pi / 180, votes, minLineLength=min_length,
                            maxLineGap=max_gap)
    out = bgr(img).copy()
    for x1, y1, x2, y2 in ([] if found is None else found[:, 0]):
        cv2.line(out, (int(x1), int(y1)), (int(x2), int(y2)), (0, 0, 255), thickness,
                 cv2.LINE_AA)
    return out


def _contours(img, thresh=127, mode=cv2.RETR_TREE):
    _, binary = cv2.threshold(gray(img), thresh, 255, cv2.THRESH_BINARY)
    found, _ = cv2.findContours(binary, mode, cv2.CHAIN_APPROX_SIMPLE)
    out = bgr(img).copy()
    cv2.drawContours(out, found, -1, (0, 255, 0), 2)
    return out


def _morph_chain(img, k=5, it=1):
    kernel = np.ones((k, k), np.uint8)
    out = cv2.dilate(img, kernel, iterations=it)
    out = cv2.morphologyEx(out, cv2.MORPH_OPEN, kernel, iterations=it)
    return cv2.morphologyEx(out, cv2.MORPH_CLOSE, kernel, iterations=it)


def _equalize(img):
    if img.ndim == 2:
        return cv2.equalizeHist(img)
    ycrcb = cv2.cvtColor(img, cv2.COLOR_BGR2YCrCb)
    ycrcb[:, :, 0] = cv2.equalizeHist(ycrcb[:, :, 0])
    return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2BGR)


def _clahe(img, clip=2.0, grid=8):
    tool = cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid))
    if img.ndim == 2:
        return tool.apply(img)
    lab = cv2.cvtColor(img, cv2.COLOR_BGR2LAB)
    lab[:, :, 0] = tool.apply(lab[:, :, 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)


def _sepia(img):
    m = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
    # The RGB sepia matrix applied in BGR order: reverse rows and columns.
    return cv2.transform(bgr(img), m[::-1, ::-1].astype(np.float32))


def _sharpen(img, amount=1.0, sigma=1.0):
    blurred = cv2.GaussianBlur(img, (7, 7), sigma)
    return cv2.addWeighted(img, 1 + amount, blurred, -amount, 0)


def _gamma(img, g):
    lut = np.clip(np.rint(((np.arange(256) / 255.0) ** (1 / g)) * 255), 0, 255).astype(np.uint8)
    return cv2.LUT(img, lut)


def _sobel_mag(img, k=3):
    gx = cv2.Sobel(gray(img), cv2.CV_32F, 1, 0, ksize=k)
    gy = cv2.Sobel(gray(img), cv2.CV_32F, 0, 1, ksize=k)
    return cv2.convertScaleAbs(np.sqrt(gx * gx + gy * gy))


ELLIPSE7 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
RECT5 = np.ones((5, 5), np.uint8)

# (operation, params, reference) — reference(img) is the direct OpenCV computation.
CASES = [
    # The original tool's eight, with their old fixed values as the defaults.
    ("invert", {}, lambda i: 255 - i),
    ("grayscale", {}, gray),
    ("gaussian_blur", {}, lambda i: cv2.GaussianBlur(i, (15, 15), 0)),
    ("canny", {}, lambda i: cv2.Canny(gray(i), 100, 200)),
    ("threshold", {}, lambda i: cv2.threshold(gray(i), 127, 255, cv2.THRESH_BINARY)[1]),
    ("lines", {}, _lines),
    ("contours", {}, _contours),
    ("morphology", {}, _morph_chain),
    # Parameters other than the defaults.
    ("gaussian_blur", {"ksize": 5, "sigma": 2.5}, lambda i: cv2.GaussianBlur(i, (5, 5), 2.5)),
    ("canny", {"low": 30, "high": 90, "aperture": 5, "l2_gradient": True},
     lambda i: cv2.Canny(gray(i), 30, 90, apertureSize=5, L2gradient=True)),
    ("threshold", {"threshold": 90, "max_value": 200, "type": "tozero_inv"},
     lambda i: cv2.threshold(gray(i), 90, 200, cv2.THRESH_TOZERO_INV)[1]),
    ("lines", {"canny_low": 80, "canny_high": 160, "votes": 40, "min_length": 20,
               "max_gap": 5, "thickness": 1},
     lambda i: _lines(i, 80, 160, 40, 20, 5, 1)),
    ("contours", {"threshold": 100, "mode": "external"},
     lambda i: _contours(i, 100, cv2.RETR_EXTERNAL)),
    ("morphology", {"ksize": 3, "iterations": 2}, lambda i: _morph_chain(i, 3, 2)),
    ("median_blur", {}, lambda i: cv2.medianBlur(i, 5)),
    ("median_blur", {"ksize": 9}, lambda i: cv2.medianBlur(i, 9)),
    ("bilateral", {}, lambda i: cv2.bilateralFilter(i, 9, 75, 75)),
    ("bilateral", {"diameter": 5, "sigma_color": 30, "sigma_space": 10},
     lambda i: cv2.bilateralFilter(i, 5, 30, 10)),
    ("box_blur", {}, lambda i: cv2.blur(i, (5, 5))),
    ("box_blur", {"ksize": 12}, lambda i: cv2.blur(i, (12, 12))),
    ("sharpen", {}, _sharpen),
    ("sharpen", {"amount": 2.0}, lambda i: _sharpen(i, 2.0)),
    ("sobel", {}, _sobel_mag),
    ("sobel", {"direction": "x", "ksize": 5},
     lambda i: cv2.convertScaleAbs(cv2.Sobel(gray(i), cv2.CV_16S, 1, 0, ksize=5))),
    ("sobel", {"direction": "y"},
     lambda i: cv2.convertScaleAbs(cv2.Sobel(gray(i), cv2.CV_16S, 0, 1, ksize=3))),
    ("laplacian", {}, lambda i: cv2.convertScaleAbs(cv2.Laplacian(gray(i), cv2.CV_16S, ksize=3))),
    ("otsu_threshold", {},
     lambda i: cv2.threshold(gray(i), 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)[1]),
    ("otsu_threshold", {"invert": True},
     lambda i: cv2.threshold(gray(i), 0, 255, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)[1]),
    ("adaptive_threshold", {},
     lambda i: cv2.adaptiveThreshold(gray(i), 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C,
                                     cv2.THRESH_BINARY, 11, 2)),
    ("adaptive_threshold", {"method": "mean", "block_size": 31, "c": -5, "invert": True},
     lambda i: cv2.adaptiveThreshold(gray(i), 255, cv2.ADAPTIVE_THRESH_MEAN_C,
                                     cv2.THRESH_BINARY_INV, 31, -5)),
    ("erode", {}, lambda i: cv2.erode(i, RECT5)),
    ("dilate", {"shape": "ellipse", "ksize": 7, "iterations": 2},
     lambda i: cv2.dilate(i, ELLIPSE7, iterations=2)),
    ("open", {}, lambda i: cv2.morphologyEx(i, cv2.MORPH_OPEN, RECT5)),
    ("close", {}, lambda i: cv2.morphologyEx(i, cv2.MORPH_CLOSE, RECT5)),
    ("gradient", {}, lambda i: cv2.morphologyEx(i, cv2.MORPH_GRADIENT, RECT5)),
    ("tophat", {"ksize": 7, "shape": "ellipse"},
     lambda i: cv2.morphologyEx(i, cv2.MORPH_TOPHAT, ELLIPSE7)),
    ("blackhat", {}, lambda i: cv2.morphologyEx(i, cv2.MORPH_BLACKHAT, RECT5)),
    ("equalize", {}, _equalize),
    ("clahe", {}, _clahe),
    ("clahe", {"clip_limit": 4.0, "grid": 4}, lambda i: _clahe(i, 4.0, 4)),
    ("brightness_contrast", {"brightness": 20, "contrast": 1.5},
     lambda i: cv2.convertScaleAbs(i, alpha=1.5, beta=20)),
    ("gamma", {"gamma": 2.2}, lambda i: _gamma(i, 2.2)),
    ("sepia", {}, _sepia),
    ("resize", {"width": 256, "height": 256, "mode": "exact", "interpolation": "linear"},
     lambda i: cv2.resize(i, (256, 256), interpolation=cv2.INTER_LINEAR)),
    ("rotate", {"angle": 90}, lambda i: cv2.rotate(i, cv2.ROTATE_90_COUNTERCLOCKWISE)),
    ("rotate", {"angle": -90}, lambda i: cv2.rotate(i, cv2.ROTATE_90_CLOCKWISE)),
    ("rotate", {"angle": 180}, lambda i: cv2.rotate(i, cv2.ROTATE_180)),
    ("flip", {}, lambda i: cv2.flip(i, 1)),
    ("flip", {"direction": "vertical"}, lambda i: cv2.flip(i, 0)),
    ("flip", {"direction": "both"}, lambda i: cv2.flip(i, -1)),
    ("crop", {"x": 10, "y": 20, "width": 100, "height": 50}, lambda i: i[20:70, 10:110]),
    ("crop", {"x": 300, "y": 200}, lambda i: i[200:, 300:]),
]


@pytest.mark.parametrize("photo", PHOTOS)
@pytest.mark.parametrize(("name", "params", "reference"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_operation_matches_opencv(photo, name, params, reference):
    image = load(photo)
    np.testing.assert_array_equal(run(name, image, **params), reference(image))


def test_every_operation_is_covered_and_there_are_at_least_24():
    covered = {case[0] for case in CASES}
    assert len(REGISTRY) >= 24
    assert set(REGISTRY) == covered


def test_sharpen_threshold_leaves_small_differences_alone():
    image = load("camera.png")
    out = run("sharpen", image, amount=1.5, radius=2.0, threshold=10)
    blurred = cv2.GaussianBlur(image, (13, 13), 2.0)
    sharp = cv2.addWeighted(image, 2.5, blurred, -1.5, 0)
    detail = image.astype(np.int16) - blurred.astype(np.int16)
    expected = np.where(np.abs(detail) < 10, image, sharp)
    assert (expected != sharp).any() and (expected != image).any()
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    ("params", "size"),
    [
        ({"width": 256}, (256, 171)),               # one side: keep the aspect ratio
        ({"height": 100}, (150, 100)),
        ({"width": 200, "height": 200}, (200, 133)),  # fit inside the box
        ({"width": 200, "height": 200, "mode": "fill"}, (200, 200)),
        ({"width": 300, "height": 100, "mode": "exact"}, (300, 100)),
        ({"width": 1280}, (1280, 854)),             # enlarging
    ],
)
def test_resize_sizes(params, size):
    image = load("rocket.jpg")  # 640x427
    out = run("resize", image, **params)
    assert (out.shape[1], out.shape[0]) == size
    step = parse_step(REGISTRY, "resize", params)
    assert step.operation.size_after(640, 427, step.params.as_dict()) == size


def test_resize_fit_uses_area_when_shrinking():
    image = load("rocket.jpg")
    out = run("resize", image, width=320, height=320)
    np.testing.assert_array_equal(out, cv2.resize(image, (320, 214),
                                                  interpolation=cv2.INTER_AREA))


def test_resize_fill_crops_the_centre():
    image = load("rocket.jpg")
    out = run("resize", image, width=200, height=200, mode="fill", interpolation="linear")
    scaled = cv2.resize(image, (300, 200), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(out, scaled[:, 50:250])


def test_rotate_arbitrary_angle_expands_canvas_and_matches_warp_affine():
    image = load("chelsea.png")  # 451x300
    out = run("rotate", image, angle=30)
    h, w = image.shape[:2]
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    new_w, new_h = int(np.ceil(w * c + h * s)), int(np.ceil(w * s + h * c))
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), 30, 1.0)
    m[0, 2] += (new_w - w) / 2
    m[1, 2] += (new_h - h) / 2
    expected = cv2.warpAffine(image, m, (new_w, new_h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    np.testing.assert_array_equal(out, expected)


def test_rotate_without_expand_keeps_size_and_transparent_background_adds_alpha():
    image = load("chelsea.png")
    out = run("rotate", image, angle=45, expand=False, background="transparent")
    assert out.shape == (300, 451, 4)
    assert out[0, 0, 3] == 0            # uncovered corner: transparent
    assert out[150, 225, 3] == 255      # centre: opaque


def test_alpha_kept_for_colour_operations_and_transformed_by_geometry():
    rgba = cv2.cvtColor(load("astronaut.png"), cv2.COLOR_BGR2BGRA)
    rgba[:, :256, 3] = 128
    blurred = run("gaussian_blur", rgba, ksize=5)
    np.testing.assert_array_equal(blurred[:, :, 3], rgba[:, :, 3])
    np.testing.assert_array_equal(blurred[:, :, :3], cv2.GaussianBlur(rgba[:, :, :3], (5, 5), 0))
    edges = run("canny", rgba)
    assert edges.shape == (512, 512, 4)  # gray result, alpha put back
    np.testing.assert_array_equal(edges[:, :, 0], cv2.Canny(gray(rgba[:, :, :3]), 100, 200))
    flipped = run("flip", rgba)
    np.testing.assert_array_equal(flipped[:, :, 3], cv2.flip(rgba[:, :, 3], 1))


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("canny", {"low": 300, "high": 100}, "must not be above"),
        ("resize", {}, "needs 'width', 'height' or both"),
        ("gaussian_blur", {"ksize": 4}, "an odd integer from 1 to 151"),
        ("gaussian_blur", {"size": 5}, "valid parameters: ksize, sigma"),
        ("flip", {"direction": "diagonal"}, "one of horizontal, vertical, both"),
        ("gamma", {"gamma": 0}, "a number from 0.1 to 10"),
        ("blur", {}, "valid operations: invert, grayscale"),
    ],
)
def test_invalid_parameters_name_what_is_allowed(name, params, fragment):
    with pytest.raises(ApiError) as info:
        parse_step(REGISTRY, name, params)
    assert info.value.status == 400
    assert fragment in info.value.message


def test_crop_outside_the_image_is_a_400_from_the_header_size():
    pipeline = parse_pipeline(REGISTRY, "crop", '{"x": 600}', None)
    with pytest.raises(ApiError) as info:
        pipeline.output_size(512, 512)
    assert "outside the 512x512 image" in info.value.message


def test_pipeline_runs_steps_in_order_and_has_a_canonical_form():
    image = load("astronaut.png")
    steps = '[{"op": "grayscale"}, {"op": "gaussian_blur", "ksize": 5}, {"op": "canny"}]'
    pipeline = parse_pipeline(REGISTRY, None, None, steps)
    expected = cv2.Canny(cv2.GaussianBlur(gray(image), (5, 5), 0), 100, 200)
    np.testing.assert_array_equal(pipeline.run(image), expected)
    # Defaults are filled in and numbers normalised, so equivalent requests share a key.
    same = parse_pipeline(REGISTRY, None, None,
                          '[{"op":"grayscale"},{"op":"gaussian_blur","ksize":5.0,"sigma":0},'
                          '{"op":"canny","low":100,"high":200}]')
    assert pipeline.canonical() == same.canonical()


def test_operations_schema_is_complete():
    for op in REGISTRY.values():
        doc = op.to_json()
        assert doc["title"] and doc["description"]
        for param in doc["params"]:
            assert param["type"] in ("int", "float", "bool", "choice")
            spec = next(p for p in op.params if p.name == param["name"])
            assert parse_param(op.name, spec, param["default"]) == param["default"]
