"""Deterministic synthetic chest X-ray phantom: the project's embedded labelled dataset.

No real labelled chest X-ray set is available offline, so the pipeline (training, Grad-CAM,
leakage and shortcut audits) is exercised on procedurally rendered PA radiographs whose
ground truth is known exactly: the lesion mask says where the disease signal *is*, the
lung mask says where a clinically plausible explanation should point, and optional
hospital styles / burned-in markers provide controllable confounders.

Images are built in an "attenuation" space (air 0, aerated lung ~0.2, soft tissue ~0.55,
bone on top of that) and then windowed to a display image where bright means dense, as on
a standard PA radiograph. Everything is vectorised numpy so that a 900-image dataset
renders in a few seconds.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import multiprocessing as mp
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

from cxrnn.data.dataset import Dataset, Sample
from cxrnn.data.io import to_uint8
from cxrnn.utils.atomic import atomic_write_bytes

__all__ = [
    "CLASSES",
    "PHANTOM_VERSION",
    "LESION_PARAMS",
    "PhantomCase",
    "PhantomConfig",
    "case_seed_for",
    "generate_phantom",
    "load_phantom_config",
    "phantom_cases",
    "render_case",
]

CLASSES: tuple[str, ...] = ("covid", "normal", "pneumonia")
ABNORMAL: frozenset[str] = frozenset({"covid", "pneumonia"})
# Bump whenever rendering changes so a stored phantom.json can tell it is stale.
PHANTOM_VERSION = "1.6"

# ---------------------------------------------------------------------------------------
# Lesion calibration. Every knob that decides how visible the disease is lives here so the
# task difficulty can be tuned in one place. Strengths are in attenuation units: aerated
# lung is ~0.2 and soft tissue ~0.55, so +0.3 turns lung into soft-tissue density while
# +0.05 is comparable to normal vessel markings / texture (i.e. hard to see).
# Each image draws its own strength from the range, giving a spread of easy and hard cases.
# `difficulty` divides strengths and shrinks radii (radius * difficulty ** -RADIUS_EXP).
# ---------------------------------------------------------------------------------------
LESION_PARAMS: dict[str, dict[str, tuple[float, float]]] = {
    "pneumonia": {
        "strength": (0.60, 1.20),      # peak added attenuation of the consolidation
        "radius": (0.15, 0.22),        # blob radius, in half-image units
        "lower_zone_p": (0.6, 0.6),    # probability of the lower zone (else mid / upper)
    },
    "covid": {
        "strength": (0.45, 1.00),      # ground glass: fainter than consolidation
        "radius": (0.06, 0.12),
        "patches": (2, 4),             # patches per lung (inclusive)
    },
}
RADIUS_EXP = 0.35
LESION_MASK_FRACTION = 0.15  # mask = added opacity above this fraction of the patch peak
LESION_DENSITY_CAP = 0.66  # attenuation an opacity saturates at (soft tissue is ~0.55, ribs ~0.67)


@dataclass
class PhantomConfig:
    per_class: int = 300
    size: int = 256
    seed: int = 0
    difficulty: float = 1.0  # >1 harder (fainter/smaller lesions), <1 easier
    sources: int = 1  # K simulated hospitals
    shortcut: bool = False  # burned-in marker correlated with the class
    shortcut_strength: float = 0.9  # P(marker | abnormal); P(marker | normal) = 1 - strength


@dataclass
class PhantomCase:
    image: np.ndarray  # float32 HxW in [0, 1]; 0 = air (black), 1 = bone (white)
    lesion_mask: np.ndarray  # bool HxW
    lung_mask: np.ndarray  # bool HxW
    marker_box: tuple[int, int, int, int] | None  # (y0, x0, y1, x1) of the shortcut marker


# 5x7 bitmaps for the burned-in "text" of hospital markers (row strings, '#' = lit).
_GLYPHS: dict[str, tuple[str, ...]] = {
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
}
_GLYPH_ARRAYS = {k: np.array([[c == "#" for c in row] for row in v]) for k, v in _GLYPHS.items()}
# Hospital markers never use the top-left corner: that is reserved for the shortcut token,
# so the two confounders stay separable in the audits.
_CORNERS = ("top_right", "bottom_right", "bottom_left")


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """Smooth step of a signed distance (positive inside) - anti-aliased anatomy edges."""
    return 0.5 * (1.0 + np.tanh(d / width))


@functools.lru_cache(maxsize=32)
def _interp_index(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear-interpolation taps (i0, i1, w1), pixel-centre aligned, edges clamped."""
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def _upsample(c: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    # Separable gather-and-blend rather than a matrix product: BLAS threads oversubscribe
    # and crawl when the other cores are busy (e.g. a training run next door).
    i0, i1, w = _interp_index(shape[0], c.shape[0])
    r = c[i0] * (1 - w)[:, None] + c[i1] * w[:, None]
    j0, j1, w = _interp_index(shape[1], c.shape[1])
    return r[:, j0] * (1 - w)[None, :] + r[:, j1] * w[None, :]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-correlated noise field."""
    f = max(1, int(sigma // 1.5))
    if f > 1:
        # Wide kernels are slow; a coarse field upsampled bilinearly looks the same.
        small = (-(-shape[0] // f), -(-shape[1] // f))
        c = ndimage.gaussian_filter(rng.standard_normal(small, dtype=np.float32), sigma / f, mode="wrap")
        n = _upsample(c, shape)
    else:
        n = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    n -= n.mean()
    s = float(n.std())
    return n / s if s > 0 else n


def case_seed_for(seed: int, label: str, index: int) -> int:
    """Stable per-image seed, independent of the order or number of other images."""
    ss = np.random.SeedSequence([int(seed), CLASSES.index(label), int(index)])
    return int(ss.generate_state(1, np.uint32)[0])


@dataclass
class _Style:
    """Per-hospital acquisition style (consistent across every image of one source)."""

    level: float
    window: float
    gamma: float
    noise: float
    blur: float
    corner: str
    glyphs: str


def _hospital_style(cfg: PhantomConfig, source: int) -> _Style:
    if cfg.sources <= 1:
        # A single neutral site: no systematic offsets, a generic "L" side marker.
        return _Style(0.0, 1.0, 1.0, 0.022, 0.7, "top_right", "L")
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 7919, int(source)]))
    letters = "LRAPEH"
    return _Style(
        level=float(rng.uniform(-0.06, 0.06)),
        window=float(rng.uniform(0.88, 1.12)),
        gamma=float(rng.uniform(0.85, 1.2)),
        noise=float(rng.uniform(0.012, 0.04)),
        blur=float(rng.uniform(0.4, 1.4)),
        corner=_CORNERS[source % len(_CORNERS)],
        glyphs=letters[source % len(letters)] + letters[(source // len(letters) + 3) % len(letters)],
    )


def _draw_glyphs(img: np.ndarray, text: str, corner: str, value: float, rng: np.random.Generator) -> None:
    h, w = img.shape
    cell = max(1, round(h / 100))
    gw, gh = 5 * cell, 7 * cell
    total_w = len(text) * gw + (len(text) - 1) * cell
    margin = max(1, round(h * 0.04)) + int(rng.integers(0, max(1, round(h * 0.015)) + 1))
    y0 = margin if corner.startswith("top") else h - margin - gh
    x0 = margin if corner.endswith("left") else w - margin - total_w
    for i, ch in enumerate(text):
        bm = np.kron(_GLYPH_ARRAYS[ch], np.ones((cell, cell), dtype=bool))
        xs = x0 + i * (gw + cell)
        region = img[y0 : y0 + gh, xs : xs + gw]
        region[bm[: region.shape[0], : region.shape[1]]] = value


def _ellipse_r(u: np.ndarray, v: np.ndarray, cx: float, cy: float, a: float, b: float, p: float = 2.0) -> np.ndarray:
    return (np.abs((u - cx) / a) ** p + np.abs((v - cy) / b) ** p) ** (1.0 / p)


def _rotate(u: np.ndarray, v: np.ndarray, cx: float, cy: float, ang: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(ang), math.sin(ang)
    du, dv = u - cx, v - cy
    return cx + c * du + s * dv, cy - s * du + c * dv


def _anatomy(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Attenuation map of a normal chest plus the lung field weights used to place lesions."""
    px = 2.0 / n  # one pixel in normalised units; edges are kept ~1 px soft at any size
    g = (np.arange(n, dtype=np.float32) + 0.5) * px - 1.0
    y, x = np.meshgrid(g, g, indexing="ij")

    # Patient pose: position, size, small rotation - the classifier must be robust to these.
    # Scalars are kept as Python floats: a NumPy float64 scalar would silently promote every
    # float32 field to float64 and double the render time.
    ang = float(np.deg2rad(rng.uniform(-5, 5)))
    sx, sy = rng.uniform(0.9, 1.06), rng.uniform(0.9, 1.06)
    tx, ty = rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.06)
    c, s = math.cos(ang), math.sin(ang)
    u = ((x - tx) * c + (y - ty) * s) / sx  # patient coordinates: u to image right, v down
    v = (-(x - tx) * s + (y - ty) * c) / sy
    e = max(px, 0.012)

    # Body: boxy torso, neck, abdomen.  Shoulder width and habitus vary per patient.
    bw = rng.uniform(0.78, 0.95)
    torso = _soft(1.0 - _ellipse_r(u, v, 0.0, 0.42, bw, 1.25, p=3.2), 0.02)
    neck_w = rng.uniform(0.15, 0.2)
    neck = _soft(neck_w - np.abs(u), e) * _soft(-0.6 - v, 0.05)
    body = np.maximum(torso, neck)
    # Chest wall is thicker laterally: a slow gradient makes lung peripheries greyer.
    soft = 0.55 * body * (0.85 + 0.15 * np.clip(np.abs(u) / bw, 0, 1))

    # Lungs: bean-shaped fields, wider at the base, cut from below by the diaphragm domes.
    lung_fields = []
    domes = []
    lung_depth = np.zeros_like(u)
    dome_right_higher = rng.uniform(0.02, 0.07)
    lung_a = rng.uniform(0.24, 0.29)
    lung_b = rng.uniform(0.48, 0.56)
    lung_cy = rng.uniform(-0.08, 0.0)
    for side in (-1, 1):  # -1: image left (patient right), +1: image right (patient left)
        a = lung_a * (0.9 if side > 0 else 1.0)  # heart makes patient-left lung narrower
        cx = side * (0.1 + a + rng.uniform(-0.01, 0.02))
        yl = (v - lung_cy) / lung_b
        widen = 1.0 + 0.28 * np.clip(yl, -1, 1)
        xl = (u - cx - side * 0.05 * yl) / (a * widen)
        r = np.sqrt(xl**2 + yl**2)
        d_ell = (1.0 - r) * a
        dome_top = lung_cy + lung_b * rng.uniform(0.55, 0.7) - (dome_right_higher if side < 0 else 0.0)
        dome_cx = cx + side * 0.02
        dome = dome_top + 0.22 * ((u - dome_cx) / a) ** 2
        # Beyond the costophrenic angle and under the heart the diaphragm flattens out.
        domes.append(np.minimum(dome, dome_top + 0.16))
        d_dome = dome - v
        field = _soft(d_ell, e) * _soft(d_dome, e)
        lung_fields.append(field)
        # Lungs are most lucent centrally and at the bases, greyer at the apex and periphery.
        lung_depth += field * (0.7 + 0.3 * np.clip(1.0 - xl**2, 0, 1)) * (0.8 + 0.2 * np.clip(yl + 0.5, 0, 1))

    # Heart and mediastinum: bulges to the patient's left (image right), size varies.
    # The diaphragm line: each hemidiaphragm's dome on its own side of the midline.
    diaphragm = np.where(u < 0, domes[0], domes[1])
    below = _soft(v - diaphragm, e)
    dome_level = lung_cy + lung_b * 0.62
    hcx, hcy = rng.uniform(0.06, 0.12), dome_level - rng.uniform(0.06, 0.12)
    ha, hb = rng.uniform(0.25, 0.31), rng.uniform(0.17, 0.22)
    hu, hv = _rotate(u, v, hcx, hcy, math.radians(rng.uniform(15, 30)))
    heart = _soft((1.0 - _ellipse_r(hu, hv, hcx, hcy, ha, hb)) * hb, e)
    med_w = rng.uniform(0.08, 0.11) + 0.04 * np.clip((v + 0.3) / 0.6, 0, 1)
    mediastinum = _soft(med_w - np.abs(u - 0.01), e) * _soft(0.3 - v, 0.05)
    knob = _soft((1.0 - _ellipse_r(u, v, 0.1, -0.25, 0.07, 0.06)) * 0.06, e)
    central = np.maximum(np.maximum(heart, mediastinum), knob)
    lung_eff = lung_depth * (1.0 - central)

    lung_mask = ((lung_fields[0] > 0.5) | (lung_fields[1] > 0.5)) & (central < 0.5) & (body > 0.5)

    # Bones.  Spine: vertebral bodies modulate a vertical band; visible through the heart.
    spine_w = rng.uniform(0.055, 0.075)
    phase = rng.uniform(0, 2 * np.pi)
    vert = 0.75 + 0.25 * np.cos(2 * np.pi * v / 0.11 + phase)
    spine = _soft(spine_w - np.abs(u), e) * vert * body

    # Ribs: posterior arcs (fall laterally) and fainter anterior arcs (fall medially).
    au = np.abs(u)
    rib_top = lung_cy - lung_b * rng.uniform(0.95, 1.05)
    spacing = lung_b * rng.uniform(0.17, 0.2)
    chest_edge = _soft(bw * 0.9 - au, 0.03) * _soft(au - 0.05, 0.02)
    # All ribs of one side share a curvature, so the whole rib cage is one periodic pattern
    # in the "straightened" coordinate w: each pixel only looks at its nearest rib, which
    # costs a handful of array ops instead of a loop over ribs.
    curve = np.where(u < 0, rng.uniform(0.55, 0.8), rng.uniform(0.55, 0.8)).astype(np.float32)
    jit = rng.uniform(-0.006, 0.006, 9).astype(np.float32)
    w = v - curve * ((au - 0.22) ** 2 - 0.03)
    k = np.clip(np.rint((w - rib_top) / spacing), 0, 8).astype(np.int32)
    kf = k.astype(np.float32)  # int arrays times Python floats would promote to float64
    d = np.abs(w - (rib_top + kf * spacing + jit[k]))
    t = 0.024 + 0.012 * au + 0.002 * kf
    cortex = np.exp(-(((d - t) / 0.008) ** 2))  # cortical rim: rib edges are brighter
    ribs = (0.6 * _soft(t - d, 0.008) + 0.4 * cortex) * chest_edge
    a0 = rib_top + 0.06
    wa = v - 0.275 * (0.75 - au)
    ka = np.clip(np.rint((wa - a0) / spacing), 0, 5).astype(np.int32)
    da = np.abs(wa - (a0 + ka.astype(np.float32) * spacing + jit[ka]))
    ribs += 0.45 * _soft(0.02 - da, 0.01) * _soft(au - 0.3, 0.06) * chest_edge
    ribs = np.minimum(ribs, 1.3)

    # Clavicles: gently S-shaped, rising laterally from the sternal notch.
    clav_v = lung_cy - lung_b * rng.uniform(0.9, 1.05)
    cl_center = clav_v - 0.16 * (au - 0.08) + 0.035 * np.sin(np.pi * (au - 0.08) / 0.5)
    clav = _soft(0.028 - np.abs(v - cl_center), 0.008) * _soft(au - 0.06, 0.01) * _soft(0.6 - au, 0.02)

    # Gastric bubble under the left hemidiaphragm in some patients.
    bubble = np.zeros_like(u)
    if rng.random() < 0.5:
        bubble = _soft((1.0 - _ellipse_r(u, v, 0.42, 0.55, 0.08, 0.05)) * 0.05, e)

    # Bronchovascular markings radiate from the hila; random angular "spokes" give the
    # branching streaks, a smooth noise field gives parenchymal texture. These set the
    # background clutter the lesions must be detected against.
    markings = np.zeros_like(u)
    for side in (-1, 1):
        hx, hy = side * 0.16, rng.uniform(-0.08, 0.0)
        du, dv = u - hx, v - hy
        rr = np.sqrt(du**2 + dv**2)
        theta = np.arctan2(dv, du)
        # Angular profile evaluated on a 1-D table then looked up: 2-D cosines per harmonic
        # would dominate the render time.
        ks = np.arange(6, 40)
        amp = rng.standard_normal(ks.size) / np.sqrt(ks)
        ph = rng.uniform(0, 2 * np.pi, ks.size)
        tgrid = np.linspace(-np.pi, np.pi, 2048, endpoint=False)
        table = (amp[:, None] * np.cos(ks[:, None] * tgrid[None, :] + ph[:, None])).sum(0).astype(np.float32)
        idx = ((theta + np.pi) * (2048 / (2 * np.pi))).astype(np.int32) & 2047
        spokes = table[idx]
        spokes = np.clip(spokes / 1.2, 0, None)
        markings += spokes * np.exp(-rr / 0.25) * np.clip(rr / 0.06, 0, 1)
    texture = _smooth_noise(rng, (n, n), 1.5 * n / 256) * 0.6 + _smooth_noise(rng, (n, n), 6 * n / 256)

    # Trachea: an air column down the mediastinum to the carina.
    trachea = _soft(0.028 - np.abs(u - 0.01), e) * _soft(-0.18 - v, 0.03) * body
    # The heart sits on the diaphragm: below the domes it merges into abdominal soft tissue,
    # which (liver, spleen) is slightly denser than the chest wall.
    central_vis = central * (1.0 - below)
    hila = sum(
        _soft((1.0 - _ellipse_r(u, v, sd * 0.17, lung_cy + 0.02, 0.05, 0.09)) * 0.05, 0.02) for sd in (-1, 1)
    )

    atten = (
        soft
        - 0.34 * lung_eff
        + 0.06 * central_vis * body
        + 0.05 * below * body
        + 0.05 * hila * lung_eff
        - 0.07 * trachea
        + 0.07 * spine
        + 0.12 * ribs * body
        + 0.1 * clav
        - 0.2 * bubble
        + lung_eff * (0.07 * markings + 0.014 * texture)
    )
    lung_field = np.maximum(lung_fields[0], lung_fields[1]) * (1.0 - central)
    return {
        "atten": atten.astype(np.float32),
        "lung_mask": lung_mask,
        "lung_eff": np.clip(lung_field, 0, 1).astype(np.float32),
        "u": u,
        "v": v,
        "lung_cy": np.float32(lung_cy),
        "lung_b": np.float32(lung_b),
        "spine_mask": (spine > 0.5) & (heart < 0.5) & (v < 0.2),
        "central": central > 0.5,
    }


