"""A prediction as DICOM objects a PACS viewer shows next to the image: a Comprehensive SR and a Secondary Capture.

Both are built with highdicom, in the source image's study (same StudyInstanceUID, patient and study
identifiers copied from the source), each in a new series with new UIDs.

The SR's content tree (no DICOM template; Comprehensive SR, every item a child of the root by CONTAINS)::

    CONTAINER  (LN 18748-4 "Diagnostic imaging report")
      TEXT   (DCM 121106 "Comment")            research-use-only statement
      TEXT   (DCM 111001 "Algorithm Name")     the model's name
      TEXT   (DCM 111003 "Algorithm Version")  cxrnn version and the model file's id (sha256 prefix)
      IMAGE  (DCM 121112 "Source of Measurement")  the source image (SOP Class/Instance UID)
      CODE   (DCM 121071 "Finding")            the predicted class (99CXRNN code, meaning = class name)
      NUM    (99CXRNN P-<class> "Probability of <class>")  each class, unit UCUM "1"
      CODE   (99CXRNN OOD "Out of distribution")  SCT Yes / No; NUM OOD score and threshold
      CODE   (99CXRNN PSET "Prediction set member")  one per class in the conformal set (if the model has one)
      CODE   (99CXRNN REFER "Refer to radiologist")  SCT Yes / No; TEXT (99CXRNN REFREASON) the reason
      TEXT   (99CXRNN WARN "Reader warning")   one per warning (e.g. a lateral view)

:func:`read_finding` reads these back into the dict ``cxrnn predict --json`` prints (label, probabilities).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from cxrnn.utils.atomic import atomic_write_bytes

if TYPE_CHECKING:
    import pydicom

    from cxrnn.explain.cam import Explanation
    from cxrnn.models.bundle import ModelBundle

SCHEME = "99CXRNN"  # private coding scheme of this project's concepts
MANUFACTURER = "cxrnn"
RESEARCH_USE = ("RESEARCH USE ONLY. Not a medical device; not for diagnosis or treatment. This result was "
                "produced by a machine-learning model and has not been reviewed by a clinician.")
SR_SERIES_PREFIX = "cxrnn SR"  # SeriesDescription "cxrnn SR <model id>": how a study's SR of a model is found
SC_SERIES_PREFIX = "cxrnn panel"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902


def _concepts():
    from highdicom.sr import CodedConcept

    c = {
        "report": CodedConcept("18748-4", "LN", "Diagnostic imaging report"),
        "comment": CodedConcept("121106", "DCM", "Comment"),
        "algorithm_name": CodedConcept("111001", "DCM", "Algorithm Name"),
        "algorithm_version": CodedConcept("111003", "DCM", "Algorithm Version"),
        "source": CodedConcept("121112", "DCM", "Source of Measurement"),
        "finding": CodedConcept("121071", "DCM", "Finding"),
        "ood": CodedConcept("OOD", SCHEME, "Out of distribution"),
        "ood_score": CodedConcept("OODSCORE", SCHEME, "Out-of-distribution score"),
        "ood_threshold": CodedConcept("OODTHRESH", SCHEME, "Out-of-distribution threshold"),
        "pset": CodedConcept("PSET", SCHEME, "Prediction set member"),
        "refer": CodedConcept("REFER", SCHEME, "Refer to radiologist"),
        "refer_reason": CodedConcept("REFREASON", SCHEME, "Referral reason"),
        "warning": CodedConcept("WARN", SCHEME, "Reader warning"),
        "yes": CodedConcept("373066001", "SCT", "Yes"),
        "no": CodedConcept("373067005", "SCT", "No"),
        "unitless": CodedConcept("1", "UCUM", "no units"),
    }
    return c


def class_code(name: str, index: int):
    """The 99CXRNN concept of a class: code value the name when it fits SH (16 chars), else CLASS<index>."""
    from highdicom.sr import CodedConcept

    value = name if 0 < len(name) <= 16 and name.isascii() and "\\" not in name else f"CLASS{index}"
    return CodedConcept(value, SCHEME, name[:64])


def model_info(bundle: "ModelBundle", model_path: str | Path | None = None) -> dict[str, str]:
    """{"name", "version", "id"} of a model for the results: ``id`` is the model file's sha256 prefix
    (16 hex digits; the SR series of a study is matched on it), or a hash of the description without a file."""
    import cxrnn

    if model_path is not None:
        digest = hashlib.sha256()
        with open(model_path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        model_id = digest.hexdigest()[:16]
    else:
        model_id = hashlib.sha256(bundle.describe().encode()).hexdigest()[:16]
    created = f", created {bundle.created}" if bundle.created else ""
    return {"name": f"cxrnn {bundle.describe()}", "version": f"cxrnn {cxrnn.__version__}, model {model_id}{created}",
            "id": model_id}


def _yes_no(flag: bool):
    c = _concepts()
    return c["yes"] if flag else c["no"]


def _now() -> tuple[str, str]:
    now = datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def structured_report(source: "pydicom.Dataset", prediction: Mapping[str, Any], model: Mapping[str, str],
                      series_uid: str | None = None, sop_uid: str | None = None) -> "pydicom.Dataset":
    """A Comprehensive SR of ``prediction`` (a ``Prediction.to_dict()``) on the image ``source`` (its header
    is enough: pixel data are not read). ``model``: {"name", "version", "id"} (see :func:`model_info`)."""
    import highdicom as hd
    from highdicom.sr import (CodeContentItem, ContainerContentItem, ImageContentItem, NumContentItem,
                              RelationshipTypeValues, TextContentItem)

    if prediction.get("error") or not prediction.get("probabilities"):
        raise ValueError(f"no finding to report ({prediction.get('error') or 'no probabilities'})")
    source = read_source(source)
    c = _concepts()
    contains = RelationshipTypeValues.CONTAINS
    classes = list(prediction["probabilities"])
    codes = {name: class_code(name, i) for i, name in enumerate(classes)}
    items: list[Any] = [
        TextContentItem(c["comment"], RESEARCH_USE, contains),
        TextContentItem(c["algorithm_name"], str(model["name"]), contains),
        TextContentItem(c["algorithm_version"], str(model["version"]), contains),
        ImageContentItem(c["source"], source.SOPClassUID, source.SOPInstanceUID, relationship_type=contains),
        CodeContentItem(c["finding"], codes[prediction["label"]], contains),
    ]
    for i, name in enumerate(classes):
        concept = hd.sr.CodedConcept(f"P-{codes[name].value}"[:16], SCHEME, f"Probability of {name}"[:64])
        items.append(NumContentItem(concept, float(prediction["probabilities"][name]), c["unitless"],
                                    relationship_type=contains))
    ood = prediction.get("ood")
    if ood:
        items.append(CodeContentItem(c["ood"], _yes_no(bool(ood.get("flagged"))), contains))
        for key, concept in (("score", "ood_score"), ("threshold", "ood_threshold")):
            if ood.get(key) is not None:
                items.append(NumContentItem(c[concept], float(ood[key]), c["unitless"], relationship_type=contains))
    if prediction.get("prediction_set") is not None:
        for name in prediction["prediction_set"]:
            items.append(CodeContentItem(c["pset"], codes.get(name) or class_code(name, len(codes)), contains))
    if "refer" in prediction:
        items.append(CodeContentItem(c["refer"], _yes_no(bool(prediction["refer"])), contains))
        if prediction.get("refer_reason"):
            items.append(TextContentItem(c["refer_reason"], str(prediction["refer_reason"]), contains))
    for note in prediction.get("warnings") or ():
        items.append(TextContentItem(c["warning"], str(note), contains))
    root = ContainerContentItem(c["report"])
    root.ContentSequence = items
    date, time = _now()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom's notes on optional attributes of the source
        sr = hd.sr.ComprehensiveSR(
            evidence=[source], content=root, series_instance_uid=series_uid or hd.UID(),
            series_number=SR_SERIES_NUMBER, sop_instance_uid=sop_uid or hd.UID(), instance_number=1,
            manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
            series_description=f"{SR_SERIES_PREFIX} {model['id']}"[:64],
            content_date=date, content_time=time)
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return sr


def _private_scheme() -> "pydicom.Dataset":
    """The SOP Common module's declaration of the 99CXRNN coding scheme."""
    from pydicom import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "cxrnn model output concepts"
    item.CodingSchemeResponsibleOrganization = "cxrnn project"
    return item


