"""One sentence for the user saying what went wrong and what to do about it."""

from __future__ import annotations


def describe_fleet_error(exc: BaseException, endpoint: str = "") -> str:
    """Like :func:`describe_error`, for the fleet's admin API (``/fleet``), whose token is
    the admin token: a 401 there says which setting to fix."""
    from gui import client as api

    if isinstance(exc, api.ServerError) and exc.status == 401:
        return (f"{endpoint or 'the endpoint'} refused /fleet: missing or wrong admin token "
                "(401). Set the admin token in Settings.")
    return describe_error(exc, endpoint)


def describe_error(exc: BaseException, endpoint: str = "") -> str:
    """One sentence for the UI saying what went wrong and what to do about it."""
    from gui import client as api

    where = endpoint or "the endpoint"
    if isinstance(exc, api.ServerError):
        if exc.status == 401:
            return (f"{where} refused the request: missing or wrong token (401). "
                    "Set the token in Settings.")
        if exc.status == 403:
            return f"Access denied (403): {exc.message}. The link may have expired."
        if exc.status == 413:
            return f"Too large for the server (413): {exc.message}"
        if exc.status == 415:
            return f"The server cannot read this image (415): {exc.message}"
        if exc.status == 404 and exc.code in ("http_404", "not_found"):
            return f"{where} does not offer this ({exc.message})"
        if exc.status in (502, 503, 504):
            return (f"No server could take the request ({exc.status}): {exc.message}. "
                    "The fleet may be starting or replacing instances; retry shortly.")
        return f"{exc.message} ({exc.status})"
    if isinstance(exc, api.ConnectError):
        return f"Cannot reach {where}: {exc}. Check the endpoint in Settings."
    if isinstance(exc, api.RequestTimeout):
        return f"{where} did not answer in time: {exc}"
    if isinstance(exc, api.TransportError):
        return f"Connection problem with {where}: {exc}"
    if isinstance(exc, api.InvalidResponse):
        return f"Unexpected answer from {where}: {exc}"
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    if isinstance(exc, api.ClientError | ValueError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def describe_os_error(exc: OSError, action: str = "") -> str:
    import errno

    target = f" {exc.filename}" if exc.filename else ""
    prefix = f"Could not {action}{target}" if action else f"Could not use{target}"
    if exc.errno == errno.ENOSPC:
        return f"Disk full: {prefix.lower()[0] + prefix[1:]}. Free some space and try again."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{prefix}: permission denied. Choose another folder."
    return f"{prefix}: {exc.strerror or exc}"
