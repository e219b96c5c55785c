"""A real Orthanc archive (Debian package) for tests, loaded with the sample CTs."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tempfile

import pydicom
import pytest
import requests

import orthanc  # noqa: E402
from conftest import ROOT
from server import free_port

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

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

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
        return sorted(segs, key=lambda d: (str(d.get("ContentDate", "")), str(d.get("ContentTime", ""))))

    def store(self, dataset: pydicom.Dataset) -> None:
        """STOW-RS, as another tool would store its SEG."""
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session_from_user_pass

        web = DICOMwebClient(f"{self.url}/dicom-web", session=create_session_from_user_pass(USER, PASSWORD))
        web.store_instances([dataset])

    def series_files(self, name: str) -> list:
        return sorted((self.folder / "dicom" / name).glob("*.dcm"))

    def segs_series(self) -> list[str]:
        """The UID of every SEG series in the archive (QIDO)."""
        return [s["0020000E"]["Value"][0] for s in self.get("/dicom-web/series", params={"Modality": "SEG"}).json()]

    def study_of(self, series: str) -> str:
        found = self.get("/dicom-web/series", params={"SeriesInstanceUID": series}).json()
        return found[0]["0020000D"]["Value"][0]


def dciodvfy_errors(dataset: pydicom.Dataset) -> list[str]:
    """The Error lines of dciodvfy (dicom3tools, the standard's validator) on ``dataset``."""
    if not shutil.which("dciodvfy"):
        pytest.fail("dciodvfy is not installed (apt-get install dicom3tools; SEGVOL_BROWSER=1 scripts/setup.sh does)")
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
        dataset.save_as(f.name)
        out = subprocess.run(["dciodvfy", f.name], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


CATEGORY = {"CodingSchemeDesignator": "SCT", "CodeValue": "123037004", "CodeMeaning": "Anatomical Structure"}


def foreign_seg(ct_files: list, label_ijk, segments: list[tuple[str, dict]], shift_mm: float = 0.0) -> pydicom.Dataset:
    """A SEG as another tool writes it (pydicom-seg, in-plane cropping, empty slices dropped, as dcmqi
    does): segment n = value n of ``label_ijk``, named and coded by ``segments`` [(label, type
    code)]. ``shift_mm`` moves it along the slice axis (off the CT's slices for a half slice)."""
    import numpy as np
    import pydicom_seg
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in ct_files])
    ct = reader.Execute()
    image = sitk.GetImageFromArray(np.ascontiguousarray(label_ijk.transpose(2, 1, 0)))
    image.CopyInformation(ct)
    if shift_mm:
        normal = np.array(ct.GetDirection()).reshape(3, 3)[:, 2]
        image.SetOrigin(tuple(np.array(ct.GetOrigin()) + shift_mm * normal))
    attributes = [
        {
            "labelID": n,
            "SegmentLabel": label,
            "SegmentAlgorithmType": "MANUAL",
            "SegmentedPropertyCategoryCodeSequence": CATEGORY,
            "SegmentedPropertyTypeCodeSequence": code,
        }
        for n, (label, code) in enumerate(segments, start=1)
    ]
    template = pydicom_seg.template.from_dcmqi_metainfo(
        {
            "ContentCreatorName": "Other^Tool",
            "SeriesDescription": "another tool",
            "SeriesNumber": "42",
            "InstanceNumber": "1",
            "segmentAttributes": [attributes],
        }
    )
    writer = pydicom_seg.MultiClassWriter(template=template, inplane_cropping=True, skip_empty_slices=True)
    return writer.write(image, [pydicom.dcmread(str(f), stop_before_pixels=True) for f in ct_files])


def dicomweb_server(url: str, work, log_name: str = "server.log", **conf: str):
    """A MONAI Label server (seeded tiny model) on the DICOMweb archive at ``url``, with its basic auth;
    servers given the same ``work`` folder share one datastore cache (and team state)."""
    from server import Server

    return Server(
        f"{url}/dicom-web",
        {"weights": "seeded", "model_config": "segvol-tiny", **conf},
        work / log_name,
        extra_env={
            "MONAI_LABEL_DICOMWEB_USERNAME": USER,
            "MONAI_LABEL_DICOMWEB_PASSWORD": PASSWORD,
            "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "cache"),
        },
    )


def save_liver(url: str, image: str, label, client: str) -> requests.Response:
    """A final label saved through the server as a client sends it: the label as raw bytes on the
    image grid (Fortran order), its value 1 named "liver"."""
    return requests.put(
        f"{url}/datastore/label",
        params={"image": image, "tag": "final"},
        files={
            "params": (None, json.dumps({"client_id": client, "label_info": [{"name": "liver"}]})),
            "label": ("label.bin", label.tobytes(order="F")),
        },
        timeout=120,
    )
