#!/usr/bin/env bash
# Run afm_mlx's checks: lint, the default test suite, then the slow ones if there is time.
#   bash scripts/test.sh            lint + default suite (+ slow suite unless AFM_MLX_SKIP_SLOW=1)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# The reference comparison against transformers needs torch (CPU build, test-only dependency).
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install --quiet "torch==2.13.0"

"$PYTHON" -m ruff check afm_mlx converters tests scripts
"$PYTHON" -m ruff format --check afm_mlx converters tests scripts
"$PYTHON" -m pytest -q
# Palettized layers once more on the pure-MLX path (what an install without a compiler runs; the
# default suite takes the CPU LUT kernel wherever it is built).
AFM_MLX_LUT_KERNEL=off "$PYTHON" -m pytest -q tests/test_palettized.py tests/test_generate.py tests/test_lora.py
# The slow suite runs only when some test carries the marker, so the last runner line of a CI log
# is never one that executed no test.
slow_tests=$("$PYTHON" -m pytest -q -m slow --collect-only 2>/dev/null || true)
if [ "${AFM_MLX_SKIP_SLOW:-0}" != "1" ] && grep -q "::" <<<"$slow_tests"; then
  "$PYTHON" -m pytest -q -m slow
fi
