"""The single image reader used by training, evaluation, prediction and the server.

Every image, whatever its container, comes out as a float32 ``H x W`` grey array
in ``[0, 1]`` where bright means dense (bone), so the rest of the tool never has
to care about file formats. Bad input raises :class:`ImageReadError` with a
one-line reason instead of whatever PIL or pydicom happened to throw.

The container is sniffed from the content, never the file name; PIL formats are
decoded here, DICOM in :mod:`cxrnn.data.dicom`, and the errors and size limits
every decoder shares are in :mod:`cxrnn.data.errors`.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cxrnn.data import errors as _errors
from cxrnn.data.dicom import (
    ACQUISITION_POLICIES,
    DICOM_MAGIC_OFFSET,
    AcquisitionPolicy,
    check_policy,
    dicom_size,
    has_dicom_preamble,
    read_dicom,
)
from cxrnn.data.errors import (
    BLANK_REASON,
    MAX_FILE_BYTES,
    MAX_PIXELS,
    MIN_SIDE,
    ImageReadError,
    as_read_error,
    check_size,
    minmax_unit,
    not_regular_reason,
    one_line,
    os_error_reason,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MIN_SIDE",
    "MAX_PIXELS",
    "MAX_FILE_BYTES",
    "ImageReadError",
    "ACQUISITION_POLICIES",
    "AcquisitionPolicy",
    "CheckedImage",
    "check_regular_file",
    "header_size",
    "as_read_error",
    "os_error_reason",
    "read_image",
    "read_image_checked",
    "is_image_file",
    "sniff_format",
    "to_uint8",
    "reference_radiograph",
]

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
)

# Name of the PIL plugin to try for each sniffed format; restricting Image.open
# to it means the content decides the decoder, never the file name.
_PIL_FORMATS = {
    "png": "PNG",
    "jpeg": "JPEG",
    "bmp": "BMP",
    "tiff": "TIFF",
    "gif": "GIF",
    "webp": "WEBP",
}


def sniff_format(data: bytes) -> str | None:
    """Identify an image container from its leading bytes, or None."""
    head = bytes(data[:140])
    # DICOM first: the 128-byte preamble is free-form and some modalities put
    # a TIFF header there (pydicom-data's RG1_UNCR.dcm starts with "II*\0"),
    # so a file can carry both signatures and the DICOM one is authoritative.
    if has_dicom_preamble(head):
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if _looks_like_bare_dicom(head):
        return "dicom"
    return None


def _looks_like_bare_dicom(head: bytes) -> bool:
    # Old/ACR-NEMA style files lack the 128-byte preamble and start straight
    # with a little-endian tag from group 0x0002 or 0x0008; an explicit-VR
    # element then carries two upper-case VR letters. Requiring the VR keeps
    # random binary from being misread as DICOM.
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00") or head[3] != 0:
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    # Implicit VR: 4-byte length that must be small and even for these groups.
    length = int.from_bytes(head[4:8], "little")
    return 0 < length < 1024 and length % 2 == 0


def _has_numeric_suffix(path: Path) -> bool:
    # DICOM exports are often named by UID ("1.2.840.113619.2.55.3.4"), which
    # makes Path.suffix a run of digits rather than a real extension.
    return path.suffix[1:].isdigit()


def is_image_file(path: Path) -> bool:
    """Cheap check for folder listings: a known suffix, or a DICOM file without one."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix and not _has_numeric_suffix(path):
        return False
    try:
        # Sniffing opens the file: a FIFO would block here forever.
        head = _read_regular(path, path, DICOM_MAGIC_OFFSET + 4, enforce_cap=False)
    except ImageReadError:
        return False
    return has_dicom_preamble(head)


def check_regular_file(path: str | Path, label: str | Path | None = None) -> os.stat_result:
    """The stat of ``path`` if it is a regular file within MAX_FILE_BYTES, else ImageReadError.

    Anything that opens user-named files should call this first: opening a FIFO
    blocks forever and a device such as /dev/zero never ends.
    """
    path = Path(path)
    return _stat_checked(path, Path(label) if label is not None else path, enforce_cap=True)


