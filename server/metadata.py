"""EXIF and XMP of a result, by policy: ``strip`` (none), ``keep-no-location`` (all but
where the photograph was taken), ``keep`` (all).

Pure functions from the input's blocks to the output's. In both keeping policies the
orientation is set to 1 (the pixels were turned upright when decoded), the EXIF
pixel dimensions are the result's, and the EXIF thumbnail is dropped: it shows the
original picture, which a processed result (a blurred face, a crop) must not leak.
A block that cannot be parsed is left out, never copied blind: nothing then proves
that it holds no location.
"""

from __future__ import annotations

import io
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from PIL import ExifTags
from PIL import Image as PILImage

log = logging.getLogger(__name__)

ORIENTATION = 0x0112
COLOR_SPACE = 0xA001  # in the Exif IFD: 1 = sRGB
PIXEL_X, PIXEL_Y = 0xA002, 0xA003
EXIF_IFD, GPS_IFD, INTEROP_IFD = ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo, ExifTags.IFD.Interop
# Past this the blocks cannot be carried in one JPEG APP1 segment; real ones are a few KB.
MAX_BLOCK = 65_000

# XMP properties that say where: (namespace, local name or a prefix ending in "*").
XMP_LOCATION = (
    ("http://ns.adobe.com/exif/1.0/", "GPS*"),
    ("http://ns.adobe.com/photoshop/1.0/", "City"),
    ("http://ns.adobe.com/photoshop/1.0/", "State"),
    ("http://ns.adobe.com/photoshop/1.0/", "Country"),
    ("http://iptc.org/std/Iptc4xmpCore/1.0/xmlns/", "Location"),
    ("http://iptc.org/std/Iptc4xmpCore/1.0/xmlns/", "CountryCode"),
    ("http://iptc.org/std/Iptc4xmpExt/2008-02-29/", "LocationCreated"),
    ("http://iptc.org/std/Iptc4xmpExt/2008-02-29/", "LocationShown"),
)
XMP_ORIENTATION = "{http://ns.adobe.com/tiff/1.0/}Orientation"
XPACKET_BEGIN = b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>'
XPACKET_END = b'<?xpacket end="w"?>'


@dataclass(frozen=True)
class Embedded:
    """The blocks an image carries beside its pixels. ``exif`` is TIFF data (no
    ``Exif\\0\\0`` prefix), ``xmp`` an XML packet, ``icc`` a profile."""

    icc: bytes | None = None
    exif: bytes | None = None
    xmp: bytes | None = None

    def __bool__(self) -> bool:
        return bool(self.icc or self.exif or self.xmp)


NO_BLOCKS = Embedded()  # frozen: one shared "nothing to write"


def read_embedded(img: PILImage.Image) -> Embedded:
    """The blocks Pillow found while reading the header (no pixels decoded)."""
    info = img.info
    icc = info.get("icc_profile") or None
    exif = info.get("exif") or None
    if isinstance(exif, bytes) and exif.startswith(b"Exif\x00\x00"):
        exif = exif[6:]
    xmp = info.get("xmp") or info.get("XML:com.adobe.xmp") or None
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    return Embedded(icc if isinstance(icc, bytes) else None,
                    exif if isinstance(exif, bytes) else None,
                    xmp if isinstance(xmp, bytes) else None)


def for_output(embedded: Embedded, policy: str, icc: bytes | None, width: int, height: int,
               ) -> Embedded:
    """What the result carries: ``icc`` as the colour stage decided, EXIF and XMP by
    ``policy``."""
    if policy == "strip" or not (embedded.exif or embedded.xmp):
        return Embedded(icc)
    keep_location = policy == "keep"
    exif = _exif(embedded.exif, keep_location, width, height, srgb=icc is None) \
        if embedded.exif else None
    xmp = _xmp(embedded.xmp, keep_location) if embedded.xmp else None
    return Embedded(icc, exif, xmp)


