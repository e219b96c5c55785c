"""Next image to annotate: the one on which SegVol is least sure of the categories being annotated.

Score: mean binary entropy of SegVol's zoom-out prediction (one encoder pass per image, text
prompts only) over the categories in the request's ``labels``, else those already in final
labels, else the first configured auto labels. Scores are kept per image and model version, so
asking again costs nothing until the model or the images change.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from monailabel.interfaces.tasks.strategy import Strategy

from lib.service import SegVolService
from segvol.io import read_volume

log = logging.getLogger(__name__)
MAX_SCORES = 4096


def mean_entropy(logits: torch.Tensor) -> float:
    p = torch.sigmoid(logits.float()).clamp(1e-6, 1 - 1e-6)
    return float((-(p * p.log() + (1 - p) * (1 - p).log())).mean() / torch.log(torch.tensor(2.0)))


class Uncertainty(Strategy):
    def __init__(self, service: SegVolService, max_images: int = 50) -> None:
        super().__init__("Least certain SegVol prediction first (mean entropy of the zoom-out pass)")
        self.service = service
        self.max_images = max_images
        self._scores: OrderedDict[tuple, float] = OrderedDict()  # keyed by client input too: an LRU

    def categories(self, request: dict, datastore) -> list[str]:
        vocab = self.service.vocabulary
        asked = request.get("labels")
        if isinstance(asked, list) and asked:
            return [vocab.resolve(str(n)).name for n in asked]
        names = sorted(
            {
                s["name"]
                for obj in datastore.json()["objects"].values()
                for label in obj.get("labels", {}).values()
                for s in label.get("info", {}).get("segments", [])
            }
        )
        return names or list(self.service.settings.auto_labels[:3])

    def score(self, image_id: str, path: str, names: list[str]) -> float:
        key = (image_id, self.service.version, tuple(names))
        if key not in self._scores:
            predictor = self.service.wait()
            volume = read_volume(path)
            with self.service.lock:
                self.service.sync_version()
                predictor.set_image(volume.array)
                embedding = predictor.zoom_out_embedding()
                with torch.no_grad():
                    values = [
                        mean_entropy(predictor.model.decode(embedding, predictor.text_embedding(n)[0], upsample=False))
                        for n in names
                    ]
            self._scores[key] = sum(values) / len(values)
            while len(self._scores) > MAX_SCORES:
                self._scores.popitem(last=False)
        return self._scores[key]

    def __call__(self, request: dict, datastore) -> dict | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), None)[: self.max_images]
        if not images:
            return None
        names = self.categories(request, datastore)
        scores = {i: self.score(i, datastore.get_image_uri(i), names) for i in images}
        best = max(scores, key=scores.get)
        log.info(
            "uncertainty over %s: %s",
            ", ".join(names),
            ", ".join(f"{i}={s:.3f}" for i, s in sorted(scores.items(), key=lambda x: -x[1])[:5]),
        )
        return {"id": best, "weight": scores[best], "uncertainty": scores, "categories": names}