def _sample_points(rng: np.random.Generator, weights: np.ndarray, count: int) -> list[tuple[int, int]]:
    """Draw pixel positions with probability proportional to `weights` (inverse CDF)."""
    cdf = np.cumsum(weights.ravel(), dtype=np.float64)
    draws = rng.random(count)
    if cdf[-1] <= 0:
        idx = (draws * cdf.size).astype(np.int64)
    else:
        idx = np.minimum(np.searchsorted(cdf, draws * cdf[-1], side="right"), cdf.size - 1)
    return [divmod(int(i), weights.shape[1]) for i in idx]


def _blob(
    u: np.ndarray, v: np.ndarray, cu: float, cv: float, radius: float, rng: np.random.Generator, lobes: int
) -> np.ndarray:
    """Irregular blob: a few overlapping Gaussians around a centre, in [0, 1]."""
    f = np.zeros_like(u)
    for _ in range(lobes):
        ou, ov = (float(t) for t in rng.normal(0, radius * 0.45, 2))
        rl = radius * rng.uniform(0.6, 1.0)
        f = np.maximum(f, np.exp(-(((u - cu - ou) ** 2 + (v - cv - ov) ** 2) / (2 * rl * rl))))
    # Cut the Gaussian tails to exactly zero so a lesion changes only its neighbourhood
    # (the lesion=False counterfactual is then bit-identical elsewhere).
    return np.maximum(f - 0.01, 0) * (1 / 0.99)


