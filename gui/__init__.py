"""ImageFleet desktop app and its API client.

Kept import-light on purpose: ``gui.client`` is also used by the command-line
scripts, so nothing here may import Tk at module level.
"""
