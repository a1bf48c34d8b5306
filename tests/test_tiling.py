"""Tiled processing: bit-exact against the whole image, seamless, bounded in memory,
and dispatched to real peers over HTTP with retries and local fallback."""

from __future__ import annotations

import json
import tracemalloc

import cv2
import numpy as np
import pytest
from conftest import IMAGES_DIR

from server.operations import default_registry
from server.pipeline import Pipeline, parse_pipeline, parse_step
from server.tiling import TileError, plan_tiles, run_tiled

IMAGES = IMAGES_DIR
REGISTRY = default_registry()
TILE = 1280  # 6400x4800 -> 5 x 4 = 20 tiles


@pytest.fixture(scope="module")
def big_image() -> np.ndarray:
    """30.7 MP, tiled from real photographs (mirrored, so there is detail everywhere)."""
    a = cv2.imread(str(IMAGES / "retina.jpg"))                   # 1411x1411
    b = cv2.imread(str(IMAGES / "hubble_deep_field.jpg"))        # 1000x872
    b = cv2.resize(b, (1411, 1230), interpolation=cv2.INTER_CUBIC)
    column = np.vstack([a, b[::-1], a[::-1], b])                 # 5282 rows
    row = np.hstack([column, column[:, ::-1], column, column[:, ::-1], column])
    image = np.ascontiguousarray(row[:4800, :6400])
    assert image.shape[0] * image.shape[1] >= 30_000_000
    return image


def pipeline(name: str, **params) -> Pipeline:
    return Pipeline((parse_step(REGISTRY, name, params),))


TILEABLE = [name for name, op in REGISTRY.items() if op.tileable]
NON_DEFAULT = [
    ("gaussian_blur", {"ksize": 31, "sigma": 6.0}),
    ("median_blur", {"ksize": 11}),
    ("box_blur", {"ksize": 20}),
    ("sharpen", {"amount": 2.0, "radius": 3.5, "threshold": 4}),
    ("adaptive_threshold", {"method": "mean", "block_size": 51}),
    ("sobel", {"direction": "x", "ksize": 7}),
    ("laplacian", {"ksize": 9}),
    ("dilate", {"shape": "ellipse", "ksize": 9, "iterations": 3}),
    ("morphology", {"ksize": 7, "iterations": 2}),
    ("tophat", {"shape": "cross", "ksize": 15}),
    ("otsu_threshold", {"invert": True}),
]


def test_plan_covers_every_pixel_once():
    tiles = plan_tiles(1000, 700, 256, halo=9)
    cover = np.zeros((700, 1000), np.int32)
    for t in tiles:
        cover[t.y0:t.y1, t.x0:t.x1] += 1
        assert t.wx0 == max(0, t.x0 - 9) and t.wx1 == min(1000, t.x1 + 9)
    assert (cover == 1).all() and len(tiles) == 4 * 3


def test_at_least_the_operations_that_can_be_tiled_are_tileable():
    assert len(TILEABLE) >= 20
    for name in ("resize", "rotate", "canny", "lines", "contours", "clahe", "equalize"):
        assert not REGISTRY[name].tileable


@pytest.mark.parametrize("name", TILEABLE)
def test_tiled_equals_whole_with_defaults(big_image, name):
    p = pipeline(name)
    tiled, stats = run_tiled(p, big_image, REGISTRY, tile_size=TILE, remote=None)
    assert stats.tiles >= 16
    np.testing.assert_array_equal(tiled, p.run(big_image))


@pytest.mark.parametrize(("name", "params"), NON_DEFAULT, ids=[n for n, _ in NON_DEFAULT])
def test_tiled_equals_whole_with_wide_parameters(big_image, name, params):
    p = pipeline(name, **params)
    tiled, _ = run_tiled(p, big_image, REGISTRY, tile_size=TILE, remote=None)
    np.testing.assert_array_equal(tiled, p.run(big_image))


def test_pipeline_of_three_with_a_two_phase_step_in_the_middle(big_image):
    p = parse_pipeline(REGISTRY, None, None, json.dumps([
        {"op": "gaussian_blur", "ksize": 9}, {"op": "otsu_threshold"},
        {"op": "close", "ksize": 7}]))
    tiled, stats = run_tiled(p, big_image, REGISTRY, tile_size=TILE, remote=None)
    assert stats.tiles >= 16
    np.testing.assert_array_equal(tiled, p.run(big_image))


