#!/usr/bin/env bash
# Install afm_mlx on a fresh Linux or macOS machine.
# On Linux it also installs Debian/Ubuntu's OpenBLAS, which afm_mlx preloads automatically:
# MLX's CPU wheel otherwise runs matmuls on the ~60x slower reference BLAS.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1; then
  if ! ls /usr/lib/*/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
      echo "installing OpenBLAS (libopenblas0-pthread) for fast MLX on the CPU ..."
      $SUDO apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
    else
      echo "note: cannot install OpenBLAS without root; training will be much slower" >&2
    fi
  fi
fi

"$PYTHON" -m pip install --quiet --upgrade pip
"$PYTHON" -m pip install --quiet -e ".[test]"
echo "afm_mlx installed."
