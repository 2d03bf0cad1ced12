import csv
import json

import numpy as np
import pytest

from cxrnn.data.phantom import PhantomConfig, generate_phantom
from cxrnn.evaluation.calibration import expected_calibration_error
from cxrnn.models.bundle import load_bundle
from cxrnn.training.compare import compare
from cxrnn.training.config import resolve_config
from cxrnn.training import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sources")
    generate_phantom(root, PhantomConfig(per_class=10, size=64, seed=31, sources=2))
    return root


def test_paper_folds_and_leave_one_source_out(tiny, cache_dir, tmp_path):
    cfg = resolve_config(dict(data=str(tiny), out=str(tmp_path / "run"), weights="none", epochs=3, folds=3,
                              bootstrap=200, leave_one_source_out=True, cache_dir=str(cache_dir)), preset="paper")
    result = train(cfg)
    m = json.loads((result.run_dir / "metrics.json").read_text())
    assert len(m["folds"]) == 3 and set(m["cv"]) >= {"val_accuracy", "test_accuracy"}
    test_n = m["split"]["test"]
    assert all(r["n_train"] + r["n_val"] == 30 - test_n for r in m["folds"])  # folds only from the non-test part
    assert m["ci"]["accuracy"]["low"] <= m["accuracy"] <= m["ci"]["accuracy"]["high"]
    # the stored ECE is that of the calibrated test probabilities the run wrote out (6 decimals there)
    with open(result.run_dir / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    probs = np.array([[float(r[f"p_{c}"]) for c in m["classes"]] for r in rows])
    truth = np.array([m["classes"].index(r["label"]) for r in rows])
    assert expected_calibration_error(probs, truth) == pytest.approx(m["ece"], abs=1e-4)
    assert m["calibration"]["ece_after"] == pytest.approx(m["ece"])
    assert load_bundle(result.model_path).temperature == pytest.approx(m["calibration"]["temperature"])
    loso = m["leave_one_source_out"]
    assert set(loso["sources"]) == {"hospital_0", "hospital_1"}
    assert sum(r["n_test"] for r in loso["sources"].values()) == 30
    report = (result.run_dir / "report.md").read_text()
    assert "Leave one source out" in report and "confidence intervals" in report
    assert (result.run_dir / "reliability.png").stat().st_size > 0


def test_compare_trains_every_pair_on_one_split(tiny, cache_dir, tmp_path):
    base = resolve_config(dict(data=str(tiny), weights="none", epochs=2, bootstrap=100, cache_dir=str(cache_dir)))
    rows = compare(base, ["efficientnet_lite0", "mobilenetv3_small_050"], ["lstm", "pool"], tmp_path)
    assert [(r["backbone"], r["head"]) for r in rows] == [
        ("efficientnet_lite0", "lstm"), ("efficientnet_lite0", "pool"),
        ("mobilenetv3_small_050", "lstm"), ("mobilenetv3_small_050", "pool")]
    assert len({r["n_test"] for r in rows}) == 1
    for r in rows:
        assert r["parameters"] > r["trainable_parameters"] > 0 and r["inference_ms_per_image"] > 0
        assert r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"]
    for name in ("compare.md", "compare.csv", "compare.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "compare.csv").read_text().count("\n") == 5


def test_finetune_split_keeps_shifted_copies_with_their_originals(tmp_path):
    import shutil

    from PIL import Image

    src = tmp_path / "src"
    generate_phantom(src, PhantomConfig(per_class=10, size=64, seed=32))
    data = tmp_path / "data"
    for c in ("covid", "normal", "pneumonia"):
        shutil.copytree(src / c, data / c)
    copies = {}
    for i, c in enumerate(("covid", "normal", "pneumonia")):
        original = data / c / f"{c}_000{i}.png"
        a = np.asarray(Image.open(original))
        for shift in (2, 3):  # 3-5% shifts: pHash alone misses most of these, the alignment pass does not
            name = f"copy_{c}_{shift}.png"
            Image.fromarray(np.pad(a, ((shift, 0), (shift, 0)), mode="edge")[:-shift, :-shift]).save(data / c / name)
            copies[name] = original.name
    cfg = resolve_config(dict(data=str(data), out=str(tmp_path / "run"), backbone="mobilenetv3_small_050",
                              weights="none", head="pool", finetune=True, epochs=1, batch_size=8, bootstrap=0,
                              test_size=0.3, cache_dir=str(tmp_path / "cache")))
    result = train(cfg)
    split = result.metrics["split"]
    assert split["dedup"] and split["duplicate_groups"] == 3 and split["images_in_duplicate_groups"] == 9
    with open(result.run_dir / "predictions.csv") as fh:
        tested = {row["path"].rsplit("/", 1)[-1] for row in csv.DictReader(fh)}
    for copy, original in copies.items():
        assert (copy in tested) == (original in tested), (copy, original)
