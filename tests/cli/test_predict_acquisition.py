"""Issue 13 on the command line: ``cxrnn predict`` refuses a DICOM that is not a chest radiograph, names the
file and the reason, and with ``--accept-non-chest`` predicts it with that reason as a warning."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from cxrnn.cli import app
from cxrnn.data.io import reference_radiograph

runner = CliRunner()
CT_REASON = "modality CT is not a radiograph (CR/DX/DR)"
LATERAL_REASON = "lateral view (ViewPosition LL): the model was trained on frontal PA/AP views"


@pytest.fixture
def files(phantom_dir, tmp_path):
    """(a real CT slice, a phantom PNG, a real chest radiograph marked lateral)."""
    import pydicom

    ct = tmp_path / "a_ct.dcm"
    shutil.copyfile(reference_radiograph("693_UNCR.dcm"), ct)
    good = tmp_path / "good.png"
    shutil.copyfile(sorted((phantom_dir / "covid").glob("*.png"))[0], good)
    lateral = tmp_path / "lateral.dcm"
    ds = pydicom.dcmread(reference_radiograph("RG1_UNCR.dcm"))
    ds.ViewPosition = "LL"
    ds.save_as(lateral)
    return ct, good, lateral


def _json_lines(text: str) -> dict[str, dict]:
    return {json.loads(line)["path"]: json.loads(line) for line in text.splitlines() if line.startswith("{")}


def test_predict_json_refuses_a_ct_and_predicts_the_rest(trained_run, files):
    ct, good, lateral = files
    result = runner.invoke(app, ["predict", str(trained_run.model_path), str(ct), str(good), str(lateral), "--json"])
    assert result.exit_code == 0, result.output
    out = _json_lines(result.stdout)
    assert list(out) == [str(ct), str(good), str(lateral)]
    assert out[str(ct)] == {"path": str(ct), "error": f"{ct}: {CT_REASON}"}
    assert out[str(good)]["label"] in {"covid", "normal", "pneumonia"} and out[str(good)]["warnings"] == []
    assert out[str(lateral)]["label"] and out[str(lateral)]["warnings"] == [LATERAL_REASON]
    assert "1 of 3 file(s) could not be read" in result.stderr


def test_predict_accept_non_chest_predicts_the_ct_with_a_warning(trained_run, files):
    ct, good, _ = files
    result = runner.invoke(app, ["predict", str(trained_run.model_path), str(ct), str(good), "--json",
                                 "--accept-non-chest"])
    assert result.exit_code == 0, result.output
    out = _json_lines(result.stdout)
    assert set(out[str(ct)]) == {"path", "label", "probabilities", "ood", "warnings", "prediction_set", "refer",
                                 "refer_reason"}
    assert out[str(ct)]["warnings"] == [CT_REASON]
    assert out[str(good)]["warnings"] == []
    assert "could not be read" not in result.stderr


def test_predict_text_shows_refusals_and_warnings_one_line_per_file(trained_run, files):
    ct, good, lateral = files
    argv = ["predict", str(trained_run.model_path), str(ct), str(good), str(lateral)]
    refused = runner.invoke(app, argv, env={"COLUMNS": "80"})
    assert refused.exit_code == 0, refused.output
    assert [line for line in refused.stderr.splitlines() if "a_ct.dcm" in line] == [
        f"warning: skipped {ct}: {CT_REASON}"]
    lines = refused.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(good), str(lateral)]
    assert "warning" not in lines[0] and lines[1].endswith(f"warning: {LATERAL_REASON}")

    accepted = runner.invoke(app, [*argv, "--accept-non-chest"], env={"COLUMNS": "80"})
    assert accepted.exit_code == 0, accepted.output
    lines = accepted.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{ct}: ") and lines[0].endswith(f"warning: {CT_REASON}")


def test_predict_cam_and_explain_take_the_same_policy_and_carry_the_warnings(trained_run, files, tmp_path):
    ct, good, lateral = files
    model = str(trained_run.model_path)
    refused = runner.invoke(app, ["predict", model, str(ct), str(good), str(lateral), "--json", "--cam", str(tmp_path / "a")])
    assert refused.exit_code == 0, refused.output
    out = _json_lines(refused.stdout)
    assert out[str(ct)]["error"] == f"{ct}: {CT_REASON}" and out[str(lateral)]["warnings"] == [LATERAL_REASON]
    index = json.loads((tmp_path / "a" / "explanations.json").read_text())
    assert [e.get("warnings") for e in index["images"]] == [None, [], [LATERAL_REASON]]

    accepted = runner.invoke(app, ["explain", model, str(ct), str(lateral), "--out", str(tmp_path / "b"),
                                   "--accept-non-chest"])
    assert accepted.exit_code == 0, accepted.output
    lines = accepted.stdout.splitlines()
    assert f"warning: {CT_REASON}" in lines[0] and f"warning: {LATERAL_REASON}" in lines[1]
    index = json.loads((tmp_path / "b" / "explanations.json").read_text())
    assert index["errors"] == 0 and [e["warnings"] for e in index["images"]] == [[CT_REASON], [LATERAL_REASON]]


def test_server_refuses_a_ct_with_422_and_returns_the_warnings(trained_run, files):
    from fastapi.testclient import TestClient

    from cxrnn.serve.app import create_app

    ct, _, lateral = files
    with TestClient(create_app(trained_run.model_path)) as client:
        r = client.post("/v1/predict", files={"file": ("ct.dcm", ct.read_bytes())})
        assert r.status_code == 422 and r.json() == {"error": f"ct.dcm: {CT_REASON}"}
        for route in ("/v1/predict", "/v1/explain"):
            r = client.post(route, files={"file": ("lat.dcm", lateral.read_bytes())})
            assert r.status_code == 200 and r.json()["warnings"] == [LATERAL_REASON]
    with TestClient(create_app(trained_run.model_path, acquisition="flag")) as client:
        r = client.post("/v1/predict", files={"file": ("ct.dcm", ct.read_bytes())})
        assert r.status_code == 200 and r.json()["warnings"] == [CT_REASON]


def test_predictor_refuses_an_unknown_policy_before_the_model_is_touched():
    from cxrnn.inference.predictor import Predictor

    with pytest.raises(ValueError, match="acquisition must be one of refuse, flag"):
        Predictor(None, acquisition="ignore")  # type: ignore[arg-type]
