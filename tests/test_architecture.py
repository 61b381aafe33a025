"""The plan of the house, as one rule over folders.

- A module at the top of ``afm_mlx`` is a command (``python -m afm_mlx.<stage>``, with a
  ``main()``); in ``converters`` the modules with a ``main()`` are its commands and the rest is its
  library.
- Commands never import each other.
- Every other module sits in a wing (a folder of ``afm_mlx``, or the converters' library), and a
  wing imports only itself and the wings below it in ``WINGS``; no library imports a command.
- No import cycle anywhere, imports inside functions included.
- No Python file over ``MAX_LINES`` lines, tests and scripts included (the C++ kernels excepted).

Imports are read from the source, module level and inside functions alike; each command is also
imported in a fresh interpreter to check that no other command gets loaded with it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("afm_mlx", "converters")
# Bottom to top: a wing may import the wings before it, never one after it.
WINGS = (
    "afm_mlx.core",  # errors, files, command-line plumbing, BLAS, model families
    "afm_mlx.data",  # corpora, tokenizer, token cache, batches, tasks
    "afm_mlx.palettization",  # k-means, packing, palettized layers, LUT kernels
    "afm_mlx.models",  # presets, checkpoints in and out, precision, streaming blocks
    "afm_mlx.adapters",  # LoRA
    "afm_mlx.inference",  # the generator, the HTTP app
    "afm_mlx.training",  # the loop, world, memory, blockwise step, losses, adapter training
    "afm_mlx.calibration",  # importance, measured sensitivity, bit allocation
    "converters",  # the converters' library: weights plan, lowering, Core ML / Core AI programs
)
MAX_LINES = 550


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _defines_main(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the packages under ``root``, by dotted name."""
    out = {}
    for package in PACKAGES:
        for f in sorted((root / package).rglob("*.py")):
            out[_module_name(f, root)] = f
    return out


def room(name: str, path: Path) -> str:
    """'command', 'root' (a package's ``__init__``) or the wing ``name`` belongs to."""
    parts = name.split(".")
    if len(parts) == 1:
        return "root"
    if parts[0] == "converters":
        return "command" if _defines_main(path) else "converters"
    if len(parts) == 2 and not path.name == "__init__.py":
        return "command"
    return ".".join(parts[:2])


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in ``path`` (``from afm_mlx.x import y`` counts as
    ``afm_mlx.x.y`` when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in known}


