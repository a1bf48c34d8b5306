"""The in-memory multipart parser against werkzeug's, which stays the reference: on
well-formed bodies the fast path must be taken and agree with werkzeug exactly; on
anything else the answer must be werkzeug's own."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.test import encode_multipart

from server.multipart import InMemoryFormDataParser, NotSimple, split_parts

MAX_PARTS = 20
MAX_FIELD = 100_000  # above werkzeug's 64 KB read size, as in production (500 KB)


def parse_with(parser_class, body: bytes, boundary: str):
    parser = parser_class(max_form_memory_size=MAX_FIELD, max_form_parts=MAX_PARTS,
                          silent=True)
    try:
        _, form, files = parser.parse(io.BytesIO(body), "multipart/form-data", len(body),
                                      {"boundary": boundary})
    except RequestEntityTooLarge:
        return "413"
    return (list(form.items(multi=True)),
            [(name, f.filename, f.content_type, f.read()) for name, f in files.items(multi=True)])


def assert_same_as_werkzeug(body: bytes, boundary: str):
    ours = parse_with(InMemoryFormDataParser, body, boundary)
    reference = parse_with(FormDataParser, body, boundary)
    assert ours == reference


def client_body(fields: list[tuple[str, str]], files: list[tuple[str, str, bytes]],
                boundary: str) -> bytes:
    """What aiohttp, requests and curl send: CRLF line breaks, no preamble."""
    out = io.BytesIO()
    for name, value in fields:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                  .encode())
        out.write(value.encode() + b"\r\n")
    for name, filename, data in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                  f'filename="{filename}"\r\nContent-Type: image/jpeg\r\n\r\n'.encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


names = st.text(st.characters(min_codepoint=48, max_codepoint=122,
                              blacklist_characters='"\\'), min_size=1, max_size=12)
values = st.text(max_size=60)
contents = st.binary(max_size=400) | st.sampled_from(
    [b"", b"\r\n", b"--", b"\r\n--x", b"\r\n\r\n", b"--BOUNDARY", b"\r\n--BOUNDARYX"])
boundaries = st.sampled_from(["BOUNDARY", "----WebKitFormBoundary7MA4YWxkTrZu0gW",
                              "a1b2c3d4e5f60718293a4b5c6d7e8f90", "x"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=st.lists(st.tuples(names, values), max_size=5),
       files=st.lists(st.tuples(names, names, contents), max_size=3), boundary=boundaries)
def test_client_bodies_take_the_fast_path_and_match_werkzeug(fields, files, boundary):
    body = client_body(fields, files, boundary)
    if any(boundary.encode() in part for part in [v.encode() for _, v in fields]
           + [data for _, _, data in files]):
        return  # a part containing the boundary is malformed by definition
    split_parts(body, boundary.encode(), max_parts=MAX_PARTS)  # no NotSimple
    assert_same_as_werkzeug(body, boundary)


@settings(max_examples=300, deadline=None)
@given(fields=st.lists(st.tuples(names, values), max_size=3),
       files=st.lists(st.tuples(names, names, contents), max_size=2), boundary=boundaries,
       cut=st.integers(min_value=0, max_value=10_000),
       edit=st.sampled_from(["truncate", "lf", "insert", "drop", "preamble", "fold"]),
       junk=st.binary(min_size=1, max_size=8))
def test_damaged_bodies_get_werkzeugs_answer(fields, files, boundary, cut, edit, junk):
    body = client_body(fields, files, boundary)
    at = cut % (len(body) + 1)
    damaged = {
        "truncate": body[:at],
        "lf": body.replace(b"\r\n", b"\n"),
        "insert": body[:at] + junk + body[at:],
        "drop": body[:at] + body[at + len(junk):],
        "preamble": b"preamble text\r\n" + body,
        "fold": body.replace(b"\r\nContent-Type:", b"\r\n\tContent-Type:"),
    }[edit]
    assert_same_as_werkzeug(damaged, boundary)


def test_werkzeug_encoder_bodies_match():
    boundary, body = encode_multipart({
        "operation": "gaussian_blur", "params": json.dumps({"ksize": 5}),
        "image": FileStorage(io.BytesIO(b"\xff\xd8jpeg\r\n--bytes\r\n"), "photo one.jpg",
                             content_type="image/jpeg"),
    })
    assert len(split_parts(body, boundary.encode())) == 3
    assert_same_as_werkzeug(body, boundary)


def test_quoted_and_extended_filenames():
    boundary = "b0undary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f"filename*=UTF-8''%C3%A9t%C3%A9.jpg\r\n\r\nabc\r\n"
            f'--{boundary}\r\nContent-Disposition: form-data; name="x"; '
            f'filename="a\\"b.png"\r\n\r\ndef\r\n--{boundary}--\r\n').encode()
    split_parts(body, boundary.encode())
    assert_same_as_werkzeug(body, boundary)
    assert parse_with(InMemoryFormDataParser, body, boundary)[1][0][1] == "été.jpg"


def test_limits_match_werkzeug():
    many = client_body([(f"f{i}", "v") for i in range(MAX_PARTS + 1)], [], "B")
    big_field = client_body([("steps", "x" * (MAX_FIELD + 1))], [], "B")
    big_file = client_body([], [("image", "a.jpg", b"x" * (MAX_FIELD * 10))], "B")
    assert parse_with(InMemoryFormDataParser, many, "B") == "413"
    assert parse_with(InMemoryFormDataParser, big_field, "B") == "413"
    for body in (many, big_field, big_file):
        assert_same_as_werkzeug(body, "B")


@pytest.mark.parametrize("body", [
    b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nno end",
    b"--B\r\n\r\nheaderless\r\n--B--\r\n",
    b"--B\r\nContent-Disposition: form-data\r\n\r\nnameless\r\n--B--\r\n",
    b"--B\r\nContent-Type: text/plain; charset=latin-1\r\nContent-Disposition: form-data; "
    b"name=\"a\"\r\n\r\n\xe9\r\n--B--\r\n",
    b"--Bjunk\r\n",
])
def test_unusual_shapes_fall_back(body):
    with pytest.raises(NotSimple):
        split_parts(body, b"B")
    assert_same_as_werkzeug(body, "B")


def test_non_ascii_or_missing_boundary_is_werkzeugs_error():
    body = client_body([("a", "b")], [], "B")
    for boundary in ("", "bé"):
        assert_same_as_werkzeug(body, boundary)


def test_the_bodies_our_clients_send_take_the_fast_path() -> None:
    """aiohttp (the desktop app, the command line) and requests: if either stopped being
    split directly, every upload would silently pay for werkzeug's parser again."""
    import asyncio

    import aiohttp
    import requests

    async def aiohttp_body() -> tuple[bytes, str]:
        form = aiohttp.FormData()
        form.add_field("image", b"\xff\xd8jpeg\r\n", filename="photo.jpg",
                       content_type="image/jpeg")
        form.add_field("steps", json.dumps([{"op": "invert"}]))
        payload = form()
        chunks: list[bytes] = []

        class Sink:
            async def write(self, data) -> None:
                chunks.append(bytes(data))

        await payload.write(Sink())
        return b"".join(chunks), payload.headers["Content-Type"]

    prepared = requests.Request("POST", "http://127.0.0.1/", data={"operation": "invert"},
                                files={"image": ("photo.jpg", b"\xff\xd8jpeg")}).prepare()
    for body, content_type in (asyncio.run(aiohttp_body()),
                               (prepared.body, prepared.headers["Content-Type"])):
        boundary = content_type.split("boundary=")[1].strip('"')
        parts = split_parts(body, boundary.encode())
        assert {(p.name, p.filename) for p in parts} >= {("image", "photo.jpg")}
        assert_same_as_werkzeug(body, boundary)
