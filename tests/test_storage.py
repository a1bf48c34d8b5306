"""Storage: folder (atomic writes, link secret, signed expiring links), memory, S3.

S3 runs against moto twice: in-process (`mock_aws`) for the API calls, and as a moto
server over HTTP, where the presigned link is downloaded with a plain HTTP client.
Local links are checked through the real route, with a clock the test controls, and
once end to end through a real server process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import boto3
import cv2
import numpy as np
import pytest
import requests
from moto import mock_aws
from moto.server import ThreadedMotoServer
from waiting import wait_until

from server import ServerConfig
from server.signing import SECRET_ENV, SECRET_FILE, load_or_create_secret
from server.storage import (
    MAX_LINK_SECONDS,
    FolderStorage,
    MemoryStorage,
    S3Storage,
    StorageError,
    open_storage,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY = "results/" + "ab" * 32 + ".png"
OTHER_KEY = "results/" + "cd" * 32 + ".png"
BUCKET = "imagefleet-test-results"


class ManualClock:
    """A clock the test moves by hand (links are checked against it)."""

    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def post_image(client, data: bytes, filename: str = "image.png", query: str = "", **fields):
    form = {"image": (io.BytesIO(data), filename), **fields}
    return client.post("/process" + query, data=form, content_type="multipart/form-data")


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None, "not a decodable image"
    return image


@pytest.fixture
def camera(images_dir: Path) -> np.ndarray:
    return cv2.imread(str(images_dir / "camera.png"), cv2.IMREAD_UNCHANGED)


@pytest.fixture(autouse=True)
def no_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)


# --- FolderStorage --------------------------------------------------------------------


def test_folder_round_trip(tmp_path: Path) -> None:
    storage = FolderStorage(tmp_path)
    storage.put(KEY, b"\x89PNG data", "image/png", {"width": "3", "height": "2"})

    stored = storage.head(KEY)
    assert stored is not None
    assert (stored.key, stored.size, stored.content_type) == (KEY, 9, "image/png")
    assert stored.metadata == {"width": "3", "height": "2"}
    assert storage.get(KEY) == b"\x89PNG data"
    assert storage.head(OTHER_KEY) is None
    assert storage.get(OTHER_KEY) is None


def test_folder_overwrite_replaces_whole_object_and_leaves_no_temporary_files(
        tmp_path: Path) -> None:
    storage = FolderStorage(tmp_path)
    storage.put(KEY, b"a" * 100_000, "image/png")
    storage.put(KEY, b"b" * 10, "image/jpeg", {"k": "v"})

    assert storage.get(KEY) == b"b" * 10
    assert storage.head(KEY).content_type == "image/jpeg"
    assert files_under(tmp_path) == {SECRET_FILE, KEY, KEY + ".meta.json"}


def test_failed_data_write_raises_storage_error_and_cleans_up(tmp_path: Path) -> None:
    storage = FolderStorage(tmp_path)
    # A directory where the file should go: the data reaches the temporary file, then
    # the rename fails with a real OSError (IsADirectoryError).
    (tmp_path / KEY).mkdir(parents=True)

    with pytest.raises(StorageError, match="could not write"):
        storage.put(KEY, b"x" * 4096, "image/png")

    assert storage.head(KEY) is None
    leftovers = [p.name for p in (tmp_path / "results").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


def test_crash_between_data_and_metadata_leaves_no_visible_object(tmp_path: Path) -> None:
    storage = FolderStorage(tmp_path)
    # The metadata file cannot be written (a directory is in its place): the data is
    # already in place, as after a crash between the two renames.
    (tmp_path / (KEY + ".meta.json")).mkdir(parents=True)

    with pytest.raises(StorageError):
        storage.put(KEY, b"complete data", "image/png", {"width": "1", "height": "1"})

    assert (tmp_path / KEY).read_bytes() == b"complete data"
    (tmp_path / (KEY + ".meta.json")).rmdir()  # what a crash would leave: no metadata
    assert storage.head(KEY) is None, "an object without metadata must not be reported"
    assert not [p for p in (tmp_path / "results").iterdir() if p.name.startswith(".tmp")]


def test_head_ignores_data_whose_size_does_not_match_its_metadata(tmp_path: Path) -> None:
    storage = FolderStorage(tmp_path)
    storage.put(KEY, b"0123456789", "image/png")
    (tmp_path / KEY).write_bytes(b"01234")  # e.g. replaced by a non-atomic writer

    assert storage.head(KEY) is None


def test_head_ignores_corrupt_metadata(tmp_path: Path) -> None:
    storage = FolderStorage(tmp_path)
    storage.put(KEY, b"0123456789", "image/png")
    (tmp_path / (KEY + ".meta.json")).write_text("{not json")

    assert storage.head(KEY) is None


@pytest.mark.parametrize("key", ["../escape.png", "results/../../x.png", "/etc/passwd",
                                 "results/short.png", "results/" + "a" * 64 + ".png/x"])
def test_keys_outside_the_scheme_are_refused(tmp_path: Path, key: str) -> None:
    storage = FolderStorage(tmp_path / "storage")
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.put(key, b"x", "image/png")
    assert files_under(tmp_path) == {"storage/" + SECRET_FILE}


def test_link_secret_created_once_with_mode_0600_and_shared(tmp_path: Path) -> None:
    first = FolderStorage(tmp_path)
    secret_path = tmp_path / SECRET_FILE
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    content = secret_path.read_bytes()
    assert len(content.strip()) >= 32

    second = FolderStorage(tmp_path)
    assert secret_path.read_bytes() == content, "the secret must not be regenerated"
    link = first.link(KEY, 60, "http://a")
    query = parse_qs(urlsplit(link.url).query)
    assert second.verify_link(KEY, query["expires"][0], query["signature"][0])
    assert not FolderStorage(tmp_path / "elsewhere").verify_link(
        KEY, query["expires"][0], query["signature"][0])


def test_concurrent_secret_creation_from_threads_yields_one_secret(tmp_path: Path) -> None:
    workers = 16
    barrier = threading.Barrier(workers)
    secrets: list[bytes] = []
    errors: list[BaseException] = []

    def create() -> None:
        barrier.wait()
        try:
            secrets.append(load_or_create_secret(tmp_path, environ={}))
        except (OSError, ValueError) as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert errors == []
    assert len(secrets) == workers and len(set(secrets)) == 1
    assert secrets[0] == (tmp_path / SECRET_FILE).read_text().strip().encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == [SECRET_FILE]


CREATE_SECRET = """
import sys
from pathlib import Path
from server.signing import load_or_create_secret
folder, go = Path(sys.argv[1]), Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():  # start line shared by all processes, to make them race
    pass
