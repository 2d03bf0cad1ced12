"""Panels for a run's report: a few held-out test images of each class and any extra images (e.g. RG1)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable

from cxrnn.utils.atomic import atomic_write_text
from cxrnn.explain.folder import explain_to_dir
from cxrnn.explain.registry import DEFAULT_METHOD
from cxrnn.models.bundle import load_bundle

SECTION_TITLE = "## Explanation panels"


def held_out_images_per_class(run_dir: str | Path, per_class: int = 2) -> list[Path]:
    """The first ``per_class`` test images of every class, from the run's predictions.csv (the held-out split)."""
    chosen: dict[str, list[Path]] = {}
    with open(Path(run_dir) / "predictions.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            picked = chosen.setdefault(row["label"], [])
            if len(picked) < per_class:
                picked.append(Path(row["path"]))
    return [p for paths in chosen.values() for p in paths]


def add_panels_to_report(run_dir: str | Path, per_class: int = 2, extra_images: Iterable[str | Path] = (),
                         method: str = DEFAULT_METHOD) -> list[str]:
    """Write panels to RUN/panels/ and insert a section into RUN/report.md; returns the section's lines."""
    run_dir = Path(run_dir)
    bundle = load_bundle(run_dir / "model.pt")
    with open(run_dir / "predictions.csv", newline="") as fh:
        truth = {row["path"]: row["label"] for row in csv.DictReader(fh)}
    images = [*held_out_images_per_class(run_dir, per_class), *map(Path, extra_images)]
    index = explain_to_dir(bundle, images, run_dir / "panels", method=method)
    lines = [SECTION_TITLE, "",
             f"`{method}` maps of the predicted class (of `{index['layer']}`), drawn on each image at its "
             f"own size: {per_class} held-out test image(s) per class"
             + (" and the extra image(s)." if extra_images else "."), ""]
    for entry in index["images"]:
        name = Path(entry["path"]).name
        if "error" in entry:
            lines += [f"- {name}: {entry['error']}", ""]
            continue
        true = truth.get(entry["path"])
        caption = f"{name}: " + (f"true {true}, " if true else "") + f"predicted {entry['label']}"
        if (entry.get("ood") or {}).get("flagged"):
            caption += " (out of distribution: unlike the training images)"
        panel = Path(os.path.relpath(entry["files"]["panel"], run_dir)).as_posix()
        lines += [f"**{caption}**", "", f"![{caption}]({panel})", ""]
    _insert_section(run_dir / "report.md", lines)
    return lines


def _insert_section(report: Path, lines: list[str]) -> None:
    """Put the section before the caveats (replacing an older copy of it), or at the end."""
    text = report.read_text() if report.is_file() else ""
    if SECTION_TITLE in text:
        head, _, rest = text.partition(SECTION_TITLE)
        following = rest.find("\n## ")
        text = head + (rest[following + 1 :] if following >= 0 else "")
    section = "\n".join(lines) + "\n"
    marker = "## Caveats"
    if marker in text:
        head, _, tail = text.partition(marker)
        text = head + section + "\n" + marker + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(report, text)
