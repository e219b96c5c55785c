"""Next image to annotate: the one on which SegVol is least sure of the categories being annotated.

Score: mean binary entropy of SegVol's zoom-out prediction (one encoder pass per image, text
prompts only) over the categories in the request's ``labels`` (at most lib/serving/limits.py's 16),
else those already in final labels, else the first configured auto labels. Scores are kept per
image and model version, so asking again costs nothing until the model or the images change.

Scoring runs in ``prepare``, before the pick lock that every annotator's Next image takes, and
holds the model lock for one image at a time, so prompts and other annotators' picks go on
between images; the pick itself only compares scores already computed. An image that cannot be
read is listed once as unreadable and skipped.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from monailabel.interfaces.tasks.strategy import Strategy

from lib.serving.host import ModelHost
from lib.team.unreadable import Unreadable
from segvol.io import ImageReadError, read_volume

log = logging.getLogger(__name__)
MAX_SCORES = 4096


def mean_entropy(logits: torch.Tensor) -> float:
    p = torch.sigmoid(logits.float()).clamp(1e-6, 1 - 1e-6)
    return float((-(p * p.log() + (1 - p) * (1 - p).log())).mean() / torch.log(torch.tensor(2.0)))


class Uncertainty(Strategy):
    def __init__(self, service: ModelHost, unreadable: Unreadable, max_images: int = 50) -> None:
        super().__init__("Least certain SegVol prediction first (mean entropy of the zoom-out pass)")
        self.service = service
        self.unreadable = unreadable
        self.max_images = max_images
        self._scores: OrderedDict[tuple, float] = OrderedDict()  # keyed by client input too: an LRU

    def categories(self, request: dict, datastore) -> list[str]:
        vocab = self.service.vocabulary
        asked = request.get("labels")
        if isinstance(asked, list) and asked:  # categories (main.next_sample refuses other names), as a set
            return sorted({vocab.resolve(str(n)).category.name for n in asked})
        names = sorted(
            {
                s["name"]
                for obj in datastore.json()["objects"].values()
                for label in obj.get("labels", {}).values()
                for s in label.get("info", {}).get("segments", [])
            }
        )
        return names or list(self.service.settings.auto_labels[:3])

    def _key(self, image_id: str, names: list[str]) -> tuple:
        return (image_id, self.service.version, tuple(names))

    def _candidates(self, request: dict, datastore) -> list[str]:
        return datastore.get_unlabeled_images(request.get("label_tag"), None)[: self.max_images]

    def score(self, image_id: str, path: str, names: list[str]) -> float | None:
        """The image's score (None: it cannot be read, now listed as unreadable)."""
        key = self._key(image_id, names)
        if key not in self._scores:
            predictor = self.service.wait()
            try:
                volume = read_volume(path)
            except ImageReadError as e:
                self.unreadable.add(image_id, str(e))
                return None
            with self.service.lock:
                self.service.sync_version()
                predictor.set_image(volume.array)
                embedding = predictor.zoom_out_embedding()
                with torch.no_grad():
                    values = [
                        mean_entropy(predictor.model.decode(embedding, predictor.text_embedding(n)[0], upsample=False))
                        for n in names
                    ]
            self._scores[self._key(image_id, names)] = sum(values) / len(values)
            while len(self._scores) > MAX_SCORES:
                self._scores.popitem(last=False)
        return self._scores.get(key)

    def prepare(self, request: dict, datastore) -> None:
        """Score every candidate not scored yet (outside the pick lock; one image per model lock)."""
        names = self.categories(request, datastore)
        for image_id in self._candidates(request, datastore):
            if self._key(image_id, names) not in self._scores and not self.unreadable.has(image_id):
                self.score(image_id, datastore.get_image_uri(image_id), names)

    def __call__(self, request: dict, datastore) -> dict | None:
        """The best-scored candidate; a candidate not scored yet (new since ``prepare``) is scored
        here, which is the only model work that can happen under the pick lock."""
        names = self.categories(request, datastore)
        scores = {}
        for image_id in self._candidates(request, datastore):
            if self.unreadable.has(image_id):
                continue
            key = self._key(image_id, names)
            value = self._scores.get(key)
            if value is None:
                value = self.score(image_id, datastore.get_image_uri(image_id), names)
            if value is not None:
                scores[image_id] = value
        if not scores:
            return None
        best = max(scores, key=scores.get)
        log.info(
            "uncertainty over %s: %s",
            ", ".join(names),
            ", ".join(f"{i}={s:.3f}" for i, s in sorted(scores.items(), key=lambda x: -x[1])[:5]),
        )
        return {"id": best, "weight": scores[best], "uncertainty": scores, "categories": names}
