"""Second near-duplicate pass: copies found by aligning images, where perceptual hashes miss them.

Augmented copies (shifted, zoomed or cropped, rotated, mirrored, zoomed differently in x and y, padded
with black or edge pixels) are more than ``DEFAULT_THRESHOLD`` pHash bits from their original. Every
image keeps a 128 px thumbnail and a mask of its padding (flat regions reaching the border). Each
thumbnail is registered (affine) to the dataset's mirror-symmetric mean image; a 16x16 descriptor of the
registered image gives each image its ``ALIGN_NEIGHBOURS`` nearest neighbours (cosine, plain or
mirrored; chunked matrix products). Each candidate pair not yet grouped is aligned (affine Lucas-Kanade
at 32 and 64 px, started from the two canonical warps) and scored by the normalised cross-correlation
(NCC) of band-passed 128 px images over the content both cover; it is a near-duplicate when the NCC
reaches ``align_threshold`` (0.9).

Calibrated on 210 phantom images (256 px, seed 11; distinct phantoms share one anatomy, a hard
negative set): NCC of all 21,945 distinct pairs max 0.853, 99.9th percentile 0.813 (of the 759
nearest-neighbour pairs actually aligned: max 0.853, 99.9th percentile 0.840); lowest NCC of 70 copies
of each kind, either image aligned onto the other: shift 2% 0.990, 4% 0.994, 6% with black fill 0.974;
crop 5% 0.992, 10% 0.981, 15% 0.977 (resized back); rotation 5° 0.992, 10° with black corners 0.986;
JPEG q50 0.992; half size 0.996; mirrored 1.000; x-only zoom 12% 0.965; random rotation +-10°, shift
+-6%, zoom 0.85-1, mirror, JPEG q75 0.966; Keras-style (independent x/y zoom 0.85-1.15, rotation
+-10°, shift +-10%) 0.978, with black fill and JPEG q70 0.969. Every such copy was among its
original's candidates and was grouped with it; no two distinct images were grouped. Copies with less
than 35% of the thumbnail in common (e.g. rotation 15° plus shift 15% plus zoom 0.8) are not found.
Same-patient follow-up images, where present, may align too; for a split that is the right call.

Cost on one CPU thread: ~3.5 ms per image to register and describe, ~3.3 ms per aligned pair; 1,002
distinct phantom images took 12 s (3.6 pairs per image; no group formed), 1,260 images of which 1,050
copies 10 s (a pair already joined through others is not aligned).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cxrnn.data.groups import UnionFind
from cxrnn.audit.thresholds import DEFAULT_ALIGN_THRESHOLD

THUMB_SIZE = 128  # side of the stored thumbnail the alignment pass works on
ALIGN_NEIGHBOURS = 5  # candidates per image for the alignment pass


def thumbnail(u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(thumbnail, padding mask) of a uint8 grey image: the whole image squeezed to THUMB_SIZE square, and
    the pixels of it that are padding (see ``_fill_mask``)."""
    # BOX averages when shrinking; an image smaller than the thumbnail is interpolated instead
    resample = Image.Resampling.BOX if min(u8.shape) >= THUMB_SIZE else Image.Resampling.BILINEAR
    thumb = np.asarray(Image.fromarray(u8, "L").resize((THUMB_SIZE, THUMB_SIZE), resample))
    return thumb, _fill_mask(thumb)


def _fill_mask(thumb: np.ndarray) -> np.ndarray:
    """Pixels of a uint8 thumbnail that are padding: flat (3x3 range <= 1 grey level) and connected to
    the border, plus a 1 px rim. Augmented copies are padded with black (or another constant) where the
    shift, rotation or zoom-out left no content; those pixels must not count against a match."""
    from scipy import ndimage

    t = thumb.astype(np.int16)
    flat = (ndimage.maximum_filter(t, 3) - ndimage.minimum_filter(t, 3)) <= 1
    seeds = np.zeros_like(flat)
    seeds[[0, -1], :] = True
    seeds[:, [0, -1]] = True
    fill = ndimage.binary_propagation(seeds & flat, mask=flat)
    return ndimage.binary_dilation(fill) if fill.any() else fill


# Every thumbnail (THUMB_SIZE px, padding masked) is registered to the dataset's mean image made
# mirror-symmetric: phase correlation over zoomed and rotated variants at 32 px, then Lucas-Kanade
# (affine: augmenters zoom x and y independently) at 32 and 64 px. That canonical warp gives a
# descriptor of the registered image, and each image's nearest descriptors (plain or mirrored) are its
# candidates. A candidate pair starts from the composition of the two canonical warps, is refined by
# the same LK, and is scored by the normalised cross-correlation of band-passed 128 px images over the
# content both cover: that band holds the fine texture in which distinct radiographs differ.

_LEVELS = (32, 64)  # LK levels; the score is taken at THUMB_SIZE
_LK_ITERS = {32: 5, 64: 4}
_COARSE_SCALES = (1 / 1.2, 1 / 1.1, 1.0, 1.1, 1.2)
_COARSE_ROTATIONS = (-10.0, -5.0, 0.0, 5.0, 10.0)  # degrees
_MIN_OVERLAP = 0.35  # share of the thumbnail both images must cover after alignment
_DESC_CROP, _DESC_SIDE = 8, 16  # descriptor: registered 64 px image, border cropped, pooled to 16x16
_CHUNK = 64  # images or pairs per batch


def _binomial(x, taps: int):
    """Separable binomial blur of (B, 1, H, W), replicated borders: 3 taps ~ sigma 0.7 px, 5 taps ~ 1 px.
    (Shifted-slice sums: on CPU they beat conv2d and pooling for such small kernels.)"""
    k = {3: (0.25, 0.5, 0.25), 5: (0.0625, 0.25, 0.375, 0.25, 0.0625)}[taps]
    r, (h, w) = taps // 2, x.shape[-2:]
    xp = F.pad(x, (r, r, r, r), mode="replicate")
    y = xp[..., :, 0:w] * k[0]
    for i in range(1, taps):
        y = y + k[i] * xp[..., :, i : i + w]
    z = y[..., 0:h, :] * k[0]
    for i in range(1, taps):
        z = z + k[i] * y[..., i : i + h, :]
    return z


def _erode(m, r: int):
    """Binary erosion of a (B, 1, H, W) 0/1 mask by a (2r+1) square; outside the image counts as 0."""
    if r <= 0:
        return m
    h, w = m.shape[-2:]
    p = F.pad(m, (r, r, r, r), value=0.0)
    y = p[..., :, 0:w]
    for i in range(1, 2 * r + 1):
        y = torch.minimum(y, p[..., :, i : i + w])
    z = y[..., 0:h, :]
    for i in range(1, 2 * r + 1):
        z = torch.minimum(z, y[..., i : i + h, :])
    return z


def _warp(x, A, t):
    """Sample x (B, C, w, w) at A p + t, p and t in pixels about the centre, (x, y) order; bilinear, 0 outside."""
    w = x.shape[-1]
    theta = torch.cat([A, (2.0 * t / w).unsqueeze(-1)], dim=-1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _masked_stats(x, m):
    n = m.sum((2, 3), keepdim=True).clamp_min(1)
    mu = (x * m).sum((2, 3), keepdim=True) / n
    sd = ((((x - mu) * m) ** 2).sum((2, 3), keepdim=True) / n).clamp_min(1e-12).sqrt()
    return mu, sd, n


def _ncc(a, b, m):
    mu_a, sd_a, n = _masked_stats(a, m)
    mu_b, sd_b, _ = _masked_stats(b, m)
    return ((((a - mu_a) * (b - mu_b)) * m).sum((2, 3), keepdim=True) / n / (sd_a * sd_b)).view(-1)


class _Pyramid:
    """Thumbnails of a batch at 32, 64 and 128 px: blurred images, content masks and a band-pass image."""

    def __init__(self, thumbs: np.ndarray, fills: np.ndarray, mirror: np.ndarray | None = None):
        x = torch.from_numpy(np.ascontiguousarray(thumbs)).float().unsqueeze(1) / 255.0
        v = torch.from_numpy(~np.ascontiguousarray(fills)).float().unsqueeze(1)
        if mirror is not None and mirror.any():
            flip = torch.from_numpy(np.asarray(mirror, dtype=bool)).view(-1, 1, 1, 1)
            x, v = torch.where(flip, x.flip(-1), x), torch.where(flip, v.flip(-1), v)
        mean = (x * v).sum((2, 3), keepdim=True) / v.sum((2, 3), keepdim=True).clamp_min(1)
        x = torch.where(v > 0.5, x, mean)  # padding takes the mean: no hard edge for blurs and FFTs
        self.valid = {THUMB_SIZE: v}
        raw = {THUMB_SIZE: x}
        for w in (64, 32):
            raw[w] = F.avg_pool2d(raw[2 * w], 2)
            self.valid[w] = (F.avg_pool2d(self.valid[2 * w], 2) > 0.99).float()
        self.img = {THUMB_SIZE: _binomial(raw[THUMB_SIZE], 3), 64: _binomial(raw[64], 5), 32: _binomial(raw[32], 5)}
        # band-pass at 128 px: sigma ~0.7 minus sigma ~2 (the 64 px level brought back up)
        self.band = self.img[THUMB_SIZE] - F.interpolate(self.img[64], scale_factor=2, mode="bilinear",
                                                          align_corners=False)


def _inv2(M):
    """Inverse of a batch of 2x2 matrices (a determinant near 0 is held away from it)."""
    a, b, c, d = M[:, 0, 0], M[:, 0, 1], M[:, 1, 0], M[:, 1, 1]
    det = a * d - b * c
    det = torch.where(det >= 0, det.clamp_min(1e-6), det.clamp_max(-1e-6))
    return torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / det.view(-1, 1, 1)


def _similarity(scale: float, degrees: float):
    th = np.deg2rad(degrees)
    return torch.tensor([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]], dtype=torch.float32) / scale


