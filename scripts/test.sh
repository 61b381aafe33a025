#!/usr/bin/env bash
# Run afm_mlx's checks: lint, the default test suite, then the slow ones if there is time.
#   bash scripts/test.sh            lint + default suite (+ slow suite unless AFM_MLX_SKIP_SLOW=1)
# The slow suite (~15 minutes here) runs only if the run so far left time for it inside
# AFM_MLX_TIME_BUDGET_S (default 1650 s, counted from AFM_MLX_START_S, which .ci/run sets before
# set-up; otherwise from the start of this script), so CI stays inside its 30 minutes on a slow day.
set -euo pipefail
cd "$(dirname "$0")/.."
# The interpreter scripts/setup.sh installed into (see scripts/afm), unless PYTHON is set.
if [ -z "${PYTHON:-}" ] && [ -s .afm_python ]; then PYTHON="$(cat .afm_python)"; fi
PYTHON="${PYTHON:-python3}"
START_S="${AFM_MLX_START_S:-$(date +%s)}"
BUDGET_S="${AFM_MLX_TIME_BUDGET_S:-1650}"
SLOW_NEEDS_S=950  # the slow suite's time on this 2-core box (907 s measured 2026-11-30), + 5%

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
elapsed=$(( $(date +%s) - START_S ))
if [ "${AFM_MLX_SKIP_SLOW:-0}" != "1" ] && grep -q "::" <<<"$slow_tests"; then
  if [ $(( elapsed + SLOW_NEEDS_S )) -le "$BUDGET_S" ]; then
    "$PYTHON" -m pytest -q -m slow
  else
    echo "note: slow suite skipped: ${elapsed} s used of the ${BUDGET_S} s budget (AFM_MLX_TIME_BUDGET_S)"
  fi
fi