def secondary_capture(source: "pydicom.Dataset", panel_rgb: np.ndarray, model: Mapping[str, str],
                      series_uid: str | None = None, sop_uid: str | None = None) -> "pydicom.Dataset":
    """The explanation panel (uint8 RGB, H x W x 3) as a Secondary Capture image in the study of ``source``.

    The rows and columns of the X-ray in the panel run as the source's, so its PatientOrientation is
    copied (default L\\F, a frontal chest radiograph as read). The panel carries text: BurnedInAnnotation YES.
    """
    import highdicom as hd

    panel = np.ascontiguousarray(panel_rgb)
    if panel.dtype != np.uint8 or panel.ndim != 3 or panel.shape[2] != 3:
        raise ValueError(f"the panel must be uint8 RGB (H, W, 3), not {panel.dtype} {panel.shape}")
    source = read_source(source)
    orientation = source.get("PatientOrientation")
    orientation = tuple(orientation) if orientation is not None and len(orientation) == 2 else ("L", "F")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source, pixel_array=panel, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=series_uid or hd.UID(),
            series_number=SC_SERIES_NUMBER, sop_instance_uid=sop_uid or hd.UID(), instance_number=1,
            manufacturer=MANUFACTURER, patient_orientation=orientation,
            transfer_syntax_uid="1.2.840.10008.1.2.1")
    sc.SeriesDescription = f"{SC_SERIES_PREFIX} {model['id']}"[:64]
    sc.BurnedInAnnotation = "YES"
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    # General Series: Laterality (type 2C) is the source's; absent for an unpaired body part (chest), empty
    # (unknown) when the source names no body part
    laterality = source.get("Laterality") or source.get("ImageLaterality")
    if laterality:
        sc.Laterality = laterality
    elif "BodyPartExamined" not in source:
        sc.Laterality = ""
    sc.ImageComments = f"Explanation map panel of {model['name']}. {RESEARCH_USE}"[:10240]
    date, time = _now()
    sc.ContentDate, sc.ContentTime = date, time
    ref = _ref_item(source)
    sc.SourceImageSequence = [ref]
    return sc


