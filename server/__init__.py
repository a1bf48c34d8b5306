"""ImageFleet processing server: a Flask app factory over a pure operations core."""

from server.app import create_app
from server.config import ServerConfig
from server.version import __version__

__all__ = ["ServerConfig", "__version__", "create_app"]
