"""A round's training views: each labelled image read, each of its categories turned into views
(the zoom-out volume and the zoom-in windows, encoders frozen), the views with nothing to learn
left out and listed.

Under torchrun each process encodes its share of the images and every process gets all the views
(embeddings travel on the CPU and come back to the device). Encodings are kept across rounds under
the versions folder (``embedding_cache_mb``): the encoder never changes, so a second round reads
what the first one computed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

from lib.rounds.progress import RoundProgress
from lib.serving.host import ModelHost
from segvol.embedding_store import EmbeddingStore, encoder_digest
from segvol.io import read_volume
from segvol.training import distributed
from segvol.training.finetune import ALL_VIEWS, Skip, View, views_of

log = logging.getLogger(__name__)
MAX_SKIP_LINES = 100  # the result lists at most this many skipped views, then how many more

Item = tuple[str, str, str, str]  # (image id, image path, label path, label key): one final label


def on_device(views: list[View], device: torch.device | str) -> list[View]:
    """``views`` with their embeddings on ``device``; an embedding several views share (the
    zoom-out of an image with several categories) stays shared, moved once."""
    moved: dict[int, torch.Tensor] = {}
    for v in views:
        if id(v.embedding) not in moved:
            moved[id(v.embedding)] = v.embedding.to(device)
    return [View(moved[id(v.embedding)], v.target, v.category, v.image) for v in views]


def views_of_item(host: ModelHost, predictor, item: Item) -> tuple[list[View], list[Skip]]:
    """The views of one labelled image, one category per label value, and those left out (an
    all-zero label, a value that names no category, a target that vanishes from a view)."""
    image_id, image_path, label_path, _ = item
    vocab = host.vocabulary
    windows = host.settings.train_windows or None
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
        views += views_of(predictor, image, label == value, name, image_id, max_windows=windows, skipped=skipped)
    return views, skipped


def encode_views(
    host: ModelHost, predictor, items: list[Item], progress: RoundProgress
) -> tuple[list[list[View]], list[Skip]]:
    """The views of each item, in order, and the views left out (an empty target: nothing to
    learn), from every process's share."""
    mine, mine_skipped = [], []
    share = distributed.shard(items)
    bar = tqdm(share, desc="encoding views", unit="image", disable=not distributed.is_main())
    for n, item in enumerate(bar):
        # rank 0 speaks for all: the shares differ by one image at most
        progress.update("encoding views", min(n * distributed.world(), len(items)), len(items))
        views, skipped = views_of_item(host, predictor, item)
        mine.append(views)
        mine_skipped.append(skipped)
    gathered = distributed.gather_shards(mine_skipped)  # plain dataclasses: they travel as they are
    skips = [s for per_item in gathered for s in per_item]
    for s in skips if distributed.is_main() else ():
        if not s.view.startswith("zoom-in window"):  # a window beside the label is routine
            log.warning("%s", s.line())
    if distributed.world() == 1:
        return mine, skips
    views = [on_device(v, predictor.device) for v in distributed.gather_shards([on_device(v, "cpu") for v in mine])]
    return views, skips


@contextmanager
def stored_encodings(host: ModelHost, predictor) -> Iterator[EmbeddingStore | None]:
    """Encodings from earlier rounds (the encoder is frozen), kept under the versions folder."""
    mb = host.settings.embedding_cache_mb
    if mb <= 0 or predictor.store is not None:
        yield predictor.store
        return
    key = encoder_digest(predictor.model, predictor.precision)
    predictor.store = EmbeddingStore(host.versions.root / ".embeddings", key, mb)
    try:
        yield predictor.store
    finally:
        predictor.store = None


def encoding_counts(store: EmbeddingStore | None) -> dict:
    """Encodings reused from earlier rounds and computed now, over every process ({} without a store)."""
    counts = distributed.gather_shards([(store.hits, store.misses) if store else (0, 0)])
    return {"reused": sum(c[0] for c in counts), "computed": sum(c[1] for c in counts)} if store else {}


def skip_lines(skips: list[Skip]) -> list[str]:
    """The round's skipped views as lines for its result, at most ``MAX_SKIP_LINES`` of them."""
    lines = [s.line() for s in skips[:MAX_SKIP_LINES]]
    if len(skips) > MAX_SKIP_LINES:
        lines.append(f"... and {len(skips) - MAX_SKIP_LINES} more skipped views")
    return lines
