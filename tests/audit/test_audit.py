import json
import shutil

import pytest
from PIL import Image

from cxrnn.audit import run_audit
from cxrnn.audit.report import LESION_REMOVED_FAIL, MARKER_FAIL_FRACTION
from cxrnn.data.dataset import load_dataset
from cxrnn.data.phantom import ABNORMAL, PhantomConfig, generate_phantom
from cxrnn.data.splits import train_val_test_split
from cxrnn.training.run import group_array


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    plain = tmp_path_factory.mktemp("plain")
    generate_phantom(plain, PhantomConfig(per_class=30, size=96, seed=21))
    short = tmp_path_factory.mktemp("shortcut")
    generate_phantom(short, PhantomConfig(per_class=30, size=96, seed=22, sources=3, shortcut=True))
    return plain, short


def test_shortcut_phantom_fails_and_plain_passes(phantoms, tmp_path):
    plain, short = phantoms
    ok = run_audit(plain, tmp_path / "plain", cache_dir=tmp_path / "cache")
    bad = run_audit(short, tmp_path / "short", cache_dir=tmp_path / "cache")
    assert ok["verdict"] == "ok", ok["checks"]
    assert ok["checks"]["metadata_shortcut"]["status"] == "ok"
    assert ok["duplicate_groups"] == [] and ok["label_conflicts"] == [] and ok["unreadable"] == []
    assert [ok["checks"][c]["value"] for c in ("duplicates", "label_conflicts", "unreadable_files")] == [0, 0, 0]
    assert bad["checks"]["metadata_shortcut"]["status"] == "fail", bad["checks"]["metadata_shortcut"]
    assert bad["verdict"] == "fail"
    assert bad["metadata_shortcut_accuracy"] > ok["metadata_shortcut_accuracy"]
    # the marker corner is what gives it away
    assert any(f["feature"].startswith("corner_tl") for f in bad["metadata_shortcut"]["top_features"][:3])
    saved = json.loads((tmp_path / "short" / "audit.json").read_text())
    for key in ("counts", "duplicate_groups", "label_conflicts", "metadata_shortcut_accuracy", "checks"):
        assert key in saved
    assert saved["counts"]["per_source"] and sum(saved["counts"]["per_class"].values()) == 90
    assert "Verdict: FAIL" in (tmp_path / "short" / "audit.md").read_text()


def test_planted_copies_conflicts_and_a_broken_file_are_counted_exactly(tmp_path, monkeypatch):
    """Class folders with one exact copy filed under another class, one resized copy in its own class and
    one broken file: each check counts exactly those, and the duplicate pass decodes no image the
    metadata pass already decoded."""
    import cxrnn.audit.hash_cache as hash_cache_module

    src = tmp_path / "src"
    generate_phantom(src, PhantomConfig(per_class=12, size=96, seed=24))
    root = tmp_path / "data"
    for c in ("covid", "normal", "pneumonia"):
        shutil.copytree(src / c, root / c)
    shutil.copy(root / "covid" / "covid_0000.png", root / "normal" / "copy_exact.png")
    Image.open(root / "normal" / "normal_0001.png").resize((80, 80), Image.Resampling.BILINEAR).save(
        root / "normal" / "copy_small.png")
    (root / "pneumonia" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    decoded = []
    real_read = hash_cache_module.read_image
    monkeypatch.setattr(hash_cache_module, "read_image", lambda p: decoded.append(p) or real_read(p))

    result = run_audit(root, tmp_path / "out", cache_dir=tmp_path / "cache")
    checks = result["checks"]
    name = lambda group: sorted(p.split("/")[-1] for p in group)  # noqa: E731
    assert sorted(map(name, result["duplicate_groups"])) == [["copy_exact.png", "covid_0000.png"],
                                                              ["copy_small.png", "normal_0001.png"]]
    assert (checks["duplicates"]["status"], checks["duplicates"]["value"]) == ("warning", 4)
    assert "2 duplicate group(s) holding 4 images (1 exact pair(s), 1 near pair(s) within 12 bits, 0 found by " \
           "alignment)" in checks["duplicates"]["detail"]
    assert (checks["label_conflicts"]["status"], checks["label_conflicts"]["value"]) == ("fail", 1)
    assert result["label_conflicts"][0]["kind"] == "exact" and result["label_conflicts"][0]["labels"] == ["covid", "normal"]
    assert (checks["unreadable_files"]["status"], checks["unreadable_files"]["value"]) == ("warning", 1)
    assert "broken.png" in result["unreadable"][0]
    assert result["verdict"] == "fail" and result["counts"]["total"] == 39
    assert [str(p) for p in decoded] == [str(root / "pneumonia" / "broken.png")]  # only the file metadata could not read


def test_source_group_split_keeps_sources_apart(tmp_path):
    generate_phantom(tmp_path, PhantomConfig(per_class=10, size=64, seed=23, sources=5))
    ds = load_dataset(tmp_path)
    groups = group_array(ds, "source")
    split = train_val_test_split(ds.labels(), 0.2, 0.25, 0, groups)
    sides = [set(groups[idx]) for idx in (split.train, split.val, split.test)]
    assert all(sides)
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])


