"""Sharing from the embedded local fleet: a stable port that falls back when taken, and
S3 storage (moto in server mode) giving presigned links anyone can download."""

import json
import os
import socket
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from gui.fleet_process import FleetProcess, SharingOptions
from gui.links import is_loopback_link

IMAGE = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "images" / "camera.png"


def _process(endpoint: str) -> dict:
    boundary = "imagefleetboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"operation\"\r\n\r\n"
            f"grayscale\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"camera.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    body += IMAGE.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{endpoint}/process", data=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


def test_taken_port_falls_back_and_says_so(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fleet = FleetProcess(1, tmp_path / "storage", port=port)
        try:
            fleet.start()
            assert not fleet.endpoint.endswith(f":{port}")
            assert fleet.port_notice and str(port) in fleet.port_notice
        finally:
            fleet.stop()


def test_s3_backed_local_fleet_gives_presigned_links_that_download(tmp_path):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="shared-results")
        fleet = FleetProcess(1, tmp_path / "storage", port=0,
                             sharing=SharingOptions(results="s3://shared-results/local"),
                             environ=_env(IMAGEFLEET_S3_ENDPOINT_URL=endpoint, **creds))
        try:
            fleet.start()
            result = _process(fleet.endpoint)
        finally:
            fleet.stop()
        url = result["url"]
        assert "X-Amz-Signature=" in url and "shared-results" in url
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.shape[:2] == (result["height"], result["width"])
        assert not list((tmp_path / "storage").glob("results/*"))  # nothing kept locally
        # moto's own endpoint is loopback here; a real bucket's link is not
        assert is_loopback_link(url)
    finally:
        server.stop()


def test_sharing_settings_validate_and_feed_the_fleet_command(tmp_path):
    from gui.connection import local_fleet_options
    from gui.fleet_process import fleet_command
    from gui.settings import Settings, SettingsError, parse_settings

    settings = parse_settings({"local_port": "8765", "s3_bucket": "s3://my-results/",
                               "s3_prefix": "/laptop/", "storage_max_mb": 100,
                               "storage_max_age_days": 0})
    assert settings.s3_location == "s3://my-results/laptop"
    options = local_fleet_options({}, settings)
    assert (options.port, options.max_storage_mb, options.max_age_days) == (8765, 100, None)
    assert local_fleet_options({"IMAGEFLEET_LOCAL_PORT": "0"}, settings).port == 0
    with pytest.raises(SettingsError) as info:
        parse_settings({"local_port": 70000, "s3_bucket": "Bad_Bucket", "storage_max_mb": -1})
    assert len(info.value.problems) == 3
    command = fleet_command(1, tmp_path, tmp_path / "ready", 8765,
                            sharing=SharingOptions(results="s3://b/p", max_storage_mb=100))
    assert command[command.index("--results") + 1] == "s3://b/p"
    assert "--port-fallback" in command and "--max-age-days" not in command
    assert Settings().local_port == 8765


def test_local_fleet_applies_the_storage_caps(tmp_path):
    import time

    storage = tmp_path / "storage"
    (storage / "results").mkdir(parents=True)
    old = storage / "results" / "old.png"
    old.write_bytes(b"x" * 100)
    os.utime(old, (time.time() - 3 * 86400,) * 2)
    fresh = storage / "results" / "fresh.png"
    fresh.write_bytes(b"x" * 100)
    fleet = FleetProcess(1, storage, port=0, sharing=SharingOptions(max_age_days=1))
    try:
        fleet.start()
        deadline = time.monotonic() + 20
        while old.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not old.exists() and fresh.exists()
    finally:
        fleet.stop()
