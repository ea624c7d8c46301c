"""The layout's rules, read from the source: every import (late ones inside functions included) points from a
later stage of the data's path to an earlier one, never back; no cycles; no private name crosses modules.

Stages (README "Layout"): the contract (``camera``, ``schema``, ``reader``, ``console``) -> ``inputs`` ->
``geometry`` -> ``image`` -> ``pipeline`` -> ``inspect``; ``cli`` dispatches to the commands by name.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ("wt_datagen", "wt_datagen.camera", "wt_datagen.schema", "wt_datagen.reader", "wt_datagen.console")
ROOMS = ["contract", "inputs", "geometry", "image", "pipeline", "inspect"]
FILE_IO = {"tarfile", "webdataset", "json", "pathlib", "glob", "shutil", "tempfile", "zipfile", "io"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in ("wt_datagen", "wt_model") for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement anywhere in the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [a.name for a in node.names], node.lineno))
    return out


def resolve(target: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """Project modules an import statement loads: ``from pkg import mod`` loads ``pkg.mod``."""
    if not target.startswith(("wt_datagen", "wt_model")):
        return []
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return [target, *subs] if target in known else subs


def room(name: str) -> str | None:
    if name in CONTRACT:
        return "contract"
    parts = name.split(".")
    return parts[1] if parts[0] == "wt_datagen" and len(parts) > 2 and parts[1] in ROOMS else None


@pytest.fixture(scope="module")
def graph():
    known = modules()
    edges = {}
    for name, path in known.items():
        edges[name] = [(dep, names, line) for target, names, line in imports(name, path)
                       for dep in resolve(target, names, known) if dep != name]
    return known, edges


def test_imports_point_one_way_along_the_data_path(graph):
    known, edges = graph
    wrong = []
    for name, deps in edges.items():
        here = room(name)
        for dep, _, line in deps:
            if name.startswith("wt_model"):
                if dep.startswith("wt_datagen") and dep not in CONTRACT:
                    wrong.append(f"{name}:{line} imports {dep} (wt_model reads shards through the contract only)")
                continue
            there = room(dep)
            if name == "wt_datagen.cli" or here is None:
                continue
            if there is None or ROOMS.index(there) > ROOMS.index(here):
                wrong.append(f"{name}:{line} ({here}) imports {dep} ({there}), a later stage")
            if here == "inspect" and there not in ("contract", "inspect"):
                wrong.append(f"{name}:{line}: inspection reads shards and the schema only, not {dep}")
    assert not wrong, "\n".join(wrong)


def test_the_caster_knows_nothing_of_files_shards_or_runs(graph):
    known, _ = graph
    for name in ("wt_datagen.geometry.cast", "wt_datagen.geometry.kernels"):
        used = {t.split(".")[0] for t, _, _ in imports(name, known[name])}
        assert not used & FILE_IO, f"{name} imports {sorted(used & FILE_IO)}"
        deps = {t for t, _, _ in imports(name, known[name]) if t.startswith("wt_datagen")}
        assert all(room(d) in ("contract", "inputs", "geometry") for d in deps), deps


def test_no_import_cycles(graph):
    _, edges = graph
    adj = {n: sorted({d for d, _, _ in deps}) for n, deps in edges.items()}
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in adj.get(n, []):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in adj:
        if n not in state:
            visit(n)


def test_no_private_name_crosses_modules(graph):
    _, edges = graph
    wrong = [f"{name}:{line} imports {n} from {dep}" for name, deps in edges.items() for dep, names, line in deps
             for n in names if n.startswith("_") and not n.startswith("__")]
    assert not wrong, "\n".join(wrong)


def test_the_model_pulls_no_caster_or_mesh_library():
    code = ("import sys, wt_model, wt_model.train, wt_model.data, wt_model.sampler, wt_model.metrics, wt_model.cli;"
            "print(sorted(m for m in ('numba', 'trimesh', 'open3d', 'wt_datagen.geometry', 'wt_datagen.pipeline')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
