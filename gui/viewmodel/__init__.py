"""Pure logic behind the desktop app's views, one module per subject: no Tk, no network, no threads.

- parameter schema (``/operations``) → control specs, and control values → typed params;
- the state of a batch of images and its progress arithmetic;
- the process request (single operation or a pipeline of steps);
- fleet table rows, totals and event lines;
- small formatting helpers (expiry, elapsed time, error messages, pasted paths).

The views own the widgets; everything that can be decided without them is decided here
so it can be tested without a display.
"""
