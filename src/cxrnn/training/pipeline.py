"""``cxrnn train``: dataset -> fitter (frozen backbone on cached features, or fine-tuning) -> shared tail.

A run directory is either the old run, whole, or the new run, whole: nothing is written until the fit
is done, then the run is written into a hidden sibling folder and swapped in by renames (the old run is
renamed aside, the new one renamed in, the old one deleted). A failed or interrupted run leaves the old
run as it was, and a new ``--out`` absent.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable

import yaml

from cxrnn.data.dataset import load_dataset
from cxrnn.training.config import TrainConfig
from cxrnn.training.finetune import fit_finetune
from cxrnn.training.frozen import fit_frozen
from cxrnn.training.run import (FittedModel, Log, PreparedData, Progress, TrainResult, check_class_counts,
                               finish_run)
from cxrnn.utils.atomic import atomic_write_text

# A folder holding a config.yaml with these keys is a run (this or an older cxrnn's) that a new run may replace.
_RUN_KEYS = ("data", "backbone", "head", "out")


def train(cfg: TrainConfig, progress: Progress | None = None, log: Log | None = None) -> TrainResult:
    """Run ``cfg`` end to end and write its run directory; returns what was written and measured."""
    cfg.validate()
    log = log or (lambda msg: None)
    run_dir = Path(cfg.out)
    check_run_dir(run_dir, cfg)  # before the minutes of extraction and training, not after
    # passed only when asked for, like the CLI: the default (refuse paths outside the manifest) is load_dataset's
    outside = {"allow_outside_paths": True} if getattr(cfg, "allow_outside_paths", False) else {}
    dataset = load_dataset(cfg.data, **outside)
    log(f"{len(dataset)} images, classes {', '.join(dataset.classes)}")
    check_class_counts(dataset.class_counts(), cfg)
    fit = fit_finetune if cfg.finetune else fit_frozen
    fitted = fit(cfg, dataset, progress=progress, log=log)
    if fitted is None:  # under torchrun the other processes helped extract or train; rank 0 writes the run
        return TrainResult(run_dir, run_dir / "model.pt", {}, [])
    prepared, model = fitted
    return write_run(run_dir, lambda tmp: _write(cfg, tmp, prepared, model, log))


def _write(cfg: TrainConfig, tmp: Path, prepared: PreparedData, model: FittedModel, log: Log) -> TrainResult:
    atomic_write_text(tmp / "config.yaml", cfg.to_yaml())
    return finish_run(cfg, tmp, prepared, model, log)


def check_run_dir(run_dir: Path, cfg: TrainConfig | None = None) -> None:
    """Refuse, with one line naming the path and why, an ``--out`` that a run could not be swapped into."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise ValueError(f"--out {run_dir}: is a broken symbolic link")
    real = _real(run_dir)
    if real.exists() and not real.is_dir():
        raise ValueError(f"--out {run_dir}: exists and is not a folder")
    if _inside(Path.cwd(), real):
        raise ValueError(f"--out {run_dir}: is the current folder or holds it; a run replaces its folder whole, "
                         "so give a folder of its own")
    for name in ("data", "cache_dir", "image_cache"):
        folder = getattr(cfg, name, None) if cfg is not None else None
        if folder and _inside(Path(folder), real):
            raise ValueError(f"--{name.replace('_', '-')} {folder}: is inside --out {run_dir}, which a run "
                             "replaces whole; keep it outside the run directory")
    if real.is_dir() and not _is_replaceable(real):
        sample = sorted(p.name for p in real.iterdir())[0]
        raise ValueError(f"--out {run_dir}: is a folder holding files that are not a cxrnn run (e.g. {sample}); "
                         "a run replaces its folder whole, so give a new or empty folder")
    ancestor = real.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--out {run_dir}: {ancestor} is not a folder")
    _probe(run_dir, ancestor)
    if real.is_dir():
        _probe(run_dir, real)  # the old run's files are deleted from here after the swap


def write_run(run_dir: Path, write: Callable[[Path], TrainResult]) -> TrainResult:
    """Call ``write(tmp)`` on a hidden sibling folder of ``run_dir``, then swap it in for ``run_dir``.

    Any failure or interrupt (KeyboardInterrupt included) removes the sibling and any parent folders
    made for it, leaving ``run_dir`` as it was. The returned result names ``run_dir``, not the sibling.
    """
    real = _real(run_dir)
    created = _missing_parents(real)
    tmp: Path | None = None
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_sibling(real, "new")
        result = write(tmp)
        _swap(tmp, real)
        tmp = None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # deepest first; only those still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return replace(result, run_dir=run_dir, model_path=run_dir / result.model_path.name)


def _swap(new: Path, real: Path) -> None:
    if not real.exists():
        os.rename(new, real)
        return
    aside = _new_sibling(real, "old")
    os.rename(real, aside)  # replaces the empty placeholder
    try:
        os.rename(new, real)
    except BaseException:
        os.rename(aside, real)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _new_sibling(real: Path, kind: str) -> Path:
    # mkdir, not mkdtemp: the run folder keeps the umask's permissions, not mkdtemp's 0700
    while True:
        candidate = real.parent / f".{real.name}.{uuid.uuid4().hex[:12]}.{kind}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _real(run_dir: Path) -> Path:
    # A link to a folder: the run goes into its target and the link stays (renaming would move the link).
    return Path(os.path.realpath(run_dir)) if run_dir.is_symlink() else Path(os.path.abspath(run_dir))


def _missing_parents(real: Path) -> list[Path]:
    missing = []
    parent = real.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


def _is_replaceable(folder: Path) -> bool:
    """Empty, or a run: the swap deletes what the folder held, so never anything else."""
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise ValueError(f"--out {folder}: cannot be read ({exc.strerror or exc})") from None
    if not entries:
        return True
    config = folder / "config.yaml"
    if not config.is_file():
        return False
    try:
        values = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(values, dict) and all(k in values for k in _RUN_KEYS)


def _probe(run_dir: Path, folder: Path) -> None:
    # os.access misses read-only mounts seen through some containers and ignores root's rights: try it
    probe = folder / f".cxrnn-probe-{uuid.uuid4().hex[:12]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise ValueError(f"--out {run_dir}: cannot write in {folder} ({exc.strerror or exc})") from None


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents
