"""Wide-gamut test material made here, not downloaded: ICC profiles for Display P3 and
Adobe RGB (1998) written from their published primaries, a reference conversion to sRGB
in numpy (independent of littlecms), and CIEDE2000.

A matrix/TRC ("matrix-shaper") display profile is what phones and cameras embed:
colorants (the primaries' XYZ, adapted to the D50 connection space with Bradford),
one tone curve per channel, a white point.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

D65 = np.array([0.95047, 1.0, 1.08883])
D50 = np.array([0.96422, 1.0, 0.82521])
BRADFORD = np.array([[0.8951, 0.2664, -0.1614],
                     [-0.7502, 1.7135, 0.0367],
                     [0.0389, -0.0685, 1.0296]])


@dataclass(frozen=True)
class RGBSpace:
    name: str
    primaries: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    gamma: float | None  # a pure power law; None: the sRGB curve

    def to_linear(self, v: np.ndarray) -> np.ndarray:
        if self.gamma is not None:
            return np.power(v, self.gamma)
        return srgb_to_linear(v)

    def matrix(self) -> np.ndarray:
        """Linear RGB → XYZ (D65 white)."""
        return rgb_to_xyz_matrix(self.primaries, D65)


SRGB = RGBSpace("sRGB", ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06)), None)
DISPLAY_P3 = RGBSpace("Display P3", ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060)), None)
# Adobe RGB (1998) specification: gamma 563/256 (2.19921875), D65 white.
ADOBE_RGB = RGBSpace("Adobe RGB (1998)", ((0.64, 0.33), (0.21, 0.71), (0.15, 0.06)), 563 / 256)


def rgb_to_xyz_matrix(primaries, white: np.ndarray) -> np.ndarray:
    xyz = np.array([[x / y, 1.0, (1 - x - y) / y] for x, y in primaries]).T
    scale = np.linalg.solve(xyz, white)
    return xyz * scale


def bradford(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    cone_src, cone_dst = BRADFORD @ src, BRADFORD @ dst
    return np.linalg.inv(BRADFORD) @ np.diag(cone_dst / cone_src) @ BRADFORD


def srgb_to_linear(v: np.ndarray) -> np.ndarray:
    return np.where(v <= 0.04045, v / 12.92, np.power((v + 0.055) / 1.055, 2.4))


def linear_to_srgb(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.0, 1.0)
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * np.power(v, 1 / 2.4) - 0.055)


# --------------------------------------------------------------------------- ICC bytes


def _s15f16(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz_tag(xyz) -> bytes:
    return b"XYZ " + b"\0" * 4 + b"".join(_s15f16(v) for v in xyz)


def _curve_tag(space: RGBSpace) -> bytes:
    if space.gamma is not None:  # one entry: the gamma as u8Fixed8
        return b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(space.gamma * 256)) + b"\0\0"
    points = space.to_linear(np.linspace(0.0, 1.0, 1024))
    table = np.round(points * 65535).astype(">u2").tobytes()
    return b"curv" + b"\0" * 4 + struct.pack(">I", 1024) + table


def _desc_tag(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    return (b"desc" + b"\0" * 4 + struct.pack(">I", len(ascii_text)) + ascii_text
            + struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + b"\0" * 67)


def _text_tag(text: str) -> bytes:
    return b"text" + b"\0" * 4 + text.encode("ascii") + b"\0"


def _sf32_tag(matrix: np.ndarray) -> bytes:
    return b"sf32" + b"\0" * 4 + b"".join(_s15f16(v) for v in matrix.flatten())


def icc_profile(space: RGBSpace) -> bytes:
    """An ICC v2.1 RGB display profile (matrix/TRC) for ``space``."""
    adapt = bradford(D65, D50)
    colorants = adapt @ space.matrix()  # columns: R, G, B in the D50 connection space
    curve = _curve_tag(space)
    tags = [
        (b"desc", _desc_tag(space.name)),
        (b"cprt", _text_tag("No copyright, made by the ImageFleet tests")),
        (b"wtpt", _xyz_tag(D50)),
        (b"chad", _sf32_tag(adapt)),
        (b"rXYZ", _xyz_tag(colorants[:, 0])),
        (b"gXYZ", _xyz_tag(colorants[:, 1])),
        (b"bXYZ", _xyz_tag(colorants[:, 2])),
        (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = [], b""
    shared: dict[bytes, int] = {}
    for signature, body in tags:
        if body in shared:  # the three curves share one copy, as real profiles do
            table.append(struct.pack(">4sII", signature, shared[body], len(body)))
            continue
        while (offset + len(data)) % 4:
            data += b"\0"
        shared[body] = offset + len(data)
        table.append(struct.pack(">4sII", signature, offset + len(data), len(body)))
        data += body
    body = struct.pack(">I", len(tags)) + b"".join(table) + data
    size = 128 + len(body)
    header = (struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000)
              + b"mntr" + b"RGB " + b"XYZ " + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
              + b"acsp" + b"\0" * 4 + b"\0" * 4 + b"\0" * 8 + b"\0" * 8 + struct.pack(">I", 0)
              + b"".join(_s15f16(v) for v in D50) + b"\0" * 4 + b"\0" * 16 + b"\0" * 28)
    assert len(header) == 128
    return header + body


# --------------------------------------------------------------------------- reference


def reference_to_srgb(rgb: np.ndarray, space: RGBSpace) -> np.ndarray:
    """uint8 RGB pixels in ``space`` → float sRGB in [0, 1] (clipped: what relative
    colorimetric does to colours outside sRGB)."""
    linear = space.to_linear(rgb.astype(np.float64) / 255.0)
    to_srgb = np.linalg.inv(SRGB.matrix()) @ space.matrix()
    return linear_to_srgb(linear @ to_srgb.T)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] → CIELAB (D65)."""
    xyz = srgb_to_linear(rgb) @ SRGB.matrix().T / D65
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


def ciede2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference (Sharma, Wu and Dalal 2005), elementwise."""
    L1, a1, b1 = np.moveaxis(lab1, -1, 0)
    L2, a2, b2 = np.moveaxis(lab2, -1, 0)
    c_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_mean**7 / (c_mean**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    dl, dc = L2 - L1, c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(c1p * c2p == 0, 0, dh)
    dH = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    l_mean, cp_mean = (L1 + L2) / 2, (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_mean = np.where(np.abs(h1p - h2p) > 180,
                      np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2), h_sum / 2)
    h_mean = np.where(c1p * c2p == 0, h_sum, h_mean)
    t = (1 - 0.17 * np.cos(np.radians(h_mean - 30)) + 0.24 * np.cos(np.radians(2 * h_mean))
         + 0.32 * np.cos(np.radians(3 * h_mean + 6)) - 0.20 * np.cos(np.radians(4 * h_mean - 63)))
    d_theta = 30 * np.exp(-(((h_mean - 275) / 25) ** 2))
    r_c = 2 * np.sqrt(cp_mean**7 / (cp_mean**7 + 25.0**7))
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / np.sqrt(20 + (l_mean - 50) ** 2)
    s_c, s_h = 1 + 0.045 * cp_mean, 1 + 0.015 * cp_mean * t
    r_t = -np.sin(np.radians(2 * d_theta)) * r_c
    return np.sqrt((dl / s_l) ** 2 + (dc / s_c) ** 2 + (dH / s_h) ** 2
                   + r_t * (dc / s_c) * (dH / s_h))
