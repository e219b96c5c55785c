"""A fine-tune round of SegVol's decoder on the datastore's final labels.

A round: split the labelled images into train / held-out (by a stable hash of the image id),
encode every training view once (zoom-out volume and zoom-in windows; encoders frozen;
lib/rounds/views.py), measure held-out Dice, record what the served model answers for other
categories (the replay set), train the decoder with simulated prompts, measure again, and write a
new version. The version is served only if it passes the gate (lib/rounds/gate.py). A killed or
failing round leaves no version behind and the served one unchanged. One round at a time
(train.lock in the versions folder).

Several processes (``train_processes``, or the round run under torchrun): each encodes its share
of the labelled images and every process gets all the views; each computes the loss of its share
of every batch (``train_batch`` samples) and the gradients are summed, so the same seed and batch
give one process's version to float noise (segvol/training/finetune.py, segvol/training/distributed.py).
Rank 0 lists the labels, writes the progress and the version; the others return its result.
The process that holds train.lock starts the others with lib/rounds/launch.py.

Nothing here knows MONAI Label: the round takes a model host (lib/serving/host.py) and anything
with the datastore's ``datalist``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lib.rounds.gate import Gate, Verdict, nothing_to_learn, shares_category
from lib.rounds.launch import AppArgs, launch
from lib.rounds.progress import RoundProgress
from lib.rounds.views import Item, encode_views, encoding_counts, skip_lines, stored_encodings
from lib.serving.host import ModelHost
from lib.serving.validation import Param, RequestError, check
from segvol.training import distributed
from segvol.training.finetune import DecoderTrainer, Skip, View, check_batch, trainable_state
from segvol.training.versions import VersionStore

log = logging.getLogger(__name__)

PARAMETERS = {
    "steps": Param(int, 1, 100_000, "decoder optimiser steps"),
    "lr": Param(float, 1e-8, 1.0, "learning rate"),
    "seed": Param(int, 0, 1_000_000, "seed of the simulated prompts"),
    "batch": Param(int, 1, 4096, "samples per step, split evenly over the round's processes"),
}
# what MONAI Label (its server and its training process) and the clients add to every request
PASSED_THROUGH = frozenset({"model", "client_id", "gpus", "local_rank"})
SPLIT_RULE = (
    "held out: the images whose id hashes (SHA-256) to 0 mod 5, at least one and never all; "
    "the others train. The two sides never share an image."
)


def processes(settings) -> int:
    """The processes a round runs in: torchrun's when under it, else ``train_processes``."""
    return distributed.world() if distributed.world() > 1 else settings.train_processes


def check_request(params: dict, settings) -> dict:
    """The request's round parameters, checked (RequestError names a bad one), a batch that the
    round's processes cannot share evenly too."""
    what = "a SegVol fine-tune round"
    asked = check(params, PARAMETERS, PASSED_THROUGH, what)
    try:
        check_batch(asked.get("batch", settings.train_batch), processes(settings))
    except ValueError as e:
        raise RequestError(f"{what}: {e}") from e
    return asked


def image_id_of(path: str) -> str:
    """The datastore's id of an image file: its name without the volume extension (a series UID
    on DICOMweb keeps its dots: "1.2.826....nii.gz" -> "1.2.826...")."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def labelled(datastore) -> list[Item]:
    """(image id, image path, label path, label key) of every final label in the datastore."""
    return [
        (item.get("image_id") or image_id_of(item["image"]), item["image"], item["label"], item.get("label_key", ""))
        for item in datastore.datalist(full_path=True)
    ]


def _rank(image_id: str) -> int:
    return int(hashlib.sha256(image_id.encode()).hexdigest(), 16)


def split(items: list[Item]) -> tuple[list[Item], list[Item]]:
    """(train, held out): disjoint, stable per image id (an image stays on its side as labels
    are added), about one in five held out; needs two labelled images at least."""
    ranked = sorted(items, key=lambda it: _rank(it[0]))
    held = [it for it in ranked if _rank(it[0]) % 5 == 0][: len(items) - 1] or ranked[:1]
    return [it for it in items if it not in held], held


@dataclass(frozen=True)
class RoundParams:
    steps: int
    lr: float
    batch: int
    seed: int

    @classmethod
    def of(cls, asked: dict, settings) -> RoundParams:
        """The checked request's values, the app's --conf where it gives none."""
        return cls(
            asked.get("steps", settings.train_steps),
            asked.get("lr", settings.train_lr),
            asked.get("batch", settings.train_batch),
            asked.get("seed", 0),
        )


@dataclass
class Views:
    """A round's encoded views, training and held-out, and the views left out."""

    train: list[View]
    held_out: list[View]
    skips: list[Skip]
    encodings: dict  # reused / computed encodings ({} without the embedding store)
    seconds: float


