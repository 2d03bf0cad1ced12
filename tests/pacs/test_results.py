"""DICOM results of a prediction: the SR states the finding of `cxrnn predict --json`, the SC carries the panel,
both in the source's study with new UIDs, both valid for dciodvfy."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from cxrnn.data.io import reference_radiograph
from cxrnn.pacs.results import (RESEARCH_USE, SR_SERIES_PREFIX, dicom_results_for_files, model_info, read_finding,
                                secondary_capture, structured_report, write_results)


@pytest.fixture(scope="module")
def predictor(tiny_model):
    from cxrnn.inference.predictor import Predictor

    return Predictor.from_file(tiny_model)


@pytest.fixture(scope="module")
def written(predictor, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dicom-out")
    rows = dicom_results_for_files(predictor, [reference_radiograph("RG1_UNCR.dcm")], out,
                                   model_info(predictor.bundle, tiny_model))
    return rows[0]


def test_sr_states_the_prediction_of_predict_json(written, predictor):
    expected = predictor.predict_paths([reference_radiograph("RG1_UNCR.dcm")])[0].to_dict()
    sr = pydicom.dcmread(written["dicom"]["sr"])
    finding = read_finding(sr)
    assert finding["label"] == expected["label"] == written["label"]
    assert finding["probabilities"] == expected["probabilities"]  # FloatingPointValue: exact
    assert finding["ood"] == expected["ood"]
    assert finding["refer"] is expected["refer"]
    assert finding["model_name"].startswith("cxrnn test_efficientnet+lstm")
    text = [item.TextValue for item in sr.ContentSequence if "TextValue" in item]
    assert RESEARCH_USE in text


def test_results_reference_the_source_in_its_study_with_new_uids(written):
    source = pydicom.dcmread(reference_radiograph("RG1_UNCR.dcm"), stop_before_pixels=True)
    sr = pydicom.dcmread(written["dicom"]["sr"])
    sc = pydicom.dcmread(written["dicom"]["sc"])
    for ds in (sr, sc):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.SOPInstanceUID != source.SOPInstanceUID
        for key in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
            assert ds.get(key) == source.get(key), key
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
    assert sr.Modality == "SR" and sr.SeriesDescription.startswith(SR_SERIES_PREFIX)
    assert read_finding(sr)["source_sop_instance_uid"] == source.SOPInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_sc_is_the_rgb_panel(written):
    sc = pydicom.dcmread(written["dicom"]["sc"])
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    pixels = sc.pixel_array
    assert pixels.dtype == np.uint8 and pixels.shape[2] == 3
    assert pixels.shape[1] > pixels.shape[0]  # X-ray | overlay | probabilities, side by side
    assert pixels.std() > 10  # a drawing, not a blank
    assert sc.BurnedInAnnotation == "YES"


def test_sr_carries_prediction_set_referral_and_warnings(tmp_path):
    source = pydicom.dcmread(reference_radiograph("RG1_UNCR.dcm"), stop_before_pixels=True)
    prediction = {"label": "normal", "probabilities": {"covid": 0.1, "normal": 0.5, "pneumonia": 0.4},
                  "ood": {"score": 30.0, "threshold": 20.0, "flagged": True}, "warnings": ["lateral view (ViewPosition LL)"],
                  "prediction_set": ["normal", "pneumonia"], "refer": True,
                  "refer_reason": "prediction set {normal, pneumonia}: the model cannot tell these apart"}
    model = {"name": "cxrnn test", "version": "cxrnn 0.1.0, model 0123456789abcdef", "id": "0123456789abcdef"}
    finding = read_finding(structured_report(source, prediction, model))
    assert finding["label"] == "normal"
    assert finding["probabilities"] == prediction["probabilities"]
    assert finding["ood"] == prediction["ood"]
    assert finding["prediction_set"] == ["normal", "pneumonia"]
    assert finding["refer"] is True and finding["refer_reason"] == prediction["refer_reason"]
    # without the keys of "Know when not to trust" the SR still builds
    bare = {k: prediction[k] for k in ("label", "probabilities")}
    assert read_finding(structured_report(source, bare, model))["prediction_set"] is None
    with pytest.raises(ValueError, match="no finding"):
        structured_report(source, {"path": "x", "error": "x: unreadable"}, model)
    paths = write_results(reference_radiograph("RG1_UNCR.dcm"), prediction, np.zeros((20, 30, 3), np.uint8),
                          tmp_path, model)
    assert sorted(paths) == ["sc", "sr"] and all(pydicom.dcmread(p) for p in paths.values())
    with pytest.raises(ValueError, match="uint8 RGB"):
        secondary_capture(source, np.zeros((20, 30), np.uint8), model)


@pytest.fixture(scope="module")
def written_of_phantom(predictor, tiny_model, tmp_path_factory):
    """Results of a phantom wrapped as DICOM with a minimal header."""
    from .conftest import phantom_dicom  # noqa: TID252

    source, _ = phantom_dicom(tmp_path_factory.mktemp("phantom-dicom"))
    rows = dicom_results_for_files(predictor, [source], tmp_path_factory.mktemp("dicom-out-phantom"),
                                   model_info(predictor.bundle, tiny_model))
    return rows[0]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed (Debian package dicom3tools)")
@pytest.mark.parametrize("source", ["RG1_UNCR", "phantom"])
@pytest.mark.parametrize("kind", ["sr", "sc"])
def test_dciodvfy_reports_no_errors(written, written_of_phantom, source, kind):
    path = (written if source == "RG1_UNCR" else written_of_phantom)["dicom"][kind]
    run = subprocess.run(["dciodvfy", path], capture_output=True, text=True, timeout=120)
    report = run.stdout + run.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report
    assert ("ComprehensiveSR" if kind == "sr" else "SCImage") in report


def test_predict_dicom_out_writes_the_results_of_the_printed_predictions(tiny_model, tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from cxrnn.cli import app

    rg1 = reference_radiograph("RG1_UNCR.dcm")
    png = tmp_path / "scan.png"
    Image.fromarray((np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.uint8)).save(png)
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["predict", str(tiny_model), str(rg1), str(png), "--json", "--dicom-out", str(out)])
    assert result.exit_code == 0, result.output
    lines = {json.loads(line)["path"]: json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")}
    assert sorted(p.name for p in out.iterdir()) == ["RG1_UNCR_sc.dcm", "RG1_UNCR_sr.dcm"]
    finding = read_finding(pydicom.dcmread(out / "RG1_UNCR_sr.dcm"))
    assert finding["label"] == lines[str(rg1)]["label"] and finding["probabilities"] == lines[str(rg1)]["probabilities"]
    assert f"{png}: not a DICOM file: no SR or SC written" in result.stderr  # predicted, said why nothing was written
    assert lines[str(png)]["label"]

    both = CliRunner().invoke(app, ["predict", str(tiny_model), str(rg1), "--dicom-out", str(out), "--cam", str(tmp_path / "m")])
    assert both.exit_code == 2 and "give one of them" in both.output