_Patch = tuple[tuple[slice, slice], np.ndarray, float]


def _window(iy: int, ix: int, radius: float, n: int) -> tuple[slice, slice]:
    """Pixel window that holds a blob: lesions are evaluated locally, not over the frame."""
    # Pose scaling is >= 0.9 and lobes wander up to ~1.5 radii from the centre.
    half = int(math.ceil(radius * 5.0 * (n / 2) / 0.9)) + 2
    return slice(max(0, iy - half), min(n, iy + half + 1)), slice(max(0, ix - half), min(n, ix + half + 1))


def _lesion(rng: np.random.Generator, label: str, anat: dict[str, np.ndarray], difficulty: float) -> list[_Patch]:
    """Added opacity patches (window, local opacity, peak) for an abnormal case, unclipped."""
    u, v, lung = anat["u"], anat["v"], anat["lung_mask"]
    n = lung.shape[0]
    d = max(float(difficulty), 1e-3)
    k_strength, k_radius = 1.0 / d, d ** (-RADIUS_EXP)
    cy, b = float(anat["lung_cy"]), float(anat["lung_b"])
    zone = (v - (cy - b)) / (2 * b)  # 0 at apex, ~1 at the bases
    patches: list[_Patch] = []
    # Each lung's own pixels: split at the midline in patient coordinates.
    sides = {-1: lung & (u < 0), 1: lung & (u > 0)}
    # The mediastinum separates the lungs, so one transform serves both sides.
    # Half resolution is plenty for placement weights and 4x cheaper.
    half = ndimage.distance_transform_edt(lung[::2, ::2]).astype(np.float32) * (4.0 / n)
    dist = np.repeat(np.repeat(half, 2, axis=0), 2, axis=1)[:n, :n]
    tex = _smooth_noise(rng, (n, n), 3 * n / 256)

    if label == "pneumonia":
        p = LESION_PARAMS["pneumonia"]
        side = -1 if rng.random() < 0.5 else 1
        zr = rng.random()
        if zr < p["lower_zone_p"][0]:
            zw = np.clip((zone - 0.55) / 0.2, 0, 1)
        elif zr < 0.85:
            zw = np.exp(-(((zone - 0.45) / 0.12) ** 2))
        else:
            zw = np.exp(-(((zone - 0.22) / 0.1) ** 2))
        # Keep the centre away from the lung edge so most of the blob stays inside the lung.
        w = sides[side] * zw * np.clip(dist / 0.06, 0, 1)
        if w.sum() <= 0:
            w = sides[side].astype(np.float32)
        ((iy, ix),) = _sample_points(rng, w, 1)
        radius = rng.uniform(*p["radius"]) * k_radius
        strength = rng.uniform(*p["strength"]) * k_strength
        win = _window(iy, ix, radius, n)
        uu, vv = u[win], v[win]
        f = _blob(uu, vv, float(u[iy, ix]), float(v[iy, ix]), radius, rng, int(rng.integers(2, 5)))
        # Consolidation is fairly homogeneous: saturate the blob into a plateau with soft
        # margins, with only mild internal texture (occasional air bronchograms).
        floor = float(_soft(np.float32(-0.45), 0.12))
        plateau = np.maximum(_soft(f - 0.45, 0.12) - floor, 0) * (1 / (1 - floor))
        f = plateau * (0.92 + 0.08 * np.clip(tex[win], -2, 2) / 2)
        if rng.random() < 0.35:
            # A fissure gives a lobar consolidation one sharp, straight border.
            fa = rng.uniform(-0.3, 0.3)
            fv = float(v[iy, ix]) - rng.uniform(0.0, radius * 0.8)
            f *= _soft((vv - fv) - fa * (uu - float(u[iy, ix])), 0.006)
        # Lobar: the consolidation stays in its own lung, however large it is drawn.
        f = f * (u[win] < 0 if side < 0 else u[win] > 0)
        patches.append((win, f * strength, strength))
    elif label == "covid":
        p = LESION_PARAMS["covid"]
        lo_n, hi_n = int(p["patches"][0]), int(p["patches"][1])
        base = rng.uniform(*p["strength"]) * k_strength
        for side in (-1, 1):
            m = sides[side]
            # Peripheral (near the outer border, not the mediastinal side) and lower zone.
            lateral = np.clip((side * u - 0.22) / 0.35, 0, 1) ** 2
            w = m * np.exp(-dist / 0.05) * lateral * np.clip((zone - 0.3) / 0.4, 0.05, 1) ** 2
            if w.sum() <= 0:
                w = m.astype(np.float32)
            for iy, ix in _sample_points(rng, w, int(rng.integers(lo_n, hi_n + 1))):
                radius = rng.uniform(*p["radius"]) * k_radius
                strength = base * rng.uniform(0.7, 1.3)
                win = _window(iy, ix, radius, n)
                f = _blob(u[win], v[win], float(u[iy, ix]), float(v[iy, ix]), radius, rng, int(rng.integers(1, 4)))
                # Ground glass is hazy and patchy: modulate by texture rather than saturate.
                f = f * np.clip(0.75 + 0.35 * tex[win], 0.2, 1.3)
                patches.append((win, f * strength, strength))
    return patches


