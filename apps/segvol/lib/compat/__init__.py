"""Every workaround for the versions of MONAI Label and OHIF this app is built on, in one place.

Each module names the version it is written for and calls ``require`` at import, so an upgrade
fails at start-up with a message naming the module to revisit, rather than misbehaving later.
What an upgrade would touch is exactly this package and ``static/ohif-shim.js``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

MONAI_LABEL = "0.8.5"


class IncompatibleVersion(RuntimeError):
    """An installed package is not the version a workaround was written for."""


def require(package: str, wanted: str, module: str) -> None:
    try:
        found = version(package)
    except PackageNotFoundError:
        found = "none"
    if found != wanted:
        raise IncompatibleVersion(
            f"{module} works around {package} {wanted}, but {package} {found} is installed: "
            f"check each workaround in {module} against {found}, then update the version there"
        )
