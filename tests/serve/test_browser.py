"""A real browser (Debian's chromium driven by Playwright) uploads an X-ray and sees the label and overlay."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="/usr/bin/chromium is not installed (apt-get install chromium; .ci/run does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(served_model):
    import httpx
    import uvicorn

    from cxrnn.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(served_model), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        pytest.fail("the server did not start within 60 s")
    yield url
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def page(server_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            blocked: list[str] = []
            # Anything not served by our loopback server would be a CDN or tracker: refuse and record it.
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server_url)
                       else (blocked.append(route.request.url), route.abort()))
            page.blocked = blocked  # type: ignore[attr-defined]
            yield page
        finally:
            browser.close()


def test_upload_shows_label_bars_overlay_and_notice(page, server_url, phantom_png, tmp_path):
    page.goto(server_url + "/")
    assert "not a medical device" in page.inner_text(".notice")
    page.wait_for_function("document.getElementById('model-line').textContent.startsWith('cxrnn-')", timeout=30_000)
    page.set_input_files("#file-input", str(phantom_png))
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    label = page.inner_text("#label")
    assert label in ("covid", "normal", "pneumonia")
    assert page.locator(".bar").count() == 3
    page.wait_for_function("document.getElementById('cam-heat').naturalWidth > 0", timeout=30_000)
    assert page.evaluate("document.getElementById('cam-image').naturalWidth") > 0
    page.fill("#opacity", "80")
    page.dispatch_event("#opacity", "input")
    assert page.evaluate("getComputedStyle(document.getElementById('cam-heat')).opacity") == "0.8"
    shot = tmp_path / "upload.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    keep = Path("/tmp/cxrnn-browser-screenshots")  # for a person to look at after the run
    keep.mkdir(exist_ok=True)
    shutil.copy(shot, keep / "upload.png")
    assert page.blocked == []  # type: ignore[attr-defined]


def test_photo_shows_the_out_of_distribution_warning(page, server_url, tmp_path):
    import matplotlib.cbook

    photo = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    page.goto(server_url + "/")
    page.set_input_files("#file-input", str(photo))
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    assert page.is_visible("#ood-warning")
    assert "unlike the images the model was trained on" in page.inner_text("#ood-warning")
    assert page.is_visible("#refer") and page.get_attribute("#refer", "role") == "alert"
    assert page.inner_text("#refer").startswith("Refer to a radiologist: ")
    assert "out of distribution: unlike the training images" in page.inner_text("#refer")
    page.screenshot(path=str(tmp_path / "ood.png"), full_page=True)
    shutil.copy(tmp_path / "ood.png", Path("/tmp/cxrnn-browser-screenshots") / "ood.png")


def test_bad_file_shows_the_reason(page, server_url, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    page.goto(server_url + "/")
    page.set_input_files("#file-input", str(bad))
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "not an image" in page.inner_text("#error")


def test_prediction_set_and_refer_banner_follow_the_response(page, server_url):
    """The page's rendering of issue 15's fields, fed responses directly: a set of two refers, a singleton
    does not, a model without sets shows no set line."""
    page.goto(server_url + "/")
    base = {"label": "covid", "probabilities": {"covid": 0.5, "normal": 0.1, "pneumonia": 0.4}, "ood": None,
            "warnings": [], "image_png": "", "heatmap_png": "", "method": "gradcam", "target": "covid",
            "image": {"width": 8, "height": 8, "format": "png"}, "timing_ms": 1.0}
    reason = "prediction set {covid, pneumonia}: the model cannot tell these apart at 90% coverage"
    page.evaluate("(d) => renderResult(d)", {**base, "prediction_set": ["covid", "pneumonia"], "refer": True,
                                             "refer_reason": reason})
    assert page.inner_text("#prediction-set") == "{covid, pneumonia}"
    assert page.is_visible("#set-line")
    assert page.inner_text("#refer") == "Refer to a radiologist: " + reason
    page.evaluate("(d) => renderResult(d)", {**base, "prediction_set": ["covid"], "refer": False,
                                             "refer_reason": None})
    assert page.inner_text("#prediction-set") == "{covid}" and not page.is_visible("#refer")
    page.evaluate("(d) => renderResult(d)", {**base, "prediction_set": None, "refer": False, "refer_reason": None})
    assert not page.is_visible("#set-line") and not page.is_visible("#refer")