@dataclass
class Training:
    """What training did: the trained decoder, its losses and the gate's verdict."""

    trainer: DecoderTrainer
    categories: list[str]  # trained
    replay_categories: list[str]
    replay: list[View]
    losses: list[float]
    verdict: Verdict
    seconds: float


class Round:
    """One round on ``host``'s model, reporting to ``progress``."""

    def __init__(self, host: ModelHost, progress: RoundProgress) -> None:
        self.host = host
        self.settings = host.settings
        self.progress = progress

    def run(self, asked: dict, datastore) -> dict:
        """List the labels, split them, encode the views, train, gate, write: the round's result."""
        t0 = time.time()
        p = RoundParams.of(asked, self.settings)
        # rank 0 lists (on DICOMweb: fetches) the labels, so every process trains on the same ones
        items = distributed.broadcast(labelled(datastore) if distributed.is_main() else None)
        self.progress.start(len(items), p.steps)
        if len(items) < 2:
            return {
                "status": "skipped",
                "reason": f"a round needs two labelled images at least, one to train on and one held out to "
                f"measure the gain on; the datastore has {len(items)}",
            }
        train, held = split(items)
        log.info(
            "round: %d labelled images (%d train, %d held out), %d steps of %d at lr %g in %d process(es)",
            len(items),
            len(train),
            len(held),
            p.steps,
            p.batch,
            p.lr,
            distributed.world(),
        )
        self.host.load()
        predictor = self.host.wait()
        previous = self.host.version
        views = self.encode(predictor, train, held)
        self.progress.update("measuring", 0, 1)
        empty = nothing_to_learn(views.train, views.held_out, len(train), len(held), len(views.skips))
        if empty:  # a round ends with its reason, never an exception, whatever one label holds
            return {"status": "skipped", "reason": empty, "skipped_views": skip_lines(views.skips)}
        training = self.train(predictor, p, views)
        meta = self.meta(p, items, held, previous, views, training, t0)
        states = getattr(datastore, "states", {})  # lib/rounds/reviewed.py's, where the round is on reviewed labels
        for entry, item in zip(meta["labels"], items, strict=True):
            entry["state"] = states.get(item[3], "unreviewed")
        meta["train_on"] = self.settings.train_on
        return self.write(training, meta, t0)

    def encode(self, predictor, train: list[Item], held: list[Item]) -> Views:
        t0 = time.time()
        with stored_encodings(self.host, predictor) as store:
            per_item, skips = encode_views(self.host, predictor, train + held, self.progress)
        encodings = encoding_counts(store)
        train_views = [v for views in per_item[: len(train)] for v in views]
        val_views = [v for views in per_item[len(train) :] for v in views]
        return Views(train_views, val_views, skips, encodings, time.time() - t0)

    def train(self, predictor, p: RoundParams, views: Views) -> Training:
        """Measure, train, measure again, and the gate's verdict."""
        trainer = DecoderTrainer(predictor, lr=p.lr, seed=p.seed)
        trained = sorted({v.category for v in views.train})
        # held-out Dice of categories the round never trained measures nothing the round did
        measured = shares_category(trained, views.held_out)
        others = [c for c in self.settings.auto_labels if c not in trained][:3]
        replay = trainer.replay_views(views.train + views.held_out, others)
        before = trainer.mean_dice(views.held_out) if measured else None
        bar = tqdm(total=p.steps, desc="fine-tune", unit="step", disable=not distributed.is_main())

        def step(i: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            self.progress.update("fine-tune", i, p.steps)

        t0 = time.time()
        losses = trainer.train(views.train, p.steps, replay=replay, progress=step, batch=p.batch)
        seconds = time.time() - t0
        bar.close()
        self.progress.update("measuring", 0, 1)
        after = trainer.mean_dice(views.held_out) if measured else None
        replay_dice = trainer.mean_dice(replay) if replay else 1.0
        verdict = Gate.of(self.settings).judge(before, after, replay_dice)
        return Training(trainer, trained, others, replay, losses, verdict, seconds)

    def meta(
        self,
        p: RoundParams,
        items: list[Item],
        held: list[Item],
        previous: str,
        views: Views,
        training: Training,
        t0: float,
    ) -> dict:
        """The version's metadata (and the round's result), the round having started at ``t0``."""
        host, verdict = self.host, training.verdict
        meta = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "base": host.base_version,
            "base_weights": str(getattr(host, "weights_path", self.settings.weights)),
            "started_from": previous,
            "labels": [{"image": it[0], "label": it[3], "held_out": it in held} for it in items],
            "split": SPLIT_RULE,
            "categories": training.categories,
            "held_out_categories": sorted({v.category for v in views.held_out}),
            "replay_categories": training.replay_categories,
            "steps": p.steps,
            "lr": p.lr,
            "batch": p.batch,
            "processes": distributed.world(),
            "loss_first": training.losses[0],
            "loss_last": float(np.mean(training.losses[-10:])),
            "replay_dice": verdict.replay_dice,
            "status": verdict.status,
            "seconds": round(time.time() - t0, 1),
            "seconds_encoding_views": round(views.seconds, 1),
            "seconds_training": round(training.seconds, 1),
            "views": {"train": len(views.train), "held_out": len(views.held_out), "replay": len(training.replay)},
            "encodings": views.encodings,
            "skipped_views": skip_lines(views.skips),
        }
        meta.update(verdict.dice_meta())
        return meta

    def write(self, training: Training, meta: dict, t0: float) -> dict:
        """Rank 0 writes the version, served only when the gate promoted it; every rank returns its result."""
        if not distributed.is_main():
            return distributed.broadcast(None)
        store = self.host.versions
        name = store.write(trainable_state(training.trainer.model), meta)
        if training.verdict.promoted:  # promoted only when the held-out Dice measured a trained category
            store.activate(name, training.verdict.activation_reason())
        log.info("round %s: %s (%.1f s)", name, meta["status"], time.time() - t0)
        return distributed.broadcast(dict(meta, version=name))


