"""The model host: one SegVol model and predictor shared by every infer task of the app, the
decoder version it serves (synced with the versions folder before every request), and its lock.

Loading happens once, in the background after start-up; requests wait for it. The
predictor keeps the encodings of the image last used, so a further prompt on the same
image (from any user or task) costs decoder passes only. One request runs the model
at a time.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from lib.settings import AppSettings
from segvol.engine import Prediction, SegVolPredictor
from segvol.io import Volume, read_volume
from segvol.model import CONFIGS, SegVol
from segvol.postgres import is_url
from segvol.preprocess import digest
from segvol.prompts import Prompt
from segvol.training.finetune import trainable_state
from segvol.training.versions import BASE, VersionError, VersionStore
from segvol.vocabulary import Vocabulary, default_vocabulary
from segvol.weights import WeightsError, find_or_download, load_segvol

log = logging.getLogger(__name__)

SEEDED_WARNING = (
    "SERVING UNTRAINED SEEDED WEIGHTS (--conf weights seeded): masks are noise, "
    "for demos and tests only; this is not the SegVol model"
)


class ServiceUnavailable(RuntimeError):
    """The model is not loaded (still loading, or its weights are missing)."""


@dataclass
class Segmentation:
    predictions: list[Prediction]
    labelmap: np.ndarray  # uint8, the image grid, ``values[n]`` where target n won
    voxels: list[int]  # foreground voxels of each target's own mask
    timings: dict[str, float]
    model_version: str  # the version that made it (a promotion may land right after)


class ModelHost:
    def __init__(self, settings: AppSettings, vocabulary: Vocabulary | None = None) -> None:
        self.settings = settings
        self.vocabulary = vocabulary or default_vocabulary()
        self.predictor: SegVolPredictor | None = None
        self.version = "not loaded"
        self.base_version = "not loaded"
        self.decoder_version = BASE
        self.versions = versions_of(settings)
        self._base_state: dict | None = None
        self.error: str | None = None
        self._ready = threading.Event()
        self.lock = threading.Lock()  # one model run at a time
        self._cached: tuple[tuple, Volume, str] | None = None  # (file identity, volume, content digest)

    @property
    def warning(self) -> str | None:
        return SEEDED_WARNING if self.settings.seeded else None

    # ------------------------------------------------------------------ loading
    def start(self) -> None:
        """Load in a background thread; requests wait until it is done."""
        threading.Thread(target=self.load, name="segvol-load", daemon=True).start()

    def load(self) -> None:
        if self.predictor is not None:
            return
        t0 = time.perf_counter()
        try:
            model = self._build()
            self.base_version = self.version
            self._base_state = trainable_state(model)
            s = self.settings
            self.predictor = SegVolPredictor(
                model,
                s.device,
                zoom_in=s.zoom_in,
                overlap=s.overlap,
                window_batch=s.window_batch,
                decode_batch=s.decode_batch,
                cache_mb=s.cache_mb,
                precision=s.precision,
            )
            self.sync_version()
            # the model, the app and the libraries are some million objects that live as long as the
            # process: out of the collector's sight, a full collection (which holds the GIL, so the
            # event loop and /segvol/health wait) takes milliseconds, not a few tenths of a second
            gc.collect()
            gc.freeze()
            log.info("SegVol %s ready on %s in %.1f s", self.version, self.predictor.device, time.perf_counter() - t0)
            if self.warning:
                log.warning("!" * 20 + " %s " + "!" * 20, self.warning)
        except (WeightsError, RuntimeError, OSError) as e:
            self.error = str(e)
            log.error("SegVol is NOT available: %s", e)
        finally:
            self._ready.set()

    def _build(self) -> SegVol:
        s = self.settings
        if s.seeded:
            torch.manual_seed(0)
            self.version = f"seeded-untrained ({s.model_config}, seed 0)"
            return SegVol(CONFIGS[s.model_config]).eval()
        if s.model_config != "segvol-official":
            raise WeightsError(
                "--conf model_config applies to seeded weights only; a checkpoint's "
                "config is read from segvol_config.json beside it"
            )
        path = find_or_download(None if s.weights == "hub" else s.weights, s.model_dir)
        self.weights_path = path
        self.version = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
        return load_segvol(path)

    def sync_version(self) -> None:
        """Serve the version named in the versions folder's ACTIVE file. Called before every
        request (under the model lock), so a promotion or rollback takes effect at the next
        request; a damaged version is refused and the current one stays."""
        wanted = self.versions.active()
        if wanted == self.decoder_version or self.predictor is None:
            return
        try:
            state = self._base_state if wanted == BASE else self.versions.load(wanted)
            unknown = set(state) - set(self._base_state)
            if unknown:
                raise VersionError(f"version {wanted} has tensors outside the decoder: {sorted(unknown)[:3]}")
        except VersionError as e:
            log.error("keeping %s: %s", self.version, e)
            return
        self.predictor.model.load_state_dict(state, strict=False)
        self.decoder_version = wanted
        self.version = self.base_version if wanted == BASE else f"{self.base_version}+{wanted}"
        log.info("now serving %s", self.version)

    def wait(self, timeout: float = 600) -> SegVolPredictor:
        if not self._ready.wait(timeout):
            raise ServiceUnavailable("SegVol is still loading its weights; try again shortly")
        if self.predictor is None:
            raise ServiceUnavailable(f"SegVol is not available: {self.error}")
        return self.predictor

    # ------------------------------------------------------------------ inference
    def read(self, path: str) -> Volume:
        """The volume at ``path``, kept while its file is unchanged (no re-reading per click)."""
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
        cached = self._cached
        if cached is not None and cached[0] == key:
            return cached[1]
        volume = read_volume(path)
        self._cached = (key, volume, digest(volume.array))
        return volume

    def _content_key(self, volume: Volume) -> str:
        """The digest computed when ``volume`` was read (hashing a CT costs ~60 ms per request)."""
        cached = self._cached
        return cached[2] if cached is not None and cached[1] is volume else digest(volume.array)

    def segment(
        self, volume: Volume, prompts: list[Prompt], values: list[int], zoom_in: bool | None = None
    ) -> Segmentation:
        predictor = self.wait()
        with self.lock:
            self.sync_version()
            before = dict(predictor.timings)
            t0 = time.perf_counter()
            predictor.set_image(volume.array, key=self._content_key(volume))
            predictions = predictor.predict(prompts, zoom_in=zoom_in)
            t1 = time.perf_counter()
            labelmap = predictor.labelmap_on_image(predictions, values)
            voxels = [int(p.mask.sum()) for p in predictions]
            timings = {
                k: round(v - before.get(k, 0.0), 4) for k, v in predictor.timings.items() if v - before.get(k, 0.0) > 0
            }
            timings["post"] = round(time.perf_counter() - t1, 4)
            timings["total"] = round(time.perf_counter() - t0, 4)
            version = self.version
        return Segmentation(predictions, labelmap, voxels, timings, version)


def versions_of(settings: AppSettings) -> VersionStore:
    """The decoder versions: in the team database when it is PostgreSQL (every host serves what a
    round on any of them promoted), else in the versions folder."""
    if is_url(settings.team_db):
        from segvol.training.versions_db import DatabaseVersions

        return DatabaseVersions(settings.team_db, settings.versions_dir)
    return VersionStore(settings.versions_dir)
