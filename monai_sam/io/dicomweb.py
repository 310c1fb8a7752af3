"""A PACS as a source of studies and a destination for DICOM-SEG, through DICOMweb.

`DicomWebSource` wraps dicomweb-client's ``DICOMwebClient``: QIDO-RS finds a study's
series, WADO-RS retrieves the image series (non-image series such as SEG, SR or RTSTRUCT
are not downloaded) into a local folder that the usual series checks and ITK reader then
read, and STOW-RS stores the SEG back into the study. Every failure becomes a
`DicomWebError` that names the server, the study and what went wrong (server down, study
unknown, a refused store...).

Credentials never go on the command line: `DicomWebSource.from_env` reads
``MONAI_SAM_DICOMWEB_TOKEN`` (a bearer token) or ``MONAI_SAM_DICOMWEB_USER`` /
``MONAI_SAM_DICOMWEB_PASSWORD`` (HTTP basic), and ``MONAI_SAM_DICOMWEB_CA_BUNDLE`` (a CA
certificate file for an HTTPS server signed by the hospital's own authority).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pydicom
import requests

from monai_sam.io.dicom_series import NON_IMAGE_MODALITIES

__all__ = ["DicomWebError", "DicomWebSource"]

logger = logging.getLogger(__name__)

# DICOM JSON attribute tags (PS3.18 F.2)
_SERIES_UID = "0020000E"
_MODALITY = "00080060"
_N_INSTANCES = "00201209"
_FAILED_SOP_SEQUENCE = "FailedSOPSequence"


class DicomWebError(RuntimeError):
    """A DICOMweb request that failed; the message names the server and the study."""


class _TimeoutSession(requests.Session):
    """A requests session whose calls time out (requests' own default is to wait forever)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def request(self, method, url, **kwargs):  # type: ignore[override]
        kwargs.setdefault("timeout", self.timeout)
        return super().request(method, url, **kwargs)


def _tag(item: dict, tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


class DicomWebSource:
    """Studies from a DICOMweb server, and SEGs stored back to it.

    Args:
        url: the DICOMweb root, e.g. ``http://pacs:8042/dicom-web`` (Orthanc) or
            ``https://pacs.hospital.org/dicomweb``.
        token: bearer token (``Authorization: Bearer ...``).
        user, password: HTTP basic authentication.
        ca_bundle: CA certificate file to verify an HTTPS server.
        timeout: seconds per HTTP request.
        attempts: tries per request (dicomweb-client retries refused connections and HTTP
            429/408/503/504 with exponential back-off: 1 s, 2 s, 4 s...).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        ca_bundle: str | os.PathLike | None = None,
        timeout: float = 120.0,
        attempts: int = 3,
    ) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.url = url.rstrip("/")
        session = _TimeoutSession(timeout)
        if user is not None:
            session.auth = (user, password or "")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        if ca_bundle is not None:
            session.verify = str(ca_bundle)
        self.client = DICOMwebClient(self.url, session=session, headers=headers)
        self.client.set_http_retry_params(retry=attempts > 1, max_attempts=max(int(attempts), 1))

    @classmethod
    def from_env(cls, url: str, timeout: float = 120.0, attempts: int = 3) -> DicomWebSource:
        """A source whose credentials come from ``MONAI_SAM_DICOMWEB_*`` environment variables."""
        env = os.environ.get
        return cls(
            url,
            token=env("MONAI_SAM_DICOMWEB_TOKEN") or None,
            user=env("MONAI_SAM_DICOMWEB_USER") or None,
            password=env("MONAI_SAM_DICOMWEB_PASSWORD") or None,
            ca_bundle=env("MONAI_SAM_DICOMWEB_CA_BUNDLE") or None,
            timeout=timeout,
            attempts=attempts,
        )

    def _fail(self, what: str, err: Exception) -> DicomWebError:
        if isinstance(err, requests.exceptions.ConnectionError):
            return DicomWebError(
                f"DICOMweb server {self.url} cannot be reached while trying to {what} "
                f"(is it running, and is the URL right?): {err.__class__.__name__}: {err}"
            )
        if isinstance(err, requests.exceptions.Timeout):
            return DicomWebError(f"DICOMweb server {self.url} did not answer in time while trying to {what}")
        if isinstance(err, requests.exceptions.HTTPError) and err.response is not None:
            code = err.response.status_code
            hint = {
                401: " (credentials missing or wrong: see MONAI_SAM_DICOMWEB_*)",
                403: " (not allowed)",
                404: " (not found)",
            }.get(code, "")
            return DicomWebError(f"DICOMweb server {self.url}: {what} failed with HTTP {code}{hint}")
        return DicomWebError(f"DICOMweb server {self.url}: {what} failed: {err.__class__.__name__}: {err}")

    def series_of_study(self, study_uid: str) -> list[dict]:
        """QIDO-RS: the series of a study (DICOM JSON); an unknown study is a `DicomWebError`."""
        try:
            found = self.client.search_for_series(
                study_instance_uid=study_uid, fields=[_MODALITY, _N_INSTANCES, "SeriesDescription"]
            )
        except requests.exceptions.HTTPError as err:
            if err.response is not None and err.response.status_code == 404:
                found = []
            else:
                raise self._fail(f"search study {study_uid}", err) from err
        except requests.exceptions.RequestException as err:
            raise self._fail(f"search study {study_uid}", err) from err
        if not found:
            raise DicomWebError(
                f"study {study_uid} is not on DICOMweb server {self.url} (QIDO-RS found no series)"
            )
        return found

    def fetch_study(
        self, study_uid: str, dest: str | os.PathLike, modalities: Sequence[str] = ("CT", "MR")
    ) -> tuple[Path, str | None]:
        """WADO-RS: download the study's image series of ``modalities`` into ``dest``.

        Returns:
            (folder, series UID): the series UID when exactly one series was downloaded,
            else None (the caller picks among them with the usual checks).
        """
        dest = Path(dest)
        wanted = {m.upper() for m in modalities}
        series = self.series_of_study(study_uid)
        chosen = []
        for item in series:
            uid, modality = _tag(item, _SERIES_UID), (_tag(item, _MODALITY) or "").upper()
            if uid is None:
                continue
            if modality in NON_IMAGE_MODALITIES or (modality and modality not in wanted):
                logger.debug("study %s: not downloading series %s (%s)", study_uid, uid, modality)
                continue
            chosen.append(uid)
        if not chosen:
            listing = ", ".join(f"{_tag(s, _SERIES_UID)} ({_tag(s, _MODALITY)})" for s in series)
            raise DicomWebError(
                f"study {study_uid} on {self.url} has no {'/'.join(sorted(wanted))} series: {listing}"
            )
        dest.mkdir(parents=True, exist_ok=True)
        for uid in chosen:
            try:
                datasets = self.client.retrieve_series(study_uid, uid)
            except requests.exceptions.RequestException as err:
                raise self._fail(f"retrieve series {uid} of study {study_uid}", err) from err
            folder = dest / uid
            folder.mkdir(exist_ok=True)
            for i, ds in enumerate(datasets):
                self._save(ds, folder / f"{i:05d}.dcm")
            logger.info(
                "study %s: retrieved series %s (%d instances) from %s",
                study_uid,
                uid,
                len(datasets),
                self.url,
            )
        return dest, chosen[0] if len(chosen) == 1 else None

    @staticmethod
    def _save(ds: pydicom.Dataset, path: Path) -> None:
        meta = getattr(ds, "file_meta", None)
        if meta is None or "TransferSyntaxUID" not in meta:
            raise DicomWebError(
                f"{path.name}: retrieved instance {ds.get('SOPInstanceUID')} has no transfer syntax"
            )
        ds.save_as(path, write_like_original=False)

    def store(self, path: str | os.PathLike) -> None:
        """STOW-RS: store one DICOM file (a SEG) into its study on the server."""
        ds = pydicom.dcmread(path)
        what = f"store {Path(path).name} (SOP instance {ds.SOPInstanceUID}) into study {ds.StudyInstanceUID}"
        try:
            response = self.client.store_instances(datasets=[ds], study_instance_uid=str(ds.StudyInstanceUID))
        except requests.exceptions.RequestException as err:
            raise self._fail(what, err) from err
        failed = response.get(_FAILED_SOP_SEQUENCE) if response is not None else None
        if failed:
            reasons = [str(item.get("FailureReason", "?")) for item in failed]
            raise DicomWebError(f"DICOMweb server {self.url} refused to {what}: failure reason(s) {reasons}")
        logger.info("stored %s to %s", Path(path).name, self.url)
