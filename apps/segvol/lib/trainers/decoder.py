"""Fine-tune rounds of SegVol's decoder on the datastore's final labels (MONAI Label train task).

A round: split the labelled images into train / held-out (by a stable hash of the image id),
encode every training view once (zoom-out volume and zoom-in windows; encoders frozen), measure
held-out Dice, record what the served model answers for other categories (the replay set),
train the decoder with simulated prompts, measure again, and write a new version. The version is
served only if held-out Dice rose by more than ``promote_min_gain`` and the replay Dice against
the previous answers stays above 1 - ``promote_replay_margin`` (so the model does not forget).
MONAI Label runs this in a subprocess; the server picks the promoted version up at its next
request. A killed or failing round leaves no version behind and the served one unchanged.

Several processes (``train_processes``, or the round run under torchrun): each encodes its share
of the labelled images and every process gets all the views; each computes the loss of its share
of every batch (``train_batch`` samples) and the gradients are summed, so the same seed and batch
give one process's version to float noise (segvol/training/finetune.py, segvol/training/distributed.py). Rank 0
lists the labels, writes the progress and the version; the others return its result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monailabel.interfaces.tasks.train import TrainTask
from tqdm import tqdm

from lib.rounds.progress import RUNNING, RoundProgress
from lib.serving.host import SegVolService
from lib.serving.validation import Param, RequestError, check
from segvol.embedding_store import EmbeddingStore, encoder_digest
from segvol.io import read_volume
from segvol.training import distributed
from segvol.training.finetune import ALL_VIEWS, DecoderTrainer, Skip, View, check_batch, trainable_state, views_of

log = logging.getLogger(__name__)
ROUND_PY = Path(__file__).resolve().parents[2] / "round.py"  # a round from the command line / torchrun
MAX_SKIP_LINES = 100  # the result lists at most this many skipped views, then how many more
NO_SHARED_CATEGORY = "held-out images share no category with the training images: Dice measures nothing"


def image_id_of(path: str) -> str:
    """The datastore's id of an image file: its name without the volume extension (a series UID
    on DICOMweb keeps its dots: "1.2.826....nii.gz" -> "1.2.826...")."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


SPLIT_RULE = (
    "held out: the images whose id hashes (SHA-256) to 0 mod 5, at least one and never all; "
    "the others train. The two sides never share an image."
)


def _rank(image_id: str) -> int:
    return int(hashlib.sha256(image_id.encode()).hexdigest(), 16)


def split(items: list[tuple[str, str, str, str]]) -> tuple[list, list]:
    """(train, held out): disjoint, stable per image id (an image stays on its side as labels
    are added), about one in five held out; needs two labelled images at least."""
    ranked = sorted(items, key=lambda it: _rank(it[0]))
    held = [it for it in ranked if _rank(it[0]) % 5 == 0][: len(items) - 1] or ranked[:1]
    return [it for it in items if it not in held], held


@dataclass(frozen=True)
class AppArgs:
    """What builds the app again in other processes: its studies (folder or DICOMweb URL), --conf."""

    studies: str
    conf: dict[str, str]


def _on(views: list[View], device: torch.device | str) -> list[View]:
    """``views`` with their embeddings on ``device``; an embedding several views share (the
    zoom-out of an image with several categories) stays shared, moved once."""
    moved: dict[int, torch.Tensor] = {}
    for v in views:
        if id(v.embedding) not in moved:
            moved[id(v.embedding)] = v.embedding.to(device)
    return [View(moved[id(v.embedding)], v.target, v.category, v.image) for v in views]


