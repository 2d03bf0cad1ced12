"""Shared builders for the data tests: synthetic DICOM objects made with pydicom."""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import pytest


def build_dicom(
    arr: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    pixels: bool = True,
    rows: bool = True,
    **tags,
) -> bytes:
    """A Secondary Capture CR object of ``arr`` (``pixels=False``: header only; ``rows=False``: no Rows)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    if pixels:
        if bits_stored is None:
            bits_stored = arr.dtype.itemsize * 8
        ds.set_pixel_data(arr, photometric, bits_stored)
    else:
        ds.Rows, ds.Columns = arr.shape[:2]
        ds.PhotometricInterpretation = photometric
    if not rows:
        del ds.Rows
    for key, value in tags.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def dicom_bytes() -> Callable[..., bytes]:
    return build_dicom
