"""Sequence and pixel attributions (Captum): known answers on hand-made heads, every method on the four paper
backbones at full size and on every head, cuDNN off for the RNN only, deletion / insertion curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cxrnn.explain import CamExplainer
from cxrnn.explain.attribution import (PixelIntegratedGradients, PixelOcclusion, SequenceIntegratedGradients,
                                       SequenceOcclusion, cudnn_off_for_rnns, gaussian_blur, normalise_maps,
                                       subcell_offsets, translate)
from cxrnn.explain.faithfulness import DeletionInsertion, auc, pixel_order
from cxrnn.explain.registry import CAM_METHODS, METHODS
from cxrnn.models.backbones import create_backbone
from cxrnn.models.bundle import ModelBundle, build_network
from cxrnn.models.heads import HEADS
from cxrnn.models.ood import fit_ood_stats

# Slow methods at their cheapest settings: the shape tests check wiring, not quality.
CHEAP = {"ig-sequence": {"n_steps": 4}, "ig-pixels": {"n_steps": 2}, "pixel-occlusion": {"patch": 0.5}}


class OneStepHead(nn.Module):
    """Logits read one step (row, col) of the feature map only: every faithful map peaks there."""

    def __init__(self, channels: int, row: int, col: int):
        super().__init__()
        self.row, self.col = row, col
        self.linear = nn.Linear(channels, 3)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[0] = 1.0  # class 0 grows with the step's features

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.linear(fmap[:, :, self.row, self.col])


class HeadOnly(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head


@pytest.mark.parametrize("method", [SequenceOcclusion(None), SequenceOcclusion(torch.zeros(4), window=2),
                                    SequenceIntegratedGradients(torch.zeros(4), n_steps=8)],
                         ids=["occlusion-own-mean", "occlusion-window-2", "ig-sequence"])
def test_sequence_maps_peak_on_the_one_step_the_head_reads(method):
    torch.manual_seed(0)
    fmap = torch.rand(2, 4, 5, 7)
    fmap[:, :, 3, 1] += 1.0  # above any mean: the read step raises class 0 over every baseline
    net = HeadOnly(OneStepHead(4, row=3, col=1))
    maps = method.maps(net, torch.zeros(2, 3, 70, 70), fmap, [0, 0])
    assert maps.shape == (2, 70, 70) and float(maps.min()) >= 0 and float(maps.max()) == pytest.approx(1.0)
    for m in maps:
        peak_y, peak_x = np.unravel_index(int(m.argmax()), m.shape)
        assert (peak_y // 14, peak_x // 10) == (3, 1)  # the cell of step (3, 1) on a 5 x 7 grid over 70 x 70
    # Class 1 does not depend on the map at all: nothing to draw.
    assert float(method.maps(net, torch.zeros(1, 3, 70, 70), fmap[:1], [1]).max()) == 0.0


def test_pixel_methods_point_at_the_pixels_the_network_reads(tiny):
    class CornerNet(nn.Module):
        """Class 0's logit is the mean of the top-left 8 x 8 pixels of channel 0."""

        def forward(self, x):
            corner = x[:, 0, :8, :8].mean(dim=(1, 2))
            return torch.stack([corner, torch.zeros_like(corner), torch.zeros_like(corner)], dim=1)

    x = torch.ones(1, 3, 32, 32) * 2.0
    for method in (PixelIntegratedGradients(tiny.preprocessing, n_steps=4, smoothing=0.0),
                   PixelOcclusion(tiny.preprocessing, patch=0.25)):
        m = method.maps(CornerNet(), x, torch.zeros(1, 1, 1, 1), [0])[0]
        # The peak covers the read corner; pixels no patch over the corner reaches get nothing.
        assert float(m[:4, :4].min()) == pytest.approx(1.0) and float(m[16:, 16:].max()) == 0.0, type(method).__name__


