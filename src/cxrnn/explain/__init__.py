"""Explanations: Grad-CAM (and friends) through the whole CNN->RNN, drawn on the X-ray, checked on masks."""

from cxrnn.explain.cam import METHODS, CamExplainer, Explanation, explain, resize_map

__all__ = ["METHODS", "CamExplainer", "Explanation", "explain", "resize_map"]
