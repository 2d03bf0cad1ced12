"""The HTTP API and web page: ``create_app("run/model.pt")`` gives a FastAPI app (``cxrnn serve`` runs it).

Hardening, in the order a request meets it: the body size is capped while it streams in (413); the upload
is sniffed by content, never trusted by name; the pixel count is read from the header before anything is
decoded (413, so a decompression bomb never allocates); every bad input is a 4xx JSON ``{"error": ...}``;
one worker thread owns the model (micro-batching predictions), Grad-CAM shares its lock; each request has
one time limit, counted from its first byte: an upload still incomplete by then is a 408 and the connection
is closed (a client that stalls or trickles its body cannot hold it open), processing past it is a 504.
Unexpected failures are a 500 JSON without traceback. ``/docs`` and ``/redoc`` are off; with
``create_app(docs=True)`` ``/docs`` is Swagger UI from the assets bundled in ``fastapi-offline`` (no CDN;
ReDoc is left out, it fetches its logo from cdn.redoc.ly); ``/openapi.json`` is always there.

``/v1/explain`` runs one forward pass per request where it can: the CAM pass also gives the probabilities
and the OOD score (``cxrnn.explain.cam.predict_and_explain``); one explainer per method is kept for the
service, its hooks idle between requests.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Optional, Sequence

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cxrnn.data.io import ImageReadError, header_size, sniff_format
from cxrnn.explain.registry import DEFAULT_METHOD
from cxrnn.models.bundle import load_bundle
from cxrnn.inference.predictor import Prediction, Predictor
from cxrnn.serve.batching import MicroBatcher, QueueFullError
from cxrnn.serve.card import model_card, model_identity

if TYPE_CHECKING:
    from cxrnn.explain.cam import CamExplainer

log = logging.getLogger("cxrnn.serve")

# 6000 x 6000: above any chest radiograph detector, far below what would let a few concurrent uploads
# exhaust memory once decoded to float32.
DEFAULT_MAX_PIXELS = 36_000_000
DISPLAY_SIDE = 512  # the page shows images and maps at most this wide; the model sees the full image
# One backbone pass each; scorecam (~C passes), ig-pixels and pixel-occlusion (tens to hundreds) are for the CLI.
SERVER_CAM_METHODS = ("ig-sequence", "occlusion", "gradcam", "gradcam++", "xgradcam", "eigencam")
MULTIPART_OVERHEAD = 64 * 1024


class ServeError(StarletteHTTPException):
    """A request the server refuses, with the reason the client sees."""


class OodResult(BaseModel):
    score: float = Field(description="Mahalanobis distance of the image's backbone features to the training images'")
    threshold: float = Field(description="99th percentile of the training images' (out-of-fold) distances")
    flagged: bool = Field(description="score > threshold: the image is unlike the training data")


class ModelInfo(BaseModel):
    name: str
    version: str
    runtime: str


class PredictResponse(BaseModel):
    label: str
    probabilities: dict[str, float]
    ood: Optional[OodResult] = Field(None, description="null when the model has no out-of-distribution statistics")
    warnings: list[str] = Field(default_factory=list,
                                description="why the diagnosis may not apply, e.g. a lateral view or a DICOM without Modality")
    prediction_set: Optional[list[str]] = Field(
        None, description="the conformal prediction set: every class the model cannot rule out at the model's "
                          "calibrated coverage (e.g. 90%: an image of class k has k in its set with probability "
                          ">= 0.9, for each class), in the model's class order; null when the model has no "
                          "conformal calibration (trained before prediction sets)")
    refer: bool = Field(description="refer to a radiologist: the prediction set is not exactly one class (empty "
                                    "or several), or the image is out of distribution")
    refer_reason: Optional[str] = Field(None, description="why refer is true, one short sentence per reason "
                                                          "joined with '; '; null when refer is false")
    model: ModelInfo
    timing_ms: float
    image: dict[str, Any] = Field(description="width, height and sniffed format of the upload")


class ExplainResponse(PredictResponse):
    target: str
    method: str
    overlay_png: str = Field(description="base64 PNG: the map blended over the X-ray (alpha 0.4, jet)")
    heatmap_png: str = Field(description="base64 RGBA PNG: the colour map alone, to layer over image_png")
    image_png: str = Field(description="base64 PNG: the decoded grey X-ray as the model read it")


class ErrorResponse(BaseModel):
    error: str


ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503, 504)}


class BodyLimitMiddleware:
    """Refuses bodies over ``max_bytes`` from Content-Length up front, and while streaming without it."""

    def __init__(self, app: ASGIApp, max_bytes: int, limit_text: str):
        self.app = app
        self.max_bytes = max_bytes
        self.limit_text = limit_text

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = ServeError(413, f"upload too large (limit {self.limit_text})")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"error": too_large.detail}, status_code=413)(scope, receive, send)
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing unchanged -> handled as 413.
                    raise too_large
            return message

        return await self.app(scope, limited_receive, send)


REQUEST_STARTED = "cxrnn_started"  # key in scope["state"] (request.state): perf_counter() at the first byte


class RequestDeadlineMiddleware:
    """Times the whole request from when the app first sees it, upload included.

    The start goes into ``scope["state"]`` for the handlers' own limit (504). Each wait for the body is
    bounded by what is left of ``timeout_s``: a body not complete by then is a 408 ``{"error": ...}`` with
    ``Connection: close``, so the server drops the connection instead of waiting for the rest. Raised inside
    ``receive`` like ``BodyLimitMiddleware``'s 413, it passes through FastAPI's body parsing as an HTTP
    error. Once the response has started no new one can be sent: the app is then told the client is gone.
    """

    def __init__(self, app: ASGIApp, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        scope.setdefault("state", {})[REQUEST_STARTED] = started
        deadline = started + self.timeout_s
        body_done = False
        response_started = False

        async def timed_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # only http.disconnect is left to come: waiting for it is the app's business
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=deadline - time.perf_counter())
            except asyncio.TimeoutError:
                if response_started:
                    return {"type": "http.disconnect"}
                raise ServeError(408, f"upload not complete within the {self.timeout_s:g} s limit",
                                 headers={"Connection": "close"}) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        return await self.app(scope, timed_receive, timed_send)


def image_pixels(data: bytes) -> int | None:
    """Pixel count of what would be decoded (one frame of a multi-frame DICOM), from the header alone;
    None if it cannot be read cheaply (the full reader then gives the precise reason)."""
    size = header_size(data)
    return None if size is None else size[0] * size[1]


def _png_b64(array: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class ModelService:
    """One loaded model shared by all requests: predictions through the micro-batcher, CAMs under its lock."""

    def __init__(self, model_path: str | Path, runtime: str, batch: int, batch_ms: float, max_pixels: int,
                 device: str = "cpu", precision: str = "fp32", acquisition: str = "refuse"):
        self.model_path = Path(model_path)
        self.bundle = load_bundle(self.model_path)
        self.runtime = runtime
        self.predictor = Predictor(self.bundle, batch_size=max(1, batch), runtime=runtime, device=device,
                                   precision=precision, acquisition=acquisition)  # type: ignore[arg-type]
        self.identity = model_identity(self.bundle, self.model_path)
        self.card = model_card(self.bundle, self.model_path, runtime)
        self.max_pixels = max_pixels
        self.lock = threading.Lock()
        self.batcher = MicroBatcher(self._predict_batch, max_batch=max(1, batch), max_wait_ms=batch_ms,
                                    max_queue=max(64, 16 * batch), lock=self.lock)
        # Decoding runs in the thread pool; bounding it bounds the memory of concurrent large uploads.
        self.decode_slots = threading.BoundedSemaphore(4)
        self.explainers: dict[str, CamExplainer] = {}  # by method, made on first use, only touched under the lock

    def _predict_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        probs, scores = self.predictor.predict_with_ood(images)
        return list(zip(probs, scores.tolist()))

    def decode(self, data: bytes, name: str) -> tuple[np.ndarray, str, list[str]]:
        """(image, sniffed format, the reader's warnings) of an upload, or a ServeError with the reason."""
        with self.decode_slots:
            return self._decode(data, name)

    def _decode(self, data: bytes, name: str) -> tuple[np.ndarray, str, list[str]]:
        if not data:
            raise ServeError(422, f"{name}: empty file (0 bytes)")
        fmt = sniff_format(data)
        if fmt is None:
            raise ServeError(415, f"{name}: not an image (unrecognised content; send PNG, JPEG or DICOM)")
        pixels = image_pixels(data)
        if pixels is not None and pixels > self.max_pixels:
            raise ServeError(413, f"{name}: image too large ({pixels:,} pixels, limit {self.max_pixels:,})")
        try:
            image, warnings = self.predictor.read(data, name)  # a non-chest DICOM is refused here (422)
            return image, fmt, warnings
        except ImageReadError as err:
            status = 413 if err.reason.startswith("image too large") else 422
            raise ServeError(status, str(err)) from None

    def explain(self, image: np.ndarray, name: str, target: str | None, method: str, warnings: Sequence[str] = ()
                ) -> tuple[Prediction, str, dict[str, str]]:
        """(prediction, explained class, base64 PNGs) of one image."""
        from cxrnn.explain.cam import CamExplainer, ExplainInput, predict_and_explain

        item = ExplainInput.from_image(image, self.bundle.preprocessing, warnings)

        with self.lock:  # the explainer runs the shared network: nothing else may run it meanwhile
            explainer = self.explainers.get(method)
            if explainer is None:
                explainer = self.explainers[method] = CamExplainer(self.bundle, method=method, batch_size=1)
            ((prediction, exp),) = predict_and_explain(self.predictor, explainer, [item], [name], target)
        return prediction, target or prediction.label, self.render(exp.image, exp.cam)

    def render(self, image: np.ndarray, cam: np.ndarray) -> dict[str, str]:
        """The page's three PNGs, at most DISPLAY_SIDE wide (the model saw the full image)."""
        import matplotlib

        from cxrnn.explain.cam import display_shape, resize_map
        from cxrnn.explain.overlay import overlay_cam

        shape = display_shape(image.shape[:2], DISPLAY_SIDE)
        small = resize_map(image, shape)
        small_cam = resize_map(cam, shape)
        heat = matplotlib.colormaps["jet"](small_cam)
        heat[..., 3] = 0.25 + 0.75 * small_cam  # weak regions stay see-through when layered in the page
        return {
            "overlay_png": _png_b64(overlay_cam(small, small_cam, alpha=0.4)),
            "heatmap_png": _png_b64(np.round(heat * 255).astype(np.uint8)),
            "image_png": _png_b64(np.round(small * 255).astype(np.uint8)),
        }

    def close(self) -> None:
        self.batcher.close()
        with self.lock:
            # Newest first: each explainer restores the requires_grad flags it found when it was made.
            for explainer in reversed(list(self.explainers.values())):
                explainer.close()
            self.explainers.clear()


def create_app(
    model_path: str | Path,
    runtime: str = "torch",
    max_mb: float = 20.0,
    batch: int = 8,
    batch_ms: float = 10.0,
    timeout_s: float = 30.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str = "cpu",
    precision: str = "fp32",
    docs: bool = False,
    acquisition: str = "refuse",
) -> FastAPI:
    """The app for one model file; ``batch=1`` disables micro-batching. ``timeout_s`` bounds each request
    from its first byte, upload included (408 while uploading, 504 after). ``docs=True`` adds ``/docs``,
    Swagger UI served from ``fastapi-offline``'s bundled assets (ValueError if it is not installed).
    ``acquisition`` "flag" predicts DICOM objects that are not chest radiographs with a warning instead of a 422."""
    if max_mb <= 0 or timeout_s <= 0 or batch < 1 or batch_ms < 0 or max_pixels < 1:
        raise ValueError("max_mb, timeout_s, batch and max_pixels must be positive and batch_ms >= 0")

    def docs_assets() -> Path:
        """Swagger UI as shipped inside the fastapi-offline wheel: nothing fetched at run time."""
        try:
            folder = Path(str(resources.files("fastapi_offline") / "static"))
        except ModuleNotFoundError:
            raise ValueError("docs=True needs the fastapi-offline package (pip install fastapi-offline)") from None
        needed = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"fastapi-offline's assets lack {', '.join(missing)} in {folder}")
        return folder

    docs_dir = docs_assets() if docs else None  # before the model loads: fail fast
    service = ModelService(model_path, runtime, batch, batch_ms, max_pixels, device=device, precision=precision,
                           acquisition=acquisition)
    max_bytes = int(max_mb * 1_000_000)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(
        title="cxrnn",
        version=service.identity["version"],
        description="Chest X-ray classification (research use only, not a medical device). "
        f"Model: {service.bundle.describe()}.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's own pages load Swagger UI, ReDoc and fonts from public CDNs
        redoc_url=None,
    )
    app.state.service = service
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes + MULTIPART_OVERHEAD, limit_text=f"{max_mb:g} MB")
    app.add_middleware(RequestDeadlineMiddleware, timeout_s=timeout_s)  # added last: outermost, sees the start
    static_dir = Path(str(resources.files("cxrnn.serve") / "static"))
    app.mount("/static", StaticFiles(directory=static_dir), name="static")
    if docs_dir is not None:
        app.mount("/docs-static", StaticFiles(directory=docs_dir), name="docs-static")

        @app.get("/docs", include_in_schema=False)
        async def swagger_ui(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "")
            return get_swagger_ui_html(
                openapi_url=root + str(app.openapi_url), title=f"{app.title} - Swagger UI",
                swagger_js_url=f"{root}/docs-static/swagger-ui-bundle.js",
                swagger_css_url=f"{root}/docs-static/swagger-ui.css",
                swagger_favicon_url=f"{root}/docs-static/favicon.png",
                swagger_ui_parameters={"validatorUrl": None})  # no badge fetched from validator.swagger.io

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
        return JSONResponse({"error": "invalid request: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal error (logged on the server)"}, status_code=500)

    def request_started(request: Request) -> float:
        """When RequestDeadlineMiddleware first saw the request (now, if something mounted the app without it)."""
        return request.scope.get("state", {}).get(REQUEST_STARTED) or time.perf_counter()

    async def within_deadline(coro: Awaitable[Any], started: float) -> Any:
        remaining = timeout_s - (time.perf_counter() - started)
        try:
            return await asyncio.wait_for(coro, timeout=max(remaining, 1e-6))
        except asyncio.TimeoutError:
            raise ServeError(504, f"request took longer than the {timeout_s:g} s limit") from None

    async def read_upload(file: UploadFile) -> bytes:
        data = await file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ServeError(413, f"upload too large (limit {max_mb:g} MB)")
        return data

    async def one_upload(request: Request) -> None:
        """Refuse an upload holding several images: answering one of them would be a silent guess."""
        count = len((await request.form()).getlist("file"))  # the form FastAPI parsed already (cached)
        if count > 1:
            raise ServeError(422, f"one image per request: the upload has {count} 'file' fields")

    async def decode_upload(file: UploadFile) -> tuple[np.ndarray, str, str, list[str]]:
        data = await read_upload(file)
        name = Path(file.filename or "upload").name
        image, fmt, warnings = await run_in_threadpool(service.decode, data, name)
        return image, fmt, name, warnings

    def response(image: np.ndarray, fmt: str, prediction: Prediction) -> dict[str, Any]:
        """The JSON of /v1/predict and /v1/explain: the predictor's record (``Prediction.to_dict``, less the
        path) plus the model and the image; the same fields ``cxrnn predict --json`` prints."""
        record = prediction.to_dict()
        record.pop("path", None)
        return {
            **record,
            "model": {"name": service.identity["name"], "version": service.identity["version"], "runtime": runtime},
            "image": {"width": int(image.shape[1]), "height": int(image.shape[0]), "format": fmt},
        }

    async def decode_and_predict(file: UploadFile) -> dict[str, Any]:
        image, fmt, name, warnings = await decode_upload(file)
        try:
            future = service.batcher.submit(image)
        except QueueFullError as exc:
            raise ServeError(503, str(exc), headers={"Retry-After": "1"}) from None
        probs, score = await asyncio.wrap_future(future)
        # the predictor's one code path: label, OOD verdict, prediction set and referral as `cxrnn predict` has them
        return response(image, fmt, service.predictor.to_prediction(name, probs, score, warnings))

    route_errors = {**ERRORS, 408: {"model": ErrorResponse}}  # 408: upload not complete in time

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(static_dir / "index.html", media_type="text/html")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": service.identity["name"], "version": service.identity["version"],
                "runtime": runtime, "batching": service.batcher.stats.to_dict()}

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        """Model card: network, classes, training data, test metrics with intervals, calibration, intended use."""
        return service.card

    @app.post("/v1/predict", response_model=PredictResponse, responses=route_errors)
    async def predict(request: Request,
                      file: UploadFile = File(..., description="PNG, JPEG or DICOM chest X-ray")) -> dict[str, Any]:
        """Class probabilities and the out-of-distribution flag for one image."""
        started = request_started(request)
        await one_upload(request)
        result = await within_deadline(decode_and_predict(file), started)
        result["timing_ms"] = (time.perf_counter() - started) * 1000
        return result

    @app.post("/v1/explain", response_model=ExplainResponse, responses=route_errors)
    async def explain(
        request: Request,
        file: UploadFile = File(..., description="PNG, JPEG or DICOM chest X-ray"),
        target: Optional[str] = Form(None, description="class to explain (default: the predicted one)"),
        method: str = Form(DEFAULT_METHOD, description=", ".join(SERVER_CAM_METHODS)),
    ) -> dict[str, Any]:
        """The prediction plus a class activation map of the target class, as base64 PNGs."""
        started = request_started(request)
        await one_upload(request)
        target = target or None  # an empty form field means "the predicted class"
        if method not in SERVER_CAM_METHODS:
            raise ServeError(422, f"unknown method {method!r}: use one of {', '.join(SERVER_CAM_METHODS)}")
        if target is not None and target not in service.bundle.classes:
            raise ServeError(422, f"unknown target {target!r}: the classes are {', '.join(service.bundle.classes)}")

        async def work() -> dict[str, Any]:
            image, fmt, name, warnings = await decode_upload(file)
            prediction, chosen, pngs = await run_in_threadpool(service.explain, image, name, target, method, warnings)
            return {**response(image, fmt, prediction), **pngs, "target": chosen, "method": method}

        result = await within_deadline(work(), started)
        result["timing_ms"] = (time.perf_counter() - started) * 1000
        return result

    return app
