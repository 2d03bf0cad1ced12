"""Fixtures for the PACS tests: a tiny random model file, and a real PACS (Orthanc with its DICOMweb
plugin) on a loopback port with a temporary storage folder, stopped after the test."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ORTHANC = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).is_file()), None)
PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7")


def _serve_conftest():
    spec = importlib.util.spec_from_file_location("serve_conftest", Path(__file__).parent.parent / "serve" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """timm's test_efficientnet with random weights and an LSTM head, saved as model.pt (fast to build)."""
    from cxrnn.models.bundle import save_bundle

    return save_bundle(_serve_conftest().tiny_bundle("lstm"), tmp_path_factory.mktemp("pacs-model") / "model.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dicomweb_plugin() -> str | None:
    found = [p for p in PLUGIN_CANDIDATES if Path(p).is_file()]
    if not found:
        try:
            listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True).stdout
        except OSError:
            listed = ""
        found = [line for line in listed.splitlines() if "libOrthancDicomWeb.so" in line and Path(line).is_file()]
    return found[0] if found else None


def phantom_dicom(tmp_path):
    """A phantom radiograph wrapped as a CR chest PA DICOM object in a study of its own
    (no PatientBirthDate, PatientSex or PatientOrientation: a minimal header)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

    from cxrnn.data.phantom import PhantomConfig, render_case

    image = render_case(7, "pneumonia", PhantomConfig(size=128)).image
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.StudyID, ds.AccessionNumber = "PHANTOM7", "Phantom^Seven", "1", "A7"
    ds.StudyDate, ds.StudyTime = "20250101", "120000"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.set_pixel_data(np.round(image * 4095).astype(np.uint16), "MONOCHROME2", 12)
    path = tmp_path / "phantom.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds.StudyInstanceUID



@dataclass
class OrthancServer:
    root: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> None:
        plugin = dicomweb_plugin()
        config = {
            "Name": "cxrnn-test", "HttpPort": self.port, "DicomServerEnabled": False, "DicomPort": free_port(),
            "StorageDirectory": str(self.root / "storage"), "IndexDirectory": str(self.root / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "HttpTimeout": 30,
        }
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = open(self.root / "orthanc.log", "ab")
        self.process = subprocess.Popen([ORTHANC, str(path)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.process.returncode}); see {self.root / 'orthanc.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer on /system within 60 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def upload(self, path: str | Path) -> dict:
        req = urllib.request.Request(f"{self.url}/instances", data=Path(path).read_bytes(), method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def get_json(self, route: str):
        with urllib.request.urlopen(f"{self.url}{route}", timeout=30) as r:
            return json.loads(r.read())


@pytest.fixture
def orthanc(tmp_path):
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed (Debian packages orthanc, orthanc-dicomweb)")
    if dicomweb_plugin() is None:
        pytest.skip("the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)")
    server = OrthancServer(tmp_path / "orthanc", free_port())
    server.root.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.log.close()
