"""ImageFleet processing server: a Flask app factory over a pure operations core.

The exports are loaded on first use (PEP 562), so that a module with no Flask or OpenCV
in it, such as :mod:`server.tokens`, can be imported on its own: the fleet manager reads
its admin token with it and its venv has neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.app import create_app
    from server.config import ServerConfig
    from server.version import __version__

__all__ = ["ServerConfig", "__version__", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from server.app import create_app
        return create_app
    if name == "ServerConfig":
        from server.config import ServerConfig
        return ServerConfig
    if name == "__version__":
        from server.version import __version__
        return __version__
    raise AttributeError(f"module 'server' has no attribute {name!r}")
