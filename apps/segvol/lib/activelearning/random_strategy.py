"""MONAI Label's random strategy, which cannot fail when every candidate was just handed out.

MONAI Label weights each unlabelled image by the seconds since it was last handed out; when all
of them were handed out within the current second (a fourth annotator asking right after three
others), every weight is 0 and its pick raises. Then the pick is uniform.
"""

from __future__ import annotations

import random

from monailabel.tasks.activelearning.random import Random


class RandomStrategy(Random):
    def __call__(self, request: dict, datastore) -> dict | None:
        try:
            return super().__call__(request, datastore)
        except ValueError:  # "Total of weights must be greater than zero"
            images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
            return {"id": random.choice(images), "weight": 0} if images else None