@contextmanager
def exclusive(store: VersionStore, held: bool) -> Iterator[bool]:
    """The round lock for the whole round (rank 0 takes it; every process learns whether it did):
    train.lock in the versions folder, or an advisory lock in the team database across hosts.
    ``held``: the process that started this one holds it."""
    if held:
        yield True
        return
    lock = store.round_lock()
    ours = lock.acquire(0) if distributed.is_main() else True
    try:
        yield distributed.broadcast(ours)
    finally:
        if ours and distributed.is_main():
            lock.release()


def run_round(host: ModelHost, request: dict, datastore, app: AppArgs | None = None, lock_held: bool = False) -> dict:
    """A round, one at a time, its progress in round.json. With ``train_processes`` > 1 outside
    torchrun, the round runs in that many processes (``app``: what builds its parts there)."""
    asked = check_request(request, host.settings)  # refused before anything starts
    store = host.versions
    with exclusive(store, lock_held) as ours:
        if not ours:
            return {"status": "skipped", "reason": "another round is running"}
        if distributed.is_main():
            store.cleanup_partial()
        if distributed.world() == 1 and processes(host.settings) > 1:
            return launch(processes(host.settings), app, asked)  # its rank 0 writes the progress
        progress = RoundProgress(store.root, writes=distributed.is_main())
        try:
            result = Round(host, progress).run(asked, datastore)
        except BaseException as e:
            progress.fail(f"{type(e).__name__}: {e}")
            raise
        progress.finish(result)
        return result
