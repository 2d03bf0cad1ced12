"""The single image reader used by training, evaluation, prediction and the server.

Every image, whatever its container, comes out as a float32 ``H x W`` grey array
in ``[0, 1]`` where bright means dense (bone), so the rest of the tool never has
to care about file formats. Bad input raises :class:`ImageReadError` with a
one-line reason instead of whatever PIL or pydicom happened to throw.
"""

from __future__ import annotations

import importlib.metadata
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_SUFFIXES",
    "MIN_SIDE",
    "MAX_PIXELS",
    "ImageReadError",
    "read_image",
    "is_image_file",
    "sniff_format",
    "reference_radiograph",
]

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
)
MIN_SIDE = 32
MAX_PIXELS = 100_000_000

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

_DICOM_MAGIC_OFFSET = 128


class ImageReadError(ValueError):
    """An image could not be turned into a grey array; ``str()`` is one line."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type[ImageReadError], tuple[Path, str]]:
        # Default exception pickling replays args=(message,), which does not fit
        # this two-argument constructor; DataLoader workers need pickling.
        return (type(self), (self.path, self.reason))


def sniff_format(data: bytes) -> str | None:
    """Identify an image container from its leading bytes, or None."""
    head = bytes(data[:140])
    # DICOM first: the 128-byte preamble is free-form and some modalities put
    # a TIFF header there (pydicom-data's RG1_UNCR.dcm starts with "II*\0"),
    # so a file can carry both signatures and the DICOM one is authoritative.
    if head[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM":
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
        with path.open("rb") as fh:
            head = fh.read(_DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == b"DICM"


def read_image(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Read a radiograph as a float32 ``H x W`` array in ``[0, 1]`` (bright = dense).

    ``source`` is a path or the raw file bytes (e.g. an HTTP upload); ``name``
    labels the bytes in error messages. The format is sniffed from the content.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = Path(name) if name else Path("<bytes>")
        data = bytes(source)
    else:
        label = Path(name) if name else Path(source)
        data = _read_bytes(Path(source), label)

    if not data:
        raise ImageReadError(label, "empty file (0 bytes)")

    fmt = sniff_format(data)
    if fmt is None:
        raise ImageReadError(label, "not an image (unrecognised content)")
    if fmt == "dicom":
        img = _read_dicom(data, label)
    else:
        img = _read_pil(data, fmt, label)
    return np.ascontiguousarray(img, dtype=np.float32)


def _read_bytes(path: Path, label: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageReadError(label, os_error_reason(exc, path)) from None


def os_error_reason(exc: OSError, path: Path | None = None) -> str:
    """One-line reason for an OSError met while reading an image file."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    # Windows reports directories as PermissionError, so check the path too.
    if isinstance(exc, IsADirectoryError) or (isinstance(exc, PermissionError) and path is not None and path.is_dir()):
        return "is a directory, not an image file"
    if isinstance(exc, PermissionError):
        return "cannot read file (permission denied)"
    return f"cannot read file ({_one_line(exc)})"


def as_read_error(path: str | Path, exc: ImageReadError | OSError) -> ImageReadError:
    """Either way reading an image file fails, as one ImageReadError ('PATH: reason')."""
    if isinstance(exc, ImageReadError):
        return exc
    return ImageReadError(Path(path), os_error_reason(exc, Path(path)))


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_size(label: Path, width: int, height: int) -> None:
    # Checked from the header, before decoding, so a decompression bomb never
    # gets to allocate its pixels.
    if width * height > MAX_PIXELS:
        raise ImageReadError(
            label,
            f"image too large ({width}x{height} px = {width * height:,} pixels, "
            f"maximum {MAX_PIXELS:,})",
        )
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageReadError(
            label, f"image too small ({width}x{height} px, minimum {MIN_SIDE})"
        )


def _minmax(arr: np.ndarray, label: Path) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    lo = float(arr.min())
    hi = float(arr.max())
    if not hi > lo:
        raise ImageReadError(label, "blank image (constant pixel value)")
    out = arr - lo
    out *= 1.0 / (hi - lo)
    return out


