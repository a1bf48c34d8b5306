"""Server hardening against the smaller holes: odd link parameters, PNG chunk floods,
damaged metadata, a full disk, the fleet's link secret and the internal tile header.

Every test runs against a real `python -m server` on loopback (and, for the secret, a
real local fleet); the full disk is a real tmpfs of a few MB.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from PIL import Image as PILImage
from waiting import wait_until

from server.signing import tile_credential
from server.storage import FolderStorage, StorageFull
from server.tiling import TILE_HEADER

# --- helpers -----------------------------------------------------------------------------


def assert_error(response: requests.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text[:500]
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message
    return message


def process(server, data: bytes, operation: str = "invert", **fields: str) -> requests.Response:
    return server.post("/process", files={"image": ("upload.png", data, "image/png")},
                       data={"operation": operation, **fields})


def link_parts(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    return parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}


@pytest.fixture(scope="module")
def chelsea_png(images_dir: Path) -> bytes:
    return (images_dir / "chelsea.png").read_bytes()


@pytest.fixture(scope="module")
def server(module_server_process):
    return module_server_process()


# --- 1. non-ASCII link parameters ----------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [
    ("signature", "é" * 64),
    ("signature", "\u2603"),
    # These already gave 403 (the expiry pattern is ASCII); kept so it stays that way.
    ("expires", "١٢٣٤٥٦٧٨٩٠"),  # Arabic-Indic digits: str.isdigit() says yes
    ("expires", "é"),
])
def test_non_ascii_link_parameters_are_403_not_500(server, camera_png: bytes, name: str,
                                                   value: str) -> None:
    answer = process(server, camera_png)
    assert answer.status_code == 200, answer.text
    path, query = link_parts(answer.json()["url"])
    assert server.get(path, params=query).status_code == 200

    query[name] = value
    message = assert_error(server.get(path, params=query), 403, "invalid_link")
    assert "signature" in message
    assert server.get("/health").status_code == 200


# --- 2. PNG chunk floods -------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_ancillary_chunks(count: int, side: int = 16) -> bytes:
    """A valid gray PNG with `count` tiny, valid ancillary chunks (alternately tEXt and a
    private chunk) between IHDR and IDAT, where the header parser walks them."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress((b"\0" + b"\x80" * side) * side, 9))
    pair = png_chunk(b"tEXt", b"k\0v") + png_chunk(b"prIv")
    extra = pair * (count // 2) + (png_chunk(b"prIv") if count % 2 else b"")
    return b"\x89PNG\r\n\x1a\n" + ihdr + extra + idat + png_chunk(b"IEND")


def timed(call):
    started = time.perf_counter()
    response = call()
    return response, time.perf_counter() - started


def test_png_with_a_million_ancillary_chunks_is_refused_at_once(server) -> None:
    flood = png_with_ancillary_chunks(1_000_000)
    ordinary = png_with_ancillary_chunks(2)
    assert len(flood) > 10_000_000

    normal, normal_s = timed(lambda: process(server, ordinary))
    assert normal.status_code == 200, normal.text
    refused, refused_s = timed(lambda: process(server, flood))

    message = assert_error(refused, 415, "unsupported_image")
    assert "1000 ancillary chunks" in message and "at most 1000" in message
    # Unbounded, Pillow's header parser takes seconds (about 5 s here); the cap makes it
    # as quick as an ordinary request plus the upload of 12 MB.
    assert refused_s < 2.0, f"refused after {refused_s:.2f}s (ordinary: {normal_s:.2f}s)"
    assert server.get("/health").status_code == 200


def test_png_with_chunks_up_to_the_limit_is_processed(server) -> None:
    response = process(server, png_with_ancillary_chunks(1000))
    assert response.status_code == 200, response.text
    assert (response.json()["width"], response.json()["height"]) == (16, 16)
    over = process(server, png_with_ancillary_chunks(1001))
    assert_error(over, 415, "unsupported_image")



def gif_with(extensions: bytes) -> bytes:
    """A valid 16x16 GIF with a short comment, and `extensions` before its image."""
    buffer = io.BytesIO()
    PILImage.new("L", (16, 16), 128).save(buffer, "GIF", comment=b"hello")
    data = buffer.getvalue()
    at = data.index(b"\x21\xfe")  # the comment extension, before the image descriptor
    return data[:at] + extensions + data[at:]


COMMENT_BLOCK = b"\x21\xfe\x01x\x00"  # one comment extension of one byte


@pytest.mark.parametrize(("extensions", "says"), [
    # Each took Pillow's header parser seconds to minutes: it joins comments with +=.
    (COMMENT_BLOCK * 1_000_000, "more than 1000 extension blocks"),
    (b"\x21\xfe" + (b"\xff" + b"x" * 255) * 64_000 + b"\x00", "more than 64 KB of comments"),
    (b"\x21\xff\x0bXMP DataXMP" + b"\x01x" * 2_000_000 + b"\x00",
     "more than 100000 extension data blocks"),
], ids=["a million comments", "a 16 MB comment", "two million tiny data blocks"])
def test_gif_with_floods_of_extension_blocks_is_refused_at_once(server, extensions: bytes,
                                                                says: str) -> None:
    flood = gif_with(extensions)
    refused, refused_s = timed(lambda: process(server, flood))
    message = assert_error(refused, 415, "unsupported_image")
    assert says in message and "at most" in message
    assert refused_s < 2.0, f"refused after {refused_s:.2f}s"


def test_gif_with_extension_blocks_up_to_the_limits_is_processed(server) -> None:
    ordinary = gif_with(COMMENT_BLOCK * 990 + b"\x21\xfe" + (b"\xff" + b"x" * 255) * 200
                        + b"\x00")
    response = process(server, ordinary)
    assert response.status_code == 200, response.text
    assert response.json()["format"] == "png" and response.json()["width"] == 16


# --- 3. damaged metadata -------------------------------------------------------------------


def corrupt(meta: dict, how: str) -> bytes:
    text = json.dumps(meta).encode()
    return {
        "garbage": b"\xff\xfe\x00 not json at all",
        "zeroed": b"\0" * len(text),  # what a crash can leave of a file's last write
        "truncated": text[: len(text) // 2],
        "empty": b"",
        "a list": b"[1, 2, 3]",
        "no content type": json.dumps({k: v for k, v in meta.items()
                                       if k != "content_type"}).encode(),
        "content type not text": json.dumps({**meta, "content_type": 7}).encode(),
        "metadata not an object": json.dumps({**meta, "metadata": "width=1"}).encode(),
        "metadata values not text": json.dumps({**meta, "metadata": {"width": [1],
                                                                       "height": [1]}}).encode(),
    }[how]


# The first five were already recomputed (a JSON error is a ValueError); the others
# parsed and then failed every request with a 500.
DAMAGE = ["garbage", "zeroed", "truncated", "empty", "a list", "no content type",
          "content type not text", "metadata not an object", "metadata values not text"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_metadata_is_treated_as_missing_and_rewritten(server, camera_png: bytes,
                                                              how: str) -> None:
    # A request of its own per case (the kernel size), so no case sees another's result.
    params = json.dumps({"ksize": 3 + 2 * DAMAGE.index(how)})
    first = process(server, camera_png, "gaussian_blur", params=params)
    assert first.status_code == 200, first.text
    key = first.json()["key"]
    meta_path = server.storage_dir / "results" / (key + ".meta.json")
    meta = json.loads(meta_path.read_bytes())
    meta_path.write_bytes(corrupt(meta, how))

    again = process(server, camera_png, "gaussian_blur", params=params)

    assert again.status_code == 200, again.text
    body = again.json()
    assert body["key"] == key and body["cached"] is False
    assert json.loads(meta_path.read_bytes()) == meta, "the metadata was not rewritten"
    assert requests.get(body["url"], timeout=10).status_code == 200
    assert process(server, camera_png, "gaussian_blur", params=params).json()["cached"] is True


def test_link_to_a_result_with_damaged_metadata_is_404_not_500(server,
                                                               camera_png: bytes) -> None:
    first = process(server, camera_png, "median_blur")
    assert first.status_code == 200, first.text
    key = first.json()["key"]
    meta_path = server.storage_dir / "results" / (key + ".meta.json")
    meta_path.write_bytes(corrupt(json.loads(meta_path.read_bytes()), "no content type"))
    assert_error(requests.get(first.json()["url"], timeout=10), 404, "not_found")


# --- 4. a full disk --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MB filesystem (tmpfs), unmounted at teardown. Requested before the
    servers that use it, so they are stopped before it is unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)  # busy: detach


def fill(folder: Path) -> Path:
    """Write a file until the filesystem refuses (ENOSPC): the disk is then full."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block = b"\0" * 65536
    try:
        while True:
            os.write(fd, block)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def test_full_disk_is_a_507_that_says_so_and_the_server_recovers(small_disk: Path,
                                                                 server_process,
                                                                 camera_png: bytes) -> None:
    storage = small_disk / "storage"
    server = server_process(storage_dir=storage)
    assert process(server, camera_png).status_code == 200
    filler = fill(small_disk)

    full = process(server, camera_png, "gaussian_blur")

    message = assert_error(full, 507, "insufficient_storage")
    assert "disk full" in message and str(storage) in message
    assert server.get("/health").status_code == 200
    # Nothing half-written is left: only whole objects with their metadata.
    names = {p.relative_to(storage).as_posix() for p in storage.rglob("*") if p.is_file()}
    assert not [n for n in names if ".tmp-" in n], names

    filler.unlink()
    again = process(server, camera_png, "gaussian_blur")
    assert again.status_code == 200, again.text
    assert requests.get(again.json()["url"], timeout=10).status_code == 200


def test_full_disk_is_reported_by_health_problem(small_disk: Path, camera_png: bytes) -> None:
    storage = FolderStorage(small_disk / "storage", min_free_bytes=0)
    assert storage.health_problem() is None
    filler = fill(small_disk)

    with pytest.raises(StorageFull, match="disk full"):
        storage.put("originals/" + "ab" * 32 + ".png", camera_png, "image/png")

    problem = storage.health_problem()
    assert problem is not None and problem.startswith("disk full")
    assert f"MB free in {storage.root}" in problem
    # Below the free-space threshold it is reported without any failed write.
    assert "disk almost full" in (FolderStorage(storage.root).health_problem() or "")

    filler.unlink()
    storage.put("originals/" + "ab" * 32 + ".png", camera_png, "image/png")
    assert storage.health_problem() is None, "a write that succeeded clears the problem"


def test_write_that_fits_only_in_part_leaves_no_short_file(small_disk: Path,
                                                            camera_png: bytes) -> None:
    storage = FolderStorage(small_disk / "storage", min_free_bytes=0)
    key = "originals/" + "cd" * 32 + ".png"
    (small_disk / "storage" / "originals").mkdir()
    filler = fill(small_disk)
    # Free 64 KB: the kernel then writes that much of the object and reports a short
    # write, which must not end up as a short object.
    os.truncate(filler, filler.stat().st_size - 65536)
    assert len(camera_png) > 2 * 65536

    with pytest.raises(StorageFull):
        storage.put(key, camera_png, "image/png")

    assert not (storage.root / key).exists()
    assert [p.name for p in (storage.root / "originals").iterdir()] == []


# --- 5. the fleet's link secret -------------------------------------------------------------

OLD_KEY = "old-" + "a" * 40
NEW_KEY = "new-" + "b" * 40


def download_via(server_url: str, link: str) -> requests.Response:
    """A link's path and query, asked of `server_url`: does that server honour it?"""
    path, query = link_parts(link)
    return requests.get(server_url + path, params=query, timeout=10)


def test_rotation_the_first_key_signs_and_every_key_verifies(server_process, tmp_path: Path,
                                                             camera_png: bytes) -> None:
    storage = tmp_path / "shared"
    old = server_process(env={"IMAGEFLEET_LINK_SECRET": OLD_KEY}, storage_dir=storage)
    rotated = server_process(env={"IMAGEFLEET_LINK_SECRET": f"{NEW_KEY}, {OLD_KEY}"},
                             storage_dir=storage)
    old_link = process(old, camera_png).json()["url"]
    new_link = process(rotated, camera_png).json()["url"]

    assert download_via(rotated.url, old_link).status_code == 200, "old key must verify"
    assert download_via(rotated.url, new_link).status_code == 200
    # The new key signs: a server that knows only the old key refuses its links.
    assert_error(download_via(old.url, new_link), 403, "invalid_link")
    assert download_via(old.url, old_link).status_code == 200
    assert not (storage / ".link-secret").exists(), "a secret from the environment is no file"


@pytest.mark.parametrize(("env", "says"), [
    ({"IMAGEFLEET_LINK_SECRET_REQUIRED": "1"}, "IMAGEFLEET_LINK_SECRET is not set"),
    ({"IMAGEFLEET_LINK_SECRET_REQUIRED": "1", "IMAGEFLEET_LINK_SECRET": "short"},
     "at least 32 characters"),
    ({"IMAGEFLEET_LINK_SECRET": f"{NEW_KEY},tiny"}, "key 2 of 2"),
])
def test_worker_without_a_usable_fleet_secret_refuses_to_start(tmp_path: Path, env: dict,
                                                               says: str) -> None:
    from conftest import REPO_ROOT, free_port

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFLEET_")}
    storage = tmp_path / "storage"
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--port", str(free_port()), "--storage",
         str(storage)], cwd=REPO_ROOT, env={**full_env, **env}, capture_output=True,
        text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert says in proc.stderr
    assert not (storage / ".link-secret").exists(), "it made a secret of its own"


QUICK = {"health_check_interval_s": 0.5, "health_check_timeout_s": 0.5,
         "tick_interval_s": 0.25, "grace_period_s": 60}
FLEET_STARTUP = 90.0


def healthy_workers(fleet) -> dict[str, str]:
    """id -> address of the running, healthy workers."""
    return {i["id"]: i["address"] for i in fleet.snapshot()["instances"]
            if i["health"] == "healthy" and i["state"] == "running"}


def links_from_each(workers: dict[str, str], image: bytes) -> dict[str, str]:
    links = {}
    for worker_id, address in workers.items():
        answer = requests.post(f"http://{address}/process", timeout=60,
                               files={"image": ("a.png", image, "image/png")},
                               data={"operation": "invert"})
        assert answer.status_code == 200, answer.text
        links[worker_id] = answer.json()["url"]
    return links


def assert_every_link_downloads_from_every_worker(workers: dict[str, str],
                                                  links: dict[str, str]) -> None:
    for made_by, link in links.items():
        for worker_id, address in workers.items():
            status = download_via(f"http://{address}", link).status_code
            assert status == 200, f"link made by {made_by} answered {status} on {worker_id}"


@pytest.mark.slow
def test_fleet_secret_survives_a_lost_secret_file_and_a_killed_worker(
        tmp_path: Path, camera_png: bytes) -> None:
    from fleet.local.runtime import LocalFleet

    storage = tmp_path / "storage"
    with LocalFleet(workers=2, storage_dir=storage, spec_overrides=QUICK).start(
            FLEET_STARTUP) as fleet:
        workers = wait_until(lambda: (w := healthy_workers(fleet)) and len(w) == 2 and w,
                             FLEET_STARTUP, what="2 healthy workers")
        secret_file = storage / ".fleet" / "link-secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_text().strip()
        pids = fleet.worker_pids()
        for pid in pids.values():  # handed over in the environment, never in argv
            assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert f"IMAGEFLEET_LINK_SECRET={secret}".encode() in Path(
                f"/proc/{pid}/environ").read_bytes()
        before = links_from_each(workers, camera_png)

        # What used to split the fleet: the storage folder's secret file goes, and a
        # worker restarts (its replacement made a new secret of its own).
        (storage / ".link-secret").unlink(missing_ok=True)
        victim, survivor = sorted(workers)
        os.kill(pids[victim], signal.SIGKILL)
        replaced = wait_until(
            lambda: (w := healthy_workers(fleet)) and len(w) == 2 and victim not in w and w,
            FLEET_STARTUP, what="a healthy replacement")
        assert survivor in replaced

        links = {**before, **{f"{k} (after)": v
                              for k, v in links_from_each(replaced, camera_png).items()}}
        assert_every_link_downloads_from_every_worker(replaced, links)
        assert not (storage / ".link-secret").exists()


@pytest.mark.slow
def test_fleet_secret_is_reused_when_the_fleet_restarts(tmp_path: Path,
                                                        camera_png: bytes) -> None:
    from fleet.local.runtime import LocalFleet

    storage = tmp_path / "storage"
    with LocalFleet(workers=1, storage_dir=storage, spec_overrides=QUICK).start(
            FLEET_STARTUP) as fleet:
        first = wait_until(lambda: healthy_workers(fleet), FLEET_STARTUP, what="a worker")
        link = links_from_each(first, camera_png)
        secret = (storage / ".fleet" / "link-secret").read_text()
    with LocalFleet(workers=1, storage_dir=storage, spec_overrides=QUICK).start(
            FLEET_STARTUP) as fleet:
        second = wait_until(lambda: healthy_workers(fleet), FLEET_STARTUP, what="a worker")
        assert (storage / ".fleet" / "link-secret").read_text() == secret
        assert_every_link_downloads_from_every_worker(second, link)


# --- 6. the internal tile header --------------------------------------------------------------


CHELSEA_RAW_BYTES = 451 * 300 * 3  # its pixels, uncompressed


def stored_results(server) -> set[str]:
    folder = server.storage_dir / "results"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


@pytest.mark.parametrize("forged", ["1", "true", tile_credential(b"x" * 40)])
def test_forged_tile_header_gets_an_ordinary_stored_result(server_process, chelsea_png: bytes,
                                                           forged: str) -> None:
    server = server_process()
    answer = server.post("/process", headers={TILE_HEADER: forged},
                         files={"image": ("c.png", chelsea_png, "image/png")},
                         data={"operation": "invert"})

    assert answer.status_code == 200, answer.text
    body = answer.json()
    result = server.storage_dir / "results" / body["key"]
    assert result.stat().st_size == body["bytes"], "the result was not stored"
    assert body["bytes"] < 0.9 * CHELSEA_RAW_BYTES, "answered as an uncompressed tile"
    download = requests.get(body["url"], timeout=10)
    assert download.status_code == 200 and download.content == result.read_bytes()
    # The same request without the header is answered from what was stored.
    again = process(server, chelsea_png)
    assert again.json()["cached"] is True and again.json()["bytes"] == body["bytes"]
    as_image = server.post("/process?response=image", headers={TILE_HEADER: forged},
                           files={"image": ("c.png", chelsea_png, "image/png")},
                           data={"operation": "invert"})
    assert as_image.content == result.read_bytes()
    assert as_image.headers["X-Cached"] == "true"


def test_tile_header_with_the_fleet_credential_is_internal(server_process,
                                                           chelsea_png: bytes) -> None:
    secret = f"{NEW_KEY},{OLD_KEY}"
    server = server_process(env={"IMAGEFLEET_LINK_SECRET": secret})
    for key in (NEW_KEY, OLD_KEY):  # a peer that has not rotated yet sends the old one
        tile = server.post("/process?response=image",
                           headers={TILE_HEADER: tile_credential(key.encode())},
                           files={"image": ("c.png", chelsea_png, "image/png")},
                           data={"operation": "invert", "format": "png"})
        assert tile.status_code == 200, tile.text
        assert len(tile.content) > CHELSEA_RAW_BYTES, "a tile is answered in uncompressed PNG"
        assert tile.headers["X-Cached"] == "false"
    assert stored_results(server) == set(), "tiles are intermediate: nothing is stored"


def test_tiles_between_peers_sharing_the_secret_are_internal(server_process,
                                                             chelsea_png: bytes) -> None:
    env = {"IMAGEFLEET_LINK_SECRET": NEW_KEY}
    peer = server_process(env=env)
    coordinator = server_process("--peers", peer.url, "--tile-mp", "0.05", "--tile-size",
                                 "128", env=env)
    answer = coordinator.post("/process", files={"image": ("c.png", chelsea_png, "image/png")},
                              data={"operation": "box_blur"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["tiles"] == 12
    assert peer.get("/health").json()["processed"] >= 12, "the peer did the tiles"
    assert stored_results(peer) == set(), "tiles are intermediate: nothing is stored"
    key = answer.json()["key"]
    assert stored_results(coordinator) == {key, key + ".meta.json"}
