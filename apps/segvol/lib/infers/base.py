"""What every SegVol infer task shares: read, prompt, segment, write the label map."""

from __future__ import annotations

import logging
import tempfile
from abc import abstractmethod
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask

from lib.paths import TAG
from lib.serving.host import ModelHost, Segmentation, ServiceUnavailable
from lib.serving.params import PromptBuilder, Target, flag, output_options
from lib.serving.validation import Param, RequestError, check
from lib.team.identity import IdentityError, client_of
from lib.team.team import Team
from segvol.engine import ImageTooLarge
from segvol.io import ImageReadError, Volume, write_like
from segvol.preprocess import ImageError
from segvol.prompts import PromptError

log = logging.getLogger(__name__)


def offered(service: ModelHost) -> dict[str, int]:
    """The configured categories (``--conf categories``), name -> vocabulary index, in their order:
    what /info lists for OHIF's and Slicer's panels (Slicer makes a segment of each). The tasks
    still take every vocabulary index and name; only the list offered is the team's."""
    vocabulary = service.vocabulary
    found = [vocabulary.resolve(name).category for name in service.settings.categories]
    return {c.name: c.index for c in found if c is not None}


class SegVolInferTask(InferTask):
    """A thin adapter: subclasses only turn their client's parameters into targets."""

    def __init__(self, service: ModelHost, team: Team, type: str, description: str, config: dict | None = None) -> None:
        super().__init__(type=type, labels=offered(service), dimension=3, description=description, config=config)
        self.service = service
        self.team = team

    def is_valid(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["model_version"] = self.service.version
        if self.service.warning:
            info["warning"] = self.service.warning
            info["description"] = f"{self.description} [{self.service.warning}]"
        return info

    @abstractmethod
    def targets(self, params: dict, builder: PromptBuilder) -> list[Target]:
        """The targets this client's parameters ask for."""

    # MONAI Label's batch run: its own keys, and the prompts of this task for every image
    BATCH = {
        "max_workers": Param(int, 0, 64, "parallel images"),
        "max_batch_size": Param(int, 0, 4096, "images per batch, 0: all"),
    }
    BATCH_TEXT = ("device", "gpus", "logging")
    BATCH_FLAGS = ("multi_gpu", "save_label")

    def check_batch_params(self, params: dict) -> None:
        """Everything a batch run would use, checked before it starts: its own keys' types, and
        the prompt, parsed as this task parses it (coordinates are checked per image as it runs)."""
        prompt = dict(params)
        check({k: prompt.pop(k) for k in list(prompt) if k in self.BATCH}, self.BATCH, frozenset(), "a batch run")
        for key in self.BATCH_TEXT:
            if key in prompt and not isinstance(prompt.pop(key), str):
                raise RequestError(f"a batch run: {key} must be a string")
        for key in self.BATCH_FLAGS:
            if key in prompt and not isinstance(prompt.pop(key), bool):
                raise RequestError(f"a batch run: {key} must be true or false")
        tag = prompt.pop("label_tag", "original")
        if not isinstance(tag, str) or not TAG.match(tag):
            raise RequestError(f"a batch run: label_tag {tag!r} is not allowed (letters, digits, '_' and '-')")
        try:
            client_of(prompt)
            output_options(prompt)
            self.targets(prompt, PromptBuilder(self.service.vocabulary, (2**31 - 1,) * 3, flag(prompt, "exact_text")))
        except (PromptError, IdentityError) as e:
            raise RequestError(f"a batch run: {e}") from e

    def __call__(self, request: dict) -> tuple[str, dict]:
        try:
            client = client_of(request)
            out = output_options(request)
        except IdentityError as e:
            raise HTTPException(status_code=e.status, detail=str(e)) from e
        except PromptError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        volume = self._volume(request)
        targets, seg = self._segment(request, volume, out.zoom_in)
        with tempfile.NamedTemporaryFile(suffix=out.extension, delete=False) as f:
            path = f.name
        write_like(volume, seg.labelmap, path, compress=out.compress)
        result = self._result(request, client, targets, seg)
        log.info(
            "%s: %s in %.2f s",
            self.type,
            ", ".join(f"{t.name}={t.value}" for t in targets),
            seg.timings.get("total", 0.0),
        )
        return path, result

    def _volume(self, request: dict) -> Volume:
        try:
            return self.service.read(request["image"])
        except ImageReadError as e:  # the datastore's own file: listed as unreadable, skipped from now on
            if request.get("image_id"):
                self.team.unreadable.add(request["image_id"], str(e))
            raise HTTPException(status_code=422, detail=f"the image cannot be read: {e}") from e

    def _segment(self, request: dict, volume: Volume, zoom_in: bool | None) -> tuple[list[Target], Segmentation]:
        try:
            builder = PromptBuilder(self.service.vocabulary, volume.array.shape, flag(request, "exact_text"))
            targets = self.targets(request, builder)
        except (PromptError, ImageError) as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        try:
            seg = self.service.segment(volume, [t.prompt for t in targets], [t.value for t in targets], zoom_in)
        except ServiceUnavailable as e:
            raise HTTPException(status_code=503, detail=str(e)) from e
        except ImageTooLarge as e:
            raise HTTPException(status_code=413, detail=str(e)) from e
        except (PromptError, ImageError) as e:  # the engine's own checks: a text CLIP cannot take, NaNs, ...
            raise HTTPException(status_code=400, detail=str(e)) from e
        return targets, seg

    def _result(self, request: dict, client: str, targets: list[Target], seg: Segmentation) -> dict:
        """What the client is told (each target's prompt, voxels and model-space trace), recorded
        as a served result in the team's provenance when the image is the datastore's."""
        prompts = [
            {
                "name": t.name,
                "value": t.value,
                "text": t.sent,
                "points": [list(p) for p in t.prompt.points] or None,
                "point_labels": list(t.prompt.point_labels) or None,
                "box": list(t.prompt.box) if t.prompt.box else None,
                "voxels": voxels,
                "model_space": made.trace.model_space.as_json(),
                "zoom_in_windows": len(made.trace.zoom_in.windows) if made.trace.zoom_in else 0,
            }
            for t, voxels, made in zip(targets, seg.voxels, seg.predictions)
        ]
        result = {
            "label_names": {t.name: t.value for t in targets},
            "prompts": prompts,
            "model_version": seg.model_version,
            "client_id": client,
            "timings": seg.timings,
        }
        image_id = request.get("image_id")
        if image_id and self.team.provenance is not None:
            result["result_id"] = self.team.provenance.record(
                image_id,
                client,
                seg.model_version,
                request.get("model", self.type),
                [{k: v for k, v in p.items() if k != "model_space"} for p in prompts],
                seg.labelmap,
                {t.value: t.name for t in targets},
                seg.timings.get("total", 0.0),
            )
        if self.service.warning:
            result["warning"] = self.service.warning
        return result
