"""How `python -m server` serves: one waitress process (the default, and the Windows
path) or, with ``--workers N``, gunicorn's arbiter with N threaded (gthread) workers.

gunicorn's arbiter is the process supervisor we would otherwise write ourselves: it binds
the socket once, forks the workers (each builds its own app, so each has its own
admission counts and processing slots), restarts a worker that dies, stops them on
SIGTERM with a graceful timeout (our drain timeout), and its workers exit when the
arbiter is gone (they check their parent every second).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any

from server.config import ServerConfig
from server.transport import JsonErrorChannel, unsent_bytes

log = logging.getLogger("imagefleet.server")

# Uploads are images of hundreds of KB to tens of MB: reading them 8 KB at a time
# (waitress's default) costs a Python-level loop turn per 8 KB.
RECV_BYTES = 256 * 1024
# Bodies up to this size are buffered in memory while they arrive; larger ones spool
# to a temporary file (waitress's default is 512 KB, less than many photographs,
# which then cost a file create, write and read-back each).
INBUF_OVERFLOW = 8 * 1024 * 1024
# Requests waitress may read ahead on one connection while one is served; above 0 it
# also keeps reading the socket, which is how a request learns its client has gone.
REQUEST_LOOKAHEAD = 1
LISTEN_BACKLOG = 1024


def _apply_opencv_threads(config: ServerConfig) -> None:
    if config.opencv_threads:
        import cv2

        cv2.setNumThreads(config.opencv_threads)  # process-wide, so set by the entry point


def serve_waitress(config: ServerConfig) -> int:
    """Serve in this process until SIGTERM/SIGINT; drain, then return 0."""
    from waitress import create_server

    from server.app import create_app, get_state

    app = create_app(config)
    _apply_opencv_threads(config)
    server = create_server(
        app, host=config.host, port=config.port, threads=config.threads,
        ident="imagefleet", max_request_body_size=config.max_bytes + 1024 * 1024,
        channel_timeout=120, connection_limit=1000, recv_bytes=RECV_BYTES,
        inbuf_overflow=INBUF_OVERFLOW, channel_request_lookahead=REQUEST_LOOKAHEAD,
        backlog=LISTEN_BACKLOG,
    )
    server.channel_class = JsonErrorChannel
    state = get_state(app)
    log.info("listening on http://%s:%s storage=%s instance=%s", config.host,
             server.effective_port, state.storage.describe(), config.instance_id)

    drained = threading.Event()
    received: list[str] = []

    def drain() -> None:
        state.draining.wait()
        log.info("signal %s: draining", received[0] if received else "?")
        deadline = time.monotonic() + config.drain_timeout
        idle = state.wait_idle(config.drain_timeout)
        # The app is done with every response; wait until waitress has also written
        # them to their sockets (polled: waitress offers no event for it).
        while unsent_bytes(server) and time.monotonic() < deadline:
            time.sleep(0.02)
        log.info("drained (%s); exiting", "idle" if idle else "timeout")
        drained.set()
        # A real signal interrupts waitress's select() at once; on_signal then stops it.
        os.kill(os.getpid(), signal.SIGINT)

    # Started now and woken by the handler, which only sets flags: a handler that
    # started a thread itself could be re-entered by the drain's own signal inside
    # Thread.start() and leave its locks broken.
    threading.Thread(target=drain, name="drain", daemon=True).start()

    def on_signal(signum: int, _frame: Any) -> None:
        if drained.is_set():
            raise KeyboardInterrupt
        if state.draining.is_set():
            os.write(2, b"second signal: exiting now\n")
            os._exit(1)
        received.append(signal.Signals(signum).name)
        state.draining.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def serve_gunicorn(config: ServerConfig, log_level: str) -> int:
    """Serve with gunicorn's arbiter and ``config.workers`` gthread workers."""
    if sys.platform == "win32":
        raise ValueError("--workers above 1 needs gunicorn, which does not run on Windows; "
                         "run one process per core on separate ports instead")
    from gunicorn.app.base import BaseApplication

    class Application(BaseApplication):
        def load_config(self) -> None:
            for key, value in gunicorn_options(config, log_level).items():
                self.cfg.set(key, value)

        def load(self):  # in each worker after the fork: its own app and counters
            from server.app import create_app

            _apply_opencv_threads(config)
            return create_app(config)

    log.info("listening on http://%s:%s storage=%s instance=%s workers=%d (gunicorn)",
             config.host, config.port, config.storage, config.instance_id, config.workers)
    Application().run()  # returns only by SystemExit from the arbiter
    return 0


def gunicorn_options(config: ServerConfig, log_level: str) -> dict[str, Any]:
    """Pure: our flags as gunicorn settings."""
    host = f"[{config.host}]" if ":" in config.host else config.host
    return {
        "bind": [f"{host}:{config.port}"],
        "workers": config.workers,
        "worker_class": "server.serving.DrainingThreadWorker",
        "threads": config.threads,
        "backlog": LISTEN_BACKLOG,
        # SIGTERM: workers stop accepting and finish in-flight requests for this long.
        "graceful_timeout": math.ceil(config.drain_timeout),
        # A gthread worker's main loop notifies the arbiter while its threads compute,
        # so long requests never trip this; it catches a wedged main loop.
        "timeout": 60,
        "keepalive": 75,
        "accesslog": None,  # our own JSON access lines
        "errorlog": "-",
        "loglevel": log_level.lower(),
        "proc_name": f"imagefleet-server {config.instance_id}",
        "worker_tmp_dir": "/dev/shm" if os.path.isdir("/dev/shm") else None,
    }


def _draining_worker_class():
    from gunicorn.workers.gthread import ThreadWorker

    class DrainingThreadWorker(ThreadWorker):
        """A gthread worker whose SIGTERM also marks the app draining, so requests still
        arriving on open connections see /health 503 and /process 503 draining."""

        def handle_exit(self, sig, frame) -> None:
            from server.app import get_state

            app = getattr(self, "wsgi", None)  # None if the signal beats the app's load
            if app is not None:
                get_state(app).draining.set()
            super().handle_exit(sig, frame)

    return DrainingThreadWorker


def __getattr__(name: str):
    # gunicorn imports the worker class by dotted name; building it lazily keeps
    # gunicorn (POSIX only) out of the default waitress path.
    if name == "DrainingThreadWorker":
        return _draining_worker_class()
    raise AttributeError(name)
