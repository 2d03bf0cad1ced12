"""`cxrnn pacs predict` and `cxrnn pacs watch` against a real PACS: Orthanc with its DICOMweb plugin."""

from __future__ import annotations

import json
import threading
import time

import pydicom
import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from cxrnn.cli import app
from cxrnn.data.io import reference_radiograph
from cxrnn.pacs.client import PacsClient, PacsError
from cxrnn.pacs.results import SC_SERIES_PREFIX, SR_SERIES_PREFIX, read_finding
from cxrnn.pacs.watch import PacsRunner, WatchState, watch

from .conftest import phantom_dicom  # noqa: TID252


def variant(tmp_path, name, source="RG1_UNCR.dcm", study=None, **changes):
    """A copy of a reference file with new series/instance UIDs (and ``study``'s StudyInstanceUID)."""
    ds = pydicom.dcmread(reference_radiograph(source))
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if study is not None:
        for key in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex"):
            if key in study:
                setattr(ds, key, study[key].value)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path)
    return path


def results_in(client: PacsClient, study_uid: str) -> dict[str, list]:
    """The study's SR and SC objects of cxrnn, retrieved over WADO-RS."""
    out: dict[str, list] = {"sr": [], "sc": []}
    for inst in client.instances(study_uid):
        ds = client.retrieve(study_uid, inst["SeriesInstanceUID"], inst["SOPInstanceUID"])
        description = str(ds.get("SeriesDescription", ""))
        if description.startswith(SR_SERIES_PREFIX):
            out["sr"].append(ds)
        elif description.startswith(SC_SERIES_PREFIX):
            out["sc"].append(ds)
    return out


