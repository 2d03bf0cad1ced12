"""DICOM pixels to the reader's grey [0, 1] image: modality LUT, VOI (LUT or window), MONOCHROME1, colour.

The file's own VOI decides what is shown, as a viewer would show it; the window is applied by a float32
path about 10x faster than pydicom's (``_window_normalised``), with the same numbers. Only the first frame
of a multi-frame file is decoded.

Before any pixel is decoded, the header says whether the object is a chest radiograph at all
(:func:`acquisition_findings`): a CT slice, an ultrasound frame or a hand radiograph is refused with the
reason, or, under the ``"flag"`` policy, decoded with that reason as a warning.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from cxrnn.data.errors import ImageReadError, check_size, minmax_unit, one_line

if TYPE_CHECKING:  # pydicom is imported when a DICOM file is read, not with the reader
    from pydicom import Dataset

DICOM_MAGIC_OFFSET = 128  # "DICM" follows the free-form 128-byte preamble

# What the model was trained on: projection radiographs of the chest, seen from the front.
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR")  # Modality (0008,0060): computed / digital radiography
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS"})  # BodyPartExamined (0018,0015), chest only
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})  # ViewPosition (0018,5101): LL/RL are DICOM's codes

AcquisitionPolicy = Literal["refuse", "flag"]
ACQUISITION_POLICIES: tuple[str, ...] = ("refuse", "flag")
_VALUE_LIMIT = 64  # a header value quoted in a reason is cut to this many characters


@dataclass(frozen=True)
class AcquisitionFinding:
    """Something in a DICOM header that makes its image a doubtful input for a chest X-ray model.

    ``reason`` is one line without the file name; ``refuse`` says whether the image is refused under
    the default policy (otherwise it is only flagged); ``keyword`` names the header attribute.
    """

    keyword: str
    reason: str
    refuse: bool


def check_policy(acquisition: str) -> AcquisitionPolicy:
    """``acquisition`` if it is a known policy, else ValueError."""
    if acquisition not in ACQUISITION_POLICIES:
        raise ValueError(f"acquisition must be one of {', '.join(ACQUISITION_POLICIES)}, not {acquisition!r}")
    return acquisition  # type: ignore[return-value]


def _header_text(ds, keyword: str) -> str | None:
    """A header value as one upper-case line (multi-values joined by backslash); None if absent or empty."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's complaints about a value's VR: the value is still read
            value = ds.get(keyword)
        if value is None:
            return None
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        elif not isinstance(value, str) and hasattr(value, "__iter__"):
            value = "\\".join(str(v) for v in value)
        text = " ".join(str(value).split()).upper()
    except Exception:
        return None  # an unparsable value says no more than an absent one
    text = "".join(c if c.isprintable() else "?" for c in text)
    if len(text) > _VALUE_LIMIT:
        text = text[: _VALUE_LIMIT - 3] + "..."
    return text or None


def acquisition_findings(ds: Dataset) -> list[AcquisitionFinding]:
    """What the header of ``ds`` says against diagnosing it as a frontal chest radiograph (empty: nothing).

    Only header attributes are read, never pixels: a header-only dataset (``stop_before_pixels``, a
    C-FIND response) gives the same findings as the full file. Rules:

    * Modality not CR, DX or DR: refused (a CT, MR, US, NM or secondary-capture object);
      no Modality at all: flagged;
    * BodyPartExamined present and not chest (CHEST, THORAX, LUNG, LUNGS, any case): refused;
    * ViewPosition lateral (LL, RL, LAT, LATERAL): flagged, the model saw frontal views only.
    """
    findings: list[AcquisitionFinding] = []
    modality = _header_text(ds, "Modality")
    if modality is None:
        findings.append(AcquisitionFinding(
            "Modality", "no Modality in the DICOM header: not known to be a radiograph", refuse=False))
    elif modality not in RADIOGRAPH_MODALITIES:
        findings.append(AcquisitionFinding(
            "Modality", f"modality {modality} is not a radiograph ({'/'.join(RADIOGRAPH_MODALITIES)})",
            refuse=True))
    body_part = _header_text(ds, "BodyPartExamined")
    if body_part is not None and body_part not in CHEST_BODY_PARTS:
        findings.append(AcquisitionFinding("BodyPartExamined", f"body part {body_part} is not chest", refuse=True))
    view = _header_text(ds, "ViewPosition")
    if view in LATERAL_VIEWS:
        findings.append(AcquisitionFinding(
            "ViewPosition",
            f"lateral view (ViewPosition {view}): the model was trained on frontal PA/AP views", refuse=False))
    return findings


def check_acquisition(ds: Dataset, label: str | Path, acquisition: AcquisitionPolicy = "refuse") -> list[str]:
    """The warnings to show with the image of ``ds``; ImageReadError (``label``: the refusing reasons,
    joined by "; ") if the policy is ``"refuse"`` and a finding refuses it. Under ``"flag"`` every
    finding is a warning."""
    check_policy(acquisition)
    findings = acquisition_findings(ds)
    refusals = [f.reason for f in findings if f.refuse]
    if refusals and acquisition == "refuse":
        raise ImageReadError(Path(label), "; ".join(refusals))
    return [f.reason for f in findings]


