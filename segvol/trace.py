"""What the model saw for one target, typed: the crop, the prompts in model space, and the zoom-in
plan with what each window was fed. ``as_json`` gives the report the CLI writes and the app
returns (and the golden tests compare)."""

from __future__ import annotations

from dataclasses import dataclass, field

from segvol.preprocess import Crop


@dataclass
class ModelSpace:
    """The prompts as the model received them, in (d, h, w) voxels of the 32x256x256 volume."""

    text: str | None = None
    token_ids: list[int] | None = None
    box_dhw: list[int] | None = None
    points_dhw: list[list[int]] | None = None
    point_labels: list[int] | None = None

    def as_json(self) -> dict:
        out = {"text": self.text, "token_ids": self.token_ids} if self.text is not None else {}
        return {**out, "box_dhw": self.box_dhw, "points_dhw": self.points_dhw, "point_labels": self.point_labels}


@dataclass
class WindowTrace:
    slice_dhw_in_padded_roi: list[list[int]]
    box_fed_dhw: list[int] | None
    points_fed_dhw: list[list[int]] | None


@dataclass
class ZoomInTrace:
    roi_slice_dhw_in_crop: list[list[int]]
    pad_before_dhw: list[int]
    padded_roi_shape_dhw: list[int]
    windows: list[WindowTrace] = field(default_factory=list)


@dataclass
class Trace:
    crop: Crop
    model_space: ModelSpace
    zoom_in: ZoomInTrace | None = None

    def as_json(self) -> dict:
        c = self.crop
        zoom_in = None
        if self.zoom_in is not None:
            z = self.zoom_in
            zoom_in = {
                "roi_slice_dhw_in_crop": z.roi_slice_dhw_in_crop,
                "pad_before_dhw": z.pad_before_dhw,
                "padded_roi_shape_dhw": z.padded_roi_shape_dhw,
                "windows": [vars(w) for w in z.windows],
            }
        return {
            "crop": {
                "start_dhw": list(c.start),
                "stop_dhw": list(c.stop),
                "start_ijk": list(c.start_ijk),
                "stop_ijk": list(c.stop_ijk),
            },
            "model_space": self.model_space.as_json(),
            "zoom_in": zoom_in,
        }
