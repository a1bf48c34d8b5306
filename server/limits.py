"""Facts the server, the fleet, the app and the command line share, written once.

No heavy import here (no Flask, OpenCV or boto3): the desktop app and the command line
import it on their start-up paths.
"""

from __future__ import annotations

# SigV4 presigned URLs cannot outlive 7 days, so no link of ours (S3 or signed folder
# links) does either: the server caps ``expires_in``, the app and the command line refuse
# longer lifetimes before uploading.
MAX_LINK_SECONDS = 7 * 24 * 3600

# The file suffixes taken as images when a folder is listed (app and command line): the
# formats the server decodes (``server.codecs.ALLOWED_INPUTS``). A file's header decides
# in the end; the suffix only keeps a folder's other files out of the list.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".avif", ".heic", ".heif",
                            ".bmp", ".tif", ".tiff", ".gif"})
