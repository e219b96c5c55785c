"""The workarounds name the versions they are for, and refuse to run on others."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from lib.compat import IncompatibleVersion, require

COMPAT = Path(__file__).resolve().parent.parent / "apps" / "segvol" / "lib" / "compat"


def test_another_version_is_refused_naming_the_module_to_revisit():
    require("monailabel", "0.8.5", "lib.compat.datastore")  # the installed one passes
    with pytest.raises(
        IncompatibleVersion, match=r"lib.compat.datastore works around monailabel 9.9.9, but monailabel 0.8.5"
    ):
        require("monailabel", "9.9.9", "lib.compat.datastore")
    with pytest.raises(IncompatibleVersion, match="no-such-package none is installed"):
        require("no-such-package", "1.0", "lib.compat.app")


@pytest.mark.parametrize("module", sorted(p.stem for p in COMPAT.glob("*.py") if p.stem != "__init__"))
def test_every_workaround_module_checks_its_version_at_import(module, monkeypatch):
    """Each module calls ``require`` at import: with MONAI Label reported as another version,
    importing it fails with the message, rather than working around the wrong code."""
    monkeypatch.setattr("lib.compat.version", lambda package: "9.9.9")
    monkeypatch.delitem(sys.modules, f"lib.compat.{module}", raising=False)
    with pytest.raises(IncompatibleVersion, match=f"lib.compat.{module} works around monailabel 0.8.5"):
        importlib.import_module(f"lib.compat.{module}")