def _ref_item(source: "pydicom.Dataset") -> "pydicom.Dataset":
    from pydicom import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def to_bytes(ds: "pydicom.Dataset") -> bytes:
    """``ds`` as a DICOM Part 10 file (preamble, file meta)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def render_panel(exp: "Explanation", alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """The X-ray | overlay | probabilities panel of ``exp`` (as ``cxrnn explain`` draws it) as uint8 RGB."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from cxrnn.explain.overlay import displayed_map, panel_figure, panel_title

    if exp.error is not None or exp.image is None or exp.cam is None:
        raise ValueError(f"{exp.path}: no map to draw ({exp.error or 'no map'})")
    fig = panel_figure(exp.image, displayed_map(exp), exp.probabilities, title=f"{panel_title(exp)} - research use only",
                       target=exp.target, alpha=alpha, colormap=colormap)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


# Patient and study attributes of type 2 in the SR and SC: present (empty when the source lacks them)
TYPE2_HEADER = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


def read_source(source: "str | Path | pydicom.Dataset") -> "pydicom.Dataset":
    """The source's header (pixel data are not needed), with the type-2 patient and study attributes that
    it lacks added empty: highdicom copies them into the new objects and refuses a source without them."""
    import copy

    import pydicom

    if isinstance(source, pydicom.Dataset):
        ds = copy.copy(source)  # shallow: the caller's dataset keeps its attributes
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(source), stop_before_pixels=True)
    for keyword in TYPE2_HEADER:
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


def result_objects(source: "str | Path | pydicom.Dataset", prediction: Mapping[str, Any], panel_rgb: np.ndarray,
                   model: Mapping[str, str]) -> tuple["pydicom.Dataset", "pydicom.Dataset"]:
    """(SC, SR) for one image: the order a PACS gets them in (an SR only follows its SC)."""
    ds = read_source(source)
    return secondary_capture(ds, panel_rgb, model), structured_report(ds, prediction, model)


