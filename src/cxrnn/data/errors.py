"""Read errors as values, and the checks every decoder (PIL formats, DICOM) applies to what it reads.

Bad input becomes one :class:`ImageReadError` with a one-line reason instead of whatever PIL, pydicom or
the OS happened to throw, so that one bad file in a folder is a line in a report, not a crash.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

MIN_SIDE = 32
# Which files the reader accepts, and how it decodes them. The decoded-image and feature caches are keyed
# by it: a file cached by an older reader (a CT, before DICOM objects were checked for modality) must be
# read again, not reused. Bump it whenever the reader refuses or decodes anything differently.
READER_VERSION = 2
MAX_PIXELS = 100_000_000
# Largest file the reader will load into memory. A 100 M pixel 16-bit uncompressed DICOM (MAX_PIXELS)
# is 200 MB; the rest is headroom for multi-frame objects, of which only the first frame is decoded.
MAX_FILE_BYTES = 512 * 1024 * 1024

BLANK_REASON = "blank image (constant pixel value)"


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


def one_line(exc: BaseException, limit: int = 200) -> str:
    """A library's exception message squeezed onto one line of at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def os_error_reason(exc: OSError, path: Path | None = None) -> str:
    """One-line reason for an OSError met while reading an image file."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    # Windows reports directories as PermissionError, so check the path too.
    if isinstance(exc, IsADirectoryError) or (isinstance(exc, PermissionError) and path is not None and path.is_dir()):
        return "is a directory, not an image file"
    if isinstance(exc, PermissionError):
        return "cannot read file (permission denied)"
    return f"cannot read file ({one_line(exc)})"


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def not_regular_reason(st: os.stat_result) -> str | None:
    """Why a file with this stat cannot be read as an image (None for a regular file)."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not an image file"
    for test, kind in _SPECIAL_KINDS:
        if test(mode):
            return f"not a regular file ({kind})"
    return "not a regular file"


def too_large_file_reason(size: int | None) -> str:
    """Reason for a file over MAX_FILE_BYTES (``size`` None: only known to exceed it)."""
    if size is None:
        return f"file too large (more than {MAX_FILE_BYTES:,} bytes)"
    return f"file too large ({size:,} bytes, maximum {MAX_FILE_BYTES:,})"


def as_read_error(path: str | Path, exc: ImageReadError | OSError) -> ImageReadError:
    """Either way reading an image file fails, as one ImageReadError ('PATH: reason')."""
    if isinstance(exc, ImageReadError):
        return exc
    return ImageReadError(Path(path), os_error_reason(exc, Path(path)))


def check_size(label: Path, width: int, height: int) -> None:
    """Reject an image outside [MIN_SIDE, MAX_PIXELS] from its header's size."""
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


def minmax_unit(arr: np.ndarray, label: Path) -> np.ndarray:
    """``arr`` stretched to [0, 1] by its own minimum and maximum, as float32; a constant image is an error
    (there is no picture to stretch)."""
    arr = np.asarray(arr, dtype=np.float32)
    lo = float(arr.min())
    hi = float(arr.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ImageReadError(label, "invalid pixel values (NaN or infinity)")
    if not hi > lo:
        raise ImageReadError(label, BLANK_REASON)
    out = arr - lo
    out *= 1.0 / (hi - lo)
    return out
