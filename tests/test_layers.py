"""The house's layers, checked from the source: no import from a lower layer into a higher one,
no cycle between the app's wings, the engine free of the app, sys.path touched only at entry points."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "apps" / "segvol"

# lower first; a module may import its own layer and those below
LAYERS = [
    ("lib.paths", "lib.settings"),
    ("lib.team",),
    ("lib.labels", "lib.archive", "lib.compat"),
    ("lib.serving",),
    ("lib.rounds",),
    ("lib.datastores", "lib.infers", "lib.trainers", "lib.configs", "lib.activelearning", "lib.batch"),
    ("main", "server", "datastore_routes", "workspace_routes", "review_routes", "__main__"),
]
ENGINE_CORE = ("engine", "model", "preprocess", "prompts", "zoom_in", "io", "weights", "vocabulary", "encoding_cache")
ENTRY_POINTS = {APP / "__main__.py", APP / "main.py", APP / "server.py"}


def _module(path: Path) -> str:
    parts = path.relative_to(APP).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module the file imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _layer(module: str) -> int | None:
    for rank, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return rank
    return None


def _wing(module: str) -> str:
    return ".".join(module.split(".")[:2]) if module.startswith("lib.") else module


def _app_files() -> list[Path]:
    return sorted(p for p in APP.rglob("*.py") if "static" not in p.parts and p != APP / "lib" / "__init__.py")


def test_every_app_module_has_a_layer():
    assert [str(p) for p in _app_files() if _layer(_module(p)) is None] == []


def test_no_import_from_a_lower_layer_into_a_higher_one():
    wrong = []
    for path in _app_files():
        mine = _layer(_module(path))
        for name in _imports(path):
            theirs = _layer(name)
            if theirs is not None and theirs > mine:
                wrong.append(f"{_module(path)} imports {name}")
    assert wrong == []


def test_no_cycle_between_wings():
    edges: dict[str, set[str]] = {}
    for path in _app_files():
        me = _wing(_module(path))
        for name in _imports(path):
            if _layer(name) is not None and _wing(name) != me:
                edges.setdefault(me, set()).add(_wing(name))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    assert [w for w in edges if reaches(w, w, {w})] == []


def test_the_engine_imports_nothing_of_the_app_or_monai_label():
    wrong = []
    for path in sorted((ROOT / "segvol").rglob("*.py")):
        for name in _imports(path):
            if name.split(".")[0] in ("lib", "monailabel", "fastapi", "apps", "main", "server"):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
            core = path.relative_to(ROOT / "segvol").parts[0].removesuffix(".py") in ENGINE_CORE
            if core and name.startswith("segvol.training"):
                wrong.append(f"{path.relative_to(ROOT)} (inference core) imports {name}")
    assert wrong == []


def test_sys_path_is_changed_only_at_entry_points():
    changed = [
        str(path.relative_to(ROOT))
        for path in [*_app_files(), *(ROOT / "segvol").rglob("*.py")]
        if "sys.path" in path.read_text() and path not in ENTRY_POINTS
    ]
    assert changed == []
