"""Builds afm_mlx's optional CPU LUT kernel (an MLX C++ extension, afm_mlx/palettization/csrc); everything else
is declared in pyproject.toml.

The kernel is built with CMake against the mlx found at build time. A failed build (no C++
compiler, no CMake, an mlx without its CMake files) never fails the install: afm_mlx then runs
palettized layers on its pure-MLX path and says so once (``python -m afm_mlx.runtime``).
"""

import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNEL = "afm_mlx.palettization._lut_cpu"


class OptionalKernelBuild(build_ext):
    """``build_ext`` that builds the CMake kernel if it can, and otherwise explains and moves on."""

    def build_extension(self, ext: Extension) -> None:
        try:
            if shutil.which("cmake") is None:
                raise RuntimeError("cmake is not installed")
            from mlx.extension import CMakeBuild  # noqa: PLC0415  (needs mlx in the build env)

            CMakeBuild.build_extension(self, ext)
        except Exception as e:  # noqa: BLE001  (any failure means: no kernel, install anyway)
            print(
                f"afm_mlx: the CPU LUT kernel was not built ({e}); palettized models will use "
                "the pure-MLX path. Install a C++ compiler and CMake, then reinstall, to get it.",
                file=sys.stderr,
            )

    def copy_extensions_to_source(self) -> None:
        # Editable installs copy the built module next to the sources; skip it if there is none.
        def was_built(ext: Extension) -> bool:
            name = self.get_ext_filename(self.get_ext_fullname(ext.name))
            return (Path(self.build_lib) / name).exists()

        built = [e for e in self.extensions if was_built(e)]
        self.extensions, rest = built, self.extensions
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = rest


class CMakeKernel(Extension):
    def __init__(self, name: str, sourcedir: str) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(Path(sourcedir).resolve())


setup(
    ext_modules=[CMakeKernel(KERNEL, "afm_mlx/palettization/csrc")],
    cmdclass={"build_ext": OptionalKernelBuild},
)
