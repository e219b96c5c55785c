#!/usr/bin/env python3
"""Orthanc (with its DICOMweb plugin) as segvol-label's DICOMweb server, on loopback.

  python scripts/orthanc.py start [--port 8042] [--dir build/orthanc] [--user U --password P]
  python scripts/orthanc.py load  [--port 8042] [--studies FOLDER] [...]
                                           every CT (.nii.gz, HU) of FOLDER (default sample-datastore)
                                           as a DICOM series
  python scripts/orthanc.py stop  [--dir build/orthanc]
Orthanc comes from Debian (apt-get install orthanc orthanc-dicomweb); its data stays in --dir.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def config(port: int, folder: Path, user: str | None, password: str | None) -> dict:
    cfg = {
        "Name": "segvol-label",
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "DicomServerEnabled": False,
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        "AuthenticationEnabled": bool(user),
    }
    if user:
        cfg["RegisteredUsers"] = {user: password or ""}
    return cfg


def start(
    port: int, folder: Path, user: str | None = None, password: str | None = None, timeout: float = 60
) -> subprocess.Popen:
    """Start Orthanc and wait until it answers; its PID goes to folder/orthanc.pid."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "orthanc.json").write_text(json.dumps(config(port, folder, user, password), indent=1))
    log = open(folder / "orthanc.log", "ab")  # noqa: SIM115 - the process keeps it
    proc = subprocess.Popen(
        ["Orthanc", str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    (folder / "orthanc.pid").write_text(str(proc.pid))
    auth = (user, password) if user else None
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited ({proc.returncode}); see {folder / 'orthanc.log'}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/system", auth=auth, timeout=2).ok:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"Orthanc did not answer on port {port} within {timeout} s")


def stop(folder: Path) -> None:
    pid_file = folder / "orthanc.pid"
    if not pid_file.is_file():
        return
    try:
        os.killpg(int(pid_file.read_text()), signal.SIGTERM)
    except ProcessLookupError:
        pass
    pid_file.unlink()


def upload_series(series_dir: Path, port: int, user: str | None = None, password: str | None = None) -> str:
    """POST every file of a series to Orthanc; returns the SeriesInstanceUID."""
    auth = (user, password) if user else None
    uid = ""
    for f in sorted(series_dir.glob("*.dcm")):
        r = requests.post(f"http://127.0.0.1:{port}/instances", data=f.read_bytes(), auth=auth, timeout=60)
        r.raise_for_status()
        tags = requests.get(
            f"http://127.0.0.1:{port}/instances/{r.json()['ID']}/simplified-tags", auth=auth, timeout=60
        ).json()
        uid = tags["SeriesInstanceUID"]
    return uid


def load_samples(
    port: int,
    work: Path,
    user: str | None = None,
    password: str | None = None,
    studies: Path = ROOT / "sample-datastore",
) -> dict[str, str]:
    """Every CT of the sample datastore as a DICOM series in Orthanc: name -> SeriesInstanceUID."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from dicom_series import write_series

    out = {}
    for vol in sorted(studies.glob("*.nii.gz")):
        name = vol.name[: -len(".nii.gz")]
        series_dir = work / "dicom" / name
        if not any(series_dir.glob("*.dcm")):
            write_series(vol, series_dir, name)
        out[name] = upload_series(series_dir, port, user, password)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("start", "load", "stop"))
    p.add_argument("--port", type=int, default=int(os.environ.get("SEGVOL_ORTHANC_PORT", 8042)))
    p.add_argument("--dir", type=Path, default=Path(os.environ.get("SEGVOL_ORTHANC_DIR", ROOT / "build" / "orthanc")))
    p.add_argument("--user", default=os.environ.get("MONAI_LABEL_DICOMWEB_USERNAME"))
    p.add_argument("--password", default=os.environ.get("MONAI_LABEL_DICOMWEB_PASSWORD"))
    p.add_argument("--studies", type=Path, default=ROOT / "sample-datastore", help="folder of CTs to load")
    a = p.parse_args(argv)
    if a.action == "start":
        start(a.port, a.dir, a.user, a.password)
        print(f"Orthanc on http://127.0.0.1:{a.port} (DICOMweb: /dicom-web), data in {a.dir}")
    elif a.action == "load":
        for name, uid in load_samples(a.port, a.dir, a.user, a.password, studies=a.studies).items():
            print(f"{name}: SeriesInstanceUID {uid}")
    else:
        stop(a.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