def _lk(src: _Pyramid, tmpl: _Pyramid, w: int, A, t, iters: int):
    """Inverse-compositional Lucas-Kanade at level w: refine the affine warp (A, t) so that
    src(A p + t) matches gain * tmpl(p) + bias over the pixels where both have content.
    W(p; d) = [[1 + d0, d1], [d2, 1 + d3]] p + (d4, d5); the update is W <- W o W(d)^-1."""
    T = tmpl.img[w]
    half = (w - 1) / 2.0
    p = torch.arange(w, dtype=torch.float32) - half
    px, py = p.view(1, 1, 1, w), p.view(1, 1, w, 1)
    gy, gx = torch.gradient(T, dim=(2, 3))
    sd = torch.cat([gx * px, gx * py, gy * px, gy * py, gx, gy], dim=1)  # steepest-descent images
    tv = _erode(tmpl.valid[w], 1)
    stack = torch.cat([src.img[w], src.valid[w]], dim=1)
    for _ in range(iters):
        s = _warp(stack, A, t)
        m = tv * (s[:, 1:2] > 0.99).float()
        i_w = s[:, :1]
        mu_i, sd_i, n = _masked_stats(i_w, m)
        mu_t, sd_t, _ = _masked_stats(T, m)
        e = ((i_w - mu_i) * (sd_t / sd_i) + mu_t - T) * m
        sdm = sd * m
        sdm = sdm - sdm.sum((2, 3), keepdim=True) / n * m
        H = torch.einsum("bihw,bjhw->bij", sdm, sdm) + 1e-6 * torch.eye(6)
        g = torch.einsum("bihw,bhw->bi", sdm, e[:, 0])
        d = torch.nan_to_num(torch.linalg.solve(H, g.unsqueeze(-1)).squeeze(-1))
        d = torch.cat([d[:, :4].clamp(-0.2, 0.2), d[:, 4:].clamp(-w / 8, w / 8)], 1)  # a step, not a leap
        A = A @ _inv2(torch.eye(2) + d[:, :4].view(-1, 2, 2))
        t = t - (A @ d[:, 4:].unsqueeze(-1)).squeeze(-1)
    return A, t


def _refine(src: _Pyramid, tmpl: _Pyramid, A, t):
    """Coarse-to-fine LK; t in pixels at THUMB_SIZE on entry and exit."""
    for w in _LEVELS:
        k = w / THUMB_SIZE
        A, t = _lk(src, tmpl, w, A, t * k, _LK_ITERS[w])
        t = t / k
    return A, t


def _overlap(src: _Pyramid, tmpl: _Pyramid, w: int, A, t, rim: int):
    v = _warp(_erode(src.valid[w], rim), A, t * (w / THUMB_SIZE)) > 0.99
    return v.float() * _erode(tmpl.valid[w], rim)


def _score(src: _Pyramid, tmpl: _Pyramid, A, t):
    """Band-pass NCC at THUMB_SIZE over the common content (-1 where it covers < _MIN_OVERLAP)."""
    m = _overlap(src, tmpl, THUMB_SIZE, A, t, 3)
    c = torch.nan_to_num(_ncc(_warp(src.band, A, t), tmpl.band, m), nan=-1.0)
    enough = m.mean((1, 2, 3)) >= _MIN_OVERLAP
    return torch.where(enough, c, torch.full_like(c, -1.0))