def predict_json(model, path) -> dict:
    result = CliRunner().invoke(app, ["predict", str(model), str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads([line for line in result.output.splitlines() if line.startswith("{")][0])


def test_pacs_predict_stores_one_sr_and_one_sc_and_skips_what_it_cannot_read(orthanc, tiny_model, tmp_path):
    rg1 = reference_radiograph("RG1_UNCR.dcm")
    study = pydicom.dcmread(rg1, stop_before_pixels=True)
    orthanc.upload(rg1)
    orthanc.upload(reference_radiograph("693_UNCR.dcm"))  # a CT study of its own
    # in RG1's study: a CT slice, a lateral view, an image without pixel data
    orthanc.upload(variant(tmp_path, "ct", "693_UNCR.dcm", study=study))
    orthanc.upload(variant(tmp_path, "lateral", study=study, ViewPosition="LL"))
    orthanc.upload(variant(tmp_path, "nopixels", study=study, PixelData=None))

    run = CliRunner().invoke(app, ["pacs", "predict", str(tiny_model), "--url", orthanc.dicomweb])
    assert run.exit_code == 0, run.output
    out = run.output
    assert "-> SC + SR stored" in out
    assert "skipped, modality CT is not one of CR,DX" in out
    assert "skipped, lateral view (ViewPosition LL)" in out
    assert "skipped, no pixel data" in out
    assert "1 image(s) stored as SR + SC, 3 skipped, 0 failed" in out

    client = PacsClient(orthanc.dicomweb)
    found = results_in(client, study.StudyInstanceUID)
    assert len(found["sr"]) == 1 and len(found["sc"]) == 1
    expected = predict_json(tiny_model, rg1)
    finding = read_finding(found["sr"][0])
    assert finding["label"] == expected["label"]
    assert finding["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-12)
    assert finding["source_sop_instance_uid"] == study.SOPInstanceUID
    assert found["sc"][0].PhotometricInterpretation == "RGB"
    ct_study = pydicom.dcmread(reference_radiograph("693_UNCR.dcm"), stop_before_pixels=True).StudyInstanceUID
    assert results_in(client, ct_study) == {"sr": [], "sc": []}  # not a CR/DX study: not even searched

    again = CliRunner().invoke(app, ["pacs", "predict", str(tiny_model), "--url", orthanc.dicomweb,
                                     "--study", study.StudyInstanceUID])
    assert again.exit_code == 0, again.output
    assert "already has an SR of model" in again.output
    assert "0 image(s) stored" in again.output
    found = results_in(client, study.StudyInstanceUID)
    assert len(found["sr"]) == 1 and len(found["sc"]) == 1


def test_a_server_that_is_down_or_answers_an_error_is_one_line(orthanc, tiny_model, monkeypatch):
    monkeypatch.setenv("CXRNN_TEST_TOKEN", "s3cret-token-value")
    missing = PacsClient(f"{orthanc.url}/no-such-root", token_env="CXRNN_TEST_TOKEN", retries=0)
    with pytest.raises(PacsError) as err:
        missing.find_studies()
    assert str(err.value) == f"PACS {orthanc.url}/no-such-root: HTTP 404 Not Found"
    assert "s3cret" not in repr(missing)
    orthanc.stop()
    run = CliRunner().invoke(app, ["pacs", "predict", str(tiny_model), "--url", orthanc.dicomweb,
                                   "--token-env", "CXRNN_TEST_TOKEN", "--retries", "1", "--timeout", "5"])
    assert run.exit_code == 1
    assert run.output.strip() == f"error: PACS {orthanc.dicomweb}: connection refused (is the server running?)"
    assert "s3cret" not in run.output
    unset = CliRunner().invoke(app, ["pacs", "predict", str(tiny_model), "--url", orthanc.dicomweb,
                                     "--token-env", "CXRNN_NO_SUCH_VARIABLE"])
    assert unset.exit_code == 2 and "CXRNN_NO_SUCH_VARIABLE" in unset.output


def wait_for(condition, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_watch_processes_new_studies_once_and_survives_the_pacs_going_away(orthanc, tiny_model, tmp_path):
    client = PacsClient(orthanc.dicomweb, retries=0, timeout=10)
    lines: list[str] = []
    state_file = tmp_path / "state.json"
    stop = threading.Event()
    with PacsRunner(client, tiny_model, log=lines.append) as runner:
        state = WatchState(state_file, runner.model["id"])
        thread = threading.Thread(target=watch, args=(runner, state), kwargs={"interval": 0.3, "stop": stop})
        thread.start()
        try:
            time.sleep(1.0)  # a poll or more of an empty PACS
            first = pydicom.dcmread(reference_radiograph("RG1_UNCR.dcm"), stop_before_pixels=True).StudyInstanceUID
            orthanc.upload(reference_radiograph("RG1_UNCR.dcm"))
            assert wait_for(lambda: first in state.done), lines
            orthanc.stop()
            assert wait_for(lambda: any("connection refused" in line for line in lines), 30), lines
            orthanc.start()
            second = generate_uid()
            orthanc.upload(variant(tmp_path, "second", StudyInstanceUID=second))
            assert wait_for(lambda: second in state.done), lines
            time.sleep(1.0)  # more polls: nothing is done twice
        finally:
            stop.set()
            thread.join(60)
        assert not thread.is_alive()
    for uid in (first, second):
        found = results_in(client, uid)
        assert len(found["sr"]) == 1 and len(found["sc"]) == 1, (uid, lines)
    assert sum("-> SC + SR stored" in line for line in lines) == 2, lines
    assert sorted(json.loads(state_file.read_text())["studies"]) == sorted([first, second])

    # a restart resumes from the state file: nothing new is stored
    restart = CliRunner().invoke(app, ["pacs", "watch", str(tiny_model), "--url", orthanc.dicomweb, "--interval",
                                       "0.1", "--max-polls", "2", "--state", str(state_file)])
    assert restart.exit_code == 0, restart.output
    assert "2 stud(ies) done before" in restart.output
    assert "stored" not in restart.output.replace("0 image(s) stored", "")
    assert "done after 2 poll(s)" in restart.output


def test_pacs_predict_reads_jpeg2000_and_a_phantom_wrapped_as_dicom(orthanc, tiny_model, tmp_path):
    j2k = variant(tmp_path, "j2k", "RG1_J2KR.dcm", StudyInstanceUID=generate_uid())
    j2k_study = pydicom.dcmread(j2k, stop_before_pixels=True).StudyInstanceUID
    phantom, phantom_study = phantom_dicom(tmp_path)
    for path in (j2k, phantom):
        orthanc.upload(path)
    run = CliRunner().invoke(app, ["pacs", "predict", str(tiny_model), "--url", orthanc.dicomweb, "--since", "19000101"])
    assert run.exit_code == 0, run.output
    assert "2 image(s) stored as SR + SC, 0 skipped, 0 failed" in run.output
    client = PacsClient(orthanc.dicomweb)
    for path, uid in ((j2k, j2k_study), (phantom, phantom_study)):
        found = results_in(client, uid)
        assert len(found["sr"]) == 1 and len(found["sc"]) == 1
        expected = predict_json(tiny_model, path)
        finding = read_finding(found["sr"][0])
        assert finding["label"] == expected["label"]
        assert finding["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-12)