def _stat_checked(path: Path, label: Path, enforce_cap: bool) -> os.stat_result:
    try:
        st = os.stat(path)  # follows links: a link to /dev/zero is a device
    except OSError as exc:
        raise ImageReadError(label, os_error_reason(exc, path)) from None
    _check_stat(st, label, enforce_cap)
    return st


def _check_stat(st: os.stat_result, label: Path, enforce_cap: bool) -> None:
    reason = not_regular_reason(st)
    if reason is not None:
        raise ImageReadError(label, reason)
    # Looked up at call time so tests and callers can lower the cap.
    if enforce_cap and st.st_size > _errors.MAX_FILE_BYTES:
        raise ImageReadError(label, _errors.too_large_file_reason(st.st_size))


def _read_regular(path: Path, label: Path, limit: int, enforce_cap: bool = True) -> bytes:
    """At most ``limit`` bytes of a regular file, without ever blocking on a FIFO."""
    _stat_checked(path, label, enforce_cap)
    # O_NONBLOCK: if the path was swapped for a FIFO after the stat, open()
    # returns at once instead of waiting for a writer, and fstat catches it.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ImageReadError(label, os_error_reason(exc, path)) from None
    try:
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        try:
            _check_stat(os.fstat(fh.fileno()), label, enforce_cap)
            return fh.read(limit)
        except OSError as exc:
            raise ImageReadError(label, os_error_reason(exc, path)) from None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the image :func:`read_image` would decode, from the header alone.

    For a multi-frame DICOM this is one frame (only the first is decoded). None
    when the content is not an image or its header cannot be read; read_image
    then gives the reason. Unlike PIL's own check, a huge size is reported as
    it is, so a size limit can name the real pixel count.
    """
    try:
        fmt = sniff_format(data)
        if fmt is None:
            return None
        if fmt == "dicom":
            return dicom_size(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = _open_pil(data, fmt)
        try:
            return int(im.size[0]), int(im.size[1])
        finally:
            im.close()
    except Exception:  # the full reader gives the precise reason
        return None


class CheckedImage(NamedTuple):
    """An image as :func:`read_image` returns it, with the warnings to show next to its diagnosis."""

    image: np.ndarray
    warnings: list[str]


def read_image(source: str | Path | bytes, name: str | None = None, *,
               acquisition: AcquisitionPolicy = "refuse") -> np.ndarray:
    """Read a radiograph as a float32 ``H x W`` array in ``[0, 1]`` (bright = dense).

    ``source`` is a path or the raw file bytes (e.g. an HTTP upload); ``name``
    labels the bytes in error messages. The format is sniffed from the content.
    A DICOM object that is not a chest radiograph (see
    :func:`cxrnn.data.dicom.acquisition_findings`) is refused with the reason;
    ``acquisition="flag"`` decodes it anyway. Either way its warnings are
    dropped here: a caller that reports a diagnosis uses :func:`read_image_checked`.
    """
    return read_image_checked(source, name, acquisition=acquisition).image


def read_image_checked(source: str | Path | bytes, name: str | None = None, *,
                       acquisition: AcquisitionPolicy = "refuse") -> CheckedImage:
    """:func:`read_image`, with the warnings that must reach whoever sees the image's diagnosis.

    Under ``acquisition="refuse"`` (the default) a DICOM object whose Modality is not CR/DX/DR or whose
    BodyPartExamined is not chest raises ImageReadError with that reason, and only doubts (a lateral
    view, no Modality) come back as warnings; under ``"flag"`` it is decoded and every reason is a
    warning. PNG, JPEG and the other PIL formats carry no such header: no warnings.
    """
    check_policy(acquisition)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = Path(name) if name else Path("<bytes>")
        data = bytes(source)
        if len(data) > _errors.MAX_FILE_BYTES:
            raise ImageReadError(label, _errors.too_large_file_reason(len(data)))
    else:
        label = Path(name) if name else Path(source)
        data = _read_bytes(Path(source), label)

    if not data:
        raise ImageReadError(label, "empty file (0 bytes)")

    fmt = sniff_format(data)
    if fmt is None:
        raise ImageReadError(label, "not an image (unrecognised content)")
    notes: list[str] = []
    try:
        # errstate: overflow in a hostile file's scaling must become one
        # reason, not a stream of numpy RuntimeWarnings.
        with np.errstate(all="ignore"):
            if fmt == "dicom":
                img, notes = read_dicom(data, label, acquisition)
            else:
                img = _read_pil(data, fmt, label)
            img = np.ascontiguousarray(img, dtype=np.float32)
            _check_pixels(img, label)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(label, "not enough memory to decode this image") from None
    except Exception as exc:
        # The decoders catch what they expect; anything else a library throws
        # on hostile bytes is still this file's problem, not the batch's.
        raise ImageReadError(
            label, f"cannot decode {fmt.upper()} image ({type(exc).__name__}: {one_line(exc)})"
        ) from None
    return CheckedImage(img, notes)


def _check_pixels(img: np.ndarray, label: Path) -> None:
    # One rule for every container: a DICOM, PNG or JPEG with no contrast
    # carries no picture to diagnose, so none of them may reach a model.
    if img.size == 0:
        raise ImageReadError(label, "unreadable image (no pixels)")
    lo, hi = float(img.min()), float(img.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ImageReadError(label, "invalid pixel values (NaN or infinity)")
    if lo == hi:
        raise ImageReadError(label, BLANK_REASON)


def _read_bytes(path: Path, label: Path) -> bytes:
    # One byte past the cap tells a file that grew (or lied in st_size, as
    # /proc files do) apart from one exactly at the limit.
    cap = _errors.MAX_FILE_BYTES
    data = _read_regular(path, label, cap + 1)
    if len(data) > cap:
        raise ImageReadError(label, _errors.too_large_file_reason(None))
    return data


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A grey [0, 1] image as 8-bit grey (rounded; values outside [0, 1] clipped): the inverse of
    reading an 8-bit file, for writing PNGs and hashing pixels."""
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


