"""Tests for cxrnn.data.dataset: folder layouts, manifests, listing and safe reading."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrnn.data.dataset import (
    Dataset,
    DatasetError,
    Sample,
    list_image_files,
    load_dataset,
)


def _png(path: Path, value: int = 128, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size), value, np.uint8)
    arr[0, 0] = 255 - value  # not constant
    Image.fromarray(arr).save(path, "PNG")
    return path


def _manifest(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    _png(root / "pneumonia" / "bacterial" / "p1.png")
    _png(root / "pneumonia" / "viral" / "deep" / "p2.PNG")
    _png(root / "normal" / "n1.png")
    _png(root / "normal" / ".hidden.png")  # hidden file
    _png(root / "normal" / ".cache" / "n_hidden.png")  # hidden folder
    (root / "normal" / "notes.txt").write_text("not an image")
    _png(root / "covid" / "c1.jpg.png")
    _png(root / ".trash" / "x.png")  # hidden first-level folder: not a class
    (root / "docs").mkdir()
    (root / "docs" / "readme.md").write_text("no images here")
    return root


def test_folder_layout(class_tree: Path):
    with pytest.warns(UserWarning, match="docs"):
        ds = load_dataset(class_tree)
    assert isinstance(ds, Dataset)
    assert ds.classes == ["covid", "normal", "pneumonia"]
    assert ds.root == class_tree
    assert len(ds) == 4
    names = {s.path.name: s.label for s in ds.samples}
    assert names == {"c1.jpg.png": "covid", "n1.png": "normal", "p1.png": "pneumonia", "p2.PNG": "pneumonia"}
    np.testing.assert_array_equal(ds.labels(), [0, 1, 2, 2])
    assert ds.labels().dtype == np.int64
    assert ds.class_counts() == {"covid": 1, "normal": 1, "pneumonia": 2}
    assert all(s.patient_id is None and s.mask is None for s in ds.samples)


def test_given_classes_keep_their_order(class_tree: Path):
    with pytest.warns(UserWarning):
        ds = load_dataset(class_tree, classes=["pneumonia", "normal", "covid", "other"])
    assert ds.classes == ["pneumonia", "normal", "covid", "other"]
    assert sorted(ds.labels().tolist()) == [0, 0, 1, 2]


def test_unknown_class_error(class_tree: Path):
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="'pneumonia'") as info:
        load_dataset(class_tree, classes=["covid", "normal"])
    assert isinstance(info.value, ValueError)


def test_missing_path(tmp_path: Path):
    with pytest.raises(DatasetError, match="dataset not found"):
        load_dataset(tmp_path / "nowhere")


def test_no_class_folders(tmp_path: Path):
    _png(tmp_path / "loose.png")
    with pytest.raises(DatasetError, match="no class folders with images"):
        load_dataset(tmp_path)


def test_empty_class_folder_named_in_classes(tmp_path: Path):
    _png(tmp_path / "normal" / "a.png")
    (tmp_path / "covid").mkdir()
    with pytest.raises(DatasetError, match="covid contains no images"):
        load_dataset(tmp_path, classes=["covid", "normal"])


def test_csv_manifest(tmp_path: Path):
    a = _png(tmp_path / "imgs" / "a.png")
    b = _png(tmp_path / "imgs" / "b.png")
    m = _png(tmp_path / "masks" / "a_mask.png")
    csv_path = _manifest(
        tmp_path / "list.csv",
        [
            {"path": "imgs/b.png", "label": "normal", "patient_id": "P2", "source": "siteB", "mask": "", "view": "PA"},
            {"path": "imgs/a.png", "label": "covid", "patient_id": "P1", "source": "siteA", "mask": "masks/a_mask.png", "view": "AP"},
        ],
    )
    ds = load_dataset(csv_path)
    assert ds.classes == ["covid", "normal"]
    assert ds.root == tmp_path
    first, second = ds.samples
    assert first == Sample(path=a, label="covid", patient_id="P1", source="siteA", mask=m)
    assert first.extra == {"view": "AP"}
    assert second.path == b and second.mask is None and second.patient_id == "P2"
    np.testing.assert_array_equal(ds.labels(), [0, 1])


def test_csv_with_bom_and_minimal_columns(tmp_path: Path):
    _png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_bytes("\ufeffpath,label\na.png,normal\n".encode("utf-8"))
    ds = load_dataset(tmp_path / "m.csv")
    assert [s.label for s in ds.samples] == ["normal"]
    assert ds.samples[0].source is None and ds.samples[0].extra == {}


def test_csv_missing_columns(tmp_path: Path):
    csv_path = _manifest(tmp_path / "m.csv", [{"file": "a.png", "class": "covid"}])
    with pytest.raises(DatasetError, match="missing column.*path, label"):
        load_dataset(csv_path)


def test_csv_missing_files_listed_together(tmp_path: Path):
    _png(tmp_path / "ok.png")
    rows = [{"path": "ok.png", "label": "normal"}] + [
        {"path": f"gone{i}.png", "label": "covid"} for i in range(7)
    ]
    with pytest.raises(DatasetError) as info:
        load_dataset(_manifest(tmp_path / "m.csv", rows))
    text = str(info.value)
    assert "7 listed file(s) do not exist" in text
    assert "gone0.png" in text and "gone4.png" in text and "gone5.png" not in text
    assert "and 2 more" in text


def test_folder_with_manifest_uses_manifest(tmp_path: Path):
    root = tmp_path / "generated"
    _png(root / "covid" / "c.png")
    _png(root / "normal" / "n.png")
    _png(root / "masks" / "c_mask.png")  # would be a bogus class without the manifest
    _manifest(
        root / "manifest.csv",
        [
            {"path": "covid/c.png", "label": "covid", "mask": "masks/c_mask.png"},
            {"path": "normal/n.png", "label": "normal", "mask": ""},
        ],
    )
    ds = load_dataset(root)
    assert ds.classes == ["covid", "normal"]
    assert ds.samples[0].mask == root / "masks" / "c_mask.png"


def test_list_image_files(class_tree: Path, tmp_path: Path):
    odd = tmp_path / "explicit.xyz"
    odd.write_bytes(b"whatever")
    files = list_image_files([class_tree / "pneumonia", odd, class_tree / "normal", class_tree / "normal" / "n1.png"])
    assert files == sorted(files)
    names = [f.name for f in files]
    assert sorted(names) == sorted(["p1.png", "p2.PNG", "explicit.xyz", "n1.png"])  # de-duplicated
    assert ".hidden.png" not in names and "notes.txt" not in names