@pytest.fixture(scope="module")
def tiny():
    backbone = create_backbone("test_efficientnet", "none", seed=0)
    torch.manual_seed(0)
    net, hw = build_network(backbone, "bilstm", 3, {"hidden": 16, "dense": 8})
    net.eval()
    pooled = np.random.default_rng(0).normal(size=(40, backbone.spec.feature_channels))
    return ModelBundle(net=net, classes=["covid", "normal", "pneumonia"], preprocessing=backbone.preprocessing,
                       backbone_name=backbone.spec.name, weights_id="none", head_name="bilstm",
                       head_options={"hidden": 16, "dense": 8}, feature_hw=hw, temperature=1.5,
                       extras={"ood": fit_ood_stats(pooled).to_extras()})


def _maps_for(bundle: ModelBundle, method: str, image: np.ndarray, layer: str | None = None) -> None:
    options = CHEAP.get(method) if method not in CAM_METHODS else None
    with CamExplainer(bundle, method=method, layer=layer, options=options) as explainer:
        ((cam, probs, target),) = explainer.explain_arrays([image])
    assert cam.shape == image.shape and cam.dtype == np.float32, method
    assert 0.0 <= cam.min() and cam.max() <= 1.0, method
    assert probs.shape == (3,) and abs(float(probs.sum()) - 1) < 1e-5
    assert 0 <= target < 3


@pytest.mark.parametrize("head", HEADS)
def test_every_method_on_every_head(head):
    backbone = create_backbone("test_efficientnet", "none", seed=0)
    options = {"paper": {"lstm_units": 8, "dense": [16]}, "pool": {}}.get(head, {"hidden": 16, "dense": 8})
    torch.manual_seed(0)
    net, hw = build_network(backbone, head, 3, options)
    bundle = ModelBundle(net=net.eval(), classes=["covid", "normal", "pneumonia"], preprocessing=backbone.preprocessing,
                         backbone_name=backbone.spec.name, weights_id="none", head_name=head, head_options=options,
                         feature_hw=hw)
    image = np.random.default_rng(0).random((61, 47), dtype=np.float32)
    for method in METHODS:
        # ScoreCAM: one pass per channel of the layer, so the narrow first block
        _maps_for(bundle, method, image, layer="blocks.0" if method == "scorecam" else None)


@pytest.mark.parametrize("name", ["vgg19", "densenet121", "inception_v3", "inception_resnet_v2"])
def test_every_method_on_the_paper_backbones_at_full_size(name):
    backbone = create_backbone(name, "none", seed=0)
    torch.manual_seed(0)
    net, hw = build_network(backbone, "paper", 3, {"lstm_units": 16, "dense": [32]})
    bundle = ModelBundle(net=net.eval(), classes=["covid", "normal", "pneumonia"], preprocessing=backbone.preprocessing,
                         backbone_name=name, weights_id="none", head_name="paper",
                         head_options={"lstm_units": 16, "dense": [32]}, feature_hw=hw)
    assert bundle.preprocessing.input_size in (224, 299)
    image = np.random.default_rng(0).random((300, 260), dtype=np.float32)
    # ScoreCAM costs one full-size pass per channel (512-2048): it is covered on every head above.
    for method in (m for m in METHODS if m != "scorecam"):
        _maps_for(bundle, method, image)


def test_cudnn_is_off_inside_the_rnn_only():
    seen = {}

    class WatchedLSTM(nn.LSTM):
        def forward(self, *args, **kwargs):
            seen["in_rnn"] = torch.backends.cudnn.enabled
            return super().forward(*args, **kwargs)

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = WatchedLSTM(4, 4, batch_first=True)
            self.after = nn.Linear(4, 2)

        def forward(self, seq):
            seen["before_rnn"] = torch.backends.cudnn.enabled
            out, _ = self.rnn(seq)
            seen["after_rnn"] = torch.backends.cudnn.enabled
            return self.after(out)

    before = torch.backends.cudnn.enabled
    try:
        torch.backends.cudnn.enabled = True
        probe = Probe()
        with cudnn_off_for_rnns(probe):
            probe(torch.rand(1, 3, 4))
        assert seen == {"before_rnn": True, "in_rnn": False, "after_rnn": True}  # the other layers keep cuDNN
        assert torch.backends.cudnn.enabled
        probe(torch.rand(1, 3, 4))  # the hooks are gone after the block
        assert seen["in_rnn"] is True
    finally:
        torch.backends.cudnn.enabled = before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: the cuDNN RNN path "
                                                          "is checked where one is present")
