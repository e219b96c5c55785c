"""Pre-annotation of an archive or a folder with Ray: a draft label per series, for annotators to
correct (``python apps/segvol preannotate``).

Ray Data hands the series to a pool of actors, one model each (one GPU each where the cluster has
GPUs). An actor reads a series as the app does for inference (the datastore's NIfTI of it),
segments the categories with text prompts in one engine call and stores the label map as a draft
through the app's datastore: in the archive a SEG marked as a draft, every segment AUTOMATIC; in a
folder MONAI Label's ``original`` label. Drafts are never final labels (lib/archive/index.py), so rounds
do not learn from them and the images stay unlabelled for the next-image strategies.

What is done is read from what is stored, not from a progress file: a series with any label or
draft is skipped, so a stopped run resumes where it was and a second run has nothing to do. A
series that fails (unreadable, corrupt) is a failed row, never the end of the run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import segvol
from lib.activelearning.scorer import score_volume, team_categories
from lib.datastores import CheckedLabels, open_datastore
from lib.labels.checks import LabelPart
from lib.serving.host import ModelHost
from lib.serving.params import PromptBuilder, with_texts
from lib.settings import AppSettings
from lib.team.scores import Scores
from lib.team.team import Team
from segvol.vocabulary import default_vocabulary

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[2]  # apps/segvol
CREATOR = "SegVol pre-annotation"  # ContentCreatorName of the drafts, client of their provenance
OK, EMPTY, FAILED = "ok", "empty", "failed"


class PreannotateError(ValueError):
    """A run that cannot start (unknown category, more workers than the cluster holds, ...)."""


@dataclass(frozen=True)
class Job:
    """Everything an actor needs, sent to every one of them (so it must pickle)."""

    studies: str  # DICOMweb URL or folder
    categories: tuple[str, ...]  # trained names
    conf: dict[str, str]  # the app's --conf keys: weights, model_config, zoom_in, device, versions_dir
    cache: str | None = None  # DICOMweb downloads (each series removed once done)
    team_db: Path | None = None  # the server's team state: drafts are recorded there as served results

    def settings(self) -> AppSettings:
        # one image at a time, never revisited: no encodings kept beyond the current one
        return AppSettings.from_conf({"cache_mb": "0", **self.conf}, APP_DIR / "model")

    def open_store(self, service: ModelHost, team: Team) -> CheckedLabels:
        return open_datastore(service, team, self.studies, cache_path=self.cache)


def resolve_categories(names: list[str]) -> tuple[str, ...]:
    """Trained names for the typed ones; a name outside the vocabulary stops the run before it
    starts (a typo would cost a whole archive's worth of model time)."""
    vocabulary = default_vocabulary()
    out = []
    for name in names:
        found = vocabulary.resolve(name)
        if found.category is None:
            hint = f"; closest: {', '.join(found.suggestions)}" if found.suggestions else ""
            raise PreannotateError(f"{name!r} is not a SegVol category{hint} (python -m segvol categories)")
        out.append(found.category.name)
    if not out:
        raise PreannotateError("no categories: give --categories liver,spleen,...")
    return tuple(dict.fromkeys(out))


def _reason(e: Exception) -> str:
    """One line for the summary: the HTTP detail of a datastore error, else type and message
    (without the source paths ITK puts in its messages)."""
    detail = getattr(e, "detail", None)
    text = str(detail) if detail is not None else f"{type(e).__name__}: {e}"
    text = re.sub(r"\S+\.(?:hxx|cxx|cpp|h):\d+:", "", text)
    return re.sub(r"\s+", " ", text).strip()[:400]


class Annotator:
    """A Ray actor: loads SegVol once, then pre-annotates one series per call."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.service = ModelHost(job.settings())
        self.service.load()
        self.service.wait(0)  # raises with the reason when the weights did not load
        self.team = Team(self.service.settings.lease_minutes)
        if job.team_db is not None:
            self.team.open(job.team_db)
        self.store = job.open_store(self.service, self.team)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [self.annotate(str(series)) for series in batch["series"]]
        return {key: [row[key] for row in rows] for key in rows[0]}

    def annotate(self, series: str) -> dict:
        t0 = time.perf_counter()
        row = {"series": series, "status": FAILED, "error": "", "stored": "", "voxels": "{}", "seconds": 0.0}
        try:
            volume = self.service.read(self.store.get_image_uri(series))
            builder = PromptBuilder(self.service.vocabulary, volume.array.shape)
            targets = with_texts(builder, list(self.job.categories), [], [], None)
            seg = self.service.segment(volume, [t.prompt for t in targets], [t.value for t in targets])
            self.score(series, volume.array)
            counts = np.bincount(seg.labelmap.ravel(), minlength=256)
            voxels = {t.name: int(counts[t.value]) for t in targets}
            row["voxels"] = json.dumps(voxels)
            if not any(voxels.values()):
                row["status"] = EMPTY  # nothing to correct; tried again by the next run
                return row
            vocabulary = self.service.vocabulary
            parts = [LabelPart(t.value, t.name, vocabulary.categories[t.value - 1]) for t in targets if voxels[t.name]]
            row["stored"] = self.store.store_draft(series, seg.labelmap, parts, CREATOR, seg.model_version)
            if self.team.provenance is not None:  # an unedited draft saved later is AUTOMATIC
                prompts = [{"name": t.name, "value": t.value, "text": t.sent} for t in targets]
                names = {t.value: t.name for t in targets}
                total = seg.timings.get("total", 0.0)
                self.team.provenance.record(
                    series, CREATOR, seg.model_version, "preannotate", prompts, seg.labelmap, names, total
                )
            row["status"] = OK
        except Exception as e:  # any series may be broken; the run goes on and reports it
            log.warning("series %s failed: %s", series, _reason(e))
            row["error"] = _reason(e)
        finally:
            row["seconds"] = round(time.perf_counter() - t0, 3)
            self.store.release(series)
        return row

    def score(self, series: str, image_ijk: np.ndarray) -> None:
        """Store the series' uncertainty for Next image (lib/activelearning/scorer.py) in the
        server's team store, when the run was given one: what the server's background scorer would
        otherwise compute again, one encoder pass per series."""
        if self.team.store is None:
            return
        t0 = time.perf_counter()
        names = team_categories(self.team.store, self.service.settings.auto_labels)
        value, version = score_volume(self.service, image_ijk, names)
        Scores(self.team.store).put(series, names, version, value, time.perf_counter() - t0)


@dataclass
class Report:
    studies: str
    workers: int
    total: int  # series in the archive or folder
    skipped: int  # already labelled or drafted
    rows: list[dict]
    seconds: float = 0.0  # the pipeline: actors starting, models loading, every series
    first: float = 0.0  # until the first result: actors starting, models loading, one series

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r["status"] == status)

    @property
    def series_per_minute(self) -> float:
        return 60.0 * len(self.rows) / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        lines = [
            f"pre-annotation of {self.studies}: {self.total} series, {self.skipped} skipped "
            "(a label or a draft is stored)",
            f"  done    {self.count(OK):4d}  (a draft stored)",
            f"  empty   {self.count(EMPTY):4d}  (no voxel of any category: nothing stored, tried again next run)",
            f"  failed  {self.count(FAILED):4d}",
        ]
        lines += [f"    {r['series']}: {r['error']}" for r in self.rows if r["status"] == FAILED]
        if self.rows:
            mean = sum(r["seconds"] for r in self.rows) / len(self.rows)
            lines.append(
                f"{len(self.rows)} series in {self.seconds:.1f} s with {self.workers} worker(s): "
                f"{self.series_per_minute:.2f} series/min, models loading included (first result after "
                f"{self.first:.1f} s); {mean:.2f} s per series in a worker"
            )
        return "\n".join(lines)


def plan(job: Job) -> tuple[list[str], int]:
    """The series to do (those with no label and no draft stored) and how many are skipped."""
    settings = job.settings()
    store = job.open_store(ModelHost(settings), Team(settings.lease_minutes))  # no model needed to list
    images = store.list_images()
    done = store.annotated_images()
    todo = sorted(i for i in images if i not in done)
    return todo, len(images) - len(todo)


def _start_ray(address: str | None, cpus: int | None) -> None:
    """A local Ray instance sized for this run (no dashboard, small object store), or the cluster
    at ``address``. Our code travels with the job (py_modules) and so do MONAI Label's settings
    (the archive's credentials): the cluster's Python needs the dependencies only."""
    import ray

    runtime_env = {
        "py_modules": [str(Path(segvol.__file__).parent), str(APP_DIR / "lib")],
        "env_vars": {k: v for k, v in os.environ.items() if k.startswith("MONAI_LABEL_")},
    }
    local = {}
    if not address:
        local = dict(num_cpus=cpus or os.cpu_count(), object_store_memory=256 * 2**20, include_dashboard=False)
    ray.init(
        address=address or "local",
        runtime_env=runtime_env,
        logging_level=logging.WARNING,
        log_to_driver=False,
        **local,
    )


def run(job: Job, workers: int, address: str | None = None, cpus: int | None = None) -> Report:
    """Pre-annotate every series without a label or draft, ``workers`` actors at a time."""
    if workers < 1:
        raise PreannotateError(f"--workers {workers}: at least 1")
    todo, skipped = plan(job)
    workers = min(workers, max(len(todo), 1))  # no idle model
    report = Report(job.studies, workers, len(todo) + skipped, skipped, [])
    if not todo:
        return report
    for key, value in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_DEDUP_LOGS", "0")):
        os.environ.setdefault(key, value)
    import ray
    import ray.data
    from tqdm import tqdm

    _start_ray(address, cpus)
    try:
        resources = ray.cluster_resources()
        gpus, cpus_total = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if workers > (gpus or cpus_total):
            kind = "GPUs" if gpus else "CPUs"
            raise PreannotateError(f"{workers} workers need {workers} {kind}; the Ray cluster has {gpus or cpus_total}")
        per_worker = {"num_cpus": max(1, cpus_total // workers)}  # Ray sets each actor's torch threads from it
        if gpus:
            per_worker["num_gpus"] = 1
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts series, not blocks
        rows = ray.data.from_items([{"series": s} for s in todo]).map_batches(
            Annotator,
            fn_constructor_args=(job,),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            **per_worker,
        )
        t0 = time.perf_counter()
        try:
            for row in tqdm(rows.iter_rows(), total=len(todo), unit="series", disable=None):  # a terminal only
                report.rows.append(dict(row))
                report.first = report.first or time.perf_counter() - t0
        except ray.exceptions.RayError as e:  # a worker that cannot load its model, or died
            reason = str(e).strip().splitlines()[-1]
            raise PreannotateError(
                f"the run stopped after {len(report.rows)} series: {reason} (drafts stored so far stay; "
                "a new run goes on from there)"
            ) from e
        report.seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return report
