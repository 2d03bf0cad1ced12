"""Explain many files into a folder: per image NAME_cam.png, NAME_panel.png, NAME_cam.npy, plus an index.

Images stream through in batches; only a small dict per image (paths and probabilities) is kept, so
memory stays flat over thousands of files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from cxrnn.utils.atomic import atomic_write_text
from cxrnn.explain.cam import CamExplainer, Explanation
from cxrnn.explain.overlay import OutputNamer, write_explanation
from cxrnn.models.bundle import ModelBundle

INDEX_NAME = "explanations.json"


def explain_to_dir(
    bundle: ModelBundle,
    paths: Iterable[str | Path],
    out_dir: str | Path,
    method: str = "gradcam",
    target: str | None = None,
    layer: str | None = None,
    batch_size: int = 8,
    alpha: float = 0.4,
    colormap: str = "jet",
    progress: Callable[[int, int], None] | None = None,
    on_result: Callable[[Explanation, dict[str, str]], None] | None = None,
) -> dict[str, Any]:
    """Write the maps of every readable file to ``out_dir`` and an index ``explanations.json``.

    A file that cannot be read gets an ``error`` entry ("PATH: reason") and the batch goes on.
    ``on_result(explanation, files)`` is called for each image as soon as its files are written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    namer = OutputNamer()
    entries: list[dict[str, Any]] = []
    with CamExplainer(bundle, method=method, layer=layer, batch_size=batch_size) as explainer:
        layer_name = explainer.layer_name
        for exp in explainer.explain_paths(paths, target=target, progress=progress):
            files: dict[str, str] = {}
            if exp.error is None:
                files = write_explanation(exp, out, namer(exp.path), alpha=alpha, colormap=colormap)
            entries.append({**exp.to_dict(), **({"files": files} if files else {})})
            if on_result:
                on_result(exp, files)
    index = {
        "model": bundle.describe(),
        "method": method,
        "layer": layer_name,
        "target": target or "predicted",
        "n": sum(1 for e in entries if "error" not in e),
        "errors": sum(1 for e in entries if "error" in e),
        "images": entries,
    }
    atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2))
    return index
