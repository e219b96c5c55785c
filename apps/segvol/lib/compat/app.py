"""MONAI Label 0.8.5's app keeps its tasks in private attributes; the routes and commands reach
them through these properties only."""

from __future__ import annotations

from lib.compat import MONAI_LABEL, require

require("monailabel", MONAI_LABEL, __name__)


class AppAccess:
    """Mixed into the app (a MONAILabelApp)."""

    @property
    def infers(self) -> dict:
        return self._infers

    @property
    def trainers(self) -> dict:
        return self._trainers

    @property
    def strategies(self) -> dict:
        return self._strategies
