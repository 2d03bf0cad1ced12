"""Maps drawn on the grey X-ray at its own resolution: overlay PNG, three-part panel, raw map .npy.

Figures are built with ``matplotlib.figure.Figure`` (never pyplot), so nothing is registered globally and
thousands of panels do not accumulate open figures.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
from PIL import Image

from cxrnn.data.io import to_uint8
from cxrnn.explain.cam import Explanation, resize_map
from cxrnn.utils.atomic import atomic_write_bytes

if TYPE_CHECKING:  # matplotlib loads only when a panel is drawn
    from matplotlib.figure import Figure


def overlay_cam(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped [0,1] map over a grey [0,1] image of the same (H, W); returns uint8 RGB (H, W, 3)."""
    import matplotlib

    if image.shape[:2] != cam.shape[:2]:
        raise ValueError(f"map {cam.shape[:2]} and image {image.shape[:2]} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise ValueError(f"unknown colour map {colormap!r} (any matplotlib name, e.g. jet, inferno, turbo)") from None
    grey = np.clip(image, 0.0, 1.0)[..., None]
    colour = cmap(np.clip(cam, 0.0, 1.0))[..., :3]
    return to_uint8((1.0 - alpha) * grey + alpha * colour)


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return atomic_write_bytes(Path(path), buf.getvalue())


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.save(buf, array)
    return atomic_write_bytes(Path(path), buf.getvalue())


def panel_figure(
    image: np.ndarray,
    cam: np.ndarray,
    probabilities: Mapping[str, float],
    title: str = "",
    target: str | None = None,
    alpha: float = 0.4,
    colormap: str = "jet",
) -> Figure:
    """image | overlay | probability bars with class names, as a matplotlib Figure."""
    from matplotlib.figure import Figure

    h, w = image.shape[:2]
    fig = Figure(figsize=(11, 3.8 * max(0.6, min(1.6, h / w))), dpi=100, layout="constrained")
    ax_img, ax_cam, ax_bar = fig.subplots(1, 3, width_ratios=[1, 1, 0.8])
    ax_img.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="lanczos")
    ax_img.set_title("X-ray", fontsize=10)
    ax_cam.imshow(overlay_cam(image, cam, alpha, colormap), interpolation="lanczos")
    ax_cam.set_title(f"map for '{target}'" if target else "map", fontsize=10)
    for ax in (ax_img, ax_cam):
        ax.set_axis_off()
    names = list(probabilities)
    values = [float(probabilities[n]) for n in names]
    top = int(np.argmax(values)) if values else -1
    colours = ["tab:red" if i == top else "tab:gray" for i in range(len(names))]
    ax_bar.barh(range(len(names)), values, color=colours)
    ax_bar.set_yticks(range(len(names)), names)
    ax_bar.invert_yaxis()
    ax_bar.set_xlim(0, 1)
    ax_bar.set_xlabel("probability")
    for i, v in enumerate(values):
        ax_bar.text(min(v + 0.02, 0.8), i, f"{v:.2f}", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_panel(path: str | Path, image: np.ndarray, cam: np.ndarray, probabilities: Mapping[str, float],
               title: str = "", target: str | None = None, alpha: float = 0.4, colormap: str = "jet") -> Path:
    fig = panel_figure(image, cam, probabilities, title, target, alpha, colormap)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(Path(path), buf.getvalue())


class OutputNamer:
    """File stems for outputs: the image's stem, made unique when two inputs share it (a/x.png, b/x.png)."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def __call__(self, path: str | Path) -> str:
        stem = Path(path).stem
        name = stem
        if name in self._used:
            name = f"{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        self._used.add(name)
        return name


def write_explanation(
    exp: Explanation, out_dir: str | Path, name: str, alpha: float = 0.4, colormap: str = "jet"
) -> dict[str, str]:
    """NAME_cam.png (overlay), NAME_panel.png (image | overlay | probabilities), NAME_cam.npy (map in [0,1]).

    The overlay and panel are drawn at the display size (at most DISPLAY_MAX_SIDE on the long side), the
    map is saved as the explanation holds it (the image's own size up to MAP_MAX_PIXELS).
    """
    if exp.error is not None or exp.image is None or exp.cam is None:
        raise ValueError(f"{exp.path}: nothing to write ({exp.error or 'no map'})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = displayed_map(exp)
    files = {
        "overlay": save_png(out / f"{name}_cam.png", overlay_cam(exp.image, shown, alpha, colormap)),
        "panel": save_panel(out / f"{name}_panel.png", exp.image, shown, exp.probabilities,
                            title=f"{Path(exp.path).name}: {panel_title(exp)}", target=exp.target, alpha=alpha,
                            colormap=colormap),
        "map": save_npy(out / f"{name}_cam.npy", exp.cam.astype(np.float32)),
    }
    return {k: str(v) for k, v in files.items()}


def displayed_map(exp: Explanation) -> np.ndarray:
    """The map at the size of the explanation's display image (already bounded by DISPLAY_MAX_SIDE)."""
    if exp.image is None or exp.cam is None:
        raise ValueError(f"{exp.path}: no map to draw ({exp.error or 'no map'})")
    return resize_map(exp.cam, exp.image.shape[:2])


def panel_title(exp: Explanation) -> str:
    """What a panel says of its prediction: the label and, where it applies, the out-of-distribution mark."""
    return f"predicted {exp.label}" + (" (OUT OF DISTRIBUTION: unlike the training images)"
                                       if exp.out_of_distribution else "")

