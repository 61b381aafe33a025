"""Diff every command's ``--help`` between a git revision and the working tree.

    python scripts/check_help.py [REV]        (default REV: HEAD)

The commands are the console scripts of each tree's ``pyproject.toml`` (``afm-train`` ->
``afm_mlx.train``), run as ``python -m MODULE --help`` with that tree first on the path. Prints
one line per command and a unified diff of any that changed; exits 1 if a command's help changed,
appeared or disappeared. A command that prints no usage either side (``afm_mlx.runtime`` takes no
flags) is listed but not compared. Used to show that a refactor kept every command's flags.
"""

from __future__ import annotations

import argparse
import difflib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands(tree: Path) -> list[str]:
    """The modules behind the console scripts of ``tree``'s pyproject.toml."""
    text = (tree / "pyproject.toml").read_text()
    section = text.split("[project.scripts]")[1].split("\n[")[0]
    return sorted(
        {line.split('"')[1].split(":")[0] for line in section.splitlines() if '= "' in line}
    )


def help_text(tree: Path, module: str, cwd: Path) -> str:
    # AFM_MLX_BLAS_REEXEC: no re-run with the fast BLAS (it changes nothing a --help prints).
    env = {**os.environ, "PYTHONPATH": str(tree), "AFM_MLX_BLAS_REEXEC": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=cwd, env=env, capture_output=True, text=True
    )
    return f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"


def checkout(rev: str, into: Path) -> Path:
    """The files of ``rev`` (``git archive``), without touching the working tree."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True, check=True
    ).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", nargs="?", default="HEAD", help="git revision to compare with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = checkout(args.rev, Path(tmp) / "old")
        cwd = Path(tmp) / "cwd"
        cwd.mkdir()
        old, new = set(commands(old_tree)), set(commands(ROOT))
        changed = skipped = 0
        for module in sorted(old | new):
            if module not in new or module not in old:
                print(f"{module}: only in {'the working tree' if module in new else args.rev}")
                changed += 1
                continue
            before, after = help_text(old_tree, module, cwd), help_text(ROOT, module, cwd)
            if "usage:" not in before and "usage:" not in after:
                # afm_mlx.runtime takes no flags: "--help" runs it, and it prints this machine.
                print(f"{module}: takes no flags (prints no usage); not compared")
                skipped += 1
                continue
            if before == after:
                print(f"{module}: identical ({len(after.splitlines()) - 1} lines)")
                continue
            changed += 1
            print(f"{module}: CHANGED")
            sys.stdout.writelines(
                difflib.unified_diff(
                    before.splitlines(True), after.splitlines(True), args.rev, "working tree"
                )
            )
    print(
        f"{len(old | new) - changed - skipped} of {len(old | new) - skipped} commands' --help "
        f"identical to {args.rev}"
    )
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
