"""A DICOMweb client for a PACS (QIDO-RS search, WADO-RS retrieve, STOW-RS store) over dicomweb-client.

Authentication: HTTP basic (a user name, the password read from an environment variable) or a bearer token
read from an environment variable. Secrets are never part of a message, a repr or a log line. Every call
has a timeout; a refused connection or a 5xx answer is retried (``retries`` times, backing off), and
anything that still fails raises :class:`PacsError`, whose message is one line naming the URL and why.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Callable, Iterable, Sequence, TypeVar

DEFAULT_MODALITIES = ("CR", "DX")
T = TypeVar("T")

STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "PatientID", "AccessionNumber", "ModalitiesInStudy",
                "StudyDescription")
INSTANCE_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
                   "BodyPartExamined", "ViewPosition", "NumberOfFrames", "SeriesDescription", "Rows", "Columns")


class PacsError(Exception):
    """A PACS that cannot be reached or answers with an error; ``str()`` is one line: "URL: reason"."""

    def __init__(self, url: str, reason: str):
        self.url, self.reason = url, reason
        super().__init__(f"PACS {url}: {reason}")


def redact(url: str) -> str:
    """``url`` without credentials (``https://user:pass@host`` -> ``https://host``)."""
    return re.sub(r"//[^/@]*@", "//", url)


def _reason(exc: BaseException, timeout: float) -> str:
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        r = exc.response
        hint = {401: " (check --username/--password-env or --token-env)", 403: " (not allowed for this account)"}
        return f"HTTP {r.status_code} {r.reason or ''}".rstrip() + hint.get(r.status_code, "")
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, requests.ConnectionError):
        text = str(exc)
        if "Connection refused" in text:
            return "connection refused (is the server running?)"
        if "Name or service not known" in text or "getaddrinfo" in text or "nodename nor servname" in text:
            return "unknown host"
        return "cannot connect"
    try:
        from retrying import RetryError

        if isinstance(exc, RetryError):
            last = exc.last_attempt.value
            inner = last[1] if isinstance(last, tuple) and len(last) > 1 else None
            if isinstance(inner, BaseException):
                return _reason(inner, timeout)
            return "still failing after retries"
    except ImportError:  # pragma: no cover
        pass
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


