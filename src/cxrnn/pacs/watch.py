"""``cxrnn pacs predict`` and ``cxrnn pacs watch``: studies from a PACS in, an SR and an SC per image back.

Per study: skipped as a whole when it already holds an SR series of this model (its SeriesDescription is
``"cxrnn SR <model id>"``, the model id being the model file's sha256 prefix: see
``cxrnn.pacs.results.model_info``). Otherwise each instance is checked from its QIDO header first, then from
the retrieved object, and skipped with a one-line reason when its modality is not one asked for, it is not
a chest radiograph (``acquisition_findings``: refused, or a lateral view), it has no pixel data, or it is
multi-frame. A kept instance is predicted and explained, and its SC then its SR are stored (STOW-RS): an SR
is only sent once its SC is stored, and a failure says which one failed.

The watch polls for studies, remembers the ones done in a state file (JSON, written atomically) so that a
restart does not redo them, and treats a PACS that is down as one line and a retry at the next poll.
"""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cxrnn.pacs.client import INSTANCE_FIELDS, PacsClient, PacsError, header_dataset
from cxrnn.utils.atomic import atomic_write_json

Log = Callable[[str], None]


@dataclass
class RunSummary:
    """What a run did: counts of studies and instances, and the skip reasons."""

    studies: int = 0
    studies_done_before: int = 0
    stored: int = 0  # instances whose SC and SR are both stored
    skipped: list[str] = field(default_factory=list)  # "UID: reason"
    failed: list[str] = field(default_factory=list)  # "UID: what failed"

    def line(self) -> str:
        return (f"{self.studies} stud{'y' if self.studies == 1 else 'ies'}"
                f" ({self.studies_done_before} already processed): {self.stored} image(s) stored as SR + SC, "
                f"{len(self.skipped)} skipped, {len(self.failed)} failed")

    def add(self, other: "RunSummary") -> None:
        self.studies += other.studies
        self.studies_done_before += other.studies_done_before
        self.stored += other.stored
        self.skipped += other.skipped
        self.failed += other.failed


def skip_reason(header: Any, modalities: Sequence[str], full: bool) -> str | None:
    """Why an instance (a header-only or full Dataset) is not predicted; None: predict it. ``full``: the
    retrieved object (pixel data can be checked), else a QIDO header (absent fields are not held against it)."""
    from cxrnn.data.dicom import acquisition_findings

    modality = str(header.get("Modality") or "").upper()
    if modality and modality not in modalities:
        return f"modality {modality} is not one of {','.join(modalities)}"
    if full and not modality:
        return "no Modality in the DICOM header"
    for finding in acquisition_findings(header):
        if finding.refuse or finding.keyword == "ViewPosition":
            return finding.reason
    frames = header.get("NumberOfFrames")
    try:
        if frames not in (None, "") and int(frames) > 1:
            return f"multi-frame object ({int(frames)} frames)"
    except (TypeError, ValueError):
        pass
    if full and "PixelData" not in header and "FloatPixelData" not in header and "DoubleFloatPixelData" not in header:
        return "no pixel data"
    return None


