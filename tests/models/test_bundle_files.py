"""A file that is not a whole cxrnn model file gives one clear line naming it, never a traceback or torch's advice."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from cxrnn.models.backbones import create_backbone
from cxrnn.models.bundle import ModelBundle, build_network, load_bundle, save_bundle


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> dict[str, Any]:
    backbone = create_backbone("test_efficientnet", "none", seed=0)
    net, hw = build_network(backbone, "pool", 3, {})
    bundle = ModelBundle(net=net.eval(), classes=["covid", "normal", "pneumonia"], preprocessing=backbone.preprocessing,
                         backbone_name="test_efficientnet", weights_id="none:0", head_name="pool", head_options={},
                         feature_hw=hw)
    path = save_bundle(bundle, tmp_path_factory.mktemp("good") / "model.pt")
    assert load_bundle(path).classes == ["covid", "normal", "pneumonia"]
    return torch.load(path, weights_only=True)


def _without(key: str) -> Callable[[dict], None]:
    return lambda p: p.pop(key)


def _two_classes(p: dict) -> None:
    p["classes"] = ["covid", "normal"]  # the head's weights are for three


def _renamed_weight(p: dict) -> None:
    name = next(iter(p["state_dict"]))
    p["state_dict"]["not." + name] = p["state_dict"].pop(name)


def _bad_shape(p: dict) -> None:
    name = next(iter(p["state_dict"]))
    p["state_dict"][name] = torch.zeros(7, 1)


def _weights_as_list(p: dict) -> None:
    p["state_dict"] = [1, 2]


EDITS = {
    "no backbone": (_without("backbone"), "missing backbone"),
    "no state_dict": (_without("state_dict"), "missing state_dict"),
    "no classes": (_without("classes"), "missing classes"),
    "fewer classes than weights": (_two_classes, "weights do not match"),
    "renamed weight": (_renamed_weight, "1 missing"),
    "weight of another shape": (_bad_shape, "of another shape"),
    "weights not a mapping": (_weights_as_list, "state_dict is a list"),
    "text format_version": (lambda p: p.update(format_version="three"), "format_version 'three' is not a number"),
    "list format_version": (lambda p: p.update(format_version=[3]), "format_version [3] is not a number"),
    "unknown backbone": (lambda p: p["backbone"].update(name="no_such_net_xyz"), "cannot build its network"),
    "unknown head option": (lambda p: p["head"]["options"].update(bogus=1), "cannot build its network"),
    "bad preprocessing": (lambda p: p.update(preprocessing={"mean": []}), "cannot build its network"),
}


def _assert_one_clear_line(path: Path, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        load_bundle(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a cxrnn model file (") and message.endswith(")")
    assert reason in message
    assert "\n" not in message and "weights_only" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("case", list(EDITS))
def test_a_tagged_file_with_wrong_contents_is_one_clear_line(payload, tmp_path, case: str) -> None:
    edit, reason = EDITS[case]
    bad = {**payload, "backbone": dict(payload["backbone"]), "head": {**payload["head"],
           "options": dict(payload["head"]["options"])}, "state_dict": dict(payload["state_dict"])}
    edit(bad)
    path = tmp_path / "model.pt"
    torch.save(bad, path)
    _assert_one_clear_line(path, reason)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_malicious_pickle_is_refused_without_advising_weights_only_false(tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"format": "cxrnn-model", "payload": _Evil()}, path)
    _assert_one_clear_line(path, "Python objects")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_Evil()))
    _assert_one_clear_line(plain, "not a readable PyTorch file")


@pytest.mark.parametrize("content", [random.Random(seed).randbytes(4096) for seed in range(3)] + [b"", b"PK\x03\x04" + bytes(100)])
def test_random_bytes_are_one_clear_line(tmp_path, content: bytes) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    _assert_one_clear_line(path, "not a readable PyTorch file")


def test_a_truncated_model_file_is_one_clear_line(payload, tmp_path) -> None:
    whole = tmp_path / "whole.pt"
    torch.save(payload, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    _assert_one_clear_line(cut, "not a readable PyTorch file")


def test_an_untagged_torch_file_and_a_newer_format_name_the_file(payload, tmp_path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": payload["state_dict"]}, path)
    _assert_one_clear_line(path, "no cxrnn-model format tag")
    newer = tmp_path / "newer.pt"
    torch.save({**payload, "format_version": 99}, newer)
    with pytest.raises(ValueError, match=f"^{newer}: made by a newer cxrnn"):
        load_bundle(newer)


def test_a_missing_model_file_is_still_file_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_bundle(tmp_path / "nothing.pt")
