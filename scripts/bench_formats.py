"""What the formats, colour and metadata options cost, in process (no HTTP).

    python scripts/bench_formats.py [--repeat 5]

For a 12 MP photograph (derived from the test photographs) it prints the median ms of:
- encoding as JPEG, JPEG progressive, JPEG 4:4:4, WebP, WebP lossless, and AVIF at
  libavif speeds 6 (Pillow's default) and 8 (the server's), with the bytes;
- decoding HEIC and AVIF (Pillow / pillow-heif) against JPEG;
- the ICC stage: an untagged image, an sRGB-tagged one (no work) and a Display P3 one
  (a littlecms transform);
- writing ICC + EXIF + XMP into a JPEG against writing none.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import cv2
from helpers_icc import DISPLAY_P3, icc_profile
from PIL import Image, ImageCms

from scripts.benchlib import derived
from server import codecs, colour
from server.metadata import Embedded
from server.output_options import OutputOptions


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    image = derived(4000, 3000)
    rgb = Image.fromarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    print("| encode (12 MP) | ms | KB |\n|---|---:|---:|")
    cases = {
        "jpeg q90": ("jpeg", OutputOptions()),
        "jpeg q90 progressive": ("jpeg", OutputOptions(progressive=True)),
        "jpeg q90 4:4:4": ("jpeg", OutputOptions(subsampling="4:4:4")),
        "webp q90": ("webp", OutputOptions()),
        "webp lossless": ("webp", OutputOptions(lossless=True)),
    }
    for label, (fmt, opts) in cases.items():
        data = codecs.encode(image, fmt, opts)
        ms = median_ms(lambda f=fmt, o=opts: codecs.encode(image, f, o), args.repeat)
        print(f"| {label} | {ms:.0f} | {len(data) / 1024:.0f} |")
    for speed in (6, 8):
        out = io.BytesIO()

        def avif(s: int = speed, buffer: io.BytesIO = out) -> None:
            buffer.seek(0)
            buffer.truncate()
            rgb.save(buffer, "AVIF", quality=75, speed=s)

        ms = median_ms(avif, max(1, args.repeat // 2))
        print(f"| avif q75 speed {speed} | {ms:.0f} | {len(out.getvalue()) / 1024:.0f} |")

    print("\n| decode (12 MP) | ms |\n|---|---:|")
    for label, fmt, extra in (("jpeg", "JPEG", {"quality": 90}), ("heic", "HEIF", {"quality": 80}),
                              ("avif", "AVIF", {"quality": 75, "speed": 8})):
        buffer = io.BytesIO()
        rgb.save(buffer, fmt, **extra)
        data = buffer.getvalue()
        info = codecs.probe(data, 10**9)
        ms = median_ms(lambda d=data, i=info: codecs.decode(d, i), args.repeat)
        print(f"| {label} | {ms:.0f} |")

    print("\n| ICC stage (12 MP) | ms |\n|---|---:|")
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for label, profile in (("no profile", None), ("sRGB profile", srgb),
                           ("Display P3 -> sRGB", icc_profile(DISPLAY_P3))):
        ms = median_ms(lambda p=profile: colour.apply_policy(image, p, "srgb"), args.repeat)
        print(f"| {label} | {ms:.1f} |")

    exif = Image.Exif()
    exif[0x8298] = "(c) bench"
    blocks = Embedded(icc_profile(DISPLAY_P3), exif.tobytes()[6:], b"<x:xmpmeta/>")
    plain = median_ms(lambda: codecs.encode(image, "jpeg", OutputOptions()), args.repeat)
    tagged = median_ms(lambda: codecs.encode(image, "jpeg", OutputOptions(), blocks),
                       args.repeat)
    print(f"\n| JPEG encode, no blocks vs ICC+EXIF+XMP | {plain:.0f} ms | {tagged:.0f} ms |")


if __name__ == "__main__":
    main()
