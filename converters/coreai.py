"""Convert an afm_mlx / mlx-lm qwen3-family model (fp or palettized) to a Core AI ``.aimodel``.

    python -m converters.coreai --model runs/small-3.7 --out small.aimodel
    python -m converters.coreai --model runs/small-3.7 --adapter chat=runs/chat \\
        --out small.aimodel --context 512 --prefill-chunk 64 --compute-dtype float16

Core AI is Apple's iOS/macOS 27 path for AI models; ``coreai-core`` (PyPI, Python >= 3.11) builds
the asset and, on Linux too, runs it on the CPU. The asset has the Core ML package's interface:
functions ``prefill`` (``--prefill-chunk`` tokens at a position) and ``decode`` (one token), plus
``prefill_NAME`` / ``decode_NAME`` per adapter (LoRA unfused); inputs ``input_ids`` (1, S) int32
and ``position`` (1,) int32; the KV cache as state (``k_cache_i``, ``v_cache_i``, zero-filled by
the caller) shared by every function; outputs ``logits_0``, ``logits_1``... (vocabulary chunks, in
order). It is built from the MLX weights by the lowering shared with ``converters.coreml`` (no
PyTorch); palettized layers keep their LUTs and indices bit for bit and every weight is stored
once for all functions. ``float16`` compute is what ships; ``float32`` makes Linux verification
tight and fast (the Linux interpreter's fp16 path is slow and accumulates in fp16).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from afm_mlx.core.errors import UserError
from converters.coreai_run import require_coreai
from converters.export import ConvertResult, ExportConfig, ModelPlan, cli_main, convert_with

PROG = "python -m converters.coreai"
COMPUTE_DTYPE_CHOICES = ("float16", "float32")


@dataclass
class CoreAIConfig(ExportConfig):
    out: str = field(default="", metadata={"help": "output asset, NAME.aimodel"})
    compute_dtype: str = field(
        default="float16",
        metadata={
            "help": "activations, KV cache and dense weights (float16 ships; float32 verifies)",
            "choices": list(COMPUTE_DTYPE_CHOICES),
        },
    )


def _write_asset(
    cfg: CoreAIConfig, plan: ModelPlan, staged: Path, say: Callable[[str], None]
) -> dict[str, float]:
    from converters.coreai_program import build_program, save_program

    start = time.perf_counter()
    program, weights = build_program(plan, cfg.context, cfg.compute_dtype)
    build = time.perf_counter() - start
    say(f"built {len(plan.functions)} functions ({cfg.compute_dtype} compute) in {build:.1f} s")
    metadata = {**plan.metadata(cfg), "afm_mlx.compute_dtype": cfg.compute_dtype}
    plan.release()  # the blobs point at the packed rows themselves; the rest of the plan can go
    save_program(program, staged, metadata)
    del program, weights
    return {"build": build, "save": time.perf_counter() - start - build}


def convert(cfg: CoreAIConfig, progress: Callable[[str], None] | None = None) -> ConvertResult:
    """Validate, read the model (and adapters), build every function, write the asset atomically."""
    if cfg.compute_dtype not in COMPUTE_DTYPE_CHOICES:
        raise UserError(
            f"--compute-dtype {cfg.compute_dtype!r}: choose one of {', '.join(COMPUTE_DTYPE_CHOICES)}"
        )
    require_coreai()
    return convert_with(
        cfg, ".aimodel", lambda plan, staged, say: _write_asset(cfg, plan, staged, say), progress
    )


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    cli_main(CoreAIConfig, convert, PROG, __doc__, argv)


if __name__ == "__main__":
    main()