def render_case(case_seed: int, label: str, cfg: PhantomConfig, source: int = 0, lesion: bool = True) -> PhantomCase:
    """Render one radiograph, fully determined by (case_seed, label, cfg, source).

    Anatomy, exposure, noise and markers come from RNG streams that do not depend on the
    label or on `lesion`, so `lesion=False` yields the same image with the opacity left out
    (a counterfactual for shortcut tests), and the same case_seed with another label gives
    the same patient with a different disease.
    """
    if label not in CLASSES:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASSES}")
    n = int(cfg.size)
    root = np.random.SeedSequence([int(case_seed), 0x5EED])
    s_anat, s_expo, s_noise, s_marker, s_lesion = root.spawn(5)
    r_lesion = np.random.default_rng(np.random.SeedSequence(s_lesion.generate_state(4).tolist() + [CLASSES.index(label)]))

    anat = _anatomy(np.random.default_rng(s_anat), n)
    atten = anat["atten"].copy()
    lesion_mask = np.zeros((n, n), dtype=bool)
    if label in ABNORMAL:
        # Draw the lesion even when it is not rendered so that the two renderings agree.
        patches = _lesion(r_lesion, label, anat, cfg.difficulty)
        clip = anat["lung_eff"]
        added = np.zeros_like(atten)
        for win, f, peak in patches:
            fc = f * clip[win]
            added[win] += fc
            lesion_mask[win] |= fc > LESION_MASK_FRACTION * peak
        lesion_mask &= anat["lung_mask"]
        if lesion:
            # Fluid-filled lung approaches soft-tissue density but never exceeds it: saturate the
            # added opacity below LESION_DENSITY_CAP so lesions never outshine bone or the heart.
            room = np.maximum(LESION_DENSITY_CAP - atten, 0.0)
            atten = atten + room * (1.0 - np.exp(-added / np.maximum(room, 1e-3)))
        else:
            lesion_mask[:] = False

    style = _hospital_style(cfg, source)
    re = np.random.default_rng(s_expo)
    # Exposure / windowing: per-site systematic offset plus per-image variation.
    lo = -0.02 + style.level + re.uniform(-0.04, 0.04)
    hi = lo + (0.86 + re.uniform(-0.08, 0.08)) * style.window
    gamma = style.gamma * re.uniform(0.8, 1.25)
    blur = style.blur * re.uniform(0.8, 1.25) * n / 256
    grad = [float(t) for t in re.uniform(-0.04, 0.04, 2)]  # heel effect / uneven detector response
    noise_level = style.noise * re.uniform(0.8, 1.25)

    img = np.clip((atten - lo) / (hi - lo), 0, 1)
    g = np.linspace(-1, 1, n, dtype=np.float32)
    img = img + grad[0] * g[:, None] + grad[1] * g[None, :]
    img = np.clip(img, 1e-6, 1) ** gamma
    rn = np.random.default_rng(s_noise)
    # Noise added before the system blur comes out spatially correlated (detector
    # structure); white quantum noise after it is stronger in bright (low-dose) regions.
    img = img + noise_level * rn.standard_normal((n, n), dtype=np.float32)
    if blur > 0.05:
        img = ndimage.gaussian_filter(img, blur)
    img = img + noise_level * (0.6 + 0.4 * img) * rn.standard_normal((n, n), dtype=np.float32)
    img = np.clip(img, 0, 1).astype(np.float32)

    rm = np.random.default_rng(s_marker)
    _draw_glyphs(img, style.glyphs, style.corner, float(rm.uniform(0.9, 1.0)), rm)

    marker_box = None
    u_marker = rm.random()
    ms_y, ms_x = rm.uniform(0.03, 0.07, 2)
    if cfg.shortcut:
        p = cfg.shortcut_strength if label in ABNORMAL else 1.0 - cfg.shortcut_strength
        if u_marker < p:
            side = max(3, round(n * 0.07))
            y0, x0 = round(ms_y * n), round(ms_x * n)
            y1, x1 = y0 + side, x0 + side
            # A bright square token with a dark core: unmistakable to a CNN, outside the lungs.
            img[y0:y1, x0:x1] = 1.0
            c0 = side // 3
            img[y0 + c0 : y1 - c0, x0 + c0 : x1 - c0] = 0.15
            marker_box = (y0, x0, y1, x1)

    return PhantomCase(image=img, lesion_mask=lesion_mask, lung_mask=anat["lung_mask"], marker_box=marker_box)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)  # speed over a few % of disk
    return buf.getvalue()


