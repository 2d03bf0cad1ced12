"""``cxrnn audit``: run every check on a dataset (and optionally a model), write audit.json and audit.md.

Every check ends in a verdict — ok, warning or fail — with the number behind it. The thresholds are
policy, not measurements; they are the module constants below so a reader can see and change them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cxrnn.audit.duplicates import DEFAULT_ALIGN_THRESHOLD, DEFAULT_THRESHOLD, find_duplicates
from cxrnn.audit.hash_cache import HashCache
from cxrnn.audit.metadata import metadata_shortcut, read_metadata
from cxrnn.audit.phash import hash_image
from cxrnn.data.dataset import load_dataset
from cxrnn.data.groups import combine_groups

# skill = (accuracy - chance) / (1 - chance): 0 at chance, 1 when perfect.
METADATA_WARN_SKILL, METADATA_FAIL_SKILL = 0.10, 0.30
SIGNIFICANCE = 0.01  # a skill only counts when the binomial test against chance agrees
SOURCE_PROBE_WARN_SKILL = 0.5
SOURCE_LABEL_WARN_V, SOURCE_LABEL_FAIL_V = 0.2, 0.5  # Cramer's V between source and label
LESION_REMOVED_WARN, LESION_REMOVED_FAIL = 0.25, 0.5  # share still called abnormal without a lesion
MARKER_WARN_ENRICHMENT, MARKER_FAIL_FRACTION = 2.0, 0.2
# Share of images cleanlab flags as label issues (cxrnn.audit.label_issues). Policy, set well above the
# 9-12% that the cheap probe flags on clean phantoms of 90-120 images (its own mistakes: about 16% of them
# are misclassified out of fold); 5% wrong labels there gave 10-21%, 10% wrong labels 17-31%.
LABEL_ISSUES_WARN_SHARE, LABEL_ISSUES_FAIL_SHARE = 0.15, 0.25

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]
_ORDER = {"ok": 0, "skipped": 0, "warning": 1, "fail": 2}


def _check(status: str, value: Any, detail: str) -> dict[str, Any]:
    return {"status": status, "value": value, "detail": detail}


def cramers_v(a: list[str], b: list[str]) -> float:
    """Association between two categorical columns: 0 independent, 1 one determines the other."""
    from scipy.stats import chi2_contingency

    ra, rb = sorted(set(a)), sorted(set(b))
    table = np.zeros((len(ra), len(rb)))
    for x, y in zip(a, b):
        table[ra.index(x), rb.index(y)] += 1
    if min(table.shape) < 2:
        return 0.0
    chi2 = chi2_contingency(table, correction=False)[0]
    return float(np.sqrt(chi2 / (table.sum() * (min(table.shape) - 1))))


def run_audit(data: str | Path, out: str | Path | None = None, model: str | Path | None = None,
              threshold: int = DEFAULT_THRESHOLD, cache_dir: str | Path | None = None, seed: int = 0,
              progress: Progress | None = None, log: Log | None = None,
              align_threshold: float | None = DEFAULT_ALIGN_THRESHOLD, *,
              allow_outside_paths: bool = False) -> dict[str, Any]:
    """Audit ``data`` (a dataset folder or manifest); with ``out``, write audit.json and audit.md there.

    ``align_threshold`` (band-pass NCC after alignment) finds shifted, cropped and rotated copies; 0 or None
    leaves only the pHash pass.
    """
    if align_threshold is not None and not 0 <= align_threshold <= 1:
        raise ValueError(f"align_threshold must be in [0, 1], not {align_threshold}")
    log = log or (lambda msg: None)
    dataset = load_dataset(data, allow_outside_paths=allow_outside_paths)
    paths = [str(s.path) for s in dataset.samples]
    labels = [s.label for s in dataset.samples]
    sources = [s.source for s in dataset.samples]
    has_sources = all(sources) and len(set(sources)) > 1
    checks: dict[str, dict[str, Any]] = {}

    counts: dict[str, Any] = {"total": len(paths), "per_class": dict(Counter(labels))}
    if all(sources):
        counts["per_source"] = dict(Counter(sources))
        counts["per_source_class"] = {src: dict(Counter(l for l, s in zip(labels, sources) if s == src))
                                      for src in sorted(set(sources))}

    log("reading metadata")
    cache = HashCache(cache_dir)

    def hash_uncached(image: np.ndarray, sha256: str) -> None:
        # The metadata pass decodes every image anyway: hash it there instead of decoding it twice.
        if cache.get(sha256) is None:
            cache.put(hash_image(image, sha256))

    metas, meta_errors = read_metadata(paths, progress=(lambda d, t: progress("metadata", d, t)) if progress else None,
                                       on_image=hash_uncached)
    log("hashing images")
    dups = find_duplicates(paths, threshold, cache,
                           progress=(lambda d, t: progress("hashing", d, t)) if progress else None,
                           align_threshold=align_threshold, digests=[m.sha256 if m else None for m in metas])
    errors = sorted(set(meta_errors) | set(dups.errors))
    ok = [i for i, m in enumerate(metas) if m is not None]

    per_class_images: dict[str, Any] = {}
    for c in dataset.classes:
        ms = [metas[i] for i in ok if labels[i] == c]
        if not ms:
            continue
        per_class_images[c] = {
            "sizes": dict(Counter(f"{m.width}x{m.height}" for m in ms).most_common(5)),
            "bit_depth": dict(Counter(str(m.bit_depth) for m in ms)),
            "mode": dict(Counter(m.mode for m in ms)),
            "format": dict(Counter(m.format for m in ms)),
            "mean_intensity": float(np.mean([m.stats["all_mean"] for m in ms])),
            "std_mean_intensity": float(np.std([m.stats["all_mean"] for m in ms])),
        }

    groups = [[paths[i] for i in g] for g in dups.groups]
    conflicts = []
    for g in dups.groups:
        group_labels = sorted({labels[i] for i in g})
        if len(group_labels) > 1:
            conflicts.append({"kind": dups.kind_of(g), "labels": group_labels,
                              "paths": [paths[i] for i in g]})
    in_groups = sum(len(g) for g in groups)
    checks["unreadable_files"] = _check("warning" if errors else "ok", len(errors),
                                        f"{len(errors)} file(s) could not be read")
    checks["duplicates"] = _check(
        "warning" if groups else "ok", in_groups,
        f"{len(groups)} duplicate group(s) holding {in_groups} images ({len(dups.exact_pairs)} exact pair(s), "
        f"{len(dups.near_pairs) - len(dups.aligned_pairs)} near pair(s) within {threshold} bits, "
        f"{len(dups.aligned_pairs)} found by alignment); cxrnn splits keep each group on one side")
    checks["label_conflicts"] = _check("fail" if conflicts else "ok", len(conflicts),
                                       f"{len(conflicts)} duplicate group(s) carry more than one label")

    log("metadata classifier")
    y = dataset.labels()[ok]
    pids = [dataset.samples[i].patient_id for i in ok]
    group_arr = np.array(pids) if all(pids) and len(set(pids)) < len(pids) else None
    meta = metadata_shortcut([metas[i] for i in ok], y, [sources[i] for i in ok] if all(sources) else None,
                             group_arr, seed=seed)
    acc, skill, p = meta.get("accuracy"), meta.get("skill"), meta.get("p_value")
    if acc is None:
        checks["metadata_shortcut"] = _check("skipped", None, meta.get("reason", ""))
    else:
        significant = p is not None and p < SIGNIFICANCE
        status = ("fail" if significant and skill >= METADATA_FAIL_SKILL else
                  "warning" if significant and skill >= METADATA_WARN_SKILL else "ok")
        top = ", ".join(f["feature"] for f in meta.get("top_features", [])[:3])
        checks["metadata_shortcut"] = _check(
            status, acc, f"metadata-only accuracy {acc:.3f} vs chance {meta['chance']:.3f} "
            f"(skill {skill:.2f}, p={p:.2g}); most used: {top}")

    if has_sources:
        v = cramers_v(labels, sources)  # type: ignore[arg-type]
        checks["source_label_association"] = _check(
            "fail" if v >= SOURCE_LABEL_FAIL_V else "warning" if v >= SOURCE_LABEL_WARN_V else "ok", v,
            f"Cramer's V between source and label {v:.3f}")

    bundle = None
    if model is not None:
        from cxrnn.models.bundle import load_bundle

        bundle = load_bundle(model)

    log("label issues")
    digests = [m.sha256 if m else None for m in metas]  # the metadata pass read every file already
    labels_found = _label_issues(dataset, digests, dups.group_ids(), cache_dir, bundle, seed, progress)
    if "reason" in labels_found:
        checks["label_issues"] = _check("skipped", None, labels_found["reason"])
    else:
        share = labels_found["flagged_share"]
        checks["label_issues"] = _check(
            "fail" if share >= LABEL_ISSUES_FAIL_SHARE else "warning" if share >= LABEL_ISSUES_WARN_SHARE else "ok",
            share, f"cleanlab flags {labels_found['n_flagged']} of {labels_found['n']} images ({share:.1%}) as "
            f"likely mislabelled; the out-of-fold probe on {labels_found['backbone']} features agrees with "
            f"{labels_found['oof_accuracy']:.1%} of the given labels, so some flags are its own mistakes")

    model_results: dict[str, Any] = {}
    if bundle is not None:
        from cxrnn.audit import shortcut
        from cxrnn.explain.counterfactual import lesion_removed_test

        log("model checks")
        model_dataset = load_dataset(data, classes=bundle.classes, allow_outside_paths=allow_outside_paths) if set(dataset.classes) <= set(bundle.classes) else None
        probe = shortcut.source_probe(bundle, dataset, cache_dir, seed, digests=digests) if has_sources else None
        if probe is not None:
            model_results["source_probe"] = probe
            checks["source_probe"] = _check(
                "warning" if probe["skill"] >= SOURCE_PROBE_WARN_SKILL else "ok", probe["accuracy"],
                f"frozen features predict the source with accuracy {probe['accuracy']:.3f} "
                f"(chance {probe['chance']:.3f}): {'they encode the hospital' if probe['skill'] >= SOURCE_PROBE_WARN_SKILL else 'weak source signal'}")
        if model_dataset is not None:
            removed = lesion_removed_test(bundle, model_dataset, seed=seed)
            if removed is not None:
                model_results["lesion_removed"] = removed
                rate = removed["still_abnormal_rate"]
                checks["lesion_removed"] = _check(
                    "fail" if rate >= LESION_REMOVED_FAIL else "warning" if rate >= LESION_REMOVED_WARN else "ok", rate,
                    f"{rate:.0%} of {removed['n_cases']} abnormal cases still called abnormal with the lesion erased "
                    f"(with lesion {removed['abnormal_rate_with_lesion']:.0%}, true normals called abnormal "
                    f"{removed['abnormal_rate_on_true_normals'] or 0:.0%})")
            energy = shortcut.marker_energy(bundle, model_dataset, seed=seed)
            if energy is not None:
                model_results["marker_energy"] = energy
                frac, enr = energy["energy_fraction"], energy["enrichment"] or 0.0
                checks["marker_energy"] = _check(
                    "fail" if frac >= MARKER_FAIL_FRACTION else "warning" if enr >= MARKER_WARN_ENRICHMENT else "ok", frac,
                    f"{frac:.1%} of Grad-CAM energy on the marker, which covers {energy['area_fraction']:.1%} of the "
                    f"image ({enr:.1f}x its share) over {energy['n_cases']} marked images")

    verdict = max((c["status"] for c in checks.values()), key=lambda s: _ORDER[s])
    result = {
        "data": str(data),
        "model": str(model) if model else None,
        "verdict": verdict,
        "counts": counts,
        "images": per_class_images,
        "duplicate_groups": groups,
        "duplicate_pairs": {"exact": [[paths[i], paths[j]] for i, j in dups.exact_pairs],
                            "near": [{"paths": [paths[i], paths[j]], "bits": b} for i, j, b in dups.near_pairs],
                            "aligned": [{"paths": [paths[i], paths[j]], "ncc": round(float(c), 4)}
                                        for i, j, c in dups.aligned_pairs]},
        "near_duplicate_threshold": threshold,
        "align_threshold": dups.align_threshold,
        "label_conflicts": conflicts,
        "metadata_shortcut_accuracy": acc,
        "metadata_shortcut": meta,
        "label_issues": labels_found,
        "model_checks": model_results,
        "unreadable": errors,
        "checks": checks,
    }
    if out is not None:
        write_audit(result, out)
    return result


def _label_issues(dataset: Any, digests: list[str | None], dup_ids: np.ndarray, cache_dir: str | Path | None,
                  bundle: Any, seed: int, progress: Progress | None) -> dict[str, Any]:
    """Suspected label errors (``cxrnn.audit.label_issues``) over the readable images; duplicate groups
    and repeated patient ids stay on one side of every fold."""
    from cxrnn.audit import label_issues

    x, kept, backbone = label_issues.pooled_features(
        dataset, digests, cache_dir, bundle, progress=(lambda d, t: progress("extract", d, t)) if progress else None)
    if not kept:
        return {"reason": "no readable images"}
    pids = [dataset.samples[i].patient_id for i in kept]
    groups = combine_groups(dup_ids[kept], np.array(pids) if all(pids) else None)
    found = label_issues.find_suspects(x, dataset.labels()[kept], groups, dataset.classes,
                                       [str(dataset.samples[i].path) for i in kept], seed=seed)
    return {**found, "backbone": backbone}


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def write_audit(result: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    from cxrnn.utils.atomic import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_text(out / "audit.json", json.dumps(result, indent=2, default=_json_default))
    lines = [f"# Dataset audit: `{result['data']}`", "", f"**Verdict: {result['verdict'].upper()}**"
             + (f" (with model `{result['model']}`)" if result["model"] else ""), "",
             "| check | status | value | detail |", "|---|---|---|---|"]
    for name, c in result["checks"].items():
        lines.append(f"| {name} | {c['status']} | {_fmt(c['value'])} | {c['detail']} |")
    counts = result["counts"]
    lines += ["", "## Counts", "", f"{counts['total']} images: "
              + ", ".join(f"{k} {v}" for k, v in counts["per_class"].items())]
    if "per_source_class" in counts:
        lines += ["", "| source | " + " | ".join(counts["per_class"]) + " |", "|---" * (len(counts["per_class"]) + 1) + "|"]
        for src, row in counts["per_source_class"].items():
            lines.append(f"| {src} | " + " | ".join(str(row.get(c, 0)) for c in counts["per_class"]) + " |")
    lines += ["", "## Images per class", "", "| class | sizes | bit depth | mode | format | mean intensity |",
              "|---|---|---|---|---|---|"]
    for c, row in result["images"].items():
        lines.append(f"| {c} | {row['sizes']} | {row['bit_depth']} | {row['mode']} | {row['format']} "
                     f"| {row['mean_intensity']:.3f} ± {row['std_mean_intensity']:.3f} |")
    groups = result["duplicate_groups"]
    lines += ["", f"## Duplicate groups ({len(groups)}, near-duplicate threshold {result['near_duplicate_threshold']} bits)", ""]
    lines += [f"- {len(g)} images: " + ", ".join(f"`{p}`" for p in g[:6]) + (" ..." if len(g) > 6 else "")
              for g in groups[:50]]
    if result["label_conflicts"]:
        lines += ["", "## Label conflicts (one image, several labels)", ""]
        lines += [f"- {c['kind']}: {', '.join(c['labels'])}: " + ", ".join(f"`{p}`" for p in c["paths"][:6])
                  for c in result["label_conflicts"][:50]]
    meta = result["metadata_shortcut"]
    if meta.get("top_features"):
        lines += ["", "## Metadata classifier", "", f"cross-validated accuracy {_fmt(meta.get('accuracy'))} "
                  f"({meta.get('folds')} folds) against chance {_fmt(meta.get('chance'))}; features it used most:", ""]
        lines += [f"- {f['feature']}: {f['importance']:.3f}" for f in meta["top_features"]]
    lines += _label_issue_lines(result.get("label_issues") or {}, out)
    if result["unreadable"]:
        lines += ["", "## Unreadable files", "", *[f"- {e}" for e in result["unreadable"][:50]]]
    lines += ["", "Thresholds are policy (see cxrnn/audit/report.py). A clean audit does not make a model safe: "
              "it only rules out the leaks and shortcuts checked here.", ""]
    md_path = atomic_write_text(out / "audit.md", "\n".join(lines))
    return json_path, md_path


def _label_issue_lines(found: dict[str, Any], out: Path) -> list[str]:
    """audit.md's suspected label errors: a thumbnail grid (written next to audit.md) and a table."""
    from cxrnn.audit.label_issues import GRID, GRID_NAME, write_grid

    suspects = found.get("suspects") or []
    if not suspects:
        return []
    lines = ["", "## Suspected label errors", "",
             f"Ranked by the out-of-fold probability of the given label (cleanlab self-confidence; low: unlikely) "
             f"from a logistic regression on pooled {found['backbone']} features, {found['folds']}-fold x "
             f"{found['repeats']}, duplicate groups kept together. cleanlab flags {found['n_flagged']} of "
             f"{found['n']}; audit.json lists the top {len(suspects)}.", ""]
    if write_grid(suspects, out / GRID_NAME) is not None:
        lines += [f"![top {min(GRID, len(suspects))} suspected label errors: given -> suggested, score]({GRID_NAME})", ""]
    lines += ["| rank | image | given | suggested | score | flagged |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['rank']} | `{s['path']}` | {s['given']} | {s['suggested']} | {s['score']:.3f} "
              f"| {'yes' if s['flagged_by_cleanlab'] else 'no'} |" for s in suspects[:GRID]]
    return lines


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
