"""MONAI Label's train task for SegVol's decoder: its parameters, their check, the stats OHIF's panel
draws, and the call into the round (lib/rounds/round.py). MONAI Label runs it in a subprocess; the
server picks a promoted version up at its next request.
"""

from __future__ import annotations

from monailabel.interfaces.tasks.train import TrainTask

from lib.rounds import round as rounds
from lib.rounds.launch import AppArgs
from lib.rounds.progress import RUNNING, RoundProgress
from lib.rounds.reviewed import reviewed_labels
from lib.serving.host import ModelHost
from lib.team.team import Team
from segvol.postgres import DatabaseUnavailable

__all__ = ["AppArgs", "SegVolDecoderTrainer"]


class SegVolDecoderTrainer(TrainTask):
    PARAMETERS = rounds.PARAMETERS
    PASSED_THROUGH = rounds.PASSED_THROUGH

    def __init__(self, service: ModelHost, team: Team, app_args: AppArgs | None = None) -> None:
        """``team``: whose reviews decide which labels a round learns from (``--conf train_on``);
        ``app_args``: how ``train_processes`` > 1 builds the round's parts in its processes
        (SegVolApp passes them; without them such a round is refused)."""
        super().__init__("Fine-tune SegVol's decoder on the final labels (encoders frozen)")
        self.service = service
        self.team = team
        self.app_args = app_args

    def check_params(self, params: dict) -> dict:
        """The request's round parameters, checked (lib.serving.validation.RequestError names a bad one),
        a batch that the round's processes cannot share evenly too."""
        return rounds.check_request(params, self.service.settings)

    @property
    def processes(self) -> int:
        """The processes the round runs in: torchrun's when under it, else ``train_processes``."""
        return rounds.processes(self.service.settings)

    def config(self) -> dict:
        s = self.service.settings
        return {"steps": s.train_steps, "lr": s.train_lr, "batch": s.train_batch}

    def stats(self) -> dict:
        """The versions, the last round, and the keys OHIF's stock panel draws its bars from
        (epoch / total_epochs while a round runs, total_time once it ended, best_metric = the
        served version's held-out Dice), so that those bars tell the truth. With the team database
        down (versions kept there), what this host serves and the reason: /info must still answer."""
        store = self.service.versions
        try:
            names = store.names()
            last = store.meta(names[-1]) if names else {}
        except DatabaseUnavailable as e:
            return {"active": store.active(), "error": str(e)}
        out = {"active": store.active(), "versions": names, "last_round": last}
        progress = RoundProgress(store.root).read()
        if progress:
            out["round"] = progress
            if progress["state"] == RUNNING and progress["stage"] == "fine-tune":
                out.update(epoch=progress["done"], total_epochs=progress["total"])
            elif progress["state"] != RUNNING:
                out["total_time"] = progress.get("finished")
        active = store.active()
        if active != "base" and active in names:
            out["best_metric"] = store.meta(active).get("val_dice_after")
        return out

    def __call__(self, request: dict, datastore) -> dict:
        """A round, one at a time (train.lock), in ``train_processes`` processes."""
        labels = reviewed_labels(datastore, self.team.reviews, self.service.settings.train_on)
        return rounds.run_round(self.service, request, labels, self.app_args)