# --------------------------------------------------------------------- PIL


def _read_pil(data: bytes, fmt: str, label: Path) -> np.ndarray:
    with warnings.catch_warnings():
        # Our own MAX_PIXELS guard replaces PIL's warning; PIL's hard error
        # (above 2x its limit) is still caught below and reported the same way.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]])
        except Image.DecompressionBombError:
            raise ImageReadError(
                label, f"image too large (more than {MAX_PIXELS:,} pixels)"
            ) from None
        except UnidentifiedImageError:
            raise ImageReadError(label, "truncated or corrupt image data") from None
        except Exception as exc:  # PIL raises many types on malformed headers
            raise ImageReadError(
                label, f"truncated or corrupt image data ({_one_line(exc)})"
            ) from None

    width, height = im.size
    _check_size(label, width, height)

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

    return _pil_to_grey(im, label)


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
        return _minmax(arr, label)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ImageReadError(label, "invalid pixel values (NaN or infinity)")
        # Float TIFFs are often already in [0, 1]; keep those absolute and
        # only stretch data that uses some other scale.
        if arr.min() >= 0.0 and arr.max() <= 1.0:
            return arr.copy()
        return _minmax(arr, label)
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


# ------------------------------------------------------------------- DICOM


def _read_dicom(data: bytes, label: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    has_preamble = data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM"
    try:
        with warnings.catch_warnings():
            # pydicom warns about every oddity it tolerates; the caller gets
            # either an image or one ImageReadError, not a stream of warnings.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except Exception as exc:
        raise ImageReadError(label, f"unreadable DICOM ({_one_line(exc)})") from None

    _ensure_transfer_syntax(ds)
    try:
        if "PixelData" not in ds:
            raise ImageReadError(label, "unreadable DICOM (no pixel data)")
        rows = int(ds.Rows)
        cols = int(ds.Columns)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    except ImageReadError:
        raise
    except Exception as exc:  # missing Rows/Columns or unparsable header values
        raise ImageReadError(label, f"unreadable DICOM ({_one_line(exc)})") from None

    _check_size(label, cols, rows)

    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            # Decode only the first frame instead of the whole cine loop.
            ds.pixel_array_options(index=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as exc:
        raise ImageReadError(
            label, f"unreadable DICOM (cannot decode pixel data: {_one_line(exc)})"
        ) from None
    if frames > 1 and arr.ndim >= 3 and arr.shape[0] == frames:
        arr = arr[0]  # a decoder that ignored the frame index

    if arr.ndim == 3:
        return _dicom_colour_to_grey(arr, ds, photometric, label)
    if arr.ndim != 2:
        raise ImageReadError(label, f"unreadable DICOM (unexpected pixel shape {arr.shape})")
    if arr.size == 0 or arr.min() == arr.max():
        raise ImageReadError(label, "blank image (constant pixel value)")

    try:
        values = apply_modality_lut(arr, ds)
    except Exception:
        values = arr  # a broken rescale is better ignored than fatal
    img = _apply_voi_normalised(values, ds, label)
    if img is None:
        img = _minmax(values, label)
    if photometric == "MONOCHROME1":
        # MONOCHROME1 stores bone dark; the model expects bone bright.
        np.subtract(1.0, img, out=img)
    return img


def _ensure_transfer_syntax(ds) -> None:
    # Old files without a file meta header carry no Transfer Syntax UID, and
    # pydicom then refuses to decode; the encoding it detected while parsing
    # is uncompressed by definition, so name that syntax explicitly.
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        return
    if implicit:
        uid = ImplicitVRLittleEndian
    else:
        uid = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = uid


def _apply_voi_normalised(values: np.ndarray, ds, label: Path) -> np.ndarray | None:
    """Apply the file's VOI (LUT or window) and scale its output range to [0, 1].

    Returns None when there is no usable VOI, so the caller falls back to the
    data's own min-max.
    """
    from pydicom.pixels import apply_voi, apply_voi_lut

    seq = ds.get("VOILUTSequence")
    has_lut = bool(seq) and None not in (
        seq[0].get("LUTDescriptor"),
        seq[0].get("LUTData"),
    )
    has_window = None not in (ds.get("WindowCenter"), ds.get("WindowWidth"))
    if not (has_lut or has_window):
        return None

    try:
        if has_lut:
            # apply_voi_lut prefers the LUT over the window when both exist;
            # the LUT's own entries define its output range.
            if not np.issubdtype(values.dtype, np.integer):
                values = np.rint(values).astype(np.int64)
            out = apply_voi_lut(values, ds)
            first, count = _lut_span(seq[0])
            entries = apply_voi(np.arange(first, first + count), ds)
            lo, hi = float(entries.min()), float(entries.max())
        else:
            window = _window_normalised(values, ds)
            if window is not None:
                return window if window.min() != window.max() else None
            out = apply_voi_lut(values, ds)
            lo, hi = _window_output_range(ds)
    except Exception:
        return None  # malformed window/LUT values: use min-max instead

    if not hi > lo:
        return None
    img = np.asarray(out, dtype=np.float32)
    img -= lo
    img *= 1.0 / (hi - lo)
    np.clip(img, 0.0, 1.0, out=img)
    if img.min() == img.max():
        # The window misses the data entirely (everything clipped to one end);
        # showing the data min-max is more useful than a blank image.
        return None
    return img


def _window_normalised(values: np.ndarray, ds) -> np.ndarray | None:
    """The first VOI window, already scaled to [0, 1], in float32: the same numbers as pydicom's
    apply_windowing followed by the output-range scaling below, but about 10x faster (pydicom works in
    float64 with boolean masks; a 2k x 2k radiograph took 51 ms there). None for a VOI function or
    width this does not cover: the caller then uses pydicom."""
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    center, width = _first_value(ds.WindowCenter), _first_value(ds.WindowWidth)
    if function == "LINEAR" and width > 1:
        center, width = center - 0.5, width - 1.0  # PS3.3 C.11.2.1.2.1
    elif function not in ("LINEAR_EXACT", "SIGMOID") or width <= 0:
        return None
    img = np.subtract(np.asarray(values, dtype=np.float32), np.float32(center))
    if function == "SIGMOID":  # 1 / (1 + exp(-4 (x - c) / w))
        img *= np.float32(-4.0 / width)
        np.exp(img, out=img)
        img += 1.0
        return np.reciprocal(img, out=img)
    img *= np.float32(1.0 / width)
    img += 0.5
    return np.clip(img, 0.0, 1.0, out=img)


def _first_value(value) -> float:
    """A DICOM multi-valued window (several alternative views) means its first view, as in pydicom."""
    from pydicom.multival import MultiValue

    return float(value[0]) if isinstance(value, (MultiValue, list, tuple)) else float(value)


def _lut_span(item) -> tuple[int, int]:
    desc = [int(v) for v in item.LUTDescriptor]
    count = desc[0] or 2**16
    return desc[1], count


def _window_output_range(ds) -> tuple[float, float]:
    # Mirrors pydicom.pixels.apply_windowing, which maps the window onto the
    # full range of the (rescaled) stored values rather than onto [0, 1].
    bits_stored = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.PixelRepresentation) == 0:
        y_min, y_max = 0.0, float(2**bits_stored - 1)
    else:
        y_min, y_max = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min = y_min * float(slope) + float(intercept)
        y_max = y_max * float(slope) + float(intercept)
    return min(y_min, y_max), max(y_min, y_max)


def _dicom_colour_to_grey(arr: np.ndarray, ds, photometric: str, label: Path) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    if arr.shape[-1] != 3:
        raise ImageReadError(label, f"unreadable DICOM (unexpected pixel shape {arr.shape})")
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    # pydicom already converts YBR to RGB; ITU-R 601 luma as for PIL images.
    grey = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
        if photometric == "PALETTE COLOR":
            bits = arr.dtype.itemsize * 8
        if grey.min() == grey.max():
            raise ImageReadError(label, "blank image (constant pixel value)")
        return np.clip(grey * (1.0 / float(2**bits - 1)), 0.0, 1.0)
    return _minmax(grey, label)


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
