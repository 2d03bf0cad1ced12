"""Training: one run pipeline (``train``) over two fitters (frozen backbone, fine-tuning), plus protocols."""

from cxrnn.training.config import TrainConfig
from cxrnn.training.pipeline import train
from cxrnn.training.run import TrainResult

__all__ = ["TrainConfig", "TrainResult", "train"]
