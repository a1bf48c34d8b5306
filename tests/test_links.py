import pytest

from gui.links import LOCAL_ONLY, is_loopback_link, link_label


@pytest.mark.parametrize("url, loopback", [
    ("http://127.0.0.1:8765/results/abc.png?expires=1&signature=x", True),
    ("http://127.4.5.6/results/a.png", True),
    ("http://[::1]:8765/results/a.png", True),
    ("http://localhost:8765/results/a.png", True),
    ("http://LOCALHOST./r", True),
    ("https://bucket.s3.amazonaws.com/results/a.png?X-Amz-Signature=1", False),
    ("https://s3.eu-west-1.amazonaws.com/b/results/a.png", False),
    ("https://fleet.example.com/results/a.png", False),
    ("http://192.168.1.10:8000/results/a.png", False),
    ("http://128.0.0.1/x", False),
    ("", False),
    ("not a url", False),
    ("http://[::1/broken", False),
])
def test_is_loopback_link(url, loopback):
    assert is_loopback_link(url) is loopback
    assert link_label(url) == (LOCAL_ONLY if loopback else "")
