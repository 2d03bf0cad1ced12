"""Training: one run pipeline (``train``) over two fitters (frozen backbone, fine-tuning), plus protocols.

``train`` and ``TrainResult`` are imported on first use, so ``cxrnn.training.config`` (which the command
line reads to build its options) does not pull in torch.
"""

from typing import Any

from cxrnn.training.config import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from cxrnn.training.pipeline import train

        return train
    if name == "TrainResult":
        from cxrnn.training.run import TrainResult

        return TrainResult
    raise AttributeError(f"module 'cxrnn.training' has no attribute {name!r}")
