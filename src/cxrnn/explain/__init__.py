"""Explanations through the whole CNN->RNN: sequence occlusion and integrated gradients (Captum), Grad-CAM and
friends (pytorch-grad-cam), drawn on the X-ray, checked against lesion masks and against the model.

The names below are imported on first use, so reading ``cxrnn.explain.registry`` (the command line does)
does not pull in torch.
"""

from typing import Any

from cxrnn.explain.registry import DEFAULT_METHOD, METHODS

_FROM_CAM = ("CamExplainer", "CamResult", "Explanation", "cam_pass_predicts", "explain", "predict_and_explain",
             "resize_map")
__all__ = ["DEFAULT_METHOD", "METHODS", *_FROM_CAM]


def __getattr__(name: str) -> Any:
    if name in _FROM_CAM:
        from cxrnn.explain import cam

        return getattr(cam, name)
    raise AttributeError(f"module 'cxrnn.explain' has no attribute {name!r}")
