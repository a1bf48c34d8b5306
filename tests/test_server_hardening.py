"""Server hardening against the smaller holes: odd link parameters, PNG chunk floods,
damaged metadata, a full disk, the fleet's link secret and the internal tile header.

Every test runs against a real `python -m server` on loopback (and, for the secret, a
real local fleet); the full disk is a real tmpfs of a few MB.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
import requests

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
