"""segvol-label: SegVol in MONAI Label (OHIF and 3D Slicer clients)."""

from __future__ import annotations

import logging
import os
import time
from functools import cached_property
from pathlib import Path

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.tasks.activelearning.first import First

import segvol
from lib.activelearning.random_strategy import RandomStrategy
from lib.activelearning.scorer import BackgroundScorer
from lib.activelearning.uncertainty import Uncertainty
from lib.compat.app import AppAccess
from lib.compat.stamps import StampWriter
from lib.configs.segvol import SegVolTaskConfig
from lib.datastores import open_datastore, studies_of
from lib.rounds.schedule import RoundSchedule
from lib.serving.host import ModelHost
from lib.serving.limits import MAX_NAME_CHARS
from lib.settings import HELP, ConfError
from lib.team.identity import IdentityError, client_of, current_roles, current_user
from lib.team.leases import WithImages, WithoutImages
from lib.team.team import Team, store_path
from segvol.io import ImageReadError

log = logging.getLogger(__name__)


class SegVolApp(AppAccess, MONAILabelApp):
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
    def service(self) -> ModelHost:
        return self.task_config.service

    @property
    def team(self) -> Team:
        return self.task_config.team

    def init_datastore(self) -> Datastore:
        self.studies = studies_of(self.studies)
        team = self.team
        store = open_datastore(self.service, team, self.studies, settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD)
        team.open(store_path(self.service.settings.team_db, store.root), Path(store.root) / ".segvol" / "held-saves")
        team.held.replay_save = self._replay_save
        team.held.start()
        return store

    def _replay_save(self, request: dict, upload: Path) -> None:
        """A save held while the team database was down, through the save route's pipeline, as its sender."""
        signed_in = current_user.set(request["user"]), current_roles.set(tuple(request.get("roles", ())))
        try:
            saved = self.datastore().save(request["image"], str(upload), request["tag"], request["params"])
        finally:
            current_user.reset(signed_in[0])
            current_roles.reset(signed_in[1])
        try:
            self.on_save_label(request["image"], saved.image)
        except Exception:  # stored: the round check runs at the next save
            log.exception("after the held save of %s", request["image"])

    def init_infers(self) -> dict[str, InferTask]:
        return self.task_config.infer()

    def init_strategies(self) -> dict:
        """``uncertainty`` first: OHIF's panel and our Next image use the first as the default."""
        return {
            "uncertainty": Uncertainty(self.service, self.team.unreadable, self.team.store),
            "random": RandomStrategy(),
            "first": First(),
        }

    @cached_property
    def stamps(self) -> StampWriter:
        return StampWriter(self.datastore)

    def sample(self, strategy: str, params: dict, user: str | None) -> dict:
        """MONAI Label's /activelearning answer (its endpoints/activelearning.py ``sample``): the
        pick with the image's info, the strategy stamped on it. Unlike there, the app's whole
        info() is not computed for each pick, the stamp is written in the background
        (lib/compat/stamps.py), and the answer is not logged whole (next_sample logs the pick)."""
        result = self.next_sample({**params, "strategy": strategy})
        if not result:
            return {}
        info = self.datastore().get_image_info(result["id"])
        stamp = dict(info.get("strategy") or {})
        stamp[strategy] = {"ts": int(time.time()), "client_id": params.get("client_id", user)}
        self.stamps.put(result["id"], {"strategy": stamp})
        return {**result, **info, "strategy": stamp}

    def next_sample(self, request: dict) -> dict:
        """The strategy's pick among the images no other annotator holds, leased to the asking
        client (lib/team/leases.py); {} when every image has a final label."""
        try:
            client = client_of(request)
        except IdentityError as e:
            raise HTTPException(status_code=e.status, detail=str(e)) from e
        self._check_labels(request.get("labels"))
        name = request.get("strategy") or "uncertainty"
        strategy = self.strategies.get(name)
        if strategy is None:
            raise HTTPException(
                status_code=404, detail=f"no strategy {name!r}; available: {', '.join(self.strategies)}"
            )
        team = self.team
        result, note = self._returned(client), None
        if result is None:
            candidates = WithoutImages(self.datastore(), team.unreadable.ids())
            candidates = WithImages(candidates, team.double.awaiting_second(client) & set(candidates.list_images()))
            result, note = team.leases.next_image(
                client, strategy, request, candidates, self.readable, team.double.seats
            )
        if result is None:
            return {}
        path = self.datastore().uri_if_ready(result["id"])  # an archive's series is fetched in the background
        if path:
            result["path"] = path
        result["client_id"] = client
        if team.double.chosen(result["id"]):
            result["double_read"] = True
        if note:
            result["note"] = note
            log.info("next image for %s: %s (%s)", client, result["id"], note)
        else:
            log.info("next image for %s: %s, leased until %s", client, result["id"], result["lease"]["until"])
        return result

    def _returned(self, client: str) -> dict | None:
        """A label a reviewer returned to ``client``, its image leased to them again: the annotator's
        returned work comes before new images (but not the one they hold and ask past)."""
        held = self.team.leases.held_by(client)
        for review in self.team.reviews.returned_to(client):
            image = review["image"]
            if (held and held.image == image) or not self.knows_image(image) or not self.readable(image):
                continue
            lease = self.team.leases.grant(image, client)
            returned = {k: review[k] for k in ("version", "reviewer", "reviewed", "comment", "segments")}
            log.info("next image for %s: %s, returned by %s", client, image, review["reviewer"])
            return {"id": image, "lease": lease.as_json(time.time()), "returned": returned}
        return None

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
        unreadable = self.team.unreadable
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
        outbox = getattr(self.datastore(), "outbox", None)
        if outbox is not None:
            try:
                outbox.flush()
            except HTTPException as e:
                log.warning("pending SEGs stay pending: %s", e.detail)
        self.service.start()
        self.rounds.start()
        if self.service.settings.background_scoring:
            self.scorer.start()

    @cached_property
    def scorer(self) -> BackgroundScorer:
        """Uncertainty scores for Next image, computed off the request path (lib/activelearning/scorer.py)."""
        return BackgroundScorer(self.service, self.team.store, self.datastore, self.team.unreadable)

    @cached_property
    def rounds(self) -> RoundSchedule:
        """When rounds start (lib/rounds/schedule.py); MONAI Label refuses a second one while one runs."""
        return RoundSchedule(
            self.service.settings, self.service.versions, self.datastore, lambda: self.async_training("segvol")
        )

    def on_save_label(self, image_id: str, label_id: str) -> dict:
        """After a save (what was saved reaches the client from the save itself): a round when
        enough new final labels came in."""
        result = super().on_save_label(image_id, label_id) or {}
        self.rounds.labels_saved()
        self.scorer.wake()  # the team's categories may have changed
        return result

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
        if model not in self.infers:
            raise HTTPException(status_code=404, detail=f"no model {model!r}; available: {', '.join(self.infers)}")
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