def test_explanations_run_on_cuda_with_a_cudnn_lstm(tiny):
    bundle = tiny
    bundle.net.to("cuda")
    try:
        image = np.random.default_rng(0).random((80, 64), dtype=np.float32)
        for method in ("occlusion", "gradcam", "ig-sequence", "ig-pixels"):
            _maps_for(bundle, method, image)
        assert torch.backends.cudnn.enabled
    finally:
        bundle.net.to("cpu")


def test_normalise_and_blur():
    maps = torch.tensor([[[-1.0, 2.0], [0.5, 4.0]], [[-1.0, -2.0], [0.0, -3.0]]])
    out = normalise_maps(maps)
    assert out[0].tolist() == [[0.0, 0.5], [0.125, 1.0]] and float(out[1].abs().max()) == 0.0
    spike = torch.zeros(1, 21, 21)
    spike[0, 10, 10] = 1.0
    blurred = gaussian_blur(spike, 2.0)
    assert float(blurred.sum()) == pytest.approx(1.0, abs=1e-4) and int(blurred[0].argmax()) == 10 * 21 + 10


def test_pixel_order_and_auc():
    order = pixel_order(np.array([[0.1, 0.9], [0.0, 0.0]]), np.random.default_rng(0))
    assert list(order[:2]) == [1, 0] and set(order[2:]) == {2, 3}
    assert auc(np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert auc(np.array([1.0, 0.0])) == pytest.approx(0.5)


CHECKER = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2.0 - 1.0


def test_deletion_of_the_read_pixels_beats_a_random_order(tiny):
    class CornerNet(nn.Module):
        """Class 0 is confident exactly while the top-left quarter shows its fine checkerboard (which both the
        black deletion canvas and the blurred insertion canvas lack)."""

        def forward(self, x):
            corner = (x[:, 0, :16, :16] * CHECKER[:16, :16]).mean(dim=(1, 2))
            return torch.stack([8 * corner - 8, torch.zeros_like(corner), torch.zeros_like(corner)], dim=1)

    x = (2.0 * CHECKER).expand(1, 3, 32, 32)
    good = np.zeros((32, 32), np.float32)
    good[:16, :16] = 1.0
    curves = DeletionInsertion(CornerNet(), tiny.preprocessing, steps=8)
    faithful, random = curves.aucs(x, good, 0), curves.random_aucs(x, 0)
    # Deleting the quarter first kills the class within 1/4 of the curve; a random order only at the end.
    assert faithful["deletion_auc"] < random["deletion_auc"] - 0.2
    assert faithful["insertion_auc"] > random["insertion_auc"] + 0.2
    full = curves.curves(x, good, 0)
    assert full["deletion"].shape == (9,) and full["deletion"][0] == pytest.approx(full["insertion"][-1], abs=1e-6)


def test_subcell_offsets_and_translate():
    assert subcell_offsets(224, (7, 7), 1) == [(0, 0)]
    assert subcell_offsets(224, (7, 7), 3) == [(a, b) for a in (-11, 0, 11) for b in (-11, 0, 11)]
    x = torch.arange(2 * 1 * 6 * 5, dtype=torch.float32).view(2, 1, 6, 5)
    moved = translate(x, 2, -1)
    assert torch.equal(moved[:, :, 2:, :4], x[:, :, :4, 1:])  # content moved down 2, left 1
    assert torch.equal(moved[:, :, 0], moved[:, :, 2])  # the uncovered top rows repeat the edge


class PoolingNet(nn.Module):
    """A translation-equivariant 'backbone' (10 x 10 average pooling, 4 channels) and a head whose class 0
    is the brightest step: a sub-cell shift of the image moves which step that is."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.AvgPool2d(10), nn.Conv2d(3, 4, 1, bias=False))
        nn.init.constant_(self.backbone[1].weight, 1.0)
        self.head = nn.Sequential(nn.Flatten(2), PeakStep())


class PeakStep(nn.Module):
    def forward(self, steps: torch.Tensor) -> torch.Tensor:
        score = torch.logsumexp(8 * steps.sum(dim=1), dim=1)
        return torch.stack([score, torch.zeros_like(score), torch.zeros_like(score)], dim=1)


@pytest.mark.parametrize("centre", [(22, 42), (18, 33), (31, 47), (27, 22)])
def test_shifted_integrated_gradients_find_a_spot_finer_than_the_grid(centre):
    cy, cx = centre  # a spot off the centres of the 10 x 10 cells
    x = torch.zeros(1, 3, 70, 70)
    x[:, :, cy - 4 : cy + 4, cx - 4 : cx + 4] = 1.0
    net = PoolingNet()
    fmap = net.backbone(x)

    def peak_error(shifts: int) -> float:
        m = SequenceIntegratedGradients(torch.zeros(4), n_steps=8, shifts=shifts, smooth=0.0).maps(net, x, fmap, [0])[0]
        assert m.shape == (70, 70) and float(m.max()) == pytest.approx(1.0)
        py, px = np.unravel_index(int(m.argmax()), m.shape)
        return float(np.hypot(py + 0.5 - cy, px + 0.5 - cx))  # from the pixel's centre to the spot's

    plain, shifted = peak_error(1), peak_error(3)
    assert shifted <= 1.0 < 2.5 <= plain, (plain, shifted)


def test_shifts_must_be_positive():
    with pytest.raises(ValueError, match="shifts"):
        SequenceIntegratedGradients(None, shifts=0)
    with pytest.raises(ValueError, match="smooth"):
        SequenceIntegratedGradients(None, smooth=-0.5)


def test_smoothing_spreads_a_step_over_its_cell_and_keeps_the_peak():
    """Half a cell of smoothing (the default) widens the spot's map (more pixels above half its maximum) without
    moving its maximum by more than a pixel."""
    x = torch.zeros(1, 3, 70, 70)
    x[:, :, 31:39, 31:39] = 1.0  # one spot at the centre of the 10 x 10 cells' middle
    net = PoolingNet()
    fmap = net.backbone(x)
    plain, smooth, default = (SequenceIntegratedGradients(torch.zeros(4), n_steps=8, **kw).maps(net, x, fmap, [0])[0]
                              for kw in ({"smooth": 0.0}, {"smooth": 0.5}, {}))
    assert torch.equal(default, smooth)  # the default map is the half-cell blur
    assert float(smooth.max()) == pytest.approx(1.0)
    peaks = [np.array(np.unravel_index(int(m.argmax()), m.shape)) for m in (plain, smooth)]
    assert np.abs(peaks[0] - peaks[1]).max() <= 1
    assert int((smooth > 0.5).sum()) > 1.3 * int((plain > 0.5).sum())


def test_random_cell_order_removes_whole_cells(tiny):
    """The cell order deletes the input cell by cell, the pixel order scatters: on a net that reads the top-left
    cell of a 2 x 2 grid, a seed whose cell order takes that cell first collapses the class within a quarter of
    the curve and one that takes it last keeps it to the end; the pixel order erodes it evenly on every seed."""

    class CornerNet(nn.Module):
        def forward(self, x):
            corner = (x[:, 0, :16, :16] * CHECKER[:16, :16]).mean(dim=(1, 2))
            return torch.stack([8 * corner - 8, torch.zeros_like(corner), torch.zeros_like(corner)], dim=1)

    x = (2.0 * CHECKER).expand(1, 3, 32, 32)
    curves = DeletionInsertion(CornerNet(), tiny.preprocessing, steps=4)
    by_cells = [curves.random_aucs(x, 0, seed=seed, cells=(2, 2))["deletion_auc"] for seed in range(24)]
    by_pixels = [curves.random_aucs(x, 0, seed=seed)["deletion_auc"] for seed in range(24)]
    # pixels: every seed erodes the corner at about the same pace
    assert max(by_pixels) - min(by_pixels) < 0.15
    # cells: seeds whose noise put the corner cell first kill the class at once, those that put it last keep it
    assert min(by_cells) < min(by_pixels) - 0.2
    assert max(by_cells) > max(by_pixels) + 0.2