def seam_ratio(edges: np.ndarray, seams: list[int]) -> float:
    """Mean edge strength on the rows either side of each seam, over that of rows 3-6
    away: 1.0 when the seams are invisible."""
    rows = edges.astype(np.float64).mean(axis=1)
    at = np.mean([rows[s - 1] + rows[s] for s in seams]) / 2
    near = np.mean([rows[s + d] for s in seams for d in (-6, -5, -4, 3, 4, 5)])
    return at / near


def test_sobel_has_no_seams_where_naive_strips_do(big_image):
    p = pipeline("sobel")
    tiled, _ = run_tiled(p, big_image, REGISTRY, tile_size=TILE, remote=None)
    seams = list(range(TILE, big_image.shape[0], TILE))
    whole = p.run(big_image)
    # Naive strips, as peers do it: each strip filtered alone, no overlap.
    naive = np.vstack([p.run(np.ascontiguousarray(big_image[y:y + TILE]))
                       for y in range(0, big_image.shape[0], TILE)])
    assert seam_ratio(tiled, seams) == pytest.approx(seam_ratio(whole, seams), abs=1e-12)
    assert seam_ratio(tiled, seams) == pytest.approx(1.0, abs=0.15)
    assert seam_ratio(naive, seams) < 0.85 * seam_ratio(tiled, seams)


def test_coordinator_holds_about_one_extra_copy(big_image):
    p = pipeline("gaussian_blur")
    tracemalloc.start()
    try:
        run_tiled(p, big_image, REGISTRY, tile_size=TILE, remote=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The input is the caller's; the output canvas is one more copy; tiles add a little.
    assert peak < 1.3 * big_image.nbytes


def test_failed_tiles_are_retried_then_done_locally(big_image):
    small = np.ascontiguousarray(big_image[:2000, :2000])
    p = pipeline("median_blur", ksize=7)
    calls: dict[tuple, int] = {}

    def flaky(steps, window, timings):
        """Fails the first attempt of every tile and every attempt of one tile."""
        key = (window.shape, int(window[0, 0, 0]), int(window[-1, -1, 0]), window.ctypes.data)
        calls[key] = calls.get(key, 0) + 1
        if calls[key] == 1 or window.ctypes.data == small.ctypes.data:
            raise TileError("simulated peer failure")
        return Pipeline(steps).run(np.ascontiguousarray(window))

    tiled, stats = run_tiled(p, small, REGISTRY, tile_size=512, remote=flaky)
    np.testing.assert_array_equal(tiled, p.run(small))
    assert stats.tiles == 16 and stats.local == 1 and stats.remote == 15
    assert stats.retries == 15 + 2


@pytest.fixture(scope="module")
def big_jpeg(big_image) -> bytes:
    ok, buf = cv2.imencode(".jpg", big_image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return buf.tobytes()


def decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def test_tiles_go_to_peers_over_http_and_match(server_process, big_jpeg):
    peer = server_process()
    coordinator = server_process("--peers", peer.url, "--tile-mp", "20", "--tile-size",
                                 str(TILE))
    steps = [{"op": "gaussian_blur", "ksize": 9}, {"op": "otsu_threshold"},
             {"op": "dilate", "ksize": 5}]
    resp = coordinator.post("/process", files={"image": ("big.jpg", big_jpeg, "image/jpeg")},
                            data={"steps": json.dumps(steps), "format": "png"}, timeout=300)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["tiles"] == 20
    result = decode(coordinator.get(body["url"].removeprefix(coordinator.url)).content)
    expected = parse_pipeline(REGISTRY, None, None, json.dumps(steps)).run(decode(big_jpeg))
    np.testing.assert_array_equal(result, expected)
    assert peer.get("/health").json()["processed"] >= 20  # the peer did the tiles
    # Below the threshold, or for a pipeline that cannot be tiled: one piece.
    whole = coordinator.post("/process", files={"image": ("big.jpg", big_jpeg, "image/jpeg")},
                             data={"operation": "resize", "params": '{"width": 640}'})
    assert whole.json()["tiles"] == 1


def test_coordinator_falls_back_to_itself_when_peers_are_down(server_process, big_image):
    from conftest import free_port

    ok, buf = cv2.imencode(".png", big_image[:2048, :2048], [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok
    coordinator = server_process("--peers", f"http://127.0.0.1:{free_port()}",
                                 "--tile-mp", "1", "--tile-size", "512")
    resp = coordinator.post("/process?response=image",
                            files={"image": ("big.png", buf.tobytes(), "image/png")},
                            data={"operation": "box_blur"}, timeout=300)
    assert resp.status_code == 200, resp.text
    np.testing.assert_array_equal(decode(resp.content), cv2.blur(big_image[:2048, :2048], (5, 5)))
    assert '"tiles_local": 16' in coordinator.log()
