"""The shape of the code: the named API as committed, no import cycles, modules and functions of a
readable size, no block written twice, and each layer keeping to its side (pipelines/ never imports
gradio; ui/ never loads a model itself)."""
from __future__ import annotations

import ast
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
from api_shape import api_shape, read_snapshot

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipelines", "ui")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
#: A comment on a def line that says why the function is longer (none is needed today).
LONG_FUNCTION_MARK = "# long:"
DUPLICATE_LINES = 6


def _sources(include_app: bool = False) -> dict[str, Path]:
    """Module name -> file, for every module of pipelines/ and ui/ (and app.py, cli.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    if include_app:
        found["app"] = ROOT / "app.py"
        found["cli"] = ROOT / "cli.py"
    return found


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports anywhere in its file (inside functions too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (a path that comes back to its start), or []."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_named_api_is_the_committed_one(services):
    """Endpoint names, each parameter's name, label, type and default, and the outputs, as committed
    in tests/data/api_snapshot.json. A change of the API changes that file in the same commit."""
    from app import build_app

    assert api_shape(build_app(services).get_api_info()) == read_snapshot()


def test_no_import_cycles_even_through_imports_inside_functions():
    modules = _sources()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    assert _cycle(graph) == []
    # and the check finds one when there is one
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_layers_keep_to_their_side():
    """pipelines/ never imports gradio; ui/ imports no model runtime (it hands work to the services)."""
    modules = _sources()
    heavy = ("openvino", "openvino_genai", "torch", "diffusers", "nncf", "optimum", "transformers")
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and not node.level}
        if name.startswith("pipelines"):
            assert "gradio" not in imported, name
        else:
            assert not imported & set(heavy), (name, imported & set(heavy))


def test_modules_and_functions_are_of_a_readable_size():
    too_long = []
    for name, path in _sources(include_app=True).items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and LONG_FUNCTION_MARK not in lines[node.lineno - 1]:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []


def _meaningful_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that carry code: no blanks, comments, lone brackets
    or docstring prose."""
    kept = []
    in_string = False
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        quotes = line.count('"""') + line.count("'''")
        if in_string or (quotes and line.startswith(('"""', "'''"))):
            in_string = in_string != bool(quotes % 2)
            continue
        if not line or line.startswith("#") or re.fullmatch(r"[\])}]+[,:]?", line):
            continue
        kept.append((number, line))
    return kept


def test_no_block_of_code_is_written_twice():
    """No run of six lines of code stands twice (in one file or two) in pipelines/, ui/ or app.py."""
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for path in _sources(include_app=True).values():
        lines = _meaningful_lines(path)
        for i in range(len(lines) - DUPLICATE_LINES + 1):
            window = tuple(text for _, text in lines[i:i + DUPLICATE_LINES])
            if sum(len(text) for text in window) < 120:  # imports of a name per line and the like
                continue
            seen[window].append(f"{path.relative_to(ROOT)}:{lines[i][0]}")
    twice = {places[0]: places[1:] for places in seen.values() if len(places) > 1}
    assert twice == {}


@pytest.mark.parametrize("text, expected", [
    ("a\n\"\"\"doc\nstill doc\n\"\"\"\nb\n", ["a", "b"]),
    ("x = 1  # one\n# comment\n)\n", ["x = 1  # one"]),
])
def test_meaningful_lines_skip_docstrings_comments_and_brackets(tmp_path, text, expected):
    path = tmp_path / "m.py"
    path.write_text(text)
    assert [line for _, line in _meaningful_lines(path)] == expected


def test_the_snapshot_is_a_real_api_description():
    snapshot = read_snapshot()
    assert "/transcribe" in snapshot and "/generate_image" in snapshot
    names = [p["name"] for p in snapshot["/generate_image"]["parameters"]]
    assert names[:3] == ["prompt", "negative_prompt", "pose"] and names[-2:] == ["precision", "mode"]
    assert json.loads(json.dumps(snapshot)) == snapshot
