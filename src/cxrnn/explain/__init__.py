"""Explanations: Grad-CAM (and friends) through the whole CNN->RNN, drawn on the X-ray, checked on masks."""

from cxrnn.explain.cam import (METHODS, CamExplainer, CamResult, Explanation, cam_pass_predicts, explain,
                               predict_and_explain, resize_map)

__all__ = ["METHODS", "CamExplainer", "CamResult", "Explanation", "cam_pass_predicts", "explain",
           "predict_and_explain", "resize_map"]