def has_dicom_preamble(head: bytes) -> bool:
    """Whether ``head`` (the file's first bytes) carries the DICM magic after the preamble."""
    return head[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM"


def dicom_size(data: bytes) -> tuple[int, int] | None:
    """(Columns, Rows) of one frame from the header alone, or None if the header cannot say."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                                 force=not has_dicom_preamble(data))
        return int(ds.Columns), int(ds.Rows)
    except Exception:
        return None


def _header_int(ds, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except Exception:
        return None


def read_dicom(data: bytes, label: Path, acquisition: AcquisitionPolicy = "refuse"
               ) -> tuple[np.ndarray, list[str]]:
    """Decode a DICOM file's bytes (``label`` names it in errors) to float32 grey [0, 1], bone bright, with
    the header's acquisition warnings (:func:`check_acquisition`; refused objects are never decoded)."""
    import pydicom

    has_preamble = has_dicom_preamble(data)
    try:
        with warnings.catch_warnings():
            # pydicom warns about every oddity it tolerates; the caller gets
            # either an image or one ImageReadError, not a stream of warnings.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except Exception as exc:
        raise ImageReadError(label, f"unreadable DICOM ({one_line(exc)})") from None

    notes = check_acquisition(ds, label, acquisition)
    return _decode_dicom(ds, label), notes


def _decode_dicom(ds, label: Path) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    _ensure_transfer_syntax(ds)
    try:
        if "PixelData" not in ds:
            raise ImageReadError(label, "unreadable DICOM (no pixel data)")
        rows, cols = _header_int(ds, "Rows"), _header_int(ds, "Columns")
        if rows is None or cols is None:
            # Checked here: pydicom would otherwise fail with its own
            # AttributeError text about a Python object.
            missing = " and ".join(k for k, v in (("Rows", rows), ("Columns", cols)) if v is None)
            raise ImageReadError(label, f"unreadable DICOM (no {missing} in header)")
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    except ImageReadError:
        raise
    except Exception as exc:  # missing Rows/Columns or unparsable header values
        raise ImageReadError(label, f"unreadable DICOM ({one_line(exc)})") from None

    check_size(label, cols, rows)

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
            label, f"unreadable DICOM (cannot decode pixel data: {one_line(exc)})"
        ) from None
    if frames > 1 and arr.ndim >= 3 and arr.shape[0] == frames:
        arr = arr[0]  # a decoder that ignored the frame index

    if arr.ndim == 3 or photometric == "PALETTE COLOR":
        return _dicom_colour_to_grey(arr, ds, photometric, label)
    if arr.ndim != 2:
        raise ImageReadError(label, f"unreadable DICOM (unexpected pixel shape {arr.shape})")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # A grey reading of pixels the header calls colour would be a guess (and MONOCHROME1 a wrong one).
        raise ImageReadError(label, f"unreadable DICOM (PhotometricInterpretation {photometric} does not match "
                                    "its 1-sample pixels)")
    if arr.size == 0 or arr.min() == arr.max():
        raise ImageReadError(label, "blank image (constant pixel value)")

    try:
        values = apply_modality_lut(arr, ds)
    except Exception:
        values = arr  # a broken rescale is better ignored than fatal
    if not _fits_float32(values):
        raise ImageReadError(
            label,
            "unreadable DICOM (RescaleSlope/RescaleIntercept scale the pixels beyond the float range: "
            f"slope {ds.get('RescaleSlope', 1)}, intercept {ds.get('RescaleIntercept', 0)})",
        )
    img = _apply_voi_normalised(values, ds)
    if img is None:
        img = minmax_unit(values, label)
    if photometric == "MONOCHROME1":
        # MONOCHROME1 stores bone dark; the model expects bone bright.
        np.subtract(1.0, img, out=img)
    return img


def _fits_float32(values: np.ndarray) -> bool:
    # Everything downstream is float32: a hostile RescaleSlope (1e300) would
    # otherwise turn into inf with overflow warnings and then a "blank image".
    if not np.issubdtype(values.dtype, np.floating):
        return True
    with np.errstate(all="ignore"):
        lo, hi = float(np.min(values)), float(np.max(values))
    limit = float(np.finfo(np.float32).max)
    return bool(np.isfinite(lo) and np.isfinite(hi) and -limit < lo and hi < limit)


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


def _apply_voi_normalised(values: np.ndarray, ds) -> np.ndarray | None:
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
            lo, hi = window_output_range(ds)
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


def window_output_range(ds: Dataset) -> tuple[float, float]:
    """The range pydicom's windowing maps a window onto, for scaling its output to [0, 1]."""
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

    if photometric == "PALETTE COLOR":
        if arr.ndim != 2:  # a palette indexes one sample per pixel
            raise ImageReadError(
                label, f"unreadable DICOM (PhotometricInterpretation PALETTE COLOR does not match its "
                       f"{arr.shape[-1]}-sample pixels)")
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as exc:
            raise ImageReadError(
                label, f"unreadable DICOM (PhotometricInterpretation PALETTE COLOR without a usable palette: "
                       f"{one_line(exc)})") from None
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageReadError(label, f"unreadable DICOM (unexpected pixel shape {arr.shape})")
    # pydicom already converts YBR to RGB; ITU-R 601 luma as for PIL images.
    grey = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
        if photometric == "PALETTE COLOR":
            bits = arr.dtype.itemsize * 8
        if grey.min() == grey.max():
            raise ImageReadError(label, "blank image (constant pixel value)")
        return np.clip(grey * (1.0 / float(2**bits - 1)), 0.0, 1.0)
    return minmax_unit(grey, label)
