"""The errors a user can cause, each with a message that names the problem."""

from segvol.io import ImageReadError
from segvol.preprocess import ImageError
from segvol.prompts import PromptError
from segvol.training.versions import VersionError
from segvol.weights import WeightsError

USER_ERRORS = (ImageReadError, ImageError, PromptError, WeightsError, VersionError)

__all__ = ["USER_ERRORS", "ImageError", "ImageReadError", "PromptError", "VersionError", "WeightsError"]
