"""The HTTP contract, in process: Flask's test client over the real app and storage."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import cv2
import numpy as np
import pytest
from conftest import IMAGES_DIR
from PIL import Image, ImageCms

from server import ServerConfig, create_app
from server.operations import default_registry
from server.storage import FolderStorage

IMAGES = IMAGES_DIR


@pytest.fixture
def storage(tmp_path):
    return FolderStorage(tmp_path / "storage")


@pytest.fixture
def client(storage):
    app = create_app(ServerConfig(instance_id="test-1", link_ttl=600), storage=storage)
    return app.test_client()


def post(client, photo="rocket.jpg", query="", **fields):
    data = {"image": ((IMAGES / photo).open("rb"), photo)}
    data.update({k: (json.dumps(v) if isinstance(v, dict | list) else v)
                 for k, v in fields.items()})
    return client.post(f"/process{query}", data=data, content_type="multipart/form-data")


def test_health(client):
    body = client.get("/health").get_json()
    assert body["status"] == "ok" and body["instance_id"] == "test-1"
    assert {"inflight", "processed", "uptime_s", "version"} <= set(body)


def test_operations_schema(client):
    ops = client.get("/operations").get_json()["operations"]
    assert len(ops) >= 24
    blur = next(op for op in ops if op["name"] == "gaussian_blur")
    ksize = next(p for p in blur["params"] if p["name"] == "ksize")
    assert ksize == {**ksize, "type": "int", "default": 15, "min": 1, "max": 151}
    assert blur["tileable"] is True
    assert next(op for op in ops if op["name"] == "resize")["tileable"] is False


def test_process_json_contract(client, storage):
    resp = post(client, operation="grayscale")
    assert resp.status_code == 200
    body = resp.get_json()
    assert set(body) >= {"key", "url", "expires_at", "instance_id", "width", "height", "format",
                         "bytes", "cached", "tiles", "timings_ms"}
    assert (body["width"], body["height"], body["format"]) == (640, 427, "jpeg")
    assert body["instance_id"] == "test-1" and body["tiles"] == 1 and body["cached"] is False
    expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert 590 <= (expires - datetime.now(UTC)).total_seconds() <= 610
    assert body["url"].startswith("http://localhost/results/" + body["key"])
    stored = storage.get(f"results/{body['key']}")
    assert len(stored) == body["bytes"]
    download = client.get(body["url"].removeprefix("http://localhost"))
    assert download.status_code == 200 and download.data == stored
    result = cv2.imdecode(np.frombuffer(download.data, np.uint8), cv2.IMREAD_UNCHANGED)
    # rocket.jpg is tagged Adobe RGB (1998): the server converts it to sRGB (icc=srgb,
    # the default) before the operation, so the reference does too.
    with Image.open(IMAGES / "rocket.jpg") as photo:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(photo.info["icc_profile"]))
        srgb = ImageCms.profileToProfile(photo, profile, ImageCms.createProfile("sRGB"),
                                         ImageCms.Intent.RELATIVE_COLORIMETRIC)
    expected = cv2.cvtColor(np.asarray(srgb), cv2.COLOR_RGB2GRAY)
    # JPEG output: close to, not equal to, the exact grayscale.
    assert cv2.PSNR(result, expected) > 38


def test_response_image_returns_bytes_and_headers(client):
    resp = post(client, "camera.png", "?response=image", operation="threshold",
                params={"threshold": 100})
    assert resp.status_code == 200 and resp.mimetype == "image/png"
    assert resp.headers["X-Instance-Id"] == "test-1"
    assert resp.headers["X-Result-Key"].endswith(".png")
    out = cv2.imdecode(np.frombuffer(resp.data, np.uint8), cv2.IMREAD_UNCHANGED)
    camera = cv2.imread(str(IMAGES / "camera.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(out, cv2.threshold(camera, 100, 255, cv2.THRESH_BINARY)[1])


def test_same_request_twice_is_cached_without_recomputing(client, storage):
    first = post(client, operation="median_blur", params={"ksize": 7}).get_json()
    path = storage.root / "results" / first["key"]
    mtime = path.stat().st_mtime_ns
    second = post(client, operation="median_blur", params={"ksize": 7}).get_json()
    assert second["key"] == first["key"] and second["cached"] is True
    assert "process" not in second["timings_ms"]
    assert path.stat().st_mtime_ns == mtime
    again = post(client, "rocket.jpg", "?response=image", operation="median_blur",
                 params={"ksize": 7})
    assert again.headers["X-Cached"] == "true" and again.data == path.read_bytes()
    other = post(client, operation="median_blur", params={"ksize": 9}).get_json()
    assert other["key"] != first["key"]
    assert post(client, operation="median_blur", params={"ksize": 7},
                format="png").get_json()["key"] != first["key"]
    assert post(client, operation="median_blur", params={"ksize": 7},
                quality="50").get_json()["key"] != first["key"]


def test_original_is_stored(client, storage):
    post(client, operation="invert")
    originals = list((storage.root / "originals").glob("*.jpg"))
    assert len(originals) == 1
    assert originals[0].read_bytes() == (IMAGES / "rocket.jpg").read_bytes()


@pytest.mark.parametrize(("fmt", "mime"), [("png", "image/png"), ("jpeg", "image/jpeg"),
                                           ("webp", "image/webp")])
def test_output_formats(client, fmt, mime):
    resp = post(client, "chelsea.png", "?response=image", operation="invert", format=fmt,
                quality="80")
    assert resp.mimetype == mime
    assert cv2.imdecode(np.frombuffer(resp.data, np.uint8), cv2.IMREAD_UNCHANGED) is not None


def test_steps_pipeline(client):
    steps = [{"op": "grayscale"}, {"op": "gaussian_blur", "ksize": 5}, {"op": "canny"}]
    resp = post(client, "astronaut.png", "?response=image", steps=steps)
    assert resp.status_code == 200
    out = cv2.imdecode(np.frombuffer(resp.data, np.uint8), cv2.IMREAD_UNCHANGED)
    src = cv2.cvtColor(cv2.imread(str(IMAGES / "astronaut.png")), cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(out, cv2.Canny(cv2.GaussianBlur(src, (5, 5), 0), 100, 200))


@pytest.mark.parametrize("name", list(default_registry()))
def test_every_operation_over_http(client, name):
    params = {"width": 100} if name == "resize" else {}
    resp = post(client, "chelsea.png", operation=name, params=params)
    assert resp.status_code == 200, resp.get_json()


def test_errors_are_json(client):
    for resp, status in [(client.get("/nope"), 404), (client.get("/process"), 405),
                         (client.get("/results/abc.png"), 404)]:
        assert resp.status_code == status
        assert set(resp.get_json()["error"]) == {"code", "message"}


def test_link_expiry_is_configurable_per_request_and_capped(client):
    body = post(client, operation="invert", expires_in="120").get_json()
    expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert 110 <= (expires - datetime.now(UTC)).total_seconds() <= 130
    too_long = post(client, operation="invert", expires_in=str(8 * 24 * 3600))
    assert too_long.status_code == 400
    assert "from 1 to 604800" in too_long.get_json()["error"]["message"]


def test_resize_beyond_pixel_limit_is_413_before_decoding(storage):
    app = create_app(ServerConfig(max_pixels=1_000_000), storage=storage)
    resp = post(app.test_client(), operation="resize", params={"width": 4000})
    assert resp.status_code == 413
    assert "at most 1.0 MP" in resp.get_json()["error"]["message"]
