"""What kind of link a result has: the app labels loopback links "this computer only".

A link to 127.0.0.1, ::1 or localhost opens only on the machine that made it (the
embedded local fleet's folder storage); an S3 presigned link or a link to a real host
can be shared. Pure functions, no Tk import: the Process view, the History rows and the
Copy link message all use :func:`link_label`.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlparse

LOCAL_ONLY = "this computer only"


def is_loopback_link(url: str) -> bool:
    """True when ``url`` names a loopback host (127.0.0.0/8, ::1, localhost)."""
    try:
        host = urlparse(url.strip()).hostname
    except ValueError:
        return False
    if not host:
        return False
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def link_label(url: str) -> str:
    """A short note to show beside a link: LOCAL_ONLY for loopback links, else ''."""
    return LOCAL_ONLY if url and is_loopback_link(url) else ""