def write_results(source: "str | Path | pydicom.Dataset", prediction: Mapping[str, Any], panel_rgb: np.ndarray,
                  out_dir: str | Path, model: Mapping[str, str], name: str | None = None) -> dict[str, str]:
    """Write NAME_sc.dcm and NAME_sr.dcm (NAME: the source file's stem, else its SOP Instance UID) into
    ``out_dir``, each atomically; returns {"sc": path, "sr": path}."""
    ds = read_source(source)
    sc, sr = result_objects(ds, prediction, panel_rgb, model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = name or (Path(source).stem if isinstance(source, (str, Path)) else str(ds.SOPInstanceUID))
    return {"sc": str(atomic_write_bytes(out / f"{stem}_sc.dcm", to_bytes(sc))),
            "sr": str(atomic_write_bytes(out / f"{stem}_sr.dcm", to_bytes(sr)))}


def _items(ds: "pydicom.Dataset"):
    for item in ds.get("ContentSequence", []):
        name = item.ConceptNameCodeSequence[0]
        yield (name.CodingSchemeDesignator, name.CodeValue, name.CodeMeaning), item


def read_finding(sr: "pydicom.Dataset") -> dict[str, Any]:
    """The finding of an SR made by :func:`structured_report`: {"label", "probabilities", "ood",
    "prediction_set", "refer", "refer_reason", "model_name", "model_version", "source_sop_instance_uid"}."""
    out: dict[str, Any] = {"probabilities": {}, "prediction_set": None, "ood": None}
    for (scheme, value, meaning), item in _items(sr):
        if (scheme, value) == ("DCM", "121071"):
            out["label"] = item.ConceptCodeSequence[0].CodeMeaning
        elif scheme == SCHEME and value.startswith("P-"):
            mv = item.MeasuredValueSequence[0]
            number = float(mv.FloatingPointValue) if "FloatingPointValue" in mv else float(mv.NumericValue)
            out["probabilities"][meaning.removeprefix("Probability of ")] = number
        elif (scheme, value) == (SCHEME, "OOD"):
            out["ood"] = {**(out["ood"] or {}), "flagged": item.ConceptCodeSequence[0].CodeValue == "373066001"}
        elif (scheme, value) in ((SCHEME, "OODSCORE"), (SCHEME, "OODTHRESH")):
            mv = item.MeasuredValueSequence[0]
            key = "score" if value == "OODSCORE" else "threshold"
            out["ood"] = {**(out["ood"] or {}), key: float(mv.get("FloatingPointValue", mv.NumericValue))}
        elif (scheme, value) == (SCHEME, "PSET"):
            out["prediction_set"] = [*(out["prediction_set"] or []), item.ConceptCodeSequence[0].CodeMeaning]
        elif (scheme, value) == (SCHEME, "REFER"):
            out["refer"] = item.ConceptCodeSequence[0].CodeValue == "373066001"
        elif (scheme, value) == (SCHEME, "REFREASON"):
            out["refer_reason"] = item.TextValue
        elif (scheme, value) == ("DCM", "111001"):
            out["model_name"] = item.TextValue
        elif (scheme, value) == ("DCM", "111003"):
            out["model_version"] = item.TextValue
        elif (scheme, value) == ("DCM", "121112"):
            out["source_sop_instance_uid"] = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return out


def dicom_results_for_files(predictor: Any, paths: list[str | Path], out_dir: str | Path,
                            model: Mapping[str, str], on_result: Any = None,
                            method: str | None = None) -> list[dict[str, Any]]:
    """``cxrnn predict --dicom-out DIR``: per DICOM file its prediction and, when it is readable, NAME_sc.dcm
    and NAME_sr.dcm in ``out_dir``. Returns one dict per file: the prediction's dict plus "dicom" {sc, sr}
    (absent for an error or a non-DICOM file: an SR must reference a DICOM source).
    ``on_result(prediction, files)`` is called per file as it is done; ``method`` is the map's (default
    ``cxrnn.explain.registry.DEFAULT_METHOD``)."""
    from cxrnn.data.io import sniff_format
    from cxrnn.explain.cam import CamExplainer, predict_and_explain_paths
    from cxrnn.explain.overlay import OutputNamer

    namer = OutputNamer()
    rows = []
    from cxrnn.explain.registry import DEFAULT_METHOD

    with CamExplainer(predictor.bundle, method=method or DEFAULT_METHOD, batch_size=predictor.batch_size) as explainer:
        for prediction, exp in predict_and_explain_paths(predictor, explainer, paths):
            row = prediction.to_dict()
            files: dict[str, str] = {}
            if prediction.error is None:
                with open(prediction.path, "rb") as fh:
                    is_dicom = sniff_format(fh.read(1024)) == "dicom"
                if is_dicom:
                    files = write_results(prediction.path, row, render_panel(exp), out_dir, model,
                                          name=namer(prediction.path))
                    row["dicom"] = files
            if on_result:
                on_result(prediction, files)
            rows.append(row)
    return rows