# --------------------------------------------------------------------- PIL


def _open_pil(data: bytes, fmt: str) -> Image.Image:
    """Open with the sniffed format's plugin only, skipping PIL's decompression-bomb check.

    PIL's check reports its own limit rather than the image's size (a 400 M pixel
    bomb came out as "178,956,971 pixels"); check_size does the same job from the
    same header and names the real size.
    """
    plugin = _PIL_FORMATS[fmt]
    if plugin not in Image.OPEN:
        Image.init()
    factory, _accept = Image.OPEN[plugin]
    return factory(io.BytesIO(data), "")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def _strip_png_text(data: bytes) -> bytes | None:
    """The PNG without its text chunks, or None if it has none (or its chunks cannot be walked).

    PIL refuses a PNG whose text exceeds its text limits (a guard against
    zTXt bombs); the pixels do not depend on text, so a valid image with a big
    comment is decoded without it instead of being called corrupt.
    """
    out = [_PNG_SIGNATURE]
    pos = len(_PNG_SIGNATURE)
    dropped = False
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 12 + length
        if end > len(data):
            return None
        kind = data[pos + 4:pos + 8]
        if kind in _PNG_TEXT_CHUNKS:
            dropped = True
        else:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    return b"".join(out) if dropped else None


def _read_pil(data: bytes, fmt: str, label: Path) -> np.ndarray:
    with warnings.catch_warnings():
        # PIL warns about corrupt EXIF, palette transparency and the like; the
        # caller gets an image or one ImageReadError, never a stream of warnings.
        warnings.simplefilter("ignore")
        return _read_pil_quietly(data, fmt, label)


def _read_pil_quietly(data: bytes, fmt: str, label: Path) -> np.ndarray:
    try:
        return _decode_pil(data, fmt, label)
    except ImageReadError as exc:
        if fmt != "png" or not exc.reason.startswith("truncated or corrupt"):
            raise
        stripped = _strip_png_text(data)
        if stripped is None:
            raise
        return _decode_pil(stripped, fmt, label)