def load_phantom_config(path: str | Path) -> PhantomConfig:
    """Read the PhantomConfig back from a phantom.json (or the folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "phantom.json"
    meta = json.loads(p.read_text())
    names = {f.name for f in fields(PhantomConfig)}
    return PhantomConfig(**{k: v for k, v in meta.items() if k in names})


class PhantomSample(NamedTuple):
    """A sample of a loaded phantom with what it takes to render it again (``render_case``)."""

    sample: Sample
    case_seed: int
    source: int  # the hospital index behind the manifest's "hospital_K"


def phantom_cases(dataset: Dataset) -> tuple[PhantomConfig, list[PhantomSample]] | None:
    """The phantom's config and every sample's rendering inputs when ``dataset`` is a cxrnn phantom (its
    folder holds phantom.json and every row a case_seed), else None."""
    meta = Path(dataset.root) / "phantom.json"
    if not meta.is_file() or any("case_seed" not in s.extra for s in dataset.samples):
        return None
    rows = []
    for s in dataset.samples:
        m = re.search(r"(\d+)$", s.source or "0")
        rows.append(PhantomSample(s, int(s.extra["case_seed"]), int(m.group(1)) if m else 0))
    return load_phantom_config(meta), rows


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _render_and_write(out: Path, cfg: PhantomConfig, label: str, index: int, source: int, pid: int) -> list[str]:
    """Render one case, write its PNGs atomically, return its manifest row."""
    seed = case_seed_for(cfg.seed, label, index)
    case = render_case(seed, label, cfg, source=source)
    stem = f"{label}_{index:04d}"
    img_rel = f"{label}/{stem}.png"
    lung_rel = f"masks/{stem}_lungs.png"
    atomic_write_bytes(out / img_rel, _png_bytes(to_uint8(case.image)))
    atomic_write_bytes(out / lung_rel, _png_bytes(case.lung_mask.astype(np.uint8) * 255))
    mask_rel = ""
    if label in ABNORMAL:
        mask_rel = f"masks/{stem}_lesion.png"
        atomic_write_bytes(out / mask_rel, _png_bytes(case.lesion_mask.astype(np.uint8) * 255))
    row = [img_rel, label, f"P{pid:05d}", f"hospital_{source}", mask_rel, lung_rel, str(seed)]
    if cfg.shortcut:
        row.append("1" if case.marker_box is not None else "0")
    return row


def _render_chunk(args: tuple[Path, PhantomConfig, list[tuple[str, int, int, int]]]) -> list[list[str]]:
    out, cfg, chunk = args
    return [_render_and_write(out, cfg, *job) for job in chunk]


def generate_phantom(
    out_dir: str | Path,
    cfg: PhantomConfig = PhantomConfig(),
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> Path:
    """Render the dataset in the Mendeley folder layout and return the manifest.csv path.

    `workers` processes render in parallel (default: all usable cores). Every case is
    rendered from its own seed, so the files are byte-identical whatever the worker count.
    """
    out = Path(out_dir)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for c in CLASSES:
        (out / c).mkdir(exist_ok=True)

    plan_rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 0xB10C]))
    total = len(CLASSES) * cfg.per_class
    # Patient ids are a shuffled numbering so the id itself carries no class information.
    pids = plan_rng.permutation(total)
    # Sources drawn uniformly and independently of the class (no site/label confounding).
    srcs = plan_rng.integers(0, max(1, cfg.sources), size=total)
    jobs = [
        (label, i, int(srcs[j]), int(pids[j]))
        for j, (label, i) in enumerate((c, i) for c in CLASSES for i in range(cfg.per_class))
    ]

    nw = _default_workers() if workers is None else max(1, int(workers))
    nw = min(nw, max(1, total // 32))  # small sets: process start-up would dominate
    chunk = 16
    chunks = [jobs[k : k + chunk] for k in range(0, total, chunk)]
    rows: list[list[str]] = []
    done = 0

    def _collect(batch: list[list[str]]) -> None:
        nonlocal done
        rows.extend(batch)
        done += len(batch)
        if progress is not None:
            progress(done, total)

    pool = None
    if nw > 1 and "fork" in mp.get_all_start_methods():
        # fork, not spawn: spawn would re-import the caller's __main__, which breaks scripts
        # without a main guard; the children only run numpy/scipy/PIL code.
        try:
            pool = ProcessPoolExecutor(max_workers=nw, mp_context=mp.get_context("fork"))
        except (OSError, ValueError):
            pool = None
    if pool is not None:
        with pool:
            for batch in pool.map(_render_chunk, [(out, cfg, ch) for ch in chunks]):
                _collect(batch)
    else:
        for ch in chunks:
            _collect(_render_chunk((out, cfg, ch)))

    header = ["path", "label", "patient_id", "source", "mask", "lung_mask", "case_seed"]
    if cfg.shortcut:
        header.append("marker")
    meta = {**asdict(cfg), "classes": list(CLASSES), "version": PHANTOM_VERSION}
    atomic_write_bytes(out / "phantom.json", (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    manifest = out / "manifest.csv"
    # The manifest goes last: its presence means every image it lists is complete.
    atomic_write_bytes(manifest, buf.getvalue().encode())
    return manifest
