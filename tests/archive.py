"""A real Orthanc archive (Debian package) for tests, loaded with the sample CTs."""

from __future__ import annotations

import io
import shutil
import sys

import pydicom
import pytest
import requests

from conftest import ROOT
from server import free_port

sys.path.insert(0, str(ROOT / "scripts"))
import orthanc  # noqa: E402

USER, PASSWORD = "annotator", "s3cret"


class Archive:
    def __init__(self, folder, port: int | None = None, studies=ROOT / "sample-datastore"):
        """Orthanc with every CT of ``studies`` (NIfTI) as a DICOM series (name -> series UID)."""
        if not shutil.which("Orthanc"):
            pytest.fail("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; scripts/setup.sh does)")
        self.folder, self.port = folder, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()
        self.series = orthanc.load_samples(self.port, self.folder, USER, PASSWORD, studies=studies)

    def start(self):
        self.proc = orthanc.start(self.port, self.folder, USER, PASSWORD)

    def stop(self):
        orthanc.stop(self.folder)
        self.proc.wait(20)

    def get(self, path, **kw):
        return requests.get(self.url + path, auth=(USER, PASSWORD), timeout=30, **kw)

    def segs(self, series: str | None = None) -> list[pydicom.Dataset]:
        """Every SEG instance in the archive (referencing ``series``, if given), oldest first."""
        found = requests.post(
            f"{self.url}/tools/find",
            auth=(USER, PASSWORD),
            timeout=30,
            json={"Level": "Instance", "Query": {"Modality": "SEG"}},
        ).json()
        segs = [pydicom.dcmread(io.BytesIO(self.get(f"/instances/{i}/file").content)) for i in found]
        if series is not None:
            segs = [d for d in segs if d.ReferencedSeriesSequence[0].SeriesInstanceUID == series]
        return sorted(segs, key=lambda d: (str(d.SeriesDate), str(d.SeriesTime), str(d.get("ContentTime", ""))))

    def study_of(self, series: str) -> str:
        found = self.get("/dicom-web/series", params={"SeriesInstanceUID": series}).json()
        return found[0]["0020000D"]["Value"][0]


def dicomweb_server(url: str, work, **conf: str):
    """A MONAI Label server (seeded tiny model) on the DICOMweb archive at ``url``, with its basic auth."""
    from server import Server

    return Server(
        f"{url}/dicom-web",
        {"weights": "seeded", "model_config": "segvol-tiny", **conf},
        work / "server.log",
        extra_env={
            "MONAI_LABEL_DICOMWEB_USERNAME": USER,
            "MONAI_LABEL_DICOMWEB_PASSWORD": PASSWORD,
            "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "cache"),
        },
    )
