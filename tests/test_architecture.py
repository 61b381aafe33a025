"""The dependency direction: library <- engine <- stage CLIs, and no stage imports another.

Every module of ``afm_mlx`` and ``converters`` is classified here; a new module must be added to
one layer (the test fails otherwise). Imports are read from the source (module level and inside
functions alike), and each stage is also imported in a fresh interpreter to check that no other
stage gets loaded with it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STAGES = {
    "afm_mlx.train",
    "afm_mlx.palettize",
    "afm_mlx.recover",
    "afm_mlx.finetune",
    "afm_mlx.evaluate",
    "afm_mlx.generate",
    "afm_mlx.fuse",
    "afm_mlx.server",
    "afm_mlx.pipeline",
    "converters.coreml",
    "converters.coreai",
}
# The engines the stages share: training (train, recover, finetune), generation (generate,
# server) and export (both converters).
ENGINE = {
    "afm_mlx.engine",
    "afm_mlx.adapter_training",
    "afm_mlx.generation",
    "converters.export",
    "converters.lowering",
    "converters.coreml_program",
    "converters.coreai_program",
}
# Everything else is library. ``tokenizer`` and ``runtime`` have small CLIs of their own (train a
# tokenizer; print the backend) but are used by everything, so they are library modules.
LIBRARY = {
    "afm_mlx",
    "afm_mlx.errors",
    "afm_mlx.families",
    "afm_mlx.cli",
    "afm_mlx.fileio",
    "afm_mlx.runtime",
    "afm_mlx.model",
    "afm_mlx.checkpoint",
    "afm_mlx.data",
    "afm_mlx.task_data",
    "afm_mlx.tokenizer",
    "afm_mlx.losses",
    "afm_mlx.lora",
    "afm_mlx.kmeans",
    "afm_mlx.packing",
    "afm_mlx.speakers",
    "afm_mlx.palettized",
    "afm_mlx.lut_kernels",
    "afm_mlx.report",
    "converters",
    "converters.plan",
    "converters.coreai_run",
}
LAYER = {**{m: 0 for m in LIBRARY}, **{m: 1 for m in ENGINE}, **{m: 2 for m in STAGES}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    files = sorted((ROOT / "afm_mlx").glob("*.py")) + sorted((ROOT / "converters").glob("*.py"))
    return {_module_name(f): f for f in files}


def _imports(path: Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (``from afm_mlx import x`` counts as
    ``afm_mlx.x`` when x is a module)."""
    known = set(_project_modules())
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in known}


def test_every_module_is_classified():
    unclassified = sorted(set(_project_modules()) - set(LAYER))
    assert not unclassified, f"add these modules to a layer in {__file__}: {unclassified}"
    stale = sorted(set(LAYER) - set(_project_modules()))
    assert not stale, f"classified modules that no longer exist: {stale}"


def test_dependencies_point_one_way():
    wrong = []
    for name, path in _project_modules().items():
        for dep in sorted(_imports(path) - {name}):
            if name == "afm_mlx" or dep in ("afm_mlx", "converters"):
                continue  # the package roots import nothing heavy (checked by the next rule)
            if LAYER[dep] > LAYER[name] or (LAYER[name] == 2 and LAYER[dep] == 2):
                wrong.append(f"{name} ({LAYER[name]}) imports {dep} ({LAYER[dep]})")
    assert not wrong, "library(0) <- engine(1) <- stage(2), no stage imports another:\n" + (
        "\n".join(wrong)
    )


def test_the_detector_sees_lazy_imports(tmp_path):
    # The rule must not miss an import hidden in a function body.
    src = tmp_path / "m.py"
    src.write_text(
        "def f():\n    from afm_mlx.evaluate import perplexity\n    import afm_mlx.fuse\n"
    )
    assert _imports(src) == {"afm_mlx.evaluate", "afm_mlx.fuse"}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_importing_a_stage_loads_no_other_stage(stage):
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({stage!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    loaded = set(json.loads(out.splitlines()[-1]))
    assert loaded & STAGES == {stage}
