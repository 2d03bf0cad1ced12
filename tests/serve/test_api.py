"""Every route, every bad input: 4xx JSON with a reason, never a 500 or a traceback."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cxrnn.data.io import reference_radiograph
from cxrnn.explain.registry import DEFAULT_METHOD
from cxrnn.models.bundle import load_bundle
from cxrnn.models.ood import OodStats
from cxrnn.serve.app import create_app
from cxrnn.serve.card import wilson_interval
from cxrnn.utils.hashing import file_digest


@pytest.fixture(scope="module")
def client(served_model):
    with TestClient(create_app(served_model, batch=4, batch_ms=5, max_mb=10)) as c:
        yield c


def upload(client, data: bytes, name: str = "x.png", field: str = "file", path: str = "/v1/predict", **form):
    return client.post(path, files={field: (name, data, "application/octet-stream")}, data=form)


def assert_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    for word in words:
        assert word in body["error"], body["error"]


def crafted_png(width: int, height: int) -> bytes:
    """A PNG header declaring huge dimensions, followed by a scrap of pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def test_health_model_card_page_and_schema(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["runtime"] == "torch"
    card = client.get("/v1/model").json()
    for key in ("name", "version", "network", "classes", "training_data", "test_metrics", "calibration",
                "intended_use", "limitations", "out_of_distribution"):
        assert key in card, key
    assert card["network"]["backbone"]["name"] == "efficientnet_lite0" and card["network"]["head"]["name"] == "bilstm"
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "not a medical device" in page.text and "/static/app.js" in page.text
    assert "http" not in page.text.split("<body>")[0].replace("http-equiv", "")  # nothing from a CDN
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/app.css").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/explain", "/v1/model", "/healthz"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 404  # off by default: FastAPI's page loads Swagger UI from a CDN
    assert_error(client.get("/no/such/route"), 404)


def test_model_card_holds_what_the_model_file_and_its_run_hold(client, served_model):
    card = client.get("/v1/model").json()
    bundle = load_bundle(served_model)
    assert card["version"] == file_digest(served_model)[:12]
    assert card["classes"] == bundle.classes
    assert card["network"]["backbone"]["weights"] == bundle.weights_id
    assert card["network"]["backbone"]["grad_cam_layer"] == bundle.target_layer
    assert card["network"]["feature_map"] == list(bundle.feature_hw)
    assert card["calibration"]["temperature"] == bundle.temperature
    assert card["out_of_distribution"]["threshold"] == OodStats.from_extras(bundle.extras).threshold
    assert card["training_data"]["n_images"] == bundle.extras["training_data"]["n_images"]
    # The run's own measurements on its test split, not numbers recomputed by the server.
    run = json.loads((Path(served_model).parent / "metrics.json").read_text())
    assert (card["test_metrics"]["n"], card["test_metrics"]["accuracy"]) == (run["n"], run["accuracy"])
    assert card["test_metrics"]["ci"]["accuracy"] == run["ci"]["accuracy"]
    assert card["calibration"]["ece"] == pytest.approx(run["ece"], abs=1e-12)


@pytest.mark.parametrize("successes, n, low, high", [
    (8, 10, 0.4901625, 0.9433178),
    (45, 50, 0.7863977, 0.9565242),
    (1, 3, 0.0614919, 0.7923404),
    (0, 10, 0.0, 0.2775328),  # closed form at p = 0: z^2 / (n + z^2)
    (10, 10, 0.7224672, 1.0),  # and at p = 1: n / (n + z^2)
])
def test_wilson_interval_known_values(successes, n, low, high):
    got = wilson_interval(successes, n)
    assert got == pytest.approx((low, high), abs=1e-6)


def test_wilson_interval_of_no_images_is_none():
    assert wilson_interval(0, 0) is None


def test_predict_png_jpeg_and_dicom(client, phantom_png, encode):
    png = phantom_png.read_bytes()
    r = upload(client, png)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["probabilities"]) == {"covid", "normal", "pneumonia"}
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert set(body["ood"]) == {"score", "threshold", "flagged"}
    assert body["model"]["name"].startswith("cxrnn-") and body["model"]["version"]
    assert body["timing_ms"] > 0 and body["image"]["format"] == "png"

    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    r = upload(client, encode.jpeg(grey), name="scan.jpg")
    assert r.status_code == 200 and r.json()["image"]["format"] == "jpeg"

    dicom = reference_radiograph("RG1_UNCR.dcm")
    r = upload(client, dicom.read_bytes(), name=dicom.name)
    assert r.status_code == 200, r.text
    assert r.json()["image"]["format"] == "dicom" and r.json()["image"]["width"] > 1000

    # Content decides, not the name: a PNG called .dcm is read as PNG.
    r = upload(client, png, name="actually_png.dcm")
    assert r.status_code == 200 and r.json()["image"]["format"] == "png"


def test_same_image_same_answer_under_concurrency(client, phantom_png):
    data = phantom_png.read_bytes()
    expected = upload(client, data).json()["probabilities"]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: upload(client, data), range(16)))
    assert all(r.status_code == 200 for r in responses)
    for r in responses:
        for c, p in expected.items():
            assert abs(r.json()["probabilities"][c] - p) < 1e-5


