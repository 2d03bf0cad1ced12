"""Running a saved model: device and precision, the inference graph, the engines, export, the predictor."""

from cxrnn.inference.predictor import Prediction, Predictor, predict

__all__ = ["Prediction", "Predictor", "predict"]