def _exif(raw: bytes, keep_location: bool, width: int, height: int, *, srgb: bool
          ) -> bytes | None:
    """A fresh EXIF block from the input's: IFD0 and the Exif IFD (with Interop), GPS
    only when location is kept, no thumbnail IFD."""
    try:
        source = PILImage.Exif()
        source.load(raw)
        out = PILImage.Exif()
        for tag, value in source.items():
            if tag not in (EXIF_IFD, GPS_IFD):
                out[tag] = value
        out[ORIENTATION] = 1
        exif_ifd: dict[int, Any] = dict(source.get_ifd(EXIF_IFD))
        if exif_ifd or srgb:
            interop = source.get_ifd(INTEROP_IFD) if exif_ifd.pop(INTEROP_IFD, None) else {}
            if interop:
                exif_ifd[INTEROP_IFD] = dict(interop)
            exif_ifd[PIXEL_X], exif_ifd[PIXEL_Y] = width, height
            if srgb:
                exif_ifd[COLOR_SPACE] = 1
            out[EXIF_IFD] = exif_ifd
        if keep_location:
            gps = dict(source.get_ifd(GPS_IFD))
            if gps:
                out[GPS_IFD] = gps
        data = out.tobytes()[6:]
    except Exception as exc:  # noqa: BLE001 - any damage in a metadata block drops the block
        log.info("leaving out an EXIF block that cannot be rewritten: %s", exc)
        return None
    if len(data) > MAX_BLOCK:
        log.info("leaving out an EXIF block of %d bytes (at most %d)", len(data), MAX_BLOCK)
        return None
    return data


def _is_location(tag: str) -> bool:
    if not tag.startswith("{"):
        return False
    namespace, _, local = tag[1:].partition("}")
    for ns, name in XMP_LOCATION:
        if ns == namespace and (local == name or
                                (name.endswith("*") and local.startswith(name[:-1]))):
            return True
    return False


def _xmp(raw: bytes, keep_location: bool) -> bytes | None:
    """The packet with its orientation set to 1 and, unless kept, its location
    properties (as elements or as attributes) removed."""
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw or len(raw) > MAX_BLOCK:
        log.info("leaving out an XMP packet with a DTD or of %d bytes", len(raw))
        return None  # XMP never has a DTD; entities are how XML bombs work
    try:
        start, end = raw.find(b"<x:xmpmeta"), raw.rfind(b"</x:xmpmeta>")
        body = raw[start:end + len(b"</x:xmpmeta>")] if 0 <= start < end else raw
        root = ET.fromstring(body)
        prefixes = _prefixes(body)
    except ET.ParseError as exc:
        log.info("leaving out an XMP packet that does not parse: %s", exc)
        return None
    for element in root.iter():
        for name in [n for n in element.attrib if n == XMP_ORIENTATION]:
            element.attrib[name] = "1"
        if not keep_location:
            for name in [n for n in element.attrib if _is_location(n)]:
                del element.attrib[name]
        for child in list(element):
            if child.tag == XMP_ORIENTATION:
                child.text = "1"
                for grandchild in list(child):
                    child.remove(grandchild)
            elif not keep_location and _is_location(child.tag):
                element.remove(child)
    if prefixes is None:  # ElementTree's own prefixes (ns0, ...): the same properties
        text = ET.tostring(root, encoding="unicode")
    else:
        declarations = "".join(f' xmlns:{prefix}="{escape(uri)}"' if prefix
                               else f' xmlns="{escape(uri)}"' for uri, prefix in prefixes.items())
        text = _serialize(root, prefixes, declarations)
    return XPACKET_BEGIN + text.encode("utf-8") + XPACKET_END


XML_NS = "http://www.w3.org/XML/1998/namespace"


def _prefixes(body: bytes) -> dict[str, str] | None:
    """Namespace URI → the prefix the packet used, when each is bound once (so the
    output reads as the input did: ``x:xmpmeta``, ``dc:rights``); None otherwise."""
    found: dict[str, str] = {}
    for _, (prefix, uri) in ET.iterparse(io.BytesIO(body), events=("start-ns",)):
        if found.get(uri, prefix) != prefix or (prefix in found.values()
                                                 and found.get(uri) != prefix):
            return None
        found[uri] = prefix
    return found


def _name(tag: str, prefixes: dict[str, str]) -> str:
    if not tag.startswith("{"):
        return tag
    uri, _, local = tag[1:].partition("}")
    if uri == XML_NS:
        return f"xml:{local}"
    prefix = prefixes[uri]
    return f"{prefix}:{local}" if prefix else local


def _serialize(element: ET.Element, prefixes: dict[str, str], declarations: str = "") -> str:
    name = _name(element.tag, prefixes)
    attributes = "".join(f' {_name(k, prefixes)}="{escape(v, {chr(34): "&quot;"})}"'
                         for k, v in element.attrib.items())
    inner = escape(element.text or "") + "".join(
        _serialize(child, prefixes) + escape(child.tail or "") for child in element)
    return f"<{name}{declarations}{attributes}>{inner}</{name}>"