class PacsRunner:
    """One model against one PACS: ``process_study`` does a study, ``run`` a search."""

    def __init__(self, client: PacsClient, model_path: str | Path, modalities: Sequence[str] = ("CR", "DX"),
                 log: Log = print, batch_size: int = 1):
        from cxrnn.explain.cam import CamExplainer
        from cxrnn.inference.predictor import Predictor
        from cxrnn.pacs.results import model_info

        self.client = client
        self.modalities = tuple(m.strip().upper() for m in modalities if m.strip())
        self.log = log
        self.predictor = Predictor.from_file(model_path, batch_size=batch_size)
        self.model = model_info(self.predictor.bundle, model_path)
        self.explainer = CamExplainer(self.predictor.bundle, batch_size=batch_size)

    def close(self) -> None:
        self.explainer.close()

    def __enter__(self) -> "PacsRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def already_processed(self, study_uid: str) -> bool:
        from cxrnn.pacs.results import SR_SERIES_PREFIX

        mark = f"{SR_SERIES_PREFIX} {self.model['id']}"
        return any(str(s.get("SeriesDescription", "")).startswith(mark) for s in self.client.series(study_uid, "SR"))

    def process_study(self, study_uid: str) -> RunSummary:
        """Predict every eligible image of one study and store its results; PacsError if the PACS fails on
        the study's search (a failure on one image is counted in the summary, and the study goes on)."""
        summary = RunSummary(studies=1)
        if self.already_processed(study_uid):
            summary.studies_done_before = 1
            self.log(f"study {study_uid}: skipped, already has an SR of model {self.model['id']}")
            return summary
        instances = self.client.instances(study_uid)
        if not instances:
            summary.skipped.append(f"{study_uid}: study without images")
            self.log(f"study {study_uid}: skipped, no images in the study")
            return summary
        for inst in instances:
            uid = str(inst.get("SOPInstanceUID", "?"))
            reason = skip_reason(header_dataset({k: v for k, v in inst.items() if k in INSTANCE_FIELDS}),
                                 self.modalities, full=False)
            if reason is None:
                try:
                    reason = self._process_instance(study_uid, inst, summary)
                except PacsError as exc:
                    summary.failed.append(f"{uid}: {exc}")
                    self.log(f"  {uid}: failed: {exc}")
                    continue
                except Exception as exc:  # an object this code cannot turn into results: the run goes on
                    text = " ".join(str(exc).split())[:200]
                    summary.failed.append(f"{uid}: {type(exc).__name__}: {text}")
                    self.log(f"  {uid}: failed: {type(exc).__name__}: {text}; nothing stored")
                    continue
            if reason is not None:
                summary.skipped.append(f"{uid}: {reason}")
                self.log(f"  {uid}: skipped, {reason}")
        return summary

    def _process_instance(self, study_uid: str, inst: dict[str, Any], summary: RunSummary) -> str | None:
        """Predict one instance and store its SC then SR; a skip reason, or None when handled."""
        from cxrnn.data.io import ImageReadError
        from cxrnn.explain.cam import ExplainInput, predict_and_explain
        from cxrnn.pacs.results import read_source, render_panel, result_objects, to_bytes

        uid = inst["SOPInstanceUID"]
        ds = self.client.retrieve(study_uid, inst["SeriesInstanceUID"], uid)
        reason = skip_reason(ds, self.modalities, full=True)
        if reason is not None:
            return reason
        if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
            from pydicom.dataset import FileMetaDataset
            from pydicom.uid import ExplicitVRLittleEndian

            meta = FileMetaDataset()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta = meta
        try:  # the one reader, on the object's bytes, as for an upload
            image, warnings = self.predictor.read(to_bytes(ds), uid)
        except ImageReadError as err:
            return err.reason
        item = ExplainInput.from_image(image, self.predictor.bundle.preprocessing, warnings)
        ((prediction, exp),) = predict_and_explain(self.predictor, self.explainer, [item], [uid])
        row = prediction.to_dict()
        sc, sr = result_objects(read_source(ds), row, render_panel(exp), self.model)
        # SC first: an SR is only sent once the panel it speaks for is in the PACS
        for obj, failure in ((sc, "SC not stored ({}); SR not sent"), (sr, "SC stored, SR not stored ({})")):
            try:
                self.client.store([obj])
            except PacsError as exc:
                summary.failed.append(f"{uid}: {failure.format(exc.reason)}")
                self.log(f"  {uid}: {prediction.label}: {failure.format(exc.reason)}")
                return None
        summary.stored += 1
        probs = "  ".join(f"{c} {v:.3f}" for c, v in row["probabilities"].items())
        flags = ("  OUT OF DISTRIBUTION" if row["ood"] and row["ood"]["flagged"] else "") + ("  REFER" if row["refer"] else "")
        self.log(f"  {uid}: {prediction.label}  ({probs}){flags}  -> SC + SR stored")
        return None

    def run(self, study: str | None = None, since: str | None = None) -> RunSummary:
        """``cxrnn pacs predict``: every study found (PacsError if the search fails)."""
        summary = RunSummary()
        studies = self.client.find_studies(since=since, study=study, modality=self.modalities)
        if not studies:
            self.log("no study found" + (f" with UID {study}" if study else "") + (f" since {since}" if since else ""))
        for row in studies:
            uid = row["StudyInstanceUID"]
            self.log(f"study {uid}" + (f" ({row['StudyDate']})" if row.get("StudyDate") else ""))
            try:
                summary.add(self.process_study(uid))
            except PacsError as exc:
                summary.studies += 1
                summary.failed.append(f"{uid}: {exc}")
                self.log(f"study {uid}: failed: {exc}")
        return summary


class WatchState:
    """The studies a watch has finished, kept in a JSON file (written atomically) across restarts."""

    def __init__(self, path: str | Path, model_id: str):
        self.path = Path(path)
        self.model_id = model_id
        self.done: set[str] = set()
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"state file {self.path}: unreadable ({exc})") from None
            if data.get("model") == model_id:
                self.done = set(data.get("studies", []))

    def add(self, uid: str) -> None:
        self.done.add(uid)
        atomic_write_json(self.path, {"model": self.model_id, "studies": sorted(self.done)})


def watch(runner: PacsRunner, state: WatchState, interval: float = 30, since: str | None = None,
          max_polls: int | None = None, stop: threading.Event | None = None) -> RunSummary:
    """Poll for studies every ``interval`` seconds and process each new one once; returns at ``stop`` (set
    by Ctrl-C / SIGTERM in the command) or after ``max_polls`` polls. A PACS that is down is one line per
    poll; a study that failed (the PACS went away meanwhile) is not marked done and is retried next poll."""
    stop = stop or threading.Event()
    total = RunSummary()
    polls = 0
    while not stop.is_set():
        polls += 1
        try:
            studies = runner.client.find_studies(since=since, modality=runner.modalities)
        except PacsError as exc:
            runner.log(f"poll {polls}: {exc}; retrying in {interval:g} s")
            studies = []
        for row in studies:
            if stop.is_set():
                break
            uid = row["StudyInstanceUID"]
            if uid in state.done:
                continue
            runner.log(f"study {uid}" + (f" ({row['StudyDate']})" if row.get("StudyDate") else ""))
            try:
                result = runner.process_study(uid)
            except PacsError as exc:
                runner.log(f"study {uid}: failed: {exc}; retrying at the next poll")
                continue
            total.add(result)
            if not result.failed:
                state.add(uid)
        if max_polls is not None and polls >= max_polls:
            break
        stop.wait(interval)
    return total


def stop_on_signals(stop: threading.Event) -> Callable[[], None]:
    """Set ``stop`` on SIGINT / SIGTERM (the image in progress finishes first); returns a function restoring
    the previous handlers."""
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