def violations(root: Path = ROOT) -> list[str]:
    """What breaks the plan under ``root``, one line each."""
    mods = modules(root)
    known = set(mods)
    rooms = {name: room(name, path) for name, path in mods.items()}
    order = {w: i for i, w in enumerate(WINGS)}
    wrong = []
    graph = {name: imports(path, known) - {name} for name, path in mods.items()}
    for name, path in mods.items():
        where = rooms[name]
        if where == "command" and not _defines_main(path):
            wrong.append(f"{name}: a module at the top of afm_mlx is a command, with a main()")
        if where not in ("command", "root") and where not in order:
            wrong.append(f"{name}: in no wing; add {where} to WINGS in {__file__}")
            continue
        for dep in sorted(graph[name]):
            there = rooms[dep]
            if there == "root":
                continue  # a package's __init__ imports nothing heavy (it has its own check)
            if there == "command":
                if where != "root":
                    wrong.append(f"{name} imports the command {dep}")
            elif where in order and there in order and order[there] > order[where]:
                wrong.append(f"{name} ({where}) imports {dep} ({there}), a wing above it")
    wrong += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    for folder in (*PACKAGES, "tests", "scripts"):
        for path in sorted((root / folder).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                wrong.append(f"{path.relative_to(root)}: {lines} lines (at most {MAX_LINES})")
    return wrong


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for group in groups:  # walk from the first member until a module repeats
        path, members = [group[0]], set(group)
        while True:
            nxt = sorted(graph[path[-1]] & members)[0]
            if nxt in path:
                out.append(path[path.index(nxt) :] + [nxt])
                break
            path.append(nxt)
    return out


def test_the_house_follows_its_plan():
    wrong = violations()
    assert not wrong, "\n".join(wrong)


def test_package_roots_and_wing_entrances_import_nothing():
    # ``import afm_mlx`` stays cheap, and a wing's __init__ is its description, not a re-export.
    for path in modules().values():
        if path.name == "__init__.py":
            body = ast.parse(path.read_text()).body
            top_level = [n for n in body if isinstance(n, (ast.Import, ast.ImportFrom))]
            assert not top_level, f"{path}: imports at module level"


def _write(root: Path, rel: str, text: str = "") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _tree(tmp_path: Path, extra: dict[str, str]) -> Path:
    """A small project laid out like this one, plus ``extra`` files."""
    files = {
        "afm_mlx/__init__.py": "",
        "afm_mlx/core/__init__.py": "",
        "afm_mlx/core/errors.py": "",
        "afm_mlx/models/__init__.py": "",
        "afm_mlx/models/io.py": "from afm_mlx.core.errors import UserError\n",
        "afm_mlx/train.py": "from afm_mlx.models.io import x\ndef main(): pass\n",
        "afm_mlx/fuse.py": "def main(): pass\n",
        "converters/__init__.py": "",
        "converters/weights.py": "from afm_mlx.models.io import x\n",
        "converters/coreml.py": "from converters.weights import y\ndef main(): pass\n",
    }
    for rel, text in {**files, **extra}.items():
        _write(tmp_path, rel, text)
    return tmp_path


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, None),
        # a command importing another command, even lazily
        (
            {"afm_mlx/fuse.py": "def main():\n    from afm_mlx.train import main\n"},
            "afm_mlx.fuse imports the command afm_mlx.train",
        ),
        # a wing importing a wing above it
        (
            {"afm_mlx/core/errors.py": "from afm_mlx.models.io import load\n"},
            "afm_mlx.core.errors (afm_mlx.core) imports afm_mlx.models.io (afm_mlx.models)",
        ),
        # a library importing a command
        (
            {"converters/weights.py": "import afm_mlx.train\n"},
            "converters.weights imports the command afm_mlx.train",
        ),
        # a cycle inside one wing
        (
            {
                "afm_mlx/models/a.py": "from afm_mlx.models.b import f\n",
                "afm_mlx/models/b.py": "def g():\n    from afm_mlx.models import a\n",
            },
            "import cycle: afm_mlx.models.a -> afm_mlx.models.b -> afm_mlx.models.a",
        ),
        # a folder that is no wing, a top-level module that is no command, an oversize module
        ({"afm_mlx/misc/__init__.py": ""}, "afm_mlx.misc: in no wing"),
        ({"afm_mlx/helpers.py": "X = 1\n"}, "afm_mlx.helpers: a module at the top of afm_mlx"),
        ({"afm_mlx/core/big.py": "x = 1\n" * (MAX_LINES + 1)}, "afm_mlx/core/big.py: 551 lines"),
        ({"tests/test_big.py": "x = 1\n" * (MAX_LINES + 1)}, "tests/test_big.py: 551 lines"),
    ],
)
def test_the_rule_sees_each_kind_of_violation(tmp_path, extra, expected):
    found = violations(_tree(tmp_path, extra))
    if expected is None:
        assert found == []
    else:
        assert any(line.startswith(expected) for line in found), found


def commands() -> list[str]:
    return sorted(n for n, p in modules().items() if room(n, p) == "command")


def test_every_command_is_a_stage_of_the_cli():
    # Each command runs as ``python -m``; the console scripts name only commands.
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    targets = {line.split('"')[1].split(":")[0] for line in scripts.splitlines() if '= "' in line}
    assert targets == set(commands())


@pytest.mark.parametrize("command", commands())
def test_importing_a_command_loads_no_other_command(command):
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({command!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    loaded = set(json.loads(out.splitlines()[-1]))
    assert loaded & set(commands()) == {command}
