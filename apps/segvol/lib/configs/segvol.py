"""TaskConfig: ``--conf`` options -> the shared model host, the team, and the three infer tasks."""

from __future__ import annotations

import logging
from pathlib import Path

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask

from lib.infers.base import offered
from lib.infers.deepgrow import SegVolDeepgrow
from lib.infers.segmentation import SegVolSegmentation
from lib.infers.vista3d import SegVolVista3D
from lib.serving.host import ModelHost
from lib.settings import AppSettings
from lib.team.team import Team
from lib.trainers.decoder import AppArgs, SegVolDecoderTrainer

log = logging.getLogger(__name__)


class SegVolTaskConfig(TaskConfig):
    """Builds no network here (training rebuilds the app in a subprocess): the service loads the
    weights in the background once the server has started."""

    def init(self, name: str, model_dir: str, conf: dict, planner=None, **kwargs) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        self.settings = AppSettings.from_conf(conf, Path(model_dir))
        self.service = ModelHost(self.settings)
        self.team = Team.of(self.settings)
        self.labels = offered(self.service)

    def infer(self) -> dict[str, InferTask]:
        return {
            self.name: SegVolVista3D(self.service, self.team),
            f"{self.name}_segmentation": SegVolSegmentation(self.service, self.team),
            f"{self.name}_deepgrow": SegVolDeepgrow(self.service, self.team),
        }

    def trainer(self, studies: str | None = None) -> SegVolDecoderTrainer:
        """``studies``: where the app reads its images, so a round in several processes
        (``train_processes``) can build the app again in each."""
        return SegVolDecoderTrainer(self.service, self.team, AppArgs(studies, dict(self.conf)) if studies else None)
