from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrnn.models import backbones as bb
from cxrnn.models.backbones import WeightsUnavailableError, create_backbone, get_spec, list_backbones
from cxrnn.models.bundle import build_network
from cxrnn.models.heads import feature_map_to_sequence
from cxrnn.models.preprocess import to_input_tensor

PAPER_SEQUENCES = {
    "vgg19": (49, 512),
    "densenet121": (49, 1024),
    "inception_v3": (25, 2048),
    "inception_resnet_v2": (25, 1536),
}


def test_registry_lists_paper_backbones_and_default() -> None:
    assert set(PAPER_SEQUENCES) | {"efficientnet_lite0"} <= set(list_backbones())


@pytest.mark.parametrize("name", sorted(PAPER_SEQUENCES))
def test_paper_backbone_sequence_shape_at_real_size(name: str) -> None:
    backbone = create_backbone(name, "none")
    assert backbone.preprocessing.input_size == 224
    with torch.inference_mode():
        fmap = backbone(torch.zeros(1, 3, 224, 224))
    seq = feature_map_to_sequence(fmap)
    assert tuple(seq.shape[1:]) == PAPER_SEQUENCES[name]
    assert get_spec(name).feature_channels == PAPER_SEQUENCES[name][1]
    # the registry's Grad-CAM layer exists in the network
    assert isinstance(backbone.target_layer(), torch.nn.Module)


def test_paper_head_sizes_follow_the_seed_code() -> None:
    backbone = create_backbone("vgg19", "none")
    spec = backbone.spec.paper_head
    net, hw = build_network(backbone, "paper", 3, {"lstm_units": spec.lstm_units, "dense": list(spec.dense)})
    assert hw == (7, 7)
    first_dense = net.head.dense[0]
    assert first_dense.in_features == 49 * 512 and first_dense.out_features == 4096
    assert get_spec("inception_resnet_v2").paper_head.dense == (4096,)
    assert get_spec("densenet121").paper_head.lstm_units == 1024


def test_efficientnet_lite0_weights_are_really_imagenet_pretrained() -> None:
    import matplotlib
    from pathlib import Path

    from cxrnn.data.io import read_image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    backbone = create_backbone("efficientnet_lite0", "imagenet")
    # The photo in colour: use the RGB route of the same preprocessing (mean/std of the weights).
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
    prep = backbone.preprocessing
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None] - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(
        prep.std
    ).view(1, 3, 1, 1)
    with torch.inference_mode():
        top5 = backbone.classify(x).topk(5).indices[0].tolist()
    assert 652 in top5  # ImageNet class 652: military uniform
    # The grey route the tool uses still sees a uniform; random weights do not.
    grey = to_input_tensor([read_image(path)], prep)
    with torch.inference_mode():
        assert 652 in backbone.classify(grey).topk(5).indices[0].tolist()
        random = create_backbone("efficientnet_lite0", "none")
        assert 652 not in random.classify(x).topk(5).indices[0].tolist()


def test_weights_file_round_trip(tmp_path) -> None:
    source = create_backbone("efficientnet_lite0", "imagenet")
    full = tmp_path / "full.pt"
    torch.save(source.model.state_dict(), full)
    features_only = tmp_path / "features_only.pt"
    torch.save({"state_dict": {k: v for k, v in source.model.state_dict().items() if not k.startswith("classifier.")}},
               features_only)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = source(x)
        for path in (full, features_only):
            loaded = create_backbone("efficientnet_lite0", path)
            assert torch.allclose(loaded(x), expected, atol=1e-5)
            assert loaded.weights_id.startswith("file:")


def test_wrong_weights_file_gives_a_clear_error(tmp_path) -> None:
    wrong = tmp_path / "resnet.pt"
    torch.save(create_backbone("resnet18", "none").model.state_dict(), wrong)
    with pytest.raises(ValueError, match="resnet.pt"):
        create_backbone("efficientnet_lite0", wrong)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        create_backbone("efficientnet_lite0", tmp_path / "missing.pt")


def test_imagenet_offline_error_says_how_to_pass_a_file(monkeypatch) -> None:
    monkeypatch.setattr(bb, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(WeightsUnavailableError, match="--weights PATH"):
        create_backbone("vgg19", "imagenet")


def test_any_timm_model_name_works_and_unknown_names_fail() -> None:
    spec = get_spec("resnet18")
    assert spec.feature_channels == 512 and spec.target_layer
    with pytest.raises(ValueError, match="unknown backbone"):
        get_spec("not_a_model_xyz")


def test_seeded_random_init_is_reproducible() -> None:
    a = create_backbone("resnet18", "none", seed=1)
    b = create_backbone("resnet18", "none", seed=1)
    c = create_backbone("resnet18", "none", seed=2)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))
        assert not torch.equal(a(x), c(x))
