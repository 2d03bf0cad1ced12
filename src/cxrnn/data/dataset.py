"""Finding labelled radiographs on disk: class folders or a CSV manifest."""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrnn.data.errors import not_regular_reason
from cxrnn.data.io import IMAGE_SUFFIXES, is_image_file

__all__ = [
    "Sample",
    "Dataset",
    "DatasetError",
    "MANIFEST_NAME",
    "load_dataset",
    "list_image_files",
]

MANIFEST_NAME = "manifest.csv"
_REQUIRED_COLUMNS = ("path", "label")
_KNOWN_COLUMNS = ("path", "label", "patient_id", "source", "mask")
_MAX_LISTED = 5


class DatasetError(ValueError):
    """A dataset folder or manifest cannot be used; the message says why."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    patient_id: str | None = None
    source: str | None = None
    mask: Path | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Dataset:
    samples: list[Sample]
    classes: list[str]
    root: Path

    def labels(self) -> np.ndarray:
        """Class index of every sample, in ``self.classes`` order."""
        index = {name: i for i, name in enumerate(self.classes)}
        return np.fromiter((index[s.label] for s in self.samples), dtype=np.int64, count=len(self.samples))

    def class_counts(self) -> dict[str, int]:
        """Number of samples per class, in ``self.classes`` order (zeros included)."""
        counts = dict.fromkeys(self.classes, 0)
        for s in self.samples:
            counts[s.label] += 1
        return counts

    def classes_with_images(self) -> list[str]:
        """The classes that have at least one sample, in ``self.classes`` order.

        A class list fixed by the caller (e.g. a model's) may name classes with
        no images; training needs at least two classes that really have some.
        """
        present = {s.label for s in self.samples}
        return [c for c in self.classes if c in present]

    def __len__(self) -> int:
        return len(self.samples)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _special_file_reason(path: Path) -> str | None:
    """Why ``path`` is not a regular file that can be read (None if it is one)."""
    try:
        return not_regular_reason(os.stat(path))
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})"


def _walk_images(folder: Path, keep_special: bool = False) -> list[Path]:
    """Image files under ``folder`` (recursive), skipping hidden files and folders.

    Non-regular entries (FIFOs, devices, broken links) are skipped with a
    warning naming them: opening a FIFO would block the whole run. With
    ``keep_special`` they are kept instead, for a caller whose reader reports
    each one as that file's error.
    """
    found: list[Path] = []
    # Pruning dirnames keeps os.walk out of hidden folders entirely, which
    # matters for things like .git or .ipynb_checkpoints inside a dataset.
    # (os.walk rather than Path.walk: the latter needs Python 3.12.)
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        for fname in filenames:
            if not _is_hidden(fname):
                p = Path(dirpath) / fname
                special = _special_file_reason(p)
                if special is not None:
                    if keep_special and p.suffix.lower() in IMAGE_SUFFIXES:
                        found.append(p)
                    elif p.suffix.lower() in IMAGE_SUFFIXES:
                        warnings.warn(f"ignored {p}: {special}", stacklevel=4)
                    continue
                if is_image_file(p):
                    found.append(p)
    found.sort()
    return found


def _list_more(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f" ... and {len(items) - _MAX_LISTED} more"
    return shown


def load_dataset(
    path: str | Path,
    classes: list[str] | None = None,
    *,
    allow_outside_paths: bool = False,
) -> Dataset:
    """Load a dataset from class folders, a CSV manifest, or a folder holding ``manifest.csv``.

    ``classes`` (e.g. a trained model's classes, in its order) fixes the class
    list; labels outside it are an error. Otherwise classes are sorted names.
    A manifest's paths must stay inside the manifest's folder (after following
    ``..`` and links) unless ``allow_outside_paths`` is true.
    """
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"dataset not found: {root}")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DatasetError(
                f"{root}: a dataset must be a folder of class folders or a CSV manifest"
            )
        samples = _read_manifest(root, allow_outside_paths)
        base = root.parent
    elif (root / MANIFEST_NAME).is_file():
        # Generated datasets keep masks/ etc. beside the images; the manifest
        # says exactly which files are samples, so it wins over the folders.
        samples = _read_manifest(root / MANIFEST_NAME, allow_outside_paths)
        base = root
    else:
        samples = _scan_class_folders(root, classes)
        base = root
    return _finish(samples, classes, base, root)


def _finish(samples: list[Sample], classes: list[str] | None, base: Path, source: Path) -> Dataset:
    found = sorted({s.label for s in samples})
    if classes is None:
        class_list = found
    else:
        class_list = list(classes)
        if len(set(class_list)) != len(class_list):
            raise DatasetError(f"duplicate class names given: {class_list}")
        unknown = [c for c in found if c not in set(class_list)]
        if unknown:
            raise DatasetError(
                f"{source}: unknown class label(s) {', '.join(repr(u) for u in unknown)}; "
                f"expected a subset of {', '.join(class_list)}"
            )
    samples = sorted(samples, key=lambda s: (s.label, str(s.path)))
    return Dataset(samples=samples, classes=class_list, root=base)


def _scan_class_folders(root: Path, classes: list[str] | None) -> list[Sample]:
    has_manifest = (root / MANIFEST_NAME).is_file()
    samples: list[Sample] = []
    seen_class = False
    for sub in sorted(root.iterdir()):
        if not sub.is_dir() or _is_hidden(sub.name):
            continue
        if sub.name == "masks" and has_manifest:
            continue
        files = _walk_images(sub)
        if not files:
            if classes is not None and sub.name in classes:
                raise DatasetError(f"class folder {sub} contains no images")
            # A stray empty folder is not a class; warn so a forgotten copy
            # of a real class does not silently vanish from training.
            warnings.warn(f"ignored folder {sub}: it contains no images", stacklevel=3)
            continue
        seen_class = True
        samples.extend(Sample(path=f, label=sub.name) for f in files)
    if not seen_class:
        raise DatasetError(
            f"no class folders with images in {root} "
            f"(expected {root}/<class>/<image files>, or a {MANIFEST_NAME})"
        )
    return samples


def _opt(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def _read_manifest(csv_path: Path, allow_outside_paths: bool = False) -> list[Sample]:
    base = csv_path.parent
    try:
        # utf-8-sig: spreadsheets exported on Windows prepend a BOM that would
        # otherwise become part of the first column name.
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [(h or "").strip() for h in (reader.fieldnames or [])]
            missing_cols = [c for c in _REQUIRED_COLUMNS if c not in header]
            if missing_cols:
                raise DatasetError(
                    f"{csv_path}: missing column(s) {', '.join(missing_cols)} "
                    f"(found: {', '.join(header) or 'no header'})"
                )
            reader.fieldnames = header
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{csv_path}: cannot read manifest ({exc})") from None

    if not rows:
        raise DatasetError(f"{csv_path}: manifest has no rows")

    samples: list[Sample] = []
    blank_rows: list[str] = []
    missing_files: list[str] = []
    special_files: list[str] = []
    outside: list[str] = []
    real_base = base.resolve()

    def check(rel: str, path: Path, what: str, line_no: int) -> None:
        where = f"{what}{rel} (line {line_no})"
        # A manifest from elsewhere must not make us read (and a training log
        # or cache echo) files such as ../../etc/shadow.
        if not allow_outside_paths and not path.resolve().is_relative_to(real_base):
            outside.append(where)
            return
        if not path.exists():
            missing_files.append(where)
            return
        reason = _special_file_reason(path)
        if reason is not None:
            special_files.append(f"{where}: {reason}")

    for line_no, row in enumerate(rows, start=2):  # line 1 is the header
        rel = _opt(row.get("path"))
        label = _opt(row.get("label"))
        if rel is None or label is None:
            blank_rows.append(str(line_no))
            continue
        file_path = _resolve(base, rel)
        check(rel, file_path, "", line_no)
        mask_rel = _opt(row.get("mask"))
        mask_path = _resolve(base, mask_rel) if mask_rel else None
        if mask_path is not None and mask_rel is not None:
            check(mask_rel, mask_path, "mask ", line_no)
        extra = {
            k: (v if isinstance(v, str) else "")
            for k, v in row.items()
            if k is not None and k not in _KNOWN_COLUMNS
        }
        samples.append(
            Sample(
                path=file_path,
                label=label,
                patient_id=_opt(row.get("patient_id")),
                source=_opt(row.get("source")),
                mask=mask_path,
                extra=extra,
            )
        )
    if blank_rows:
        raise DatasetError(
            f"{csv_path}: empty path or label on line(s) {_list_more(blank_rows)}"
        )
    if outside:
        raise DatasetError(
            f"{csv_path}: {len(outside)} listed path(s) lie outside the manifest's folder "
            f"{real_base}: {_list_more(outside)} (allow them with allow_outside_paths / "
            "--allow-outside-paths if that is intended)"
        )
    if special_files:
        raise DatasetError(
            f"{csv_path}: {len(special_files)} listed path(s) are not regular files: "
            f"{_list_more(special_files)}"
        )
    if missing_files:
        raise DatasetError(
            f"{csv_path}: {len(missing_files)} listed file(s) do not exist: "
            f"{_list_more(missing_files)}"
        )
    return samples


def _resolve(base: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else base / p


def list_image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted, de-duplicated file list.

    Folder contents are filtered by :func:`is_image_file`; a file named
    explicitly is always kept so the reader can say why it is unusable.
    """
    found: set[Path] = set()
    for item in paths:
        p = Path(item)
        if p.is_dir():
            # Kept, not skipped: the reader then reports each FIFO or device
            # as that file's error line in the command's own output.
            found.update(_walk_images(p, keep_special=True))
        else:
            found.add(p)
    return sorted(found)
