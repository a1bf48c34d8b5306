"""The bad-input corpus, sent to a real server process (waitress, loopback).

Every case must get a 4xx JSON error `{"error": {"code", "message"}}` whose message
says what is allowed; the server must stay up and keep working, and nothing may be
written outside its storage folder.
"""

from __future__ import annotations

import io
import json
import re
import struct
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from server.operations import default_registry

REPO_ROOT = Path(__file__).resolve().parents[1]
OPERATION_NAMES = list(default_registry())
STORED_NAME = re.compile(r"(results|originals)/[0-9a-f]{64}\.(png|jpg|webp|bmp|tif|gif)"
                         r"(\.meta\.json)?")


# --- Crafted files ---------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, bit_depth: int = 8, colour_type: int = 0,
                rows: int = 4) -> bytes:
    """A PNG whose header claims width x height, followed by only `rows` rows of zeros
    (a header is all a server may read before refusing a too-large image)."""
    row_bytes = 1 + (width * bit_depth + 7) // 8
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * row_bytes * rows, 9))
            + png_chunk(b"IEND", b""))


def crafted_bmp(width: int, height: int) -> bytes:
    """A 24-bit BMP header claiming width x height, with 16 bytes of pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + info + b"\0" * 16


def zip_file() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("image.png", b"\x89PNG\r\n\x1a\nnot really")
        archive.writestr("readme.txt", "hello " * 100)
    return buffer.getvalue()


def encoded(image: np.ndarray, ext: str = ".png") -> bytes:
    ok, buffer = cv2.imencode(ext, image)
    assert ok
    return buffer.tobytes()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    folder = REPO_ROOT.parent / "shared" / "testdata" / "images"
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def server(module_server_process):
    return module_server_process()


# --- The corpus --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad request: the form fields, the image (None: no file part), and what the
    answer must be."""

    status: int | tuple[int, ...]
    code: str | tuple[str, ...]
    says: tuple[str, ...]  # fragments the message must contain (what is allowed)
    image: Callable[[dict[str, bytes]], bytes] | None = lambda photos: photos["camera.png"]
    fields: dict[str, str] = field(default_factory=lambda: {"operation": "invert"})
    filename: str = "upload.png"


IMAGE_FORMATS = "PNG, JPEG, WebP, AVIF, HEIC, BMP, TIFF or GIF"
VALID_OPS = ("valid operations:", "gaussian_blur", "canny", "resize", "crop")

