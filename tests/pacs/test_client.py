"""The PACS client and the instance checks without a server: one-line errors, secrets kept out, skip reasons."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from cxrnn.pacs.client import PacsClient, PacsError, flatten, redact
from cxrnn.pacs.watch import skip_reason

from .conftest import free_port  # noqa: TID252


def header(**tags) -> Dataset:
    ds = Dataset()
    for key, value in {"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA", **tags}.items():
        if value is not None:
            setattr(ds, key, value)
    return ds


@pytest.mark.parametrize("tags, full, reason", [
    ({}, False, None),
    ({"Modality": "CT"}, False, "modality CT is not one of CR,DX"),
    ({"BodyPartExamined": "HAND"}, False, "body part HAND is not chest"),
    ({"ViewPosition": "LL"}, False, "lateral view (ViewPosition LL): the model was trained on frontal PA/AP views"),
    ({"NumberOfFrames": 3}, False, "multi-frame object (3 frames)"),
    ({}, True, "no pixel data"),
    ({"Modality": None}, True, "no Modality in the DICOM header"),
    ({"Modality": None}, False, None),  # a QIDO answer without the field: the retrieved object decides
])
def test_skip_reasons(tags, full, reason):
    assert skip_reason(header(**tags), ("CR", "DX"), full=full) == reason


def test_a_closed_port_is_one_line_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    client = PacsClient(url, retries=0, timeout=5)
    with pytest.raises(PacsError) as err:
        client.find_studies()
    assert str(err.value) == f"PACS {url}: connection refused (is the server running?)"
    assert "\n" not in str(err.value)


def test_secrets_come_from_the_environment_and_are_never_shown(monkeypatch):
    monkeypatch.setenv("CXRNN_PACS_PASSWORD", "hunter2-secret")
    client = PacsClient("https://alice:inline-pass@pacs.example/dicom-web", username="alice",
                        password_env="CXRNN_PACS_PASSWORD")
    assert client.shown_url == "https://pacs.example/dicom-web"
    assert "secret" not in repr(client) and "inline-pass" not in repr(client)
    assert redact("http://u:p@h:1/x") == "http://h:1/x"
    with pytest.raises(ValueError, match="CXRNN_UNSET_VARIABLE: the environment variable is not set"):
        PacsClient("http://h/dicom-web", token_env="CXRNN_UNSET_VARIABLE")
    with pytest.raises(ValueError, match="not both"):
        PacsClient("http://h/dicom-web", username="a", token_env="CXRNN_PACS_PASSWORD")
    with pytest.raises(ValueError, match="http"):
        PacsClient("pacs.example/dicom-web")
    with pytest.raises(ValueError, match="YYYYMMDD"):
        PacsClient("http://h/dicom-web").find_studies(since="2024-01-01")


def test_qido_json_is_flattened_to_keywords():
    item = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^J"}]},
            "00080061": {"vr": "CS", "Value": ["CR", "SR"]}, "00080020": {"vr": "DA"}}
    assert flatten(item, ["StudyInstanceUID", "PatientName", "ModalitiesInStudy", "StudyDate"]) == {
        "StudyInstanceUID": "1.2.3", "PatientName": "Doe^J", "ModalitiesInStudy": ["CR", "SR"]}
