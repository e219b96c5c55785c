"""Uncertainty scores, computed in the background and kept in the team store.

Score of an image: the mean binary entropy of SegVol's zoom-out prediction (one encoder pass, text
prompts only) over the team's categories: those in its final labels, else the first three auto
labels. One scorer runs per team store (a lock file beside it; another process takes over when the
holder dies): it scores the unlabelled images the served model has not scored yet, those never
scored first, one image per model lock, pausing between images so that a waiting prompt runs
next. It looks again every ``poll`` seconds and when woken (a promotion, a new series, a save),
so a promoted model re-scores in the background while Next image answers from the earlier scores.
The encodings it makes do not stay in the predictor's cache (segvol/engine.py zoom_out_logits).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch

from lib.serving.host import ModelHost
from lib.team.scores import Scores
from lib.team.store import TeamStore
from lib.team.unreadable import Unreadable
from segvol.io import ImageReadError, read_volume
from segvol.postgres import DatabaseUnavailable

log = logging.getLogger(__name__)


def mean_entropy(logits: torch.Tensor) -> float:
    p = torch.sigmoid(logits.float()).clamp(1e-6, 1 - 1e-6)
    return float((-(p * p.log() + (1 - p) * (1 - p).log())).mean() / torch.log(torch.tensor(2.0)))


def team_categories(store: TeamStore, auto_labels: tuple[str, ...]) -> list[str]:
    """The categories Next image scores by default: those in the team's final labels, else the
    first three auto labels."""
    with store.connect() as db:
        rows = db.execute("SELECT DISTINCT segments FROM saves WHERE tag = 'final'").fetchall()
    names = {s["name"] for r in rows for s in json.loads(r["segments"])}
    return sorted(names) or list(auto_labels[:3])


def score_image(service: ModelHost, path: str, names: list[str]) -> tuple[float, str]:
    """The image's score and the model version that gave it (ImageReadError when it cannot be read)."""
    return score_volume(service, read_volume(path).array, names)


def score_volume(service: ModelHost, image_ijk: np.ndarray, names: list[str]) -> tuple[float, str]:
    """The score of an image already read: ``python apps/segvol preannotate`` scores the series it
    segments, its zoom-out encoding still cached (decoder passes only)."""
    predictor = service.wait()
    with service.lock:
        service.sync_version()
        logits = predictor.zoom_out_logits(image_ijk, names)
        return sum(mean_entropy(x) for x in logits) / len(names), service.version


class BackgroundScorer:
    def __init__(
        self,
        service: ModelHost,
        store: TeamStore,
        datastore: Callable[[], object],
        unreadable: Unreadable,
        poll: float = 5.0,
        pause: float = 0.05,
    ) -> None:
        self.service = service
        self.store = store
        self.scores = Scores(store)
        self.datastore = datastore
        self.unreadable = unreadable
        self.poll = poll
        self.pause = pause
        self._lock = store.lock("scorer")  # one scorer for the team, on whichever host takes it
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.holder = False  # whether this process is the one scoring
        self.current: str | None = None
        self.passes = 0  # images scored by this process

    def categories(self) -> list[str]:
        return team_categories(self.store, self.service.settings.auto_labels)

    def todo(self, names: list[str]) -> list[str]:
        """Unlabelled images the served model has not scored: never scored first, then the stale ones."""
        images = [i for i in self.datastore().get_unlabeled_images() if not self.unreadable.has(i)]
        newest = self.scores.newest(names, self.service.version)
        stale = [i for i in images if i in newest and newest[i].model_version != self.service.version]
        return [i for i in images if i not in newest] + stale

    def score(self, image: str, names: list[str]) -> float | None:
        """Score one image and store it (None: it cannot be read, now listed as unreadable)."""
        self.current = image
        t0 = time.perf_counter()
        try:
            datastore = self.datastore()
            read_once = getattr(datastore, "read_once", None)  # ours; MONAI Label's datastores: the file
            with read_once(image) if read_once else nullcontext(datastore.get_image_uri(image)) as path:
                value, version = score_image(self.service, path, names)
        except ImageReadError as e:
            self.unreadable.add(image, str(e))
            return None
        finally:
            self.current = None
        self.scores.put(image, names, version, value, time.perf_counter() - t0)
        self.passes += 1
        return value

    def run_pass(self) -> int:
        """Score what the served model has not scored yet; stops early when the model changes (the
        next pass starts over with the new one) or the scorer is stopped. Returns the images scored."""
        if self.service.lock.acquire(blocking=False):  # a promotion made meanwhile is scored from now on
            try:
                self.service.sync_version()
            finally:
                self.service.lock.release()
        names = self.categories()
        version = self.service.version
        done = 0
        for image in self.todo(names):
            if self._stop.is_set() or self.service.version != version:
                break
            if self.score(image, names) is not None:
                done += 1
            time.sleep(self.pause)  # a prompt waiting for the model lock takes it now
        if done:
            log.info("scored %d image(s) with model %s over %s", done, version, ", ".join(names))
        return done

    def progress(self) -> dict:
        """How far scoring has come for the served model, as /segvol/status tells it."""
        names = self.categories()
        images = set(self.datastore().get_unlabeled_images())
        scored = self.scores.scored(names, self.service.version) & images
        return {
            "model_version": self.service.version,
            "categories": names,
            "scored": len(scored),
            "unlabelled": len(images),
            "state": "scoring" if self.current else ("idle" if self.holder else "another process scores"),
            "scoring": self.current,
            "passes": self.passes,
        }

    # ------------------------------------------------------------------ the thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="segvol-scorer", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        self.service.wait()
        while not self._stop.is_set():
            if self.holder and not self._lock.held():  # a restarted database ended the session and its lock
                self.holder = False
            if not self.holder:
                try:
                    self.holder = self._lock.acquire(timeout=0)
                except DatabaseUnavailable as e:
                    log.warning("background scoring waits for the team store: %s", e)
                if self.holder:
                    log.info("background scoring: this process scores the unlabelled images")
            done = 0
            if self.holder:
                try:
                    done = self.run_pass()
                except DatabaseUnavailable as e:
                    log.warning("background scoring waits for the team store: %s", e)
                except Exception:  # the model or the archive failed this once: log it, try again later
                    log.exception("background scoring failed; trying again in %.0f s", self.poll)
            if not done:
                self._wake.wait(self.poll)
                self._wake.clear()