def test_model_checks_run_on_a_trained_phantom_model(trained_run, phantom_dir, cache_dir, tmp_path):
    result = run_audit(phantom_dir, tmp_path, model=trained_run.model_path, cache_dir=cache_dir)
    removed = result["model_checks"]["lesion_removed"]
    abnormal = sum(s.label in ABNORMAL for s in load_dataset(phantom_dir).samples)
    assert removed["n_cases"] == min(60, abnormal)  # every abnormal case up to max_cases
    # This model reads the lesions (see tests/explain): it calls nearly every abnormal case abnormal and
    # nearly no normal one, and erasing the lesion takes most cases back to normal (measured: 0.97 with the
    # lesion, 0.05 of normals, 0.20 erased).
    assert removed["abnormal_rate_with_lesion"] > 0.8 and removed["abnormal_rate_on_true_normals"] < 0.2
    assert removed["still_abnormal_rate"] < removed["abnormal_rate_with_lesion"] - 0.5
    check = result["checks"]["lesion_removed"]
    assert check["value"] == removed["still_abnormal_rate"] and removed["still_abnormal_rate"] < LESION_REMOVED_FAIL
    assert check["status"] != "fail"


@pytest.fixture(scope="module")
def marker_phantom(tmp_path_factory):
    # Faint lesions (difficulty 3) and a marker on every abnormal image: the marker is the easy cue.
    root = tmp_path_factory.mktemp("marker")
    generate_phantom(root, PhantomConfig(per_class=30, size=128, seed=31, sources=3, shortcut=True,
                                         shortcut_strength=1.0, difficulty=3.0))
    return root


def test_model_checks_catch_a_model_that_reads_the_marker(marker_phantom, trained_run, cache_dir, tmp_path):
    from cxrnn.training import TrainConfig, train

    cheat = train(TrainConfig(data=str(marker_phantom), backbone="efficientnet_lite0", head="pool", weights="imagenet",
                              out=str(tmp_path / "cheat"), epochs=30, batch_size=16, patience=0,
                              cache_dir=str(cache_dir), seed=0, bootstrap=0))
    shortcut = run_audit(marker_phantom, tmp_path / "a1", model=cheat.model_path, cache_dir=cache_dir)
    honest = run_audit(marker_phantom, tmp_path / "a2", model=trained_run.model_path, cache_dir=cache_dir)

    # The frozen features encode the hospital whatever head sits on them.
    probe = shortcut["model_checks"]["source_probe"]
    assert probe["accuracy"] > probe["chance"] + 0.2
    assert shortcut["checks"]["source_probe"]["status"] == "warning"

    # The marker-trained model keeps calling lesion-free copies abnormal and looks at the marker.
    cheat_removed = shortcut["model_checks"]["lesion_removed"]["still_abnormal_rate"]
    honest_removed = honest["model_checks"]["lesion_removed"]["still_abnormal_rate"]
    assert cheat_removed > 0.8 and shortcut["checks"]["lesion_removed"]["status"] == "fail"
    assert honest_removed < cheat_removed - 0.3
    cheat_marker = shortcut["model_checks"]["marker_energy"]
    assert cheat_marker["enrichment"] > 2.0  # well above the marker's share of the image
    assert cheat_marker["enrichment"] > honest["model_checks"]["marker_energy"]["enrichment"]
    # enrichment above 2 is a warning at least, a fifth of the energy on the marker a fail
    expected = "fail" if cheat_marker["energy_fraction"] >= MARKER_FAIL_FRACTION else "warning"
    assert shortcut["checks"]["marker_energy"]["status"] == expected
    saved = json.loads((tmp_path / "a1" / "audit.json").read_text())
    assert {"source_probe", "lesion_removed", "marker_energy"} <= set(saved["checks"])
