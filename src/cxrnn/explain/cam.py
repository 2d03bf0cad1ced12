"""Class activation maps for the whole CNN->RNN network, built on pytorch-grad-cam.

The model handed to pytorch-grad-cam is the complete ``CxrNet``: the class score is back-propagated through
the classifier, the RNN head and the reshape of the feature map into a sequence, down to the backbone's
target layer. Maps come back at the original image's resolution and aspect: the model input is a plain
resize of the whole image to SxS (no crop), so undoing it is a resize of the map back to (H, W).

The backbone pass behind a map serves the prediction too: ``CamResult`` carries the calibrated
probabilities and the out-of-distribution score computed from that pass's feature map as the inference
graph computes them. ``predict_and_explain`` uses them instead of a second forward pass where they are
the same numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrnn.data.dicom import AcquisitionPolicy
from cxrnn.data.io import ImageReadError, read_image_checked
from cxrnn.explain.attribution import create_attribution, cudnn_off_for_rnns
from cxrnn.explain.registry import ATTRIBUTION_METHODS, CAM_METHODS, DEFAULT_METHOD, METHODS
from cxrnn.models.bundle import ModelBundle, load_bundle
from cxrnn.models.ood import MahalanobisScore, OodStats
from cxrnn.models.preprocess import resize_to_input, to_input_tensor

if TYPE_CHECKING:
    from cxrnn.inference.predictor import Prediction, Predictor

Progress = Callable[[int, int], None]


def _score_cam() -> type:
    import tqdm
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam import score_cam as score_cam_module

    quiet_bar = functools.partial(tqdm.tqdm, disable=True)

    class QuietScoreCAM(ScoreCAM):
        """ScoreCAM without its per-image tqdm bar and without recording the masked passes' activations.

        The library keeps the target layer's activations of every one of the C masked forward passes
        (C = channels, 1280 for EfficientNet-Lite0) until the next call: hundreds of MB per image for nothing.
        The recorder's hooks are gated by CamExplainer (``recording``), so muting them is one flag.
        """

        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):  # type: ignore[override]
            recorder = self.activations_and_grads
            recorder.recording = False
            try:
                with mock.patch.object(score_cam_module.tqdm, "tqdm", quiet_bar):
                    return super().get_cam_weights(input_tensor, target_layer, targets, activations, grads)
            finally:
                recorder.recording = True

    return QuietScoreCAM


def _cam_class(method: str) -> tuple[type, bool]:
    """(pytorch-grad-cam class, whether it needs gradients) for a method name."""
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, XGradCAM

    if method == "gradcam":
        return GradCAM, True
    if method == "gradcam++":
        return GradCAMPlusPlus, True
    if method == "xgradcam":
        return XGradCAM, True
    if method == "eigencam":
        return EigenCAM, False
    if method == "scorecam":
        return _score_cam(), False
    raise ValueError(f"unknown explanation method {method!r}: use one of {', '.join(METHODS)}")


# Methods that weigh each position by gradient x activation (HiResCAM, LayerCAM, element-wise Grad-CAM)
# are left out on purpose: the recurrent heads start with a per-step LayerNorm, which makes the score
# invariant to scaling a position's feature vector, so sum_c grad_c * act_c is exactly 0 at every
# position (Euler's theorem) and those maps are noise around zero.


@dataclass
class Explanation:
    """One image's map: ``cam`` is float32 in [0, 1] at the image's own size (``image_shape``), or scaled
    to MAP_MAX_PIXELS for a larger image; ``image`` is the grey image at display size (``display_shape``)."""

    path: str
    image: np.ndarray | None = None
    cam: np.ndarray | None = None
    label: str | None = None  # predicted class
    target: str | None = None  # class whose score the map explains
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    ood: dict[str, Any] | None = None  # {"score", "threshold", "flagged"}; None if the model has no OOD gate
    image_shape: tuple[int, int] | None = None  # the decoded image's (H, W); None: that of ``image``
    warnings: list[str] = field(default_factory=list)  # as Prediction.warnings (e.g. a lateral view)

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        out = {"path": self.path, "label": self.label, "target": self.target, "probabilities": self.probabilities,
               "ood": self.ood, "warnings": list(self.warnings)}
        if self.cam is not None:
            shape = self.image_shape or (self.image.shape[:2] if self.image is not None else self.cam.shape)
            out.update(image_size=[int(shape[1]), int(shape[0])], map_size=[int(self.cam.shape[1]), int(self.cam.shape[0])])
        return out

    @property
    def out_of_distribution(self) -> bool:
        return bool(self.ood and self.ood["flagged"])


@dataclass
class CamResult:
    """One image's CAM pass: the map, and the prediction from the same backbone pass.

    ``probabilities`` is softmax(head(map) / temperature) and ``ood_score`` the Mahalanobis distance of the
    backbone map's spatial mean: the operations of ``cxrnn.inference.graph.InferenceModule``.
    """

    cam: np.ndarray  # float32 in [0, 1] at map_shape(the image's own size)
    probabilities: np.ndarray  # (K,)
    target: int  # index of the explained class
    ood_score: float


# A map keeps its image's own size up to this many pixels (4096 x 4096: 64 MiB as float32); a larger image's
# map is stored scaled down to fit, aspect kept. The map is computed at the model's input size either way.
MAP_MAX_PIXELS = 4096 * 4096
# Overlays and panels are drawn at most this many pixels on the long side (a 9000 x 9000 scan is not
# drawn at 9000 x 9000: colour-mapping it alone would take gigabytes).
DISPLAY_MAX_SIDE = 2048


def map_shape(shape: tuple[int, int], max_pixels: int | None = None) -> tuple[int, int]:
    """The size (H, W) a map of an image of ``shape`` is kept at: the image's own, or scaled to fit
    ``max_pixels`` (default MAP_MAX_PIXELS)."""
    max_pixels = MAP_MAX_PIXELS if max_pixels is None else max_pixels
    h, w = int(shape[0]), int(shape[1])
    if h * w <= max_pixels:
        return h, w
    scale = (max_pixels / (h * w)) ** 0.5
    return max(1, int(h * scale)), max(1, int(w * scale))


def display_shape(shape: tuple[int, int], max_side: int | None = None) -> tuple[int, int]:
    """The size (H, W) an image of ``shape`` is drawn at: its own, or scaled so the long side is ``max_side``
    (default DISPLAY_MAX_SIDE)."""
    max_side = DISPLAY_MAX_SIDE if max_side is None else max_side
    h, w = int(shape[0]), int(shape[1])
    scale = min(1.0, max_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_map(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a [0, 1] map or grey image to ``shape`` (H, W), clipped to [0, 1].

    Enlarging undoes the square input resize; shrinking (a display copy) is antialiased.
    """
    shape = (int(shape[0]), int(shape[1]))
    if cam.shape == shape:
        return np.clip(cam, 0.0, 1.0).astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None]
    shrink = shape[0] < cam.shape[0] or shape[1] < cam.shape[1]
    out = F.interpolate(t, size=shape, mode="bilinear", align_corners=False, antialias=shrink)
    return out[0, 0].clamp_(0.0, 1.0).numpy()


@dataclass
class ExplainInput:
    """A decoded image reduced to what its explanation needs, so a batch never holds full-size scans.

    ``model_image`` is the model's SxS input exactly as ``to_input_tensor`` would resize the original (so
    predictions do not change), ``display`` a copy of at most DISPLAY_MAX_SIDE on the long side for the
    overlay and panel, ``shape`` the original (H, W).
    """

    model_image: np.ndarray
    display: np.ndarray
    shape: tuple[int, int]
    warnings: tuple[str, ...] = ()  # the reader's (``read_image_checked``): why a diagnosis may not apply

    @classmethod
    def from_image(cls, image: np.ndarray, preprocessing: Any, warnings: Sequence[str] = ()) -> "ExplainInput":
        shape = (int(image.shape[0]), int(image.shape[1]))
        return cls(resize_to_input(image, preprocessing), resize_map(image, display_shape(shape)), shape,
                   tuple(warnings))


def _differentiable_output(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: make the target layer's output a graph root when nothing upstream needs gradients.

    A trained model has a frozen backbone (requires_grad=False) and the input does not require grad, so
    the target activation would have no gradient at all. Starting the graph here (instead of marking the
    input) keeps backward to the layers after the target. The clone keeps later in-place ops (ReLU) legal.
    """
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.detach().requires_grad_().clone()
    return None


class CamExplainer:
    """Explains a model's predictions; use as a context manager so the hooks are always released.

    >>> with CamExplainer(load_bundle("run/model.pt")) as explainer:
    ...     for exp in explainer.explain_paths(["a.png", "b.dcm"]):
    ...         print(exp.label, exp.cam.shape)

    Its hooks act only while it explains: between calls the network runs exactly as without them, so one
    explainer can stay open beside a predictor that shares the network (the HTTP service keeps one).
    """

    def __init__(self, bundle: ModelBundle, method: str = DEFAULT_METHOD, layer: str | None = None, batch_size: int = 8,
                 options: dict[str, Any] | None = None):
        """``options``: keyword arguments of an attribution method (``cxrnn.explain.attribution``), e.g.
        ``{"n_steps": 8}`` for the integrated gradients or ``{"window": 2}`` for sequence occlusion."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if method not in METHODS:
            raise ValueError(f"unknown explanation method {method!r}: use one of {', '.join(METHODS)}")
        self.bundle = bundle
        self.method = method
        self.batch_size = batch_size
        self._ood_stats = OodStats.from_extras(bundle.extras)
        self._attribution = None
        self._cam = None
        if method in ATTRIBUTION_METHODS:
            # The sequence methods read the backbone's output; "layer" names what the map is of.
            if layer is not None:
                raise ValueError(f"--layer applies to the CAM methods ({', '.join(CAM_METHODS)}), not to {method}")
            self.layer_name = "pixels" if method.startswith(("ig-pixels", "pixel-")) else "feature sequence"
            mean = None if self._ood_stats is None else torch.from_numpy(np.asarray(self._ood_stats.mean, np.float32))
            self._attribution = create_attribution(method, mean, bundle.preprocessing, **(options or {}))
            self.uses_gradients = self._attribution.info.gradients
        else:
            if options:
                raise ValueError(f"{method} takes no options")
            self.layer_name = layer or bundle.target_layer
            try:
                self.layer = bundle.net.backbone.target_layer(self.layer_name)
            except AttributeError:
                raise ValueError(
                    f"layer {self.layer_name!r} is not a module of backbone {bundle.backbone_name}; "
                    f"top-level modules: {', '.join(n for n, _ in bundle.net.backbone.model.named_children())}"
                ) from None
            cam_cls, self.uses_gradients = _cam_class(method)
        bundle.net.eval()
        # Maps need gradients of activations only: parameter gradients would cost time and stay behind in
        # .grad, so every parameter is switched off while explaining and restored by close().
        self._saved_requires_grad = [(p, p.requires_grad) for p in bundle.net.parameters()]
        bundle.net.requires_grad_(False)
        self._ood = MahalanobisScore(self._ood_stats, bundle.net.backbone.spec.feature_channels)
        self._temperature = torch.tensor(float(bundle.temperature))  # a tensor, as in the inference graph
        self._feature_map: torch.Tensor | None = None
        self._handles: list[Any] = []
        if self._attribution is None:
            self._cam = cam_cls(model=bundle.net, target_layers=[self.layer])
            self._handles = self._gate_hooks()

    def _gate_hooks(self) -> list[Any]:
        """Re-register the library's recording hooks behind a switch, plus ours, all off until a call.

        pytorch-grad-cam's hooks record every forward pass while registered: a predictor sharing the
        network would pile up one activation per batch between explanations.
        """
        recorder = self._cam.activations_and_grads
        for handle in recorder.handles:
            handle.remove()
        recorder.handles.clear()
        recorder.recording = False

        def gated(hook: Callable[..., Any]) -> Callable[..., Any]:
            def run(module: nn.Module, args: Any, output: Any) -> Any:
                return hook(module, args, output) if recorder.recording else None

            return run

        handles = []
        if self.uses_gradients:  # before the recorder's hooks, so they see the differentiable output
            handles.append(self.layer.register_forward_hook(gated(_differentiable_output), prepend=True))
        recorder.handles += [self.layer.register_forward_hook(gated(recorder.save_activation)),
                             self.layer.register_forward_hook(gated(recorder.save_gradient))]
        handles.append(self.bundle.net.backbone.register_forward_hook(gated(self._keep_feature_map)))
        return handles

    def _keep_feature_map(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        # Only the first pass of a call is the image itself; ScoreCAM's masked passes come after it.
        if self._feature_map is None:
            self._feature_map = output.detach()

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> "CamExplainer":
        return cls(load_bundle(path), **kwargs)

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    def close(self) -> None:
        """Remove every hook from the model (idempotent); the model then runs exactly as before."""
        if self._cam is not None:
            self._cam.activations_and_grads.release()
            self._cam.outputs = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for param, flag in self._saved_requires_grad:
            param.requires_grad_(flag)
        self._saved_requires_grad = []

    def __enter__(self) -> "CamExplainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _target_index(self, target: str | None) -> int | None:
        if target is None:
            return None
        if target not in self.classes:
            raise ValueError(f"unknown target class {target!r}: the model's classes are {', '.join(self.classes)}")
        return self.classes.index(target)

    def explain_images(self, images: Sequence[np.ndarray | ExplainInput],
                       target: str | Sequence[str | None] | None = None) -> list[CamResult]:
        """One CamResult per grey [0,1] image (or ExplainInput), in batches of ``batch_size``.

        ``target`` is a class name for all images, one name (or None) per image, or None for the predicted class.
        """
        per_image = list(target) if isinstance(target, (list, tuple)) else [target] * len(images)
        if len(per_image) != len(images):
            raise ValueError(f"{len(per_image)} targets for {len(images)} images")
        out: list[CamResult] = []
        for start in range(0, len(images), self.batch_size):
            batch = [self.explain_input(image) for image in images[start : start + self.batch_size]]
            out.extend(self._explain_batch(batch, [self._target_index(t) for t in per_image[start : start + len(batch)]]))
        return out

    def explain_input(self, image: np.ndarray | ExplainInput) -> ExplainInput:
        """``image`` reduced to its model input and display copy (an ExplainInput is returned as it is)."""
        return image if isinstance(image, ExplainInput) else ExplainInput.from_image(image, self.bundle.preprocessing)

    def explain_arrays(
        self, images: Sequence[np.ndarray | ExplainInput], target: str | Sequence[str | None] | None = None
    ) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """(map at map_shape(each image's size), class probabilities, explained class index) per grey [0,1] image."""
        return [(r.cam, r.probabilities, r.target) for r in self.explain_images(images, target)]

    def _explain_batch(self, inputs: list[ExplainInput], targets: list[int | None]) -> list[CamResult]:
        x = to_input_tensor([item.model_image for item in inputs], self.bundle.preprocessing)
        if self._attribution is not None:
            maps, fmap, targets = self._attribute(x, targets)
        else:
            maps, fmap, targets = self._library_cam(x, targets)
        probs_np, scores_np = self._predict_from_feature_map(fmap)
        # Maps come at the model's input size; only the kept copy is enlarged, within MAP_MAX_PIXELS.
        return [CamResult(resize_map(m, map_shape(item.shape)), p, int(t), float(s))
                for m, item, p, t, s in zip(maps, inputs, probs_np, targets, scores_np)]

    def _attribute(self, x: torch.Tensor, targets: list[int | None]) -> tuple[np.ndarray, torch.Tensor, list[int]]:
        """(maps, backbone feature map, explained classes) of a sequence or pixel attribution: one plain
        backbone pass serves the prediction and the sequence methods alike."""
        net = self.bundle.net
        x = x.to(next(net.parameters()).device)
        with torch.no_grad():
            fmap = net.backbone(x)
            if any(t is None for t in targets):
                predicted = net.head(fmap).argmax(dim=1).tolist()
                targets = [p if t is None else t for t, p in zip(targets, predicted)]
        chosen = [int(t) for t in targets]  # type: ignore[arg-type]
        maps = self._attribution.maps(net, x, fmap, chosen)  # type: ignore[union-attr]
        return _float32_numpy(maps), fmap, chosen

    def _library_cam(self, x: torch.Tensor, targets: list[int | None]) -> tuple[np.ndarray, torch.Tensor, list[int]]:
        """(maps, backbone feature map, explained classes) of a pytorch-grad-cam method."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if all(t is None for t in targets):
            cam_targets = None  # pytorch-grad-cam explains the top class
        else:
            if any(t is None for t in targets):
                with torch.inference_mode():
                    predicted = self.bundle.net(x).argmax(dim=1).tolist()
                targets = [p if t is None else t for t, p in zip(targets, predicted)]
            cam_targets = [ClassifierOutputTarget(int(t)) for t in targets]
        recorder = self._cam.activations_and_grads
        self._feature_map = None
        recorder.recording = True
        try:
            with cudnn_off_for_rnns(self.bundle.net.head):
                maps = self._cam(input_tensor=x, targets=cam_targets)
            explained_logits, fmap = self._cam.outputs.detach(), self._feature_map
        finally:
            # The library keeps the last batch's activations, gradients and output graph alive: drop them now.
            recorder.recording = False
            recorder.clear()
            self._cam.outputs = None
            self._feature_map = None
        if cam_targets is None:
            targets = explained_logits.argmax(dim=1).tolist()
        return maps, fmap, [int(t) for t in targets]  # type: ignore[arg-type]

    def _predict_from_feature_map(self, fmap: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, OOD scores) from the pass's backbone map, as the inference graph computes them.

        The head runs again, in inference mode: under autograd the recurrent kernels differ from the
        inference ones in the last bits, and the head is a small share of the pass next to the backbone.
        (So for target None the map explains the autograd pass's top class; only a tie within ~1e-6 of
        the logits could make that another class than the label reported.)
        """
        with torch.inference_mode():
            logits = self.bundle.net.head(fmap)
            probs = torch.softmax(logits / self._temperature.to(logits.device), dim=1)
            scores = self._ood.to(fmap.device)(fmap.mean(dim=(2, 3)))
        return _float32_numpy(probs), _float32_numpy(scores)

    def to_explanation(self, path: str, image: np.ndarray | ExplainInput, result: CamResult) -> Explanation:
        item = self.explain_input(image)
        return Explanation(
            path=path, image=item.display, cam=result.cam, image_shape=item.shape, warnings=list(item.warnings),
            # EigenCAM is class-agnostic: it explains no particular class.
            target=self.classes[result.target] if self.method != "eigencam" else None,
            label=self.classes[int(np.argmax(result.probabilities))],
            probabilities={c: float(p) for c, p in zip(self.classes, result.probabilities)},
            # A map of an image unlike the training data explains a meaningless label: say so with it.
            ood=None if self._ood_stats is None else {
                "score": float(result.ood_score), "threshold": self._ood_stats.threshold,
                "flagged": bool(result.ood_score > self._ood_stats.threshold)},
        )

    def explain_paths(
        self, paths: Iterable[str | Path], target: str | None = None, progress: Progress | None = None,
        acquisition: AcquisitionPolicy = "refuse",
    ) -> Iterator[Explanation]:
        """One Explanation per path, in order, produced batch by batch (nothing accumulates).

        An unreadable file yields an Explanation with ``error`` ("PATH: reason") and the batch goes on;
        ``acquisition`` is the reader's policy for DICOM objects that are not chest radiographs.
        """
        self._target_index(target)  # a wrong class name fails before any work
        paths = [str(p) for p in paths]
        for start in range(0, len(paths), self.batch_size):
            chunk = paths[start : start + self.batch_size]
            read, errors = read_images(chunk, self.bundle.preprocessing, acquisition)
            results = dict(errors)
            if read:
                inputs = [item for _, item in read]
                for (i, item), r in zip(read, self._explain_batch(inputs, [self._target_index(target)] * len(read))):
                    results[i] = self.to_explanation(chunk[i], item, r)
            yield from (results[i] for i in range(len(chunk)))
            if progress:
                progress(min(start + len(chunk), len(paths)), len(paths))


def _float32_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()


def read_images(paths: Sequence[str], preprocessing: Any, acquisition: AcquisitionPolicy = "refuse",
                ) -> tuple[list[tuple[int, ExplainInput]], list[tuple[int, Explanation]]]:
    """Decode each path once and reduce it at once (only one full-size image is held at a time):
    (index, ExplainInput) for the readable ones, (index, error Explanation) for the rest."""
    read: list[tuple[int, ExplainInput]] = []
    errors: list[tuple[int, Explanation]] = []
    for i, path in enumerate(paths):
        try:
            image, warnings = read_image_checked(path, acquisition=acquisition)
            read.append((i, ExplainInput.from_image(image, preprocessing, warnings)))
        except ImageReadError as err:
            errors.append((i, Explanation(path=path, error=str(err))))
    return read, errors


def cam_pass_predicts(predictor: "Predictor") -> bool:
    """True when a CAM pass computes the predictor's own numbers: its engine is the torch graph on the CPU
    in fp32. Elsewhere (ONNX Runtime, bf16 autocast, cuDNN, which the CAM pass turns off for the RNN's
    backward) the two passes differ in the last bits, so the predictor's engine runs as well."""
    engine = predictor.engine
    device = getattr(engine, "device", None)
    return (getattr(engine, "name", None) == "torch" and getattr(device, "type", None) == "cpu"
            and getattr(engine, "precision", None) == "fp32")


def predict_and_explain(
    predictor: "Predictor", explainer: CamExplainer, images: Sequence[np.ndarray | ExplainInput],
    paths: Sequence[str], target: str | None = None,
) -> list[tuple["Prediction", Explanation]]:
    """The prediction and the map (of ``target``, default the predicted class) of each decoded image: one
    forward pass per batch where ``cam_pass_predicts(predictor)``, else the predictor's engine pass, then
    the CAM pass.

    The predictions equal ``predictor.predict_with_ood`` on the same images when the explainer's batches
    are the predictor's (same ``batch_size``): batch composition changes the last bits of a CPU forward pass.
    """
    if explainer.bundle is not predictor.bundle:
        raise ValueError("the explainer and the predictor must share one model bundle")
    images = [explainer.explain_input(image) for image in images]
    if cam_pass_predicts(predictor):
        results = explainer.explain_images(images, target)
        predictions = [predictor.to_prediction(p, r.probabilities, r.ood_score, item.warnings)
                       for p, r, item in zip(paths, results, images)]
    else:
        # The SxS model inputs: the predictor's own resize leaves them as they are.
        probs, scores = predictor.predict_with_ood([item.model_image for item in images])
        predictions = [predictor.to_prediction(p, pr, s, item.warnings)
                       for p, pr, s, item in zip(paths, probs, scores, images)]
        # The map explains the label reported, even where the two passes' last bits could tip a near tie.
        results = explainer.explain_images(images, [target or pred.label for pred in predictions])
    return [(pred, explainer.to_explanation(path, image, r))
            for pred, path, image, r in zip(predictions, paths, images, results)]


def predict_and_explain_paths(
    predictor: "Predictor", explainer: CamExplainer, paths: Iterable[str | Path], target: str | None = None,
) -> Iterator[tuple["Prediction", Explanation]]:
    """(Prediction, Explanation) per path, in order, in the predictor's batches, every file decoded once
    under the predictor's acquisition policy; an unreadable or refused file gives both with ``error``."""
    from cxrnn.inference.predictor import Prediction

    paths = [str(p) for p in paths]
    for start in range(0, len(paths), predictor.batch_size):
        chunk = paths[start : start + predictor.batch_size]
        read, errors = read_images(chunk, predictor.bundle.preprocessing, predictor.acquisition)
        results = {i: (Prediction(path=exp.path, error=exp.error), exp) for i, exp in errors}
        if read:
            pairs = predict_and_explain(predictor, explainer, [item for _, item in read], [chunk[i] for i, _ in read],
                                        target)
            results.update((i, pair) for (i, _), pair in zip(read, pairs))
        yield from (results[i] for i in range(len(chunk)))


def explain(
    model: str | Path | ModelBundle,
    paths: Iterable[str | Path],
    method: str = DEFAULT_METHOD,
    target: str | None = None,
    layer: str | None = None,
) -> list[Explanation]:
    """Convenience: ``cxrnn.explain.explain("run/model.pt", ["a.png"])`` (holds all maps; use CamExplainer for many)."""
    bundle = model if isinstance(model, ModelBundle) else load_bundle(model)
    with CamExplainer(bundle, method=method, layer=layer) as explainer:
        return list(explainer.explain_paths(paths, target=target))
