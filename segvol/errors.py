"""The errors a user can cause, each with a message that names the problem."""

from segvol.io import ImageReadError
from segvol.postgres import DatabaseUnavailable
from segvol.preprocess import ImageError
from segvol.prompts import PromptError
from segvol.training.versions import VersionError
from segvol.weights import WeightsError

USER_ERRORS = (ImageReadError, ImageError, PromptError, WeightsError, VersionError, DatabaseUnavailable)

__all__ = [
    "USER_ERRORS",
    "DatabaseUnavailable",
    "ImageError",
    "ImageReadError",
    "PromptError",
    "VersionError",
    "WeightsError",
]