def _coarse(src: _Pyramid, tmpl: _Pyramid):
    """Phase correlation at 32 px of zoomed and rotated variants of src: the best (A, t) per item."""
    w = 32
    Ms = torch.stack([_similarity(s, r) for s in _COARSE_SCALES for r in _COARSE_ROTATIONS])
    V, B = len(Ms), src.img[w].shape[0]
    s = _warp(torch.cat([src.img[w], src.valid[w]], 1).repeat_interleave(V, 0), Ms.repeat(B, 1, 1),
              torch.zeros(B * V, 2))
    x, v = s[:, :1], (s[:, 1:] > 0.99).float()
    win = torch.hann_window(w, periodic=False)
    win = win.view(w, 1) * win.view(1, w)
    a = ((x - _masked_stats(x, v)[0]) * v * win).view(B, V, w, w)
    tv = tmpl.valid[w]
    b = ((tmpl.img[w] - _masked_stats(tmpl.img[w], tv)[0]) * tv * win).view(-1, 1, w, w)
    R = torch.fft.rfft2(a) * torch.fft.rfft2(b).conj()
    fy, fx = torch.fft.fftfreq(w).view(-1, 1), torch.fft.rfftfreq(w).view(1, -1)
    R = R / (R.abs() + 1e-9) * torch.exp(-(fy**2 + fx**2) / (2 * 0.2**2))
    peak, where = torch.fft.irfft2(R, s=(w, w)).reshape(B, V, -1).max(-1)
    best = peak.argmax(-1)
    where = where.gather(1, best.view(-1, 1)).view(-1)
    dy, dx = (where // w).float(), (where % w).float()
    dy, dx = torch.where(dy > w // 2, dy - w, dy), torch.where(dx > w // 2, dx - w, dx)
    A = Ms[best]  # the variant matched tmpl shifted by d: src(A (p + d)) ~ tmpl(p)
    t = (A @ torch.stack([dx, dy], -1).unsqueeze(-1)).squeeze(-1) * (THUMB_SIZE / w)
    return A, t


def _register(src: _Pyramid, tmpl: _Pyramid):
    """Affine warp of every src item onto the (single) template: the best coarse guess, refined."""
    A, t = _coarse(src, tmpl)
    return _refine(src, tmpl, A, t)


def _descriptors(src: _Pyramid, tmpl: _Pyramid, A, t):
    """Registered 64 px image (padding replaced by the template), border cropped, pooled to 16x16,
    mean-free and unit length; also the descriptor of the mirrored image."""
    w = 64
    s = _warp(torch.cat([src.img[w], src.valid[w]], 1), A, t * (w / THUMB_SIZE))
    x, v = s[:, :1], (s[:, 1:] > 0.99).float()
    T = tmpl.img[w].expand_as(x)
    mu, sd, _ = _masked_stats(x, v)
    mu_t, sd_t, _ = _masked_stats(T, v)
    z = torch.where(v > 0, (x - mu) / sd, (T - mu_t) / sd_t)
    c = _DESC_CROP
    z = z[..., c : w - c, c : w - c]
    z = _binomial(F.adaptive_avg_pool2d(z, _DESC_SIDE), 3)

    def unit(d):
        d = d.flatten(1)
        d = d - d.mean(1, keepdim=True)
        return d / d.norm(dim=1, keepdim=True).clamp_min(1e-9)

    return unit(z), unit(z.flip(-1))


def _template(thumbs: np.ndarray, fills: np.ndarray):
    total = np.zeros(thumbs.shape[1:], np.float64)
    count = np.zeros(thumbs.shape[1:], np.float64)
    for s in range(0, len(thumbs), 512):
        v = ~fills[s : s + 512]
        total += (thumbs[s : s + 512] * v).sum(0)
        count += v.sum(0)
    mean = total / np.maximum(count, 1)
    mean = (mean + mean[:, ::-1]) / 2  # symmetric: a mirrored image registers to the mirrored warp
    return _Pyramid(np.round(mean)[None].astype(np.uint8), np.zeros((1,) + mean.shape, bool))


def _register_all(thumbs: np.ndarray, fills: np.ndarray):
    """Canonical warps (A, t) onto the symmetrised mean image and the descriptors (plain, mirrored)."""
    n = len(thumbs)
    tmpl = _template(thumbs, fills)
    A, t = torch.empty(n, 2, 2), torch.empty(n, 2)
    D = torch.empty(n, _DESC_SIDE * _DESC_SIDE)
    Dm = torch.empty_like(D)
    for s in range(0, n, _CHUNK):
        pyr = _Pyramid(thumbs[s : s + _CHUNK], fills[s : s + _CHUNK])
        A[s : s + _CHUNK], t[s : s + _CHUNK] = _register(pyr, tmpl)
        D[s : s + _CHUNK], Dm[s : s + _CHUNK] = _descriptors(pyr, tmpl, A[s : s + _CHUNK], t[s : s + _CHUNK])
    return A, t, D, Dm


def _candidates(D, Dm, neighbours: int,
                skip: Callable[[int, int], bool] | None = None) -> dict[tuple[int, int], tuple[bool, float]]:
    """(i, j) with i < j -> (mirrored, cosine) for each image's ``neighbours`` most similar descriptors
    (plain or mirrored), by chunked matrix products."""
    n = len(D)
    k = min(neighbours, n - 1)
    cands: dict[tuple[int, int], tuple[bool, float]] = {}
    for s in range(0, n, 1024):
        same, mirrored = D[s : s + 1024] @ D.T, D[s : s + 1024] @ Dm.T
        sim = torch.maximum(same, mirrored)
        rows = torch.arange(s, min(n, s + 1024))
        sim[rows - s, rows] = -float("inf")
        top = sim.topk(k, dim=1)
        flip = (mirrored > same).gather(1, top.indices)
        for r, (js, fs, cs) in enumerate(zip(top.indices.tolist(), flip.tolist(), top.values.tolist())):
            for j, f, c in zip(js, fs, cs):
                key = (min(s + r, j), max(s + r, j))
                if key not in cands and not (skip and skip(*key)):
                    cands[key] = (bool(f), c)
    return cands


def _verify(thumbs: np.ndarray, fills: np.ndarray, A, t, pairs: Sequence[tuple[int, int]],
            mirrored: Sequence[bool]) -> np.ndarray:
    """Band-pass NCC of each pair (i, j) after aligning i (mirrored where asked) onto j."""
    out = np.empty(len(pairs), np.float64)
    flip_m = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    for s in range(0, len(pairs), _CHUNK):
        ii = np.array([p[0] for p in pairs[s : s + _CHUNK]])
        jj = np.array([p[1] for p in pairs[s : s + _CHUNK]])
        ff = np.array(mirrored[s : s + _CHUNK], dtype=bool)
        src, dst = _Pyramid(thumbs[ii], fills[ii], ff), _Pyramid(thumbs[jj], fills[jj])
        fl = torch.from_numpy(ff)
        Ai = torch.where(fl.view(-1, 1, 1), flip_m @ A[ii] @ flip_m, A[ii])
        ti = torch.where(fl.view(-1, 1), t[ii] * torch.tensor([-1.0, 1.0]), t[ii])
        # src(W_i(p)) ~ template(p) ~ dst(W_j(p))  =>  src(W_i(W_j^-1(p))) ~ dst(p)
        A0 = Ai @ _inv2(A[jj])
        t0 = ti - (A0 @ t[jj].unsqueeze(-1)).squeeze(-1)
        Af, tf = _refine(src, dst, A0, t0)
        out[s : s + len(ii)] = _score(src, dst, Af, tf).numpy()
    return out


def aligned_pairs(thumbs: np.ndarray, fills: np.ndarray, threshold: float = DEFAULT_ALIGN_THRESHOLD,
                  neighbours: int = ALIGN_NEIGHBOURS,
                  skip: Callable[[int, int], bool] | None = None) -> list[tuple[int, int, float]]:
    """Near-duplicate pairs (i, j, ncc) among thumbnails (N, THUMB_SIZE, THUMB_SIZE) uint8 with their
    padding masks: each image's ``neighbours`` nearest registered descriptors (either orientation) are
    aligned to it and kept when the band-pass NCC reaches ``threshold``. ``skip(i, j)`` drops a
    candidate before alignment (e.g. a pair already grouped). Candidates are aligned likeliest first,
    and one whose images the pairs found so far already join is not aligned at all: the result holds
    the pairs that form the groups, not every pair inside a group of many copies."""
    n = len(thumbs)
    if n < 2:
        return []
    out: list[tuple[int, int, float]] = []
    with torch.no_grad():
        A, t, D, Dm = _register_all(thumbs, fills)
        cands = _candidates(D, Dm, neighbours, skip)
        order = sorted(cands, key=lambda p: (-cands[p][1], p))
        joined = UnionFind(n)
        pos = 0
        while pos < len(order):
            chunk: list[tuple[int, int]] = []
            while pos < len(order) and len(chunk) < _CHUNK:
                i, j = order[pos]
                pos += 1
                if joined.find(i) != joined.find(j):
                    chunk.append((i, j))
            scores = _verify(thumbs, fills, A, t, chunk, [cands[p][0] for p in chunk])
            for (i, j), c in zip(chunk, scores.tolist()):
                if c >= threshold:
                    out.append((i, j, round(c, 4)))
                    joined.union(i, j)
    return sorted(out)