def _value(item: dict[str, Any], keyword: str) -> Any:
    """A QIDO JSON attribute's first value (a name's Alphabetic form) or None."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        return None
    entry = item.get(f"{tag:08X}") or {}
    values = entry.get("Value") or []
    if not values:
        return None
    value = values[0] if len(values) == 1 else values
    if isinstance(value, dict):
        value = value.get("Alphabetic")
    return value


def flatten(item: dict[str, Any], keywords: Iterable[str]) -> dict[str, Any]:
    """A QIDO-RS JSON result as {keyword: value} for ``keywords`` (absent ones omitted)."""
    out = {}
    for keyword in keywords:
        value = _value(item, keyword)
        if value is not None:
            out[keyword] = value
    return out


def header_dataset(fields: dict[str, Any]) -> Any:
    """A header-only pydicom Dataset of flattened QIDO fields (for ``acquisition_findings``)."""
    from pydicom import Dataset

    ds = Dataset()
    for keyword, value in fields.items():
        try:
            setattr(ds, keyword, value)
        except Exception:
            pass
    return ds


class PacsClient:
    """QIDO-RS / WADO-RS / STOW-RS against the DICOMweb root ``url`` (e.g. http://pacs:8042/dicom-web).

    ``password_env`` / ``token_env`` name environment variables (the secret itself never goes on a command
    line); a named variable that is unset or empty is a ValueError.
    """

    def __init__(self, url: str, username: str | None = None, password_env: str | None = None,
                 token_env: str | None = None, timeout: float = 30, retries: int = 3):
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        from dicomweb_client import DICOMwebClient

        if not url or not re.match(r"^https?://", url):
            raise ValueError(f"--url must be an http:// or https:// DICOMweb root, not {redact(url)!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries!r}")
        if token_env and (username or password_env):
            raise ValueError("give either a bearer token (--token-env) or a user name and password, not both")
        self.url = url.rstrip("/")
        self.shown_url = redact(self.url)
        self.timeout = float(timeout)
        session = requests.Session()
        # a refused connection or a 502/503/504 is retried with a backoff; other errors are answers
        retry = Retry(total=retries, connect=retries, read=0, status=retries, backoff_factor=0.3,
                      status_forcelist=(502, 503, 504), allowed_methods=None, raise_on_status=False)
        session.mount("http://", HTTPAdapter(max_retries=retry))
        session.mount("https://", HTTPAdapter(max_retries=retry))
        if username:
            password = _secret(password_env, "--password-env") if password_env else ""
            session.auth = (username, password)
        elif password_env:
            raise ValueError("--password-env needs --username")
        if token_env:
            session.headers["Authorization"] = f"Bearer {_secret(token_env, '--token-env')}"
        self._client = DICOMwebClient(self.url, session=session, timeout=self.timeout)
        # the session retries already; dicomweb-client's own loop would multiply them
        self._client.set_http_retry_params(retry=False)

    def __repr__(self) -> str:
        return f"PacsClient({self.shown_url!r})"

    def _call(self, what: Callable[[], T]) -> T:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return what()
        except PacsError:
            raise
        except Exception as exc:  # requests, urllib3, a bad answer: one line, whatever failed
            raise PacsError(self.shown_url, _reason(exc, self.timeout)) from None

    def find_studies(self, since: str | None = None, study: str | None = None,
                     modality: Sequence[str] | None = DEFAULT_MODALITIES) -> list[dict[str, Any]]:
        """Studies (QIDO-RS) as {keyword: value}: one ``study`` UID, or those since the date ``since``
        (YYYYMMDD, inclusive), holding any of ``modality`` (None: any)."""
        if since is not None and not re.fullmatch(r"\d{8}", since):
            raise ValueError(f"--since must be a date YYYYMMDD, not {since!r}")
        base: dict[str, Any] = {}
        if study:
            base["StudyInstanceUID"] = study
        if since:
            base["StudyDate"] = f"{since}-"
        found: dict[str, dict[str, Any]] = {}
        for mod in (list(modality) if modality else [None]):
            filters = dict(base, **({"ModalitiesInStudy": mod} if mod else {}))
            items = self._call(lambda: self._client.search_for_studies(
                search_filters=filters, fields=list(STUDY_FIELDS)))
            for item in items:
                row = flatten(item, STUDY_FIELDS)
                if row.get("StudyInstanceUID"):
                    found.setdefault(row["StudyInstanceUID"], row)
        return sorted(found.values(), key=lambda r: (str(r.get("StudyDate", "")), r["StudyInstanceUID"]))

    def instances(self, study_uid: str) -> list[dict[str, Any]]:
        """The study's instances (QIDO-RS) as {keyword: value} with the header fields of INSTANCE_FIELDS."""
        items = self._call(lambda: self._client.search_for_instances(
            study_instance_uid=study_uid, fields=list(INSTANCE_FIELDS)))
        return [flatten(item, INSTANCE_FIELDS) for item in items]

    def series(self, study_uid: str, modality: str | None = None) -> list[dict[str, Any]]:
        """The study's series (QIDO-RS): SeriesInstanceUID, Modality, SeriesDescription."""
        filters = {"Modality": modality} if modality else None
        keys = ("SeriesInstanceUID", "Modality", "SeriesDescription")
        items = self._call(lambda: self._client.search_for_series(
            study_instance_uid=study_uid, search_filters=filters, fields=["SeriesDescription"]))
        rows = [flatten(item, keys) for item in items]
        return [r for r in rows if not modality or r.get("Modality") == modality]  # a server may ignore filters

    def retrieve(self, study: str, series: str, instance: str) -> Any:
        """One instance (WADO-RS) as a pydicom Dataset."""
        return self._call(lambda: self._client.retrieve_instance(study, series, instance))

    def store(self, datasets: Sequence[Any]) -> Any:
        """Store ``datasets`` (STOW-RS); PacsError if the server refuses any of them."""
        response = self._call(lambda: self._client.store_instances(list(datasets)))
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise PacsError(self.shown_url, f"store refused {len(failed)} object(s) (failure reason {', '.join(reasons)})")
        return response


def _secret(env: str, option: str) -> str:
    value = os.environ.get(env, "")
    if not value:
        raise ValueError(f"{option} {env}: the environment variable is not set or empty")
    return value
