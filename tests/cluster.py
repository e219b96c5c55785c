"""Replicas of the app behind a real HAProxy (scripts/replicas.py, as `serve.sh --replicas` runs
them) on a DICOMweb archive, for the tests."""

from __future__ import annotations

import os

from archive import PASSWORD, USER
from replicas import Cluster  # noqa: E402
from server import free_port


def replica_cluster(work, archive, **conf: str) -> Cluster:
    """Two replicas (seeded tiny model) on ``archive`` behind HAProxy, their state under ``work``;
    a context manager, as ``Cluster`` is."""
    conf = {
        "weights": "seeded",
        "model_config": "segvol-tiny",
        "zoom_in": "false",
        "versions_dir": str(work / "versions"),
        "archive_refresh_seconds": "1",
        **conf,
    }
    args = [x for k, v in conf.items() for x in ("--conf", k, v)]
    env = {
        "MONAI_LABEL_DICOMWEB_USERNAME": USER,
        "MONAI_LABEL_DICOMWEB_PASSWORD": PASSWORD,
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    return Cluster(
        f"{archive.url}/dicom-web",
        2,
        work / "replicas",
        port=free_port(),
        replica_ports=[free_port(), free_port()],
        args=args,
        env={**os.environ, **env},
    )