CASES: dict[str, Case] = {
    # Broken files.
    "empty file": Case(415, "unsupported_image", ("empty", IMAGE_FORMATS), lambda p: b""),
    "truncated jpeg": Case(415, "unsupported_image", (IMAGE_FORMATS,),
                           lambda p: p["rocket.jpg"][: len(p["rocket.jpg"]) // 2]),
    "truncated png": Case(415, "unsupported_image", (IMAGE_FORMATS,),
                          lambda p: p["astronaut.png"][: len(p["astronaut.png"]) // 2]),
    "png signature only": Case(415, "unsupported_image", (IMAGE_FORMATS,),
                               lambda p: p["astronaut.png"][:40]),
    "random bytes": Case(415, "unsupported_image", (IMAGE_FORMATS,),
                         lambda p: np.random.default_rng(7).bytes(8192)),
    "text file": Case(415, "unsupported_image", (IMAGE_FORMATS,),
                      lambda p: b"name,value\nthis is not an image,1\n" * 50, filename="x.png"),
    "zip archive": Case(415, "unsupported_image", (IMAGE_FORMATS,), lambda p: zip_file()),
    "svg image": Case(415, "unsupported_image", (IMAGE_FORMATS,),
                      lambda p: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'),
    # Image edge cases.
    "zero width png": Case(415, "unsupported_image", (IMAGE_FORMATS,),
                           lambda p: crafted_png(0, 16)),
    "zero height png": Case(415, "unsupported_image", (IMAGE_FORMATS,),
                            lambda p: crafted_png(16, 0)),
    "png bomb 60000x60000": Case(413, "too_many_pixels", ("60000x60000", "at most 100.0 MP"),
                                 lambda p: crafted_png(60000, 60000, 1, 0, 16)),
    "bmp bomb 60000x60000": Case(413, "too_many_pixels", ("at most 100.0 MP",),
                                 lambda p: crafted_bmp(60000, 60000)),
    "output too large": Case(413, "too_many_pixels", ("resize", "at most 100.0 MP"),
                             fields={"operation": "resize",
                                     "params": '{"width": 32768, "height": 32768, '
                                               '"mode": "exact"}'}),
    # Missing fields.
    "missing image field": Case(400, "missing_field", ("'image'",), None),
    "missing operation": Case(400, "missing_field", ("'operation'", "'steps'"), fields={}),
    "empty operation": Case(400, "missing_field", ("'operation'",), fields={"operation": ""}),
    # Bad JSON and parameters.
    "garbage json params": Case(400, "invalid_json", ("'params'", "not valid JSON"),
                                fields={"operation": "gaussian_blur", "params": "{ksize: 5"}),
    "params as a list": Case(400, "invalid_params", ("JSON object",),
                             fields={"operation": "gaussian_blur", "params": "[5, 1]"}),
    "params as a string": Case(400, "invalid_params", ("JSON object",),
                               fields={"operation": "gaussian_blur", "params": '"ksize"'}),
    "garbage json steps": Case(400, "invalid_json", ("'steps'",), fields={"steps": "[{op:"}),
    "steps as an object": Case(400, "invalid_steps", ("non-empty JSON list",),
                               fields={"steps": '{"op": "invert"}'}),
    "empty steps": Case(400, "invalid_steps", ("non-empty JSON list",), fields={"steps": "[]"}),
    "step without op": Case(400, "invalid_steps", ("step 2", "'op'"),
                            fields={"steps": '[{"op": "invert"}, {"ksize": 3}]'}),
    "step op not a string": Case(400, "unknown_operation", ("step 1", *VALID_OPS),
                                 fields={"steps": '[{"op": ["invert"]}]'}),
    "steps too long": Case(400, "invalid_steps", ("21 steps", "at most 20"),
                           fields={"steps": json.dumps([{"op": "invert"}] * 21)}),
    "operation and steps": Case(400, "invalid_request", ("either",),
                                fields={"operation": "invert", "steps": '[{"op": "invert"}]'}),
    "unknown operation": Case(400, "unknown_operation", VALID_OPS,
                              fields={"operation": "deep_dream"}),
    "unknown operation in steps": Case(400, "unknown_operation", ("step 2", *VALID_OPS),
                                       fields={"steps": '[{"op": "invert"}, {"op": "blur"}]'}),
    "unknown parameter": Case(400, "invalid_parameter", ("'size'", "valid parameters: ksize"),
                              fields={"operation": "median_blur", "params": '{"size": 5}'}),
    "out of range": Case(400, "invalid_parameter", ("ksize", "from 1 to 151"),
                         fields={"operation": "gaussian_blur", "params": '{"ksize": 9999}'}),
    "negative": Case(400, "invalid_parameter", ("iterations", "from 1 to 20"),
                     fields={"operation": "erode", "params": '{"iterations": -3}'}),
    "even kernel": Case(400, "invalid_parameter", ("odd integer",),
                        fields={"operation": "median_blur", "params": '{"ksize": 4}'}),
    "fractional int": Case(400, "invalid_parameter", ("an integer from 1 to 20",),
                           fields={"operation": "dilate", "params": '{"iterations": 1.5}'}),
    "json NaN": Case(400, "invalid_json", ("NaN",),
                     fields={"operation": "gamma", "params": '{"gamma": NaN}'}),
    "json Infinity": Case(400, "invalid_json", ("Infinity",),
                          fields={"operation": "gamma", "params": '{"gamma": Infinity}'}),
    "json -Infinity": Case(400, "invalid_json", ("-Infinity",),
                           fields={"operation": "gamma", "params": '{"gamma": -Infinity}'}),
    "string nan": Case(400, "invalid_parameter", ("gamma", "a number from 0.1 to 10"),
                       fields={"operation": "gamma", "params": '{"gamma": "nan"}'}),
    "string inf": Case(400, "invalid_parameter", ("a number from 0.1 to 10",),
                       fields={"operation": "gamma", "params": '{"gamma": "inf"}'}),
    "overflowing float": Case(400, "invalid_parameter", ("a number from -360 to 360",),
                              fields={"operation": "rotate", "params": '{"angle": 1e400}'}),
    "bool for a number": Case(400, "invalid_parameter", ("an odd integer from 1 to 151",),
                              fields={"operation": "gaussian_blur", "params": '{"ksize": true}'}),
    "null for a number": Case(400, "invalid_parameter", ("from 0 to 255",),
                              fields={"operation": "threshold", "params": '{"threshold": null}'}),
    "object for a number": Case(400, "invalid_parameter", ("from 0 to 255",),
                                fields={"operation": "threshold",
                                        "params": '{"threshold": {"v": 1}}'}),
    "bad choice": Case(400, "invalid_parameter", ("one of horizontal, vertical, both",),
                       fields={"operation": "flip", "params": '{"direction": "diagonal"}'}),
    "bad bool": Case(400, "invalid_parameter", ("true or false",),
                     fields={"operation": "rotate", "params": '{"expand": "maybe"}'}),
    "canny low above high": Case(400, "invalid_parameter", ("'low'", "'high'"),
                                 fields={"operation": "canny",
                                         "params": '{"low": 300, "high": 100}'}),
    "crop outside the image": Case(400, "invalid_parameter", ("outside", "512x512"),
                                   fields={"operation": "crop", "params": '{"x": 600}'}),
    "resize without a size": Case(400, "invalid_parameter", ("'width'", "'height'"),
                                  fields={"operation": "resize"}),
    "bad format": Case(400, "invalid_parameter", ("png, jpeg, webp",),
                       fields={"operation": "invert", "format": "bmp"}),
    "heic output": Case(400, "invalid_parameter", ("not written", "png, jpeg, webp, avif"),
                        fields={"operation": "invert", "format": "heic"}),
    "bad subsampling": Case(400, "invalid_parameter",
                            ("'subsampling'", "4:4:4, 4:2:2, 4:2:0"),
                            fields={"operation": "invert", "format": "jpeg",
                                    "subsampling": "4:1:1"}),
    "bad progressive": Case(400, "invalid_parameter", ("'progressive'", "true or false"),
                            fields={"operation": "invert", "progressive": "yes please"}),
    "bad lossless": Case(400, "invalid_parameter", ("'lossless'", "true or false"),
                         fields={"operation": "invert", "lossless": "2"}),
    "bad icc": Case(400, "invalid_parameter", ("'icc'", "srgb, keep"),
                    fields={"operation": "invert", "icc": "p3"}),
    "bad metadata": Case(400, "invalid_parameter",
                         ("'metadata'", "strip, keep-no-location, keep"),
                         fields={"operation": "invert", "metadata": "some"}),
    "100 KB metadata": Case(400, "invalid_parameter", ("'metadata'", "strip"),
                            fields={"operation": "invert", "metadata": "k" * 100_000}),
    "quality zero": Case(400, "invalid_parameter", ("quality", "from 1 to 100"),
                         fields={"operation": "invert", "format": "jpeg", "quality": "0"}),
    "quality 101": Case(400, "invalid_parameter", ("from 1 to 100",),
                        fields={"operation": "invert", "format": "jpeg", "quality": "101"}),
    "quality text": Case(400, "invalid_parameter", ("from 1 to 100",),
                         fields={"operation": "invert", "format": "jpeg", "quality": "high"}),
    "quality negative": Case(400, "invalid_parameter", ("from 1 to 100",),
                             fields={"operation": "invert", "format": "jpeg", "quality": "-5"}),
    "expires_in zero": Case(400, "invalid_parameter", ("expires_in", "from 1 to 604800"),
                            fields={"operation": "invert", "expires_in": "0"}),
    # Huge strings: refused by size (413) or as invalid (400), never a 500.
    "1 MB params": Case((400, 413), ("invalid_json", "request_entity_too_large",
                                     "too_many_bytes"), (),
                        fields={"operation": "invert", "params": '{"a": "' + "x" * 2**20 + '"}'}),
    "20 KB params": Case(400, "invalid_json", ("at most 16384",),
                         fields={"operation": "invert", "params": '{"a": "' + "x" * 20000 + '"}'}),
    "1 MB operation": Case((400, 413), ("unknown_operation", "request_entity_too_large",
                                        "too_many_bytes"), (),
                           fields={"operation": "x" * 2**20}),
    "100 KB operation": Case(400, "unknown_operation", VALID_OPS,
                             fields={"operation": "y" * 100_000}),
    "100 KB format": Case(400, "invalid_parameter", ("png, jpeg, webp",),
                          fields={"operation": "invert", "format": "z" * 100_000}),
    "1 MB steps": Case((400, 413), ("invalid_json", "request_entity_too_large",
                                    "too_many_bytes"), (),
                       fields={"steps": json.dumps([{"op": "invert"}] * 100_000)}),
}


def assert_error(response: requests.Response, status: int | tuple[int, ...],
                 code: str | tuple[str, ...], says: tuple[str, ...] = ()) -> str:
    statuses = status if isinstance(status, tuple) else (status,)
    codes = code if isinstance(code, tuple) else (code,)
    assert response.status_code in statuses, response.text[:500]
    assert response.headers["Content-Type"].startswith("application/json"), response.text[:300]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] in codes, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message, body
    for fragment in says:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def send(server, case: Case, photos: dict[str, bytes]) -> requests.Response:
    files = None
    if case.image is not None:
        files = {"image": (case.filename, case.image(photos), "application/octet-stream")}
    elif not case.fields:
        files = {"unrelated": ("a.txt", b"x")}
    # requests sends multipart/form-data only when there are files: with no image, the
    # fields go as file-less parts of a multipart body all the same.
    fields = {k: (None, v) for k, v in case.fields.items()}
    return server.post("/process", files={**fields, **(files or {})}, timeout=60)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_json_4xx_that_says_what_is_allowed(server, photos, name: str) -> None:
    case = CASES[name]
    response = send(server, case, photos)

    assert_error(response, case.status, case.code, case.says)
    assert server.get("/health").status_code == 200


class InProcessResponse:
    """The Flask test client's answer with the attributes of a `requests` response."""

    def __init__(self, response):
        self.status_code = response.status_code
        self.headers = response.headers
        self.text = response.get_data(as_text=True)

    def json(self):
        return json.loads(self.text)


@pytest.fixture
def in_process(make_app):
    """Post to an in-process app, for the cases that still make the server fail: their
    tracebacks must not end up in the shared server's log."""
    client = make_app().test_client()

    def post(image: bytes, **fields: str) -> InProcessResponse:
        return InProcessResponse(client.post(
            "/process", content_type="multipart/form-data",
            data={"image": (io.BytesIO(image), "c.png"), **fields}))

    return post


@pytest.mark.parametrize(("name", "fields", "says"), [
    ("quality with a non-ASCII digit", {"format": "jpeg", "quality": "²"}, "from 1 to 100"),
    ("quality with 5000 digits", {"format": "jpeg", "quality": "9" * 5000}, "from 1 to 100"),
    ("expires_in with a non-ASCII digit", {"expires_in": "³"}, "from 1 to 604800"),
])
def test_integer_form_fields_refuse_odd_digits(in_process, photos, name: str,
                                               fields: dict[str, str], says: str) -> None:
    response = in_process(photos["camera.png"], operation="invert", **fields)
    assert_error(response, 400, "invalid_parameter", (says,))


def test_integer_beyond_float_range_is_a_400(in_process, photos) -> None:
    response = in_process(photos["camera.png"], operation="gaussian_blur",
                          params='{"ksize": 1' + "0" * 400 + "}")
    assert_error(response, 400, "invalid_parameter", ("from 1 to 151",))


@pytest.mark.parametrize("field_name", ["params", "steps"])
def test_deeply_nested_json_is_a_400(in_process, photos, field_name: str) -> None:
    nested = "[" * 8000 + "]" * 8000
    fields = {"operation": "invert", "params": nested} if field_name == "params" else {
        "steps": nested}
    response = in_process(photos["camera.png"], **fields)
    assert_error(response, 400, "invalid_json", (f"'{field_name}'",))


def test_wrong_content_types_are_refused(server, photos) -> None:
    as_json = server.post("/process", json={"operation": "invert", "image": "aGVsbG8="})
    assert_error(as_json, 415, "unsupported_media_type", ("multipart/form-data", "'image'"))
    as_form = server.post("/process", data={"operation": "invert"})
    assert_error(as_form, 415, "unsupported_media_type", ("multipart/form-data",))
    raw = server.post("/process", data=photos["camera.png"],
                      headers={"Content-Type": "image/png"})
    assert_error(raw, 415, "unsupported_media_type", ("multipart/form-data",))
    no_type = server.post("/process", data=b"operation=invert")
    assert_error(no_type, 415, "unsupported_media_type", ("multipart/form-data",))


def test_broken_multipart_body_is_a_json_4xx(server) -> None:
    response = server.post(
        "/process", data=b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; "
                         b"filename=\"a.png\"\r\n\r\n\x89PNG",  # never closed
        headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert 400 <= response.status_code < 500, response.text[:300]
    assert response.headers["Content-Type"].startswith("application/json")
    assert "error" in response.json()


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/process", 405), ("PUT", "/process", 405), ("POST", "/health", 405),
    ("GET", "/no/such/route", 404), ("DELETE", "/operations", 405),
])
def test_wrong_routes_and_methods_are_json(server, method: str, path: str, status: int) -> None:
    response = requests.request(method, server.url + path, timeout=10)
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("application/json")
    assert set(response.json()["error"]) == {"code", "message"}


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak since start) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values




@pytest.mark.parametrize("bomb", [
    pytest.param(crafted_png(60000, 60000, 1, 0, 16), id="1-bit gray png"),
    pytest.param(crafted_png(60000, 60000, 8, 2, 4), id="8-bit rgb png"),
    pytest.param(crafted_bmp(60000, 60000), id="24-bit bmp"),
])
def test_decompression_bomb_is_refused_quickly_without_allocating(server_process,
                                                                  bomb: bytes) -> None:
    server = server_process()  # fresh, so its peak memory (VmHWM) is these requests'
    assert len(bomb) < 10_000
    before = memory_kib(server.pid)

    # Twice: how the allocator serves a request depends on what earlier ones freed, so
    # the second bomb is the one a working server sees.
    for attempt in (1, 2):
        started = time.perf_counter()
        response = server.post("/process", files={"image": ("bomb.png", bomb)},
                               data={"operation": "invert"})
        elapsed = time.perf_counter() - started
        assert_error(response, 413, "too_many_pixels", ("60000x60000", "at most 100.0 MP"))
        assert elapsed < 2.0, f"bomb {attempt} took {elapsed:.2f}s: were the pixels decoded?"

    after = memory_kib(server.pid)
    peak_growth_mib = (after["VmHWM"] - before["VmHWM"]) / 1024
    assert peak_growth_mib < 200, f"server peak memory grew by {peak_growth_mib:.0f} MiB"
    assert (after["VmRSS"] - before["VmRSS"]) / 1024 < 200


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_one_pixel_images_never_fail_with_500(make_app, channels: int) -> None:
    """Every operation, defaults, on 1x1 gray/BGR/BGRA: 200, or a 4xx that explains."""
    client = make_app().test_client()
    pixel = np.full((1, 1, channels) if channels > 1 else (1, 1), 200, np.uint8)
    data = encoded(pixel)
    failures = {}
    for name in OPERATION_NAMES:
        response = client.post("/process?response=image", content_type="multipart/form-data",
                               data={"image": (io.BytesIO(data), "p.png"), "operation": name})
        if response.status_code != 200:
            body = response.get_json() or {}
            if response.status_code >= 500 or "error" not in body:
                failures[name] = (response.status_code, response.get_data(as_text=True)[:200])
            continue
        result = cv2.imdecode(np.frombuffer(response.data, np.uint8), cv2.IMREAD_UNCHANGED)
        if result is None:
            failures[name] = "undecodable result"
    assert failures == {}
    # The ops a 1x1 image cannot be refused for must work: the contract's 200.
    for name in ("invert", "grayscale", "gaussian_blur", "median_blur", "canny", "threshold",
                 "morphology", "rotate", "flip", "sepia", "clahe", "equalize"):
        response = client.post("/process", content_type="multipart/form-data",
                               data={"image": (io.BytesIO(data), "p.png"), "operation": name})
        assert response.status_code == 200, (name, response.get_json())


def test_one_pixel_image_through_the_real_server(server) -> None:
    data = encoded(np.full((1, 1, 3), 77, np.uint8))
    response = server.post("/process", files={"image": ("one.png", data)},
                           data={"operation": "gaussian_blur"})
    assert response.status_code == 200, response.text
    assert (response.json()["width"], response.json()["height"]) == (1, 1)


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")
            if p.is_file()}


def test_file_names_never_become_paths(module_server_process, photos) -> None:
    server = module_server_process()  # its own storage, so all its files can be listed
    base = server.storage_dir.parent
    outside_before = {k: v for k, v in snapshot(base).items()
                      if not k.startswith(server.storage_dir.name + "/")
                      and not k.startswith("server-")}
    escape_targets = [server.storage_dir / "../../x.png", REPO_ROOT / "../../x.png",
                      REPO_ROOT / "../x.png", base / "x.png", Path("/x.png")]
    existing = {p.resolve() for p in escape_targets if p.exists()}

    for filename in ("../../x.png", "../x.png", "/tmp/x.png", "..\\..\\x.png",
                     "results/../../../x.png", "x.png\x00.txt", ".link-secret"):
        response = server.post("/process", files={"image": (filename, photos["camera.png"])},
                               data={"operation": "invert"})
        assert response.status_code == 200, (filename, response.text)

    outside_after = {k: v for k, v in snapshot(base).items()
                     if not k.startswith(server.storage_dir.name + "/")
                     and not k.startswith("server-")}
    assert outside_after == outside_before
    assert {p.resolve() for p in escape_targets if p.exists()} == existing
    stored = set(snapshot(server.storage_dir))
    assert stored - {".link-secret"}, "nothing was stored"
    strays = sorted(k for k in stored - {".link-secret"} if not STORED_NAME.fullmatch(k))
    assert strays == []
    # The client's name was ignored: one original and one result for all seven requests.
    assert len([k for k in stored if k.startswith("originals/")]) == 2
    assert len([k for k in stored if k.startswith("results/")]) == 2


def test_server_is_still_up_and_working_after_the_corpus(server, photos) -> None:
    """Runs after the corpus in this module (same server): it still answers."""
    health = server.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    response = server.post("/process?response=image",
                           files={"image": ("camera.png", photos["camera.png"])},
                           data={"operation": "invert"})
    assert response.status_code == 200
    camera = cv2.imdecode(np.frombuffer(photos["camera.png"], np.uint8), cv2.IMREAD_UNCHANGED)
    result = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(result, 255 - camera)
    assert server.proc.poll() is None
    assert "Traceback" not in server.log(), server.log()[-3000:]


@pytest.fixture(scope="module")
def small_server(module_server_process):
    return module_server_process("--max-bytes", "200000")


def test_request_over_max_bytes_is_a_json_413(small_server, photos) -> None:
    body = photos["astronaut.png"]  # 790 KB
    assert len(body) > 200_000
    response = small_server.post("/process", files={"image": ("a.png", body)},
                                 data={"operation": "invert"})
    assert_error(response, 413, "too_many_bytes", ("limit",))

    small = small_server.post("/process", files={"image": ("c.png", photos["camera.png"])},
                              data={"operation": "invert"})
    assert small.status_code == 200, small.text


def test_request_far_over_max_bytes_is_a_json_413(small_server) -> None:
    body = bytes(3 * 2**20)  # beyond what waitress itself accepts for this server
    response = small_server.post("/process", files={"image": ("big.png", body)},
                                 data={"operation": "invert"})
    assert_error(response, 413, ("too_many_bytes", "request_entity_too_large"), ())
    assert small_server.get("/health").status_code == 200


def test_chunked_request_over_max_bytes_is_a_413(small_server) -> None:
    boundary = "chunkedboundary"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"operation\"\r\n\r\n"
               f"invert\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
               f"filename=\"a.png\"\r\n\r\n").encode()
        for _ in range(40):
            yield bytes(10_000)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = small_server.post(
        "/process", data=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413, response.text[:300]
    assert small_server.get("/health").status_code == 200