class SegVolDecoderTrainer(TrainTask):
    PARAMETERS = {
        "steps": Param(int, 1, 100_000, "decoder optimiser steps"),
        "lr": Param(float, 1e-8, 1.0, "learning rate"),
        "seed": Param(int, 0, 1_000_000, "seed of the simulated prompts"),
        "batch": Param(int, 1, 4096, "samples per step, split evenly over the round's processes"),
    }
    # what MONAI Label (its server and its training process) and the clients add to every request
    PASSED_THROUGH = frozenset({"model", "client_id", "gpus", "local_rank"})

    def check_params(self, params: dict) -> dict:
        """The request's round parameters, checked (lib.serving.validation.RequestError names a bad one),
        a batch that the round's processes cannot share evenly too."""
        what = "a SegVol fine-tune round"
        asked = check(params, self.PARAMETERS, self.PASSED_THROUGH, what)
        try:
            check_batch(asked.get("batch", self.service.settings.train_batch), self.processes)
        except ValueError as e:
            raise RequestError(f"{what}: {e}") from e
        return asked

    def __init__(self, service: SegVolService, app_args: AppArgs | None = None) -> None:
        """``app_args``: how ``train_processes`` > 1 builds the app in its processes (SegVolApp
        passes them; without them such a round is refused)."""
        super().__init__("Fine-tune SegVol's decoder on the final labels (encoders frozen)")
        self.service = service
        self.app_args = app_args

    @property
    def processes(self) -> int:
        """The processes the round runs in: torchrun's when under it, else ``train_processes``."""
        return distributed.world() if distributed.world() > 1 else self.service.settings.train_processes

    def config(self) -> dict:
        s = self.service.settings
        return {"steps": s.train_steps, "lr": s.train_lr, "batch": s.train_batch}

    def stats(self) -> dict:
        """The versions, the last round, and the keys OHIF's stock panel draws its bars from
        (epoch / total_epochs while a round runs, total_time once it ended, best_metric = the
        served version's held-out Dice), so that those bars tell the truth."""
        store = self.service.versions
        names = store.names()
        last = store.meta(names[-1]) if names else {}
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

    def labelled(self, datastore) -> list[tuple[str, str, str, str]]:
        """(image id, image path, label path, label key) of every final label in the datastore."""
        return [
            (
                item.get("image_id") or image_id_of(item["image"]),
                item["image"],
                item["label"],
                item.get("label_key", ""),
            )
            for item in datastore.datalist(full_path=True)
        ]

    def _views(self, predictor, items, progress: RoundProgress) -> tuple[list[list[View]], list[Skip]]:
        """The views of each item, in order, and the views left out (an empty target: nothing to
        learn). Under torchrun each process encodes its share and every process gets all
        (embeddings travel on the CPU and come back to the device)."""
        vocab = self.service.vocabulary
        windows = self.service.settings.train_windows or None
        mine, mine_skipped = [], []
        share = distributed.shard(items)
        bar = tqdm(share, desc="encoding views", unit="image", disable=not distributed.is_main())
        for n, (image_id, image_path, label_path, _) in enumerate(bar):
            # rank 0 speaks for all: the shares differ by one image at most
            progress.update("encoding views", min(n * distributed.world(), len(items)), len(items))
            image = read_volume(image_path).array
            label = np.asarray(read_volume(label_path).array)
            views: list[View] = []
            skipped: list[Skip] = []
            values = [int(v) for v in np.unique(label) if v]
            if not values:
                skipped.append(Skip(image_id, "(no category)", ALL_VIEWS, "the label map is all zero"))
            for value in values:
                if not 1 <= value <= len(vocab):
                    why = f"names no SegVol category (1..{len(vocab)})"
                    skipped.append(Skip(image_id, f"label value {value}", ALL_VIEWS, why))
                    continue
                name = vocab.categories[value - 1].name
                views += views_of(
                    predictor, image, label == value, name, image_id, max_windows=windows, skipped=skipped
                )
            mine.append(views)
            mine_skipped.append(skipped)
        gathered = distributed.gather_shards(mine_skipped)  # plain dataclasses: they travel as they are
        skips = [s for per_item in gathered for s in per_item]
        for s in skips if distributed.is_main() else ():
            if not s.view.startswith("zoom-in window"):  # a window beside the label is routine
                log.warning("%s", s.line())
        if distributed.world() == 1:
            return mine, skips
        views = [_on(v, predictor.device) for v in distributed.gather_shards([_on(v, "cpu") for v in mine])]
        return views, skips

    @contextmanager
    def _stored_encodings(self, predictor) -> Iterator[EmbeddingStore | None]:
        """Encodings from earlier rounds (the encoder is frozen), kept under the versions folder."""
        mb = self.service.settings.embedding_cache_mb
        if mb <= 0 or predictor.store is not None:
            yield predictor.store
            return
        key = encoder_digest(predictor.model, predictor.precision)
        predictor.store = EmbeddingStore(self.service.versions.root / ".embeddings", key, mb)
        try:
            yield predictor.store
        finally:
            predictor.store = None

    def __call__(self, request: dict, datastore) -> dict:
        return self.run(request, datastore)

    def run(self, request: dict, datastore, lock_held: bool = False) -> dict:
        """A round, one at a time (train.lock; ``lock_held``: the process that launched this one
        holds it). With ``train_processes`` > 1 outside torchrun, launches the round under it."""
        asked = self.check_params(request)  # refused before anything starts
        store = self.service.versions
        with self._exclusive(lock_held) as ours:
            if not ours:
                return {"status": "skipped", "reason": "another round is running"}
            if distributed.is_main():
                store.cleanup_partial()
            if distributed.world() == 1 and self.processes > 1:
                return self._launch(asked)  # its rank 0 writes the progress
            progress = RoundProgress(store.root, writes=distributed.is_main())
            try:
                result = self._round(asked, datastore, progress)
            except BaseException as e:
                progress.fail(f"{type(e).__name__}: {e}")
                raise
            progress.finish(result)
            return result

    @contextmanager
    def _exclusive(self, held: bool) -> Iterator[bool]:
        """train.lock for the whole round (rank 0 takes it; every process learns whether it did)."""
        if held:
            yield True
            return
        with open(self.service.versions.root / "train.lock", "w") as lock:
            ours = True
            if distributed.is_main():
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    ours = False
            yield distributed.broadcast(ours)

    def _launch(self, asked: dict) -> dict:
        """The round under ``torchrun --standalone`` in ``processes`` processes (apps/segvol/round.py
        on the same studies and --conf), this process holding train.lock meanwhile; rank 0's result."""
        if self.app_args is None:
            raise RuntimeError("train_processes > 1 needs the app's studies and --conf (SegVolApp passes them)")
        with tempfile.TemporaryDirectory(prefix="segvol-round-") as tmp:
            output = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.processes}"]
            cmd += [str(ROUND_PY), "--studies", self.app_args.studies, "--output", str(output), "--lock-held"]
            for key, value in self.app_args.conf.items():
                cmd += ["--conf", key, str(value)]
            for key, value in asked.items():
                cmd += [f"--{key}", str(value)]
            log.info("round in %d processes: %s", self.processes, " ".join(cmd))
            code = subprocess.run(cmd, check=False).returncode  # its log lines go to this process's
            if code != 0:
                raise RuntimeError(f"the round's {self.processes} processes failed (torchrun exit {code}; log above)")
            return json.loads(output.read_text())

    def _round(self, asked: dict, datastore, progress: RoundProgress) -> dict:
        t0 = time.time()
        s = self.service.settings
        steps = asked.get("steps", s.train_steps)
        lr = asked.get("lr", s.train_lr)
        batch = asked.get("batch", s.train_batch)
        # rank 0 lists (on DICOMweb: fetches) the labels, so every process trains on the same ones
        items = distributed.broadcast(self.labelled(datastore) if distributed.is_main() else None)
        progress.start(len(items), steps)
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
            steps,
            batch,
            lr,
            distributed.world(),
        )
        self.service.load()
        predictor = self.service.wait()
        previous = self.service.version
        t_views = time.time()
        with self._stored_encodings(predictor) as store:
            per_item, skips = self._views(predictor, train + held, progress)
        skipped = _skip_lines(skips)
        counts = distributed.gather_shards([(store.hits, store.misses) if store else (0, 0)])
        encodings = {"reused": sum(c[0] for c in counts), "computed": sum(c[1] for c in counts)} if store else {}
        train_views = [v for views in per_item[: len(train)] for v in views]
        val_views = [v for views in per_item[len(train) :] for v in views]
        t_views = time.time() - t_views
        progress.update("measuring", 0, 1)
        empty = _nothing_to_learn(train_views, val_views, len(train), len(held), len(skips))
        if empty:  # a round ends with its reason, never an exception, whatever one label holds
            return {"status": "skipped", "reason": empty, "skipped_views": skipped}
        trainer = DecoderTrainer(predictor, lr=lr, seed=asked.get("seed", 0))
        trained = sorted({v.category for v in train_views})
        # held-out Dice of categories the round never trained measures nothing the round did
        measured = bool(set(trained) & {v.category for v in val_views})
        others = [c for c in s.auto_labels if c not in trained][:3]
        replay = trainer.replay_views(train_views + val_views, others)
        before = trainer.mean_dice(val_views) if measured else None
        bar = tqdm(total=steps, desc="fine-tune", unit="step", disable=not distributed.is_main())

        def step(i: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            progress.update("fine-tune", i, steps)

        t_train = time.time()
        losses = trainer.train(train_views, steps, replay=replay, progress=step, batch=batch)
        t_train = time.time() - t_train
        bar.close()
        progress.update("measuring", 0, 1)
        after = trainer.mean_dice(val_views) if measured else None
        replay_dice = trainer.mean_dice(replay) if replay else 1.0
        replay_ok = replay_dice >= 1 - s.promote_replay_margin
        if not measured:
            why = [NO_SHARED_CATEGORY]
        elif after > before + s.promote_min_gain:
            why = []
        else:
            why = [f"held-out Dice {before:.3f} -> {after:.3f} did not rise"]
        why += [] if replay_ok else [f"replay Dice {replay_dice:.3f} below {1 - s.promote_replay_margin:.2f}"]
        status = "rejected: " + "; ".join(why) if why else "promoted"
        meta = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "base": self.service.base_version,
            "base_weights": str(getattr(self.service, "weights_path", s.weights)),
            "started_from": previous,
            "labels": [{"image": it[0], "label": it[3], "held_out": it in held} for it in items],
            "split": SPLIT_RULE,
            "categories": trained,
            "held_out_categories": sorted({v.category for v in val_views}),
            "replay_categories": others,
            "steps": steps,
            "lr": lr,
            "batch": batch,
            "processes": distributed.world(),
            "loss_first": losses[0],
            "loss_last": float(np.mean(losses[-10:])),
            "replay_dice": replay_dice,
            "status": status,
            "seconds": round(time.time() - t0, 1),
            "seconds_encoding_views": round(t_views, 1),
            "seconds_training": round(t_train, 1),
            "views": {"train": len(train_views), "held_out": len(val_views), "replay": len(replay)},
            "encodings": encodings,
            "skipped_views": skipped,
        }
        if measured:
            meta.update(val_dice_before=before, val_dice_after=after)
        else:  # no Dice reported: one that measures nothing would read as a result
            meta["warning"] = NO_SHARED_CATEGORY
        if not distributed.is_main():
            return distributed.broadcast(None)
        store = self.service.versions
        name = store.write(trainable_state(trainer.model), meta)
        if not why:  # promoted only when the held-out Dice measured a trained category
            store.activate(name, f"held-out Dice {before:.3f} -> {after:.3f}, replay {replay_dice:.3f}")
        log.info("round %s: %s (%.1f s)", name, status, time.time() - t0)
        return distributed.broadcast(dict(meta, version=name))


def _skip_lines(skips: list[Skip]) -> list[str]:
    """The round's skipped views as lines for its result, at most ``MAX_SKIP_LINES`` of them."""
    lines = [s.line() for s in skips[:MAX_SKIP_LINES]]
    if len(skips) > MAX_SKIP_LINES:
        lines.append(f"... and {len(skips) - MAX_SKIP_LINES} more skipped views")
    return lines


def _nothing_to_learn(train_views: list[View], val_views: list[View], train: int, held: int, skipped: int) -> str:
    """Why the round cannot train or measure once the empty views are left out ("" if it can):
    then it ends with this reason, as a skipped round, never with an exception."""
    side = None
    if not train_views:
        side = f"the {train} training image(s) give no view with a target"
    elif not val_views:
        side = f"the {held} held-out image(s) give no view with a target to measure the gain on"
    if side is None:
        return ""
    return f"nothing to learn: {side} ({skipped} view(s) skipped, listed in skipped_views)"
