"""segvol-label: SegVol in MONAI Label (OHIF and 3D Slicer clients)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask

import segvol
from lib.configs.segvol import SegVolTaskConfig
from lib.datastores import SegVolDICOMWebDatastore, open_datastore
from lib.serving.limits import MAX_NAME_CHARS
from lib.settings import HELP, ConfError
from lib.team.identity import IdentityError, client_of
from lib.team.leases import WithoutImages
from segvol.io import ImageReadError

log = logging.getLogger(__name__)


class SegVolApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        self.model_dir = os.path.join(app_dir, "model")
        os.makedirs(self.model_dir, exist_ok=True)
        self.task_config = SegVolTaskConfig()
        try:
            self.task_config.init("segvol", self.model_dir, conf, None)
        except ConfError as e:
            options = "\n".join(f"  --conf {k}: {v}" for k, v in HELP.items())
            raise SystemExit(f"segvol-label: {e}\nOptions:\n{options}") from e
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="segvol-label",
            description="SegVol: text, point and box prompted CT segmentation (223 categories)",
            version=segvol.__version__,
            labels=None,  # MONAI Label lists the tasks' labels in index order (OHIF wants a list here)
        )

    @property
    def service(self):
        return self.task_config.service

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            self.studies = self.studies.rstrip("/").strip()
        cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
        store = open_datastore(self.service, self.studies, cache_path, settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD)
        team_db = self.service.settings.team_db or Path(store._datastore_path) / ".segvol" / "team.sqlite"
        self.service.attach_store(team_db)
        return store

    def init_infers(self) -> dict[str, InferTask]:
        return self.task_config.infer()

    def init_strategies(self) -> dict:
        """``uncertainty`` first: OHIF's panel and our Next image use the first as the default."""
        from monailabel.tasks.activelearning.first import First

        from lib.activelearning.random_strategy import RandomStrategy
        from lib.activelearning.uncertainty import Uncertainty

        return {"uncertainty": Uncertainty(self.service), "random": RandomStrategy(), "first": First()}

    def next_sample(self, request: dict) -> dict:
        """The strategy's pick among the images no other annotator holds, leased to the asking
        client (lib/team/leases.py); {} when every image has a final label."""
        try:
            client = client_of(request)
        except IdentityError as e:
            raise HTTPException(status_code=e.status, detail=str(e)) from e
        self._check_labels(request.get("labels"))
        name = request.get("strategy") or "uncertainty"
        strategy = self._strategies.get(name)
        if strategy is None:
            raise HTTPException(
                status_code=404, detail=f"no strategy {name!r}; available: {', '.join(self._strategies)}"
            )
        candidates = WithoutImages(self.datastore(), self.service.unreadable.ids())
        result, note = self.service.leases.next_image(client, strategy, request, candidates, self.readable)
        if result is None:
            return {}
        result["path"] = self._datastore.get_image_uri(result["id"])
        result["client_id"] = client
        if note:
            result["note"] = note
            log.info("next image for %s: %s (%s)", client, result["id"], note)
        else:
            log.info("next image for %s: %s, leased until %s", client, result["id"], result["lease"]["until"])
        return result

    def _check_labels(self, labels: object) -> None:
        """A Next image request's ``labels``: category names only (each is model work per image)."""
        if labels is None:
            return
        names_ok = isinstance(labels, list) and all(isinstance(n, str) and 0 < len(n) <= MAX_NAME_CHARS for n in labels)
        if not names_ok:
            detail = f"labels must be a list of category names of 1 to {MAX_NAME_CHARS} characters"
            raise HTTPException(status_code=400, detail=detail)
        unknown = [n for n in labels if self.service.vocabulary.resolve(n).category is None]
        if unknown:
            raise HTTPException(status_code=400, detail=f"labels {unknown[:5]} are not SegVol categories (see /info)")

    def readable(self, image_id: str) -> bool:
        """Whether the image can be read (a folder's file may be truncated or not a volume); one
        that cannot is listed once (log and /segvol/status) and skipped by every strategy."""
        unreadable = self.service.unreadable
        if unreadable.has(image_id):
            return False
        try:
            self.datastore().check_readable(image_id)
        except ImageReadError as e:
            unreadable.add(image_id, str(e))
            return False
        return True

    def init_trainers(self) -> dict:
        return {"segvol": self.task_config.trainer(self.studies)}

    def on_init_complete(self) -> None:
        """The server process only (a training subprocess builds the app too, and must not send
        pending SEGs or start the scheduler a second time)."""
        super().on_init_complete()
        if isinstance(self._datastore, SegVolDICOMWebDatastore):
            try:
                self._datastore.flush_pending()
            except HTTPException as e:
                log.warning("pending SEGs stay pending: %s", e.detail)
        self.service.start()
        minutes = self.service.settings.train_every_minutes
        if minutes > 0:
            threading.Thread(target=self._scheduled_rounds, args=(minutes,), name="segvol-rounds", daemon=True).start()

    def new_final_labels(self) -> int:
        """Labels the last round did not use (on DICOMweb: SEG series, counted with QIDO only)."""
        store = self.service.versions
        names = store.names()
        used = {x.get("label") for x in store.meta(names[-1]).get("labels", [])} if names else set()
        return len(self.datastore().label_keys() - used)

    def start_round(self, why: str) -> None:
        log.info("starting a fine-tune round: %s", why)
        self.async_training("segvol")  # MONAI Label refuses a second one while one runs

    def on_save_label(self, image_id: str, label_id: str) -> dict:
        """Tells the client what was stored: who, from which model version, each segment's type
        (AUTOMATIC / SEMIAUTOMATIC with the voxels added and removed / MANUAL), the SEG series."""
        result = super().on_save_label(image_id, label_id) or {}
        saved = getattr(self.datastore().last_saved, "info", None) or {}
        for key in ("client", "model_version", "segments", "SeriesInstanceUID"):
            if key in saved:
                result[key] = saved[key]
        after = self.service.settings.train_after_labels
        if after > 0:
            new = self.new_final_labels()
            if new >= after:
                self.start_round(f"{new} new final labels (train_after_labels {after})")
        return result

    def _scheduled_rounds(self, minutes: float) -> None:
        while True:
            time.sleep(minutes * 60)
            try:
                if self.new_final_labels() > 0:
                    self.start_round(f"schedule (every {minutes:g} min) with new final labels")
            except Exception:  # a scheduler that dies silently is worse than a logged failure
                log.exception("scheduled round failed to start")

    def info(self) -> dict:
        meta = super().info()
        meta["model_version"] = self.service.version
        if self.service.error:
            meta["error"] = self.service.error
        if self.service.warning:
            meta["warning"] = self.service.warning
        return meta

    def infer(self, request: dict, datastore=None) -> dict:
        """Refuse unknown models and images with a 4xx before MONAI Label would treat an
        unknown id as a file path."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"no model {model!r}; available: {', '.join(self._infers)}")
        image = request.get("image")
        if isinstance(image, str) and image:
            if not self.knows_image(image):
                raise HTTPException(status_code=404, detail=f"no image {image!r} in the datastore")
            request = dict(request, image_id=image)  # MONAI Label replaces "image" with a file path
        elif not request.get("session_id"):
            raise HTTPException(status_code=400, detail="give ?image=<an id from /datastore/> or a session")
        return super().infer(request, datastore)

    def knows_image(self, image: object) -> bool:
        """Whether ``image`` is an id the datastore lists: the one test every route applies before
        an id becomes a path (lib/paths.py)."""
        return isinstance(image, str) and bool(image) and image in self.datastore().list_images()
