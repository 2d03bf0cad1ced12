"""Issue 13: a DICOM object that is not a frontal chest radiograph is refused (or, on request, flagged)
with the reason, from its header alone, before its pixels are decoded."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxrnn.data.dicom import AcquisitionFinding, acquisition_findings, check_acquisition
from cxrnn.data.io import ImageReadError, read_image, read_image_checked, reference_radiograph
from cxrnn.data.loading import ImageFiles

H, W = 64, 48
MODALITY_REASON = "modality {} is not a radiograph (CR/DX/DR)"
LATERAL_REASON = "lateral view (ViewPosition LL): the model was trained on frontal PA/AP views"
NO_MODALITY_REASON = "no Modality in the DICOM header: not known to be a radiograph"

# pydicom warns when a test writes a non-standard CS value ("chest ", "Thorax"), which is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR CS", "ignore:The value length")


def _gradient() -> np.ndarray:
    return (np.arange(H * W, dtype=np.uint16).reshape(H, W) % 4000).astype(np.uint16)


def _header(**tags):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def _write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _without_modality(data: bytes) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.Modality
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ------------------------------------------------------------------ the rules, on a header alone


@pytest.mark.parametrize("tags, expected", [
    ({"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}, []),
    ({"Modality": "DX", "BodyPartExamined": "chest ", "ViewPosition": "AP"}, []),
    ({"Modality": "DR", "BodyPartExamined": "Thorax"}, []),
    ({"Modality": "dx", "BodyPartExamined": "LUNG"}, []),
    ({"Modality": "CR"}, []),  # no body part and no view: nothing to hold against it
    ({"Modality": "CT"}, [AcquisitionFinding("Modality", MODALITY_REASON.format("CT"), refuse=True)]),
    ({"Modality": "OT"}, [AcquisitionFinding("Modality", MODALITY_REASON.format("OT"), refuse=True)]),
    ({"Modality": "CR", "BodyPartExamined": "HAND"},
     [AcquisitionFinding("BodyPartExamined", "body part HAND is not chest", refuse=True)]),
    ({"Modality": "CR", "BodyPartExamined": "CHESTABDOMEN"},
     [AcquisitionFinding("BodyPartExamined", "body part CHESTABDOMEN is not chest", refuse=True)]),
    ({"Modality": "DX", "ViewPosition": "LL"}, [AcquisitionFinding("ViewPosition", LATERAL_REASON, refuse=False)]),
    ({"BodyPartExamined": "CHEST"}, [AcquisitionFinding("Modality", NO_MODALITY_REASON, refuse=False)]),
    ({"Modality": "", "BodyPartExamined": "CHEST"}, [AcquisitionFinding("Modality", NO_MODALITY_REASON, refuse=False)]),
])
def test_findings_from_a_header_only_dataset(tags, expected):
    assert acquisition_findings(_header(**tags)) == expected


def test_every_finding_of_a_file_is_reported_and_the_refusals_joined():
    ds = _header(Modality="MR", BodyPartExamined="HEAD", ViewPosition="RL")
    assert [f.refuse for f in acquisition_findings(ds)] == [True, True, False]
    with pytest.raises(ImageReadError) as info:
        check_acquisition(ds, "x.dcm")
    assert str(info.value) == "x.dcm: modality MR is not a radiograph (CR/DX/DR); body part HEAD is not chest"
    assert check_acquisition(ds, "x.dcm", "flag") == [
        "modality MR is not a radiograph (CR/DX/DR)", "body part HEAD is not chest",
        "lateral view (ViewPosition RL): the model was trained on frontal PA/AP views"]


def test_hostile_header_values_stay_one_short_line():
    ds = _header(Modality=["CT", "MR"], BodyPartExamined="X" * 500)
    reasons = [f.reason for f in acquisition_findings(ds)]
    assert reasons[0] == "modality CT\\MR is not a radiograph (CR/DX/DR)"
    assert reasons[1].startswith("body part XXX") and reasons[1].endswith("... is not chest")
    assert all(len(r) < 120 and "\n" not in r for r in reasons)


def test_unknown_policy_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="acquisition must be one of refuse, flag, not 'warn'"):
        read_image(tmp_path / "missing.png", acquisition="warn")  # type: ignore[arg-type]


# ------------------------------------------------------------------ through the reader


@pytest.mark.parametrize("modality", ["CT", "MR", "US", "OT"])
def test_non_radiograph_modalities_are_refused_by_default_and_flagged_on_request(tmp_path, dicom_bytes, modality):
    p = _write(tmp_path, f"{modality.lower()}.dcm", dicom_bytes(_gradient(), bits_stored=12, Modality=modality))
    reason = MODALITY_REASON.format(modality)
    with pytest.raises(ImageReadError) as info:
        read_image(p)
    assert str(info.value) == f"{p}: {reason}" and info.value.reason == reason
    image, warnings = read_image_checked(p, acquisition="flag")
    assert image.shape == (H, W) and warnings == [reason]
    assert np.array_equal(read_image(p, acquisition="flag"), image)


@pytest.mark.filterwarnings("error")
def test_reading_a_non_standard_value_warns_nothing(tmp_path, dicom_bytes):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = dicom_bytes(_gradient(), bits_stored=12, BodyPartExamined="chest ", Modality="dx")
    assert read_image_checked(data).warnings == []


def test_body_part_other_than_chest_is_refused(tmp_path, dicom_bytes):
    hand = _write(tmp_path, "hand.dcm", dicom_bytes(_gradient(), bits_stored=12, BodyPartExamined="HAND"))
    with pytest.raises(ImageReadError, match="hand.dcm: body part HAND is not chest$"):
        read_image(hand)
    chest = _write(tmp_path, "chest.dcm", dicom_bytes(_gradient(), bits_stored=12, BodyPartExamined="chest "))
    assert read_image_checked(chest).warnings == []


def test_lateral_view_and_missing_modality_are_flagged_not_refused(tmp_path, dicom_bytes):
    lateral = _write(tmp_path, "lat.dcm", dicom_bytes(_gradient(), bits_stored=12, ViewPosition="LL"))
    image, warnings = read_image_checked(lateral)
    assert warnings == [LATERAL_REASON]
    assert np.array_equal(image, read_image(lateral))  # the same pixels: only the warning is extra
    anonymous = _write(tmp_path, "anon.dcm", _without_modality(dicom_bytes(_gradient(), bits_stored=12)))
    assert read_image_checked(anonymous).warnings == [NO_MODALITY_REASON]


def test_refused_bytes_are_named_by_their_upload_name(dicom_bytes):
    data = dicom_bytes(_gradient(), bits_stored=12, Modality="US")
    with pytest.raises(ImageReadError) as info:
        read_image(data, name="upload.dcm")
    assert str(info.value) == "upload.dcm: modality US is not a radiograph (CR/DX/DR)"


def test_refused_before_the_pixels_are_decoded(tmp_path, dicom_bytes):
    # A CT header over pixels that cannot be decoded: the reason is the modality, not the pixels.
    p = _write(tmp_path, "ct.dcm", dicom_bytes(_gradient(), pixels=False, Modality="CT"))
    with pytest.raises(ImageReadError, match=r"modality CT is not a radiograph \(CR/DX/DR\)$"):
        read_image(p)


def test_non_dicom_images_have_no_findings(tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray((np.arange(H * W).reshape(H, W) % 256).astype(np.uint8)).save(p)
    assert read_image_checked(p).warnings == []
    assert read_image_checked(p, acquisition="flag").warnings == []


def test_training_reader_refuses_a_non_chest_dicom_like_any_unreadable_file(tmp_path, dicom_bytes):
    ct = _write(tmp_path, "ct.dcm", dicom_bytes(_gradient(), bits_stored=12, Modality="CT"))
    good = _write(tmp_path, "good.dcm", dicom_bytes(_gradient(), bits_stored=12))
    items = [ImageFiles([ct, good], transform=lambda im: im, tag="t")[i] for i in range(2)]
    assert items[0].image is None and str(items[0].error) == f"{ct}: {MODALITY_REASON.format('CT')}"
    assert items[1].error is None and items[1].image.shape == (H, W)


# ------------------------------------------------------------------ real objects from pydicom-data


def test_real_chest_radiograph_is_accepted_without_warnings():
    image, warnings = read_image_checked(reference_radiograph("RG1_UNCR.dcm"))
    assert warnings == [] and image.ndim == 2


@pytest.mark.parametrize("name, reason", [
    ("RG3_UNCR.dcm", "body part EXTREMITY is not chest"),
    ("693_UNCR.dcm", MODALITY_REASON.format("CT")),
    ("MR2_UNCR.dcm", MODALITY_REASON.format("MR")),
    ("US1_UNCR.dcm", MODALITY_REASON.format("US")),
    ("OT-PAL-8-face.dcm", MODALITY_REASON.format("OT")),
])
def test_real_non_chest_objects_are_refused_with_the_reason(name, reason):
    path = reference_radiograph(name)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(info.value) == f"{path}: {reason}"


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG3_UNCR.dcm", "693_UNCR.dcm", "US1_UNCR.dcm"])
def test_header_without_pixels_gives_the_same_findings(name):
    # What a PACS client sees before it fetches the pixels.
    import pydicom

    path = reference_radiograph(name)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert "PixelData" not in header
    assert acquisition_findings(header) == acquisition_findings(pydicom.dcmread(path))


def test_real_ct_is_decoded_under_the_flag_policy():
    image, warnings = read_image_checked(reference_radiograph("693_UNCR.dcm"), acquisition="flag")
    assert warnings == [MODALITY_REASON.format("CT")]
    assert image.dtype == np.float32 and 0.0 <= image.min() < image.max() <= 1.0
