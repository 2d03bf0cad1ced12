"""Plots go through the one atomic-write helper: no fixed temp name, nothing left behind."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cxrnn.evaluation.plots import plot_confusion_matrix, plot_roc


def _write_plots(folder: str, k: int) -> None:
    rng = np.random.default_rng(k)
    y = np.arange(60) % 3
    for _ in range(3):
        plot_roc(y, rng.dirichlet(np.ones(3), size=60), ["a", "b", "c"], Path(folder) / "roc.png")
        plot_confusion_matrix([[k, 1, 0], [0, 2, 1], [1, 0, 3]], ["a", "b", "c"], Path(folder) / "cm.png")


def test_runs_writing_plots_into_one_folder_at_once_leave_only_whole_files(tmp_path) -> None:
    # A fixed temp name (the old "roc.png.tmp.png") made one of two concurrent writers fail its rename.
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("fork")) as pool:
        for future in [pool.submit(_write_plots, str(tmp_path), k) for k in range(4)]:
            future.result()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "roc.png"]
    for name in ("cm.png", "roc.png"):
        with Image.open(tmp_path / name) as im:
            im.load()
            assert im.size[0] > 100 and im.size[1] > 100
