"""The explanation methods by name, and the defaults: torch-free, so the CLI lists them without loading torch.

Two families sit behind one ``--method`` option: pytorch-grad-cam's channel-weighting CAMs
(``cxrnn.explain.cam``) and the attributions that read the network as a CNN->RNN, through Captum
(``cxrnn.explain.attribution``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    """What a method costs: ``gradients`` (a backward pass) and the backbone passes per image."""

    name: str
    summary: str
    gradients: bool
    backbone_passes: str


CAM_METHODS: dict[str, MethodInfo] = {
    "gradcam": MethodInfo("gradcam", "Grad-CAM at the backbone's target layer (the paper's maps)", True, "1"),
    "gradcam++": MethodInfo("gradcam++", "Grad-CAM++ at the target layer", True, "1"),
    "xgradcam": MethodInfo("xgradcam", "XGrad-CAM at the target layer", True, "1"),
    "eigencam": MethodInfo("eigencam", "first principal component of the target layer (class-agnostic)", False, "1"),
    "scorecam": MethodInfo("scorecam", "Score-CAM (slow: one pass per channel)", False, "channels"),
}
ATTRIBUTION_METHODS: dict[str, MethodInfo] = {
    "occlusion": MethodInfo("occlusion", "sequence occlusion: each feature-map step replaced by the training mean",
                            False, "1"),
    "ig-sequence": MethodInfo("ig-sequence", "integrated gradients on the feature-map sequence, blurred by half a cell",
                              True, "1"),
    "ig-pixels": MethodInfo("ig-pixels", "integrated gradients on the pixels (slow: backbone backward per step)",
                            True, "n_steps"),
    "pixel-occlusion": MethodInfo("pixel-occlusion", "image-space occlusion (slow reference: one pass per patch)",
                                  False, "patches"),
}
# Chosen by explain-eval on an unseen phantom (README, "Explanations"): of the methods that cost one backbone
# pass, the highest pointing-game hit rate, with a deletion AUC below Grad-CAM's and the random order's.
DEFAULT_METHOD = "ig-sequence"
# Every method behind ``--method``, the default first.
METHODS = (DEFAULT_METHOD, *(m for m in (*ATTRIBUTION_METHODS, *CAM_METHODS) if m != DEFAULT_METHOD))
# The methods explain-eval compares when told none: the default and the paper's Grad-CAM.
DEFAULT_EVAL_METHODS = (DEFAULT_METHOD, "gradcam")
# Steps of the deletion / insertion curves (``cxrnn.explain.faithfulness``).
CURVE_STEPS = 16
