from __future__ import annotations

import pytest
import torch

from cxrnn.models.heads import HEADS, ReluLSTM, create_head, feature_map_to_sequence


@pytest.mark.parametrize("name", HEADS)
def test_every_head_maps_a_feature_map_to_class_logits(name: str) -> None:
    opts = {"lstm_units": 16, "dense": [32, 32]} if name == "paper" else {}
    head = create_head(name, in_channels=24, steps=3 * 3, num_classes=3, **opts).eval()
    out = head(torch.randn(4, 24, 3, 3))
    assert out.shape == (4, 3)
    assert torch.isfinite(out).all()


def test_sequence_is_row_major_over_the_map() -> None:
    fmap = torch.arange(2 * 2 * 3, dtype=torch.float32).view(1, 2, 2, 3)  # C=2, H=2, W=3
    seq = feature_map_to_sequence(fmap)
    assert seq.shape == (1, 6, 2)
    assert seq[0, 1].tolist() == [1.0, 7.0]  # step 1 = (row 0, col 1), both channels


def test_relu_lstm_outputs_are_non_negative_and_depend_on_order() -> None:
    lstm = ReluLSTM(5, 7)
    seq = torch.randn(2, 6, 5)
    out = lstm(seq)
    assert out.shape == (2, 6, 7)
    assert (out >= 0).all()
    assert not torch.allclose(lstm(seq.flip(1))[:, -1], out[:, -1])


def test_freeze_rnn_keeps_the_paper_lstm_at_random_init() -> None:
    head = create_head("paper", 8, 4, 3, lstm_units=6, dense=[10], freeze_rnn=True)
    before = {k: v.clone() for k, v in head.rnn.state_dict().items()}
    dense_before = head.classifier.weight.clone()
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.cross_entropy(head(torch.randn(8, 8, 2, 2)), torch.randint(0, 3, (8,)))
    loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in head.rnn.state_dict().items())
    assert not torch.equal(dense_before, head.classifier.weight)
    trainable = create_head("paper", 8, 4, 3, lstm_units=6, dense=[10])
    assert all(p.requires_grad for p in trainable.rnn.parameters())


def test_unknown_head_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown head"):
        create_head("transformer", 8, 4, 3)


@pytest.mark.parametrize("summary", ["last_mean", "mean_max", "mean"])
def test_recurrent_summaries_give_every_step_a_gradient(summary: str) -> None:
    torch.manual_seed(0)  # a tiny random dense layer can start with every ReLU dead
    head = create_head("bilstm", in_channels=8, steps=9, num_classes=3, hidden=6, proj=6, dense=32,
                       dropout=0.0, summary=summary).eval()
    fmap = torch.randn(1, 8, 3, 3, requires_grad=True)
    head(fmap)[0, 0].backward()
    assert (fmap.grad.abs().sum(dim=1) > 0).all()


def test_an_unknown_summary_is_refused() -> None:
    with pytest.raises(ValueError, match="summary"):
        create_head("lstm", in_channels=8, steps=4, num_classes=3, summary="first")


def test_model_files_keep_their_head_summary(tmp_path) -> None:
    from cxrnn.models.backbones import create_backbone
    from cxrnn.models.bundle import ModelBundle, build_network, load_bundle, save_bundle

    backbone = create_backbone("test_efficientnet", "none", seed=0)
    net, hw = build_network(backbone, "lstm", 3, {"hidden": 8, "proj": 8, "dense": 4})
    bundle = ModelBundle(net=net.eval(), classes=["covid", "normal", "pneumonia"], preprocessing=backbone.preprocessing,
                         backbone_name="test_efficientnet", weights_id="none:0", head_name="lstm",
                         head_options={"hidden": 8, "proj": 8, "dense": 4}, feature_hw=hw)
    path = save_bundle(bundle, tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["head"]["options"]["summary"] == "mean_max"  # the default at save time is written down
    x = torch.rand(2, 3, *[backbone.preprocessing.input_size] * 2)
    assert torch.allclose(load_bundle(path).net(x), net(x), atol=1e-6)
    # A format-1 file (written before summaries existed) was trained with last+mean and must load as such.
    del payload["head"]["options"]["summary"]
    payload["format_version"] = 1
    torch.save(payload, tmp_path / "old.pt")
    old = load_bundle(tmp_path / "old.pt")
    assert old.net.head.summary == "last_mean" and old.head_options["summary"] == "last_mean"


@pytest.mark.parametrize("name", ["lstm", "bilstm"])
def test_recurrent_heads_zero_every_gradient_times_activation_sum(name: str) -> None:
    # Why cxrnn offers no HiResCAM / LayerCAM: the per-step LayerNorm makes each position's score
    # invariant to scaling its feature vector, so sum_c grad_c * act_c vanishes at every position.
    torch.manual_seed(0)
    head = create_head(name, 32, 12, 3).eval()
    fmap = (torch.rand(2, 32, 3, 4) + 0.1).requires_grad_()
    head(fmap)[:, 1].sum().backward()
    per_position = (fmap.grad * fmap.detach()).sum(dim=1)
    assert fmap.grad.abs().max() > 1e-4  # the gradient itself is not zero...
    assert per_position.abs().max() < 1e-3 * fmap.grad.abs().max() * fmap.detach().norm(dim=1).max()  # ...its projection is
