"""The requirements files declare what the code imports and what its libraries need at run time.

The app, the Docker image and the Space install ``requirements.txt`` alone, while the tests run in a
venv made from ``requirements-dev.txt``: a package that only a test tool pulls in (onnxruntime came in
through faster-whisper, while the app's VAD needs it) would pass every other test and still break the
deployed app. These checks read the installed packages' own metadata, so they hold for any venv.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
APP_CODE = [ROOT / "app.py", ROOT / "cli.py", *sorted((ROOT / "pipelines").rglob("*.py")),
            *sorted((ROOT / "ui").glob("*.py"))]
DEV_CODE = [*sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py")),
            *sorted((ROOT / "examples").glob("*.py"))]
LOCAL = {"app", "cli", "pipelines", "ui", "tests", "conftest", "image_fixtures", "servers", "machine"} | {
    p.stem for p in DEV_CODE}


def declared(name: str) -> dict[str, Requirement]:
    """Requirements written in a requirements file, following ``-r`` includes."""
    found: dict[str, Requirement] = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r"):
            found.update(declared(line[2:].strip()))
        elif line and not line.startswith("-"):
            req = Requirement(line)
            found[canonicalize_name(req.name)] = req
    return found


def closure(requirements: dict[str, Requirement]) -> set[str]:
    """Every distribution that installing ``requirements`` brings in (markers and extras honoured)."""
    seen: set[str] = set()
    todo = [(name, set(req.extras)) for name, req in requirements.items()]
    while todo:
        name, extras = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in md.distribution(name).requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((canonicalize_name(req.name), set(req.extras)))
    return seen


def imported_top_modules(files: list[Path]) -> dict[str, Path]:
    """Top-level modules imported anywhere in ``files`` (function-level imports too), with one file each."""
    modules: dict[str, Path] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                modules.setdefault(name.split(".")[0], path)
    return {m: p for m, p in modules.items() if m not in sys.stdlib_module_names and m not in LOCAL}


# Imported by a library only when present (httpcore tries trio and its helpers, which selenium brings into the
# dev venv); the app works without them.
OPTIONAL_AT_RUN_TIME = {"trio", "outcome", "sniffio", "sortedcontainers"}


@lru_cache(maxsize=1)
def _module_owners() -> dict[str, list[str]]:
    return md.packages_distributions()


def distributions_of(module: str) -> set[str]:
    return {canonicalize_name(d) for d in _module_owners().get(module, [])}


def test_every_requirement_is_pinned():
    for name in ("requirements.txt", "requirements-dev.txt"):
        loose = [str(r) for r in declared(name).values() if not str(r.specifier).startswith("==")]
        assert not loose, f"{name} leaves {loose} unpinned"


@pytest.mark.parametrize("code, requirements", [(APP_CODE, "requirements.txt"),
                                                (DEV_CODE, "requirements-dev.txt")], ids=["app", "tests"])
def test_every_imported_package_is_declared_directly(code, requirements):
    names = set(declared(requirements))
    missing = {}
    for module, path in imported_top_modules(code).items():
        dists = distributions_of(module)
        assert dists, f"{module} (imported in {path.name}) is not installed"
        if not dists & names:
            missing[module] = (sorted(dists), path.relative_to(ROOT).as_posix())
    assert not missing, f"imported but not in {requirements}: {missing}"


def test_what_the_app_loads_at_run_time_comes_from_requirements_txt():
    """Import the app and load the models that ship in wheels (VAD); every module loaded must belong to a
    distribution that ``pip install -r requirements.txt`` installs."""
    script = ("import json, sys; import app, ui.common, ui.speech_tab, ui.subtitles_tab, ui.image_tab; "
              "import pipelines.speech.service, pipelines.image.service, pipelines.image.pose, pipelines.image.int8, pipelines.subtitles.youtube; "
              "from pipelines.speech import vad; vad.load_vad_model(); "
              "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True,
                                       text=True, timeout=300).stdout.splitlines()[-1])
    installed = closure(declared("requirements.txt"))
    outside = {m: sorted(distributions_of(m)) for m in loaded
               if m not in OPTIONAL_AT_RUN_TIME and distributions_of(m) and not distributions_of(m) & installed}
    assert not outside, f"loaded at run time but not installed by requirements.txt: {outside}"