def test_explain_returns_the_overlay(client, phantom_png):
    predicted = upload(client, phantom_png.read_bytes()).json()
    r = upload(client, phantom_png.read_bytes(), path="/v1/explain")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["target"] == body["label"] == predicted["label"] and body["method"] == DEFAULT_METHOD
    # The CAM pass's prediction is the engine's (batch composition only moves the last bits).
    for c, p in predicted["probabilities"].items():
        assert abs(body["probabilities"][c] - p) < 1e-5
    assert body["ood"]["score"] == pytest.approx(predicted["ood"]["score"], rel=1e-4)
    assert body["ood"]["flagged"] == predicted["ood"]["flagged"] and body["image"] == predicted["image"]
    for key in ("overlay_png", "heatmap_png", "image_png"):
        image = Image.open(io.BytesIO(base64.b64decode(body[key])))
        assert image.format == "PNG" and min(image.size) >= 32
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"]))))
    assert heat.shape[-1] == 4 and heat[..., :3].std() > 0  # a map, not a flat colour

    r = upload(client, phantom_png.read_bytes(), path="/v1/explain", target="normal", method="gradcam++")
    assert r.status_code == 200 and r.json()["target"] == "normal" and r.json()["method"] == "gradcam++"
    assert_error(upload(client, phantom_png.read_bytes(), path="/v1/explain", method="magic"), 422, "method")
    assert_error(upload(client, phantom_png.read_bytes(), path="/v1/explain", target="flu"), 422, "flu")
    assert_error(upload(client, b"", path="/v1/explain"), 422, "empty")


def test_explainer_is_kept_and_idle_between_requests(client, phantom_png):
    data = phantom_png.read_bytes()
    assert upload(client, data, path="/v1/explain", method="gradcam").status_code == 200  # the hooked kind
    service = client.app.state.service
    explainer = service.explainers["gradcam"]
    before = upload(client, data).json()["probabilities"]
    assert upload(client, data, path="/v1/explain", method="gradcam").status_code == 200
    assert upload(client, data, path="/v1/explain").status_code == 200
    assert service.explainers["gradcam"] is explainer  # one explainer per method for the service's life
    assert {"gradcam", DEFAULT_METHOD} <= set(service.explainers)
    after = [upload(client, data).json()["probabilities"] for _ in range(3)]
    assert all(a == before for a in after)  # its hooks change nothing in predictions
    assert explainer._cam.activations_and_grads.activations == []  # and record nothing between requests


def test_bad_uploads_are_4xx_json(client, phantom_png, encode):
    png = phantom_png.read_bytes()
    assert_error(upload(client, b""), 422, "empty")
    assert_error(upload(client, b"hello, this is text and not an image" * 3, name="notes.png"), 415, "not an image")
    assert_error(upload(client, png[: len(png) // 2]), 422, "truncated")
    assert_error(upload(client, png, field="image"), 422, "file")  # wrong field name
    assert_error(client.post("/v1/predict"), 422)  # no body at all
    assert_error(client.post("/v1/predict", content=b"raw bytes", headers={"content-type": "image/png"}), 422)
    assert_error(client.post("/v1/predict", json={"file": "x"}), 422)
    assert_error(upload(client, crafted_png(100_000, 100_000)), 413, "too large")  # huge header, tiny file
    assert_error(upload(client, encode.png(np.full((64, 64), 128, np.uint8))), 422, "blank image")
    # readable, but nothing like an X-ray: a faint checkerboard
    faint = (128 + 4 * ((np.indices((64, 64)).sum(axis=0) // 8) % 2)).astype(np.uint8)
    flat = upload(client, encode.png(faint))
    assert flat.status_code == 200 and flat.json()["ood"]["flagged"]
    assert_error(client.get("/v1/predict"), 405)


def test_decompression_bomb_is_refused_before_decoding(client):
    # 7000 x 7000 zeros: ~50 kB of PNG, 49 M pixels once decoded (over the 36 M default limit).
    buf = io.BytesIO()
    Image.new("L", (7000, 7000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 200_000
    assert_error(upload(client, buf.getvalue()), 413, "too large")


def test_oversize_upload_is_413_with_or_without_content_length(client):
    big = b"\x89PNG\r\n\x1a\n" + bytes(11_000_000)  # limit is 10 MB
    assert_error(upload(client, big), 413, "too large", "10 MB")

    def chunks():
        for _ in range(120):
            yield b"x" * 100_000

    r = client.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=abc"})
    assert_error(r, 413, "too large")


def test_request_time_limit_gives_504(served_model, phantom_png):
    """Processing past the limit is a 504 (an upload not complete in time is a 408: test_hardening_timing)."""
    with TestClient(create_app(served_model, timeout_s=0.5)) as slow:
        service = slow.app.state.service
        decode = service.decode

        def slow_decode(data, name):
            time.sleep(1.0)
            return decode(data, name)

        service.decode = slow_decode
        assert_error(upload(slow, phantom_png.read_bytes()), 504, "longer than the 0.5 s limit")


def test_onnx_runtime_server_matches_torch(client, served_model, phantom_png):
    data = phantom_png.read_bytes()
    expected = upload(client, data).json()
    with TestClient(create_app(served_model, runtime="onnx")) as onnx_client:
        got = upload(onnx_client, data).json()
        assert got["model"]["runtime"] == "onnx"
        for c, p in expected["probabilities"].items():
            assert abs(got["probabilities"][c] - p) < 1e-4
        assert onnx_client.get("/healthz").json()["runtime"] == "onnx"


def test_bad_settings_are_refused(served_model):
    with pytest.raises(ValueError):
        create_app(served_model, batch=0)
    with pytest.raises(ValueError, match="runtime"):
        create_app(served_model, runtime="tensorrt")


def test_an_upload_with_two_images_is_refused_not_half_answered(client, encode):
    png = encode.png(np.full((64, 64), 90, np.uint8) + np.eye(64, dtype=np.uint8) * 60)
    files = [("file", ("a.png", png, "image/png")), ("file", ("b.png", png, "image/png"))]
    for path in ("/v1/predict", "/v1/explain"):
        assert_error(client.post(path, files=files), 422, "one image per request", "2 'file' fields")
    assert upload(client, png).status_code == 200  # one image is answered as before
