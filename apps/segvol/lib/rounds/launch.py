"""A round in several processes: ``torchrun --standalone --nproc_per_node N apps/segvol round
--lock-held ...`` on the app's studies and ``--conf``, started by the process that holds train.lock
(the train task with ``train_processes`` > 1). Each process builds the round's parts (model host,
datastore) from the same studies and --conf (apps/segvol/__main__.py), so they share the versions
folder; rank 0 writes the progress, the version and the result, which comes back here.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
APP_DIR = Path(__file__).resolve().parents[2]  # apps/segvol: `python apps/segvol round` runs its __main__.py


@dataclass(frozen=True)
class AppArgs:
    """What builds the round's parts again in other processes: the studies (folder or DICOMweb URL), --conf."""

    studies: str
    conf: dict[str, str]


def round_command(processes: int, app: AppArgs, asked: dict, output: Path) -> list[str]:
    """The torchrun command line of a round in ``processes`` processes that writes its result to ``output``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd += [str(APP_DIR), "round", "--studies", app.studies, "--output", str(output), "--lock-held"]
    for key, value in app.conf.items():
        cmd += ["--conf", key, str(value)]
    for key, value in asked.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def launch(processes: int, app: AppArgs | None, asked: dict) -> dict:
    """The round in ``processes`` processes under torchrun (the caller holds train.lock meanwhile);
    rank 0's result."""
    if app is None:
        raise RuntimeError("train_processes > 1 needs the app's studies and --conf (SegVolApp passes them)")
    with tempfile.TemporaryDirectory(prefix="segvol-round-") as tmp:
        output = Path(tmp) / "result.json"
        cmd = round_command(processes, app, asked, output)
        log.info("round in %d processes: %s", processes, " ".join(cmd))
        code = subprocess.run(cmd, check=False).returncode  # its log lines go to this process's
        if code != 0:
            raise RuntimeError(f"the round's {processes} processes failed (torchrun exit {code}; log above)")
        return json.loads(output.read_text())