def _decode_pil(data: bytes, fmt: str, label: Path) -> np.ndarray:
    try:
        im = _open_pil(data, fmt)
    except Image.DecompressionBombError:
        # Only from plugins that check again themselves (e.g. a TIFF frame).
        raise ImageReadError(
            label, f"image too large (more than {_errors.MAX_PIXELS:,} pixels)"
        ) from None
    except (SyntaxError, UnidentifiedImageError):
        raise ImageReadError(label, "truncated or corrupt image data") from None
    except Exception as exc:  # PIL raises many types on malformed headers
        raise ImageReadError(
            label, f"truncated or corrupt image data ({one_line(exc)})"
        ) from None

    width, height = im.size
    check_size(label, width, height)

    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    # PIL otherwise happily returns half-grey images for cut-off files; a
    # partial radiograph must not be diagnosed.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        im.load()
    except Exception:
        raise ImageReadError(label, "truncated or corrupt image data") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved

    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block should not reject good pixels
        orientation = 1
    if orientation not in (None, 1):
        im = ImageOps.exif_transpose(im)

    _reject_fully_transparent(im, label)
    return _pil_to_grey(im, label)


def _reject_fully_transparent(im: Image.Image, label: Path) -> None:
    # Alpha is dropped when converting to grey, so an image that shows nothing
    # would otherwise be judged by the colours hidden under zero alpha.
    if "A" in im.getbands():
        lo, hi = im.getchannel("A").getextrema()
        if hi == 0:
            raise ImageReadError(label, "blank image (fully transparent)")
    elif im.mode == "P" and "transparency" in im.info:
        rgba = im.convert("RGBA")
        if rgba.getchannel("A").getextrema()[1] == 0:
            raise ImageReadError(label, "blank image (fully transparent)")


def _pil_to_grey(im: Image.Image, label: Path) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16"):
        # 16-bit PNG/TIFF: scale by the container's range so a 12-bit detector
        # image stored in 16 bits keeps its absolute brightness.
        return np.asarray(im).astype(np.float32) * (1.0 / 65535.0)
    if mode == "I":
        arr = np.asarray(im)
        bits = _integer_bits(im)
        if bits is not None and arr.min() >= 0:
            return arr.astype(np.float32) * (1.0 / float(2**bits - 1))
        return minmax_unit(arr, label)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ImageReadError(label, "invalid pixel values (NaN or infinity)")
        # Float TIFFs are often already in [0, 1]; keep those absolute and
        # only stretch data that uses some other scale.
        if arr.min() >= 0.0 and arr.max() <= 1.0:
            return arr.copy()
        return minmax_unit(arr, label)
    if mode != "L":
        with warnings.catch_warnings():
            # Palette transparency warnings are irrelevant: alpha is dropped.
            warnings.simplefilter("ignore")
            if mode in ("RGB", "RGBA", "RGBX", "LA", "1", "P"):
                # Alpha is dropped, not composited: radiographs saved with an
                # alpha channel are opaque, and compositing on black would
                # invent dark regions if a tool wrote partial alpha. PIL's
                # RGB->L is ITU-R 601-2 luma (299/587/114).
                im = im.convert("L")
            else:
                im = im.convert("RGB").convert("L")
    return np.asarray(im).astype(np.float32) * (1.0 / 255.0)


def _integer_bits(im: Image.Image) -> int | None:
    if im.format == "PNG":
        return 16  # PNG has no 32-bit grey; mode "I" means 16-bit samples
    tags = getattr(im, "tag_v2", None)
    if tags is not None:
        bits = tags.get(258)
        if isinstance(bits, tuple):
            bits = bits[0]
        if isinstance(bits, int) and 1 <= bits <= 16:
            return bits
    return None


# --------------------------------------------------------- reference data


def reference_radiograph(name: str = "RG1_UNCR.dcm") -> Path:
    """Path of a real radiograph shipped by the ``pydicom-data`` package (offline)."""
    # Look in the installed distribution first: pydicom's get_testdata_file
    # would otherwise try to download missing files.
    try:
        dist = importlib.metadata.distribution("pydicom-data")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for entry in dist.files or ():
            if entry.name == name and entry.parent.name == "data":
                found = Path(str(dist.locate_file(entry)))
                if found.is_file():
                    return found
    try:
        from pydicom.data import get_testdata_file

        found_str = get_testdata_file(name, download=False)
    except Exception:
        found_str = None
    if found_str:
        return Path(found_str)
    if dist is None:
        raise FileNotFoundError(
            f"reference radiograph {name!r} needs the 'pydicom-data' package, which is "
            "not installed (pip install pydicom-data)"
        )
    raise FileNotFoundError(
        f"reference radiograph {name!r} is not in the installed 'pydicom-data' package"
    )
