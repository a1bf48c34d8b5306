"""``python -m gui [--endpoint URL] [FILES_OR_FOLDERS...]``: start the ImageFleet desktop
app, with those images listed ("Open with" and scripts).

With no endpoint (flag, ``IMAGEFLEET_ENDPOINT`` or the settings file) it starts an
embedded local fleet as a child process. Exits 2 with advice when there is no display.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

NO_DISPLAY_EXIT = 2
USAGE_EXIT = 2  # as argparse exits for a bad command line

NO_DISPLAY_MESSAGE = """\
imagefleet: no display available ({reason}).
The desktop app needs a graphical display. To work without one:
  - process images from the command line:
        python -m scripts.process --endpoint URL --op NAME [--param k=v ...] FILES...
  - or run the app on a virtual display:
        xvfb-run python -m gui"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gui",
        description="ImageFleet desktop app. Without an endpoint it runs a local fleet.")
    parser.add_argument("--endpoint", metavar="URL",
                        help="load balancer or server URL (default: IMAGEFLEET_ENDPOINT, then "
                             "the settings, else an embedded local fleet)")
    parser.add_argument("--admin-endpoint", metavar="URL",
                        help="where the fleet's /fleet API is served when it is not the "
                             "endpoint, e.g. 'python -m fleet run' for an AWS fleet "
                             "(default: IMAGEFLEET_ADMIN_ENDPOINT, then the settings)")
    parser.add_argument("paths", nargs="*", metavar="FILES_OR_FOLDERS",
                        help="images, or folders of images, to list at start")
    parser.add_argument("--log-level", default=os.environ.get("IMAGEFLEET_LOG_LEVEL", "WARNING"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def display_problem(environ: dict[str, str] | os._Environ[str]) -> str | None:
    """Why no window can open, or None. Only X11/Wayland systems need a display variable."""
    if sys.platform.startswith(("linux", "freebsd", "openbsd")) and not (
            environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY")):
        return "DISPLAY is not set"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from gui.settings import validate_endpoint

    for flag, value in (("--endpoint", args.endpoint), ("--admin-endpoint", args.admin_endpoint)):
        problem = validate_endpoint(value or "")
        if problem:
            print(f"imagefleet: {flag}: {problem}", file=sys.stderr)
            return USAGE_EXIT
    reason = display_problem(os.environ)
    if reason is None:
        import tkinter

        from gui.app import ImageFleetApp

        try:
            app = ImageFleetApp(args.endpoint, admin_endpoint=args.admin_endpoint,
                                open_paths=args.paths)
        except tkinter.TclError as exc:
            reason = str(exc)
        else:
            # SIGTERM (a logout, `kill`) closes like the window's close button, so the
            # embedded fleet is stopped in order too (SIGKILL cannot be caught: then the
            # fleet sees its stdin pipe close and stops by itself)
            signal.signal(signal.SIGTERM, lambda *_: app.after_idle(app.close))
            try:
                app.mainloop()
            except KeyboardInterrupt:
                pass
            finally:
                app.close()
            return 0
    print(NO_DISPLAY_MESSAGE.format(reason=reason), file=sys.stderr)
    return NO_DISPLAY_EXIT


if __name__ == "__main__":
    sys.exit(main())