print(load_or_create_secret(folder, environ={}).decode(), flush=True)
"""


def test_concurrent_secret_creation_from_processes_yields_one_secret(tmp_path: Path) -> None:
    folder, go = tmp_path / "shared", tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    procs = [subprocess.Popen([sys.executable, "-c", CREATE_SECRET, str(folder), str(go)],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        go.touch()
        outputs = [proc.communicate(timeout=30)[0].strip() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(proc.returncode == 0 for proc in procs)
    assert len(set(outputs)) == 1 and len(outputs[0]) >= 32
    assert sorted(p.name for p in folder.iterdir()) == [SECRET_FILE]
    assert stat.S_IMODE((folder / SECRET_FILE).stat().st_mode) == 0o600


def test_secret_from_environment_wins_and_writes_no_file(tmp_path: Path) -> None:
    secret = "s" * 40
    assert load_or_create_secret(tmp_path, environ={SECRET_ENV: secret}) == secret.encode()
    assert not (tmp_path / SECRET_FILE).exists()
    with pytest.raises(ValueError, match="at least 32"):
        load_or_create_secret(tmp_path, environ={SECRET_ENV: "short"})


def test_too_short_secret_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / SECRET_FILE).write_text("abc")
    with pytest.raises(ValueError, match="too short"):
        load_or_create_secret(tmp_path, environ={})


# --- MemoryStorage --------------------------------------------------------------------


def test_memory_storage_round_trip_and_links() -> None:
    clock = ManualClock()
    storage = MemoryStorage(clock=clock)
    assert storage.head(KEY) is None and storage.get(KEY) is None
    storage.put(KEY, b"abc", "image/webp", {"width": "1"})
    storage.put(OTHER_KEY, b"de", "image/png")

    assert storage.get(KEY) == b"abc"
    assert storage.head(KEY).size == 3 and storage.head(KEY).metadata == {"width": "1"}
    assert storage.keys() == sorted([KEY, OTHER_KEY])
    link = storage.link(KEY, 10, "http://host:1/")
    assert link.expires_at == clock.now + 10
    query = parse_qs(urlsplit(link.url).query)
    assert storage.verify_link(KEY, query["expires"][0], query["signature"][0])
    assert not storage.verify_link(OTHER_KEY, query["expires"][0], query["signature"][0])
    clock.now += 11
    assert not storage.verify_link(KEY, query["expires"][0], query["signature"][0])
    with pytest.raises(ValueError):
        storage.put("../x.png", b"", "image/png")


# --- Local links through the route ----------------------------------------------------


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def clocked(tmp_path: Path, make_app, clock: ManualClock):
    storage = FolderStorage(tmp_path / "storage", clock=clock)
    app = make_app(storage=storage)
    return storage, app.test_client()


def split_link(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    return parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}


def assert_json_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_valid_local_link_downloads_the_result(clocked, camera_png: bytes,
                                               camera: np.ndarray) -> None:
    storage, client = clocked
    answer = post_image(client, camera_png, operation="invert").get_json()
    assert answer["url"].startswith("http://localhost/results/")
    path, query = split_link(answer["url"])

    response = client.get(path, query_string=query)

    assert response.status_code == 200
    assert response.mimetype == "image/png"
    assert response.data == storage.get("results/" + answer["key"])
    np.testing.assert_array_equal(decode(response.data), 255 - camera)


def test_expired_local_link_is_refused(clocked, clock: ManualClock, camera_png: bytes) -> None:
    _, client = clocked
    answer = post_image(client, camera_png, operation="invert", expires_in="60").get_json()
    path, query = split_link(answer["url"])
    assert int(query["expires"]) == int(clock.now) + 60

    clock.now += 60
    assert client.get(path, query_string=query).status_code == 200, "valid up to expiry"
    clock.now += 1
    error = assert_json_error(client.get(path, query_string=query), 403, "invalid_link")
    assert "expired" in error["message"]


@pytest.mark.parametrize("tamper", ["signature", "expires", "key", "no_signature",
                                    "no_expires", "expires_text", "signature_case"])
def test_tampered_local_link_is_refused(clocked, camera_png: bytes, tamper: str) -> None:
    _, client = clocked
    answer = post_image(client, camera_png, operation="invert").get_json()
    other = post_image(client, camera_png, operation="grayscale").get_json()
    path, query = split_link(answer["url"])
    signature = query["signature"]
    if tamper == "signature":
        query["signature"] = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    elif tamper == "expires":
        query["expires"] = str(int(query["expires"]) + 3600)  # a longer life
    elif tamper == "key":
        path = "/results/" + other["key"]  # a real result, but not the one signed
    elif tamper == "no_signature":
        del query["signature"]
    elif tamper == "no_expires":
        del query["expires"]
    elif tamper == "expires_text":
        query["expires"] = "never"
    elif tamper == "signature_case":
        query["signature"] = signature.upper()

    assert_json_error(client.get(path, query_string=query), 403, "invalid_link")


def test_link_with_non_ascii_digit_expiry_is_refused(clocked, camera_png: bytes) -> None:
    _, client = clocked
    answer = post_image(client, camera_png, operation="invert").get_json()
    path, query = split_link(answer["url"])
    query["expires"] = "²"
    assert_json_error(client.get(path, query_string=query), 403, "invalid_link")


def test_validly_signed_link_to_a_missing_result_is_404(clocked) -> None:
    storage, client = clocked
    path, query = split_link(storage.link(KEY, 60, "http://localhost").url)

    assert_json_error(client.get(path, query_string=query), 404, "not_found")


@pytest.mark.parametrize("name", ["../.link-secret", "..%2F.link-secret", "x.png",
                                  "ab" * 32 + ".png.meta.json", "AB" * 32 + ".png"])
def test_result_route_serves_only_result_names(clocked, name: str) -> None:
    _, client = clocked
    response = client.get("/results/" + name, query_string={"expires": "1", "signature": "x"})
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_link_lifetime_is_clamped_to_seven_days(tmp_path: Path, clock: ManualClock) -> None:
    storage = FolderStorage(tmp_path, clock=clock)
    link = storage.link(KEY, 30 * 24 * 3600, "http://h")
    assert link.expires_at == int(clock.now) + MAX_LINK_SECONDS == clock.now + 7 * 24 * 3600
    assert split_link(link.url)[1]["expires"] == str(int(clock.now) + MAX_LINK_SECONDS)


def test_link_lifetime_above_seven_days_is_refused_in_requests_and_config(
        clocked, clock: ManualClock, camera_png: bytes) -> None:
    _, client = clocked
    error = assert_json_error(post_image(client, camera_png, operation="invert",
                                         expires_in=str(MAX_LINK_SECONDS + 1)),
                              400, "invalid_parameter")
    assert "expires_in" in error["message"] and str(MAX_LINK_SECONDS) in error["message"]

    answer = post_image(client, camera_png, operation="invert",
                        expires_in=str(MAX_LINK_SECONDS)).get_json()
    assert answer["expires_at"] == "2027-01-22T08:00:00Z"  # clock.now + 7 days, ISO 8601

    with pytest.raises(ValueError, match="7 days"):
        ServerConfig(link_ttl=MAX_LINK_SECONDS + 1)


def test_local_link_from_a_real_server_downloads_then_expires(
        server_process, images_dir: Path) -> None:
    server = server_process()
    data = (images_dir / "camera.png").read_bytes()

    def process(**fields: str) -> dict:
        response = server.post("/process", files={"image": ("camera.png", data)},
                               data={"operation": "invert", **fields})
        assert response.status_code == 200, response.text
        return response.json()

    answer = process()
    assert answer["url"].startswith(server.url + "/results/" + answer["key"] + "?")

    download = requests.get(answer["url"], timeout=10)

    assert download.status_code == 200
    assert download.headers["Content-Type"] == "image/png"
    stored = (server.storage_dir / "results" / answer["key"]).read_bytes()
    assert download.content == stored
    camera = cv2.imread(str(images_dir / "camera.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(decode(download.content), 255 - camera)

    # A link to the same result that lives one second: poll until it has expired
    # (real clock, real process), while the long link keeps working.
    short = process(expires_in="1")
    assert short["key"] == answer["key"] and short["url"] != answer["url"]
    wait_until(lambda: requests.get(short["url"], timeout=10).status_code == 403,
               timeout=10, interval=0.2, what="the one-second link to expire")
    expired = requests.get(short["url"], timeout=10)
    assert expired.status_code == 403
    assert expired.json()["error"]["code"] == "invalid_link"
    assert requests.get(answer["url"], timeout=10).status_code == 200


# --- Content-addressed caching ----------------------------------------------------------


def test_same_request_twice_is_answered_from_storage(app, tmp_path: Path,
                                                     camera_png: bytes) -> None:
    client = app.test_client()
    first = post_image(client, camera_png, operation="gaussian_blur",
                       params='{"ksize": 7}').get_json()
    result_path = tmp_path / "storage" / "results" / first["key"]
    before = result_path.stat().st_mtime_ns
    files_before = files_under(tmp_path / "storage")

    second = post_image(client, camera_png, operation="gaussian_blur",
                        params='{"ksize": 7}').get_json()

    assert first["cached"] is False and "process" in first["timings_ms"]
    assert second["cached"] is True
    assert "process" not in second["timings_ms"] and "decode" not in second["timings_ms"]
    assert second["key"] == first["key"]
    assert (second["width"], second["height"], second["bytes"]) == (
        first["width"], first["height"], first["bytes"])
    assert result_path.stat().st_mtime_ns == before, "the result was rewritten"
    assert files_under(tmp_path / "storage") == files_before
    image = post_image(client, camera_png, query="?response=image", operation="gaussian_blur",
                       params='{"ksize": 7}')
    assert image.headers["X-Result-Key"] == first["key"]
    assert image.data == result_path.read_bytes()


def test_recomputes_when_the_stored_result_has_no_metadata(app, tmp_path: Path,
                                                           camera_png: bytes) -> None:
    client = app.test_client()
    first = post_image(client, camera_png, operation="invert").get_json()
    meta = tmp_path / "storage" / "results" / (first["key"] + ".meta.json")
    meta.unlink()  # as if the process died between writing data and metadata

    again = post_image(client, camera_png, operation="invert").get_json()

    assert again["cached"] is False and "process" in again["timings_ms"]
    assert again["key"] == first["key"] and meta.exists()


def test_keys_differ_by_params_format_quality_and_input(client, camera_png: bytes,
                                                        images_dir: Path) -> None:
    def key(data: bytes = camera_png, **fields) -> str:
        response = post_image(client, data, **fields)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()["key"]

    keys = {
        "blur7": key(operation="gaussian_blur", params='{"ksize": 7}'),
        "blur9": key(operation="gaussian_blur", params='{"ksize": 9}'),
        "blur7_sigma": key(operation="gaussian_blur", params='{"ksize": 7, "sigma": 2}'),
        "invert": key(operation="invert"),
        "invert_jpeg": key(operation="invert", format="jpeg"),
        "invert_jpeg_q50": key(operation="invert", format="jpeg", quality="50"),
        "invert_webp": key(operation="invert", format="webp"),
        "invert_other_input": key((images_dir / "astronaut.png").read_bytes(),
                                  operation="invert"),
        "two_steps": key(steps='[{"op": "invert"}, {"op": "grayscale"}]'),
        "two_steps_swapped": key(steps='[{"op": "grayscale"}, {"op": "invert"}]'),
    }
    assert len(set(keys.values())) == len(keys), keys
    assert keys["invert_jpeg"].endswith(".jpg") and keys["invert_webp"].endswith(".webp")

    # Equal requests in other spellings share the key: the pipeline is canonical.
    assert key(operation="gaussian_blur", params='{"sigma": 0, "ksize": "7"}') == keys["blur7"]
    assert key(steps='[{"op": "invert"}]') == keys["invert"]
    assert key(operation="invert", format="jpeg", quality="90") == keys["invert_jpeg"]
    # The file name is not part of the content.
    assert key(operation="invert", filename="another-name.png") == keys["invert"]


def test_original_is_stored_under_originals(client, tmp_path: Path, camera_png: bytes,
                                            images_dir: Path) -> None:
    post_image(client, camera_png, operation="invert")
    jpeg = (images_dir / "rocket.jpg").read_bytes()
    post_image(client, jpeg, filename="rocket.jpg", operation="invert")

    root = tmp_path / "storage"
    storage = FolderStorage(root)
    png_key = f"originals/{hashlib.sha256(camera_png).hexdigest()}.png"
    jpg_key = f"originals/{hashlib.sha256(jpeg).hexdigest()}.jpg"
    assert storage.get(png_key) == camera_png
    assert storage.head(png_key).content_type == "image/png"
    assert storage.get(jpg_key) == jpeg
    assert storage.head(jpg_key).content_type == "image/jpeg"
    originals = {p for p in files_under(root) if p.startswith("originals/")}
    assert originals == {png_key, png_key + ".meta.json", jpg_key, jpg_key + ".meta.json"}


# --- S3 (moto in-process) ---------------------------------------------------------------


@pytest.fixture
def moto_s3(fake_aws):
    with mock_aws():
        raw = boto3.client("s3", region_name="us-east-1")
        raw.create_bucket(Bucket=BUCKET)
        yield raw


def test_s3_put_sets_content_type_metadata_and_encryption(moto_s3) -> None:
    storage = S3Storage(BUCKET, "fleet-a/", region="us-east-1")
    storage.put(KEY, b"jpeg bytes", "image/jpeg", {"width": "4", "height": "5"})

    answer = moto_s3.head_object(Bucket=BUCKET, Key="fleet-a/" + KEY)
    assert answer["ContentType"] == "image/jpeg"
    assert answer["ServerSideEncryption"] == "AES256"
    assert answer["Metadata"] == {"width": "4", "height": "5"}
    stored = storage.head(KEY)
    assert (stored.size, stored.content_type, stored.metadata) == (
        10, "image/jpeg", {"width": "4", "height": "5"})
    assert storage.get(KEY) == b"jpeg bytes"
    assert storage.describe() == f"s3://{BUCKET}/fleet-a"


def test_s3_missing_objects_are_none(moto_s3) -> None:
    storage = S3Storage(BUCKET, region="us-east-1")
    assert storage.head(KEY) is None
    assert storage.get(KEY) is None


def test_s3_presigned_link_is_sigv4_and_clamped(moto_s3) -> None:
    clock = ManualClock()
    storage = S3Storage(BUCKET, "p", region="us-east-1", clock=clock)
    storage.put(KEY, b"x", "image/png")

    link = storage.link(KEY, 3600, "http://ignored")
    query = parse_qs(urlsplit(link.url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == ["3600"]
    assert {"X-Amz-Credential", "X-Amz-Signature", "X-Amz-Date"} <= set(query)
    assert urlsplit(link.url).path.endswith("/p/" + KEY)
    assert link.expires_at == clock.now + 3600

    long_link = storage.link(KEY, 30 * 24 * 3600, "http://ignored")
    assert parse_qs(urlsplit(long_link.url).query)["X-Amz-Expires"] == [str(MAX_LINK_SECONDS)]
    assert long_link.expires_at == clock.now + MAX_LINK_SECONDS


def test_s3_failures_become_storage_errors_and_503(fake_aws, make_app,
                                                   camera_png: bytes) -> None:
    with mock_aws():  # no bucket created
        storage = S3Storage("no-such-bucket", region="us-east-1")
        with pytest.raises(StorageError, match="no-such-bucket"):
            storage.put(KEY, b"x", "image/png")
        client = make_app(storage=storage).test_client()
        response = post_image(client, camera_png, operation="invert")
    assert_json_error(response, 503, "storage_unavailable")


def test_open_storage_parses_locations(tmp_path: Path) -> None:
    s3 = open_storage("s3://bucket/some/prefix", s3_endpoint_url="http://127.0.0.1:9")
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    folder = open_storage(str(tmp_path / "f"))
    assert isinstance(folder, FolderStorage) and folder.root == (tmp_path / "f").resolve()
    for bad in ("s3://", "s3:///prefix", "http://example.com/x"):
        with pytest.raises(ValueError, match="s3://bucket"):
            open_storage(bad)


# --- S3 over HTTP: a moto server, and the presigned link downloaded for real -------------


@pytest.fixture
def moto_server(fake_aws):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_s3_over_http_presigned_link_downloads_the_result(
        moto_server: str, make_app, camera_png: bytes, camera: np.ndarray) -> None:
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(
        Bucket=BUCKET)
    storage = S3Storage(BUCKET, "results-prefix", endpoint_url=moto_server, region="us-east-1")
    client = make_app(storage=storage).test_client()

    response = post_image(client, camera_png, operation="invert", format="png")

    assert response.status_code == 200, response.get_data(as_text=True)
    answer = response.get_json()
    assert answer["url"].startswith(moto_server + "/")
    assert "X-Amz-Signature=" in answer["url"]
    download = requests.get(answer["url"], timeout=10)
    assert download.status_code == 200
    assert download.headers["Content-Type"] == "image/png"
    assert download.content == storage.get("results/" + answer["key"])
    np.testing.assert_array_equal(decode(download.content), 255 - camera)

    again = post_image(client, camera_png, operation="invert", format="png").get_json()
    assert again["cached"] is True and again["key"] == answer["key"]
    original = f"originals/{hashlib.sha256(camera_png).hexdigest()}.png"
    assert storage.get(original) == camera_png
    # Without the signature the private bucket refuses the object.
    bare = answer["url"].split("?", 1)[0]
    assert requests.get(bare + "?" + urlencode({"x": "1"}), timeout=10).status_code == 403


def test_s3_over_http_head_reports_encryption(moto_server: str) -> None:
    raw = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    raw.create_bucket(Bucket=BUCKET)
    storage = S3Storage(BUCKET, endpoint_url=moto_server, region="us-east-1")
    storage.put(KEY, json.dumps({"a": 1}).encode(), "application/json")

    answer = raw.head_object(Bucket=BUCKET, Key=KEY)
    assert answer["ServerSideEncryption"] == "AES256"
    assert answer["ContentType"] == "application/json"
    assert storage.head(OTHER_KEY) is None
