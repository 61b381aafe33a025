"""Run a converted Core AI asset on the Neural Engine / GPU (macOS 27) and compare it with MLX.

    python scripts/coreai_check.py --asset small.aimodel --model runs/small-3.7
    python scripts/coreai_check.py --asset small.aimodel --model runs/small-3.7 \\
        --adapter chat=runs/chat --compute-unit gpu --prompt "ROMEO." --steps 64

Loads the asset with the runtime's ``SpecializationOptions`` for the chosen compute unit, prefills
the prompt through ``prefill[_NAME]``, then decodes greedily with ``decode[_NAME]`` on one KV state.
Every step's logits are compared with MLX's for the same tokens (teacher-forced), and the time to
first token and decode tokens/s are printed next to MLX's on the same machine.

``--compute-unit neural_engine`` and ``gpu`` need macOS 27 (the OS Core AI framework); elsewhere the
script stops with a one-line message. ``--compute-unit cpu`` also runs on Linux, through the CPU
interpreter bundled with coreai-core (that path is what the tests run). The macOS paths have not
been run yet (written on Linux): treat their first run on a Mac as the check of the check.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_check import Run, check_fits, load_reference, report  # noqa: E402

from afm_mlx.core.config import parse_config, run_main
from afm_mlx.core.errors import UserError

COMPUTE_UNITS = ("neural_engine", "gpu", "cpu")


@dataclass
class CheckConfig:
    asset: str = field(default="", metadata={"help": "the converted .aimodel"})
    model: str = field(default="", metadata={"help": "the MLX model folder it was converted from"})
    adapter: str = field(default="", metadata={"help": "NAME=DIR: check decode_NAME/prefill_NAME"})
    prompt: str = field(default="The ", metadata={"help": "prompt text (needs the tokenizer)"})
    steps: int = field(default=32, metadata={"help": "greedy decode steps"})
    compute_unit: str = field(
        default="neural_engine",
        metadata={"help": "preferred Core AI compute unit", "choices": COMPUTE_UNITS},
    )
    min_agreement: float = field(
        default=0.9, metadata={"help": "fail below this fraction of steps with MLX's argmax"}
    )


def specialization(compute_unit: str):
    """The runtime's specialization options for ``compute_unit`` (None: the bundled CPU
    interpreter, the only runtime off macOS 27)."""
    on_macos_27 = sys.platform == "darwin" and int(platform.mac_ver()[0].split(".")[0] or 0) >= 27
    if not on_macos_27:
        if compute_unit == "cpu":
            return None
        raise UserError(
            f"--compute-unit {compute_unit} needs macOS 27 (the Core AI framework); this is "
            f"{platform.system()} {platform.release()}, so nothing was run (--compute-unit cpu "
            "runs the bundled CPU interpreter anywhere)"
        )
    from coreai.runtime import ComputeUnitKind, SpecializationOptions

    if not SpecializationOptions.is_supported():
        raise UserError(
            "the OS Core AI runtime is not in use (set USE_OS_COREAI=1); nothing was run"
        )
    kind = getattr(ComputeUnitKind, compute_unit)()
    return SpecializationOptions.from_preferred_compute_unit_kind(kind)


def main_body(cfg: CheckConfig) -> None:
    if cfg.steps < 1:
        raise UserError("--steps must be positive")
    options = specialization(cfg.compute_unit)
    from converters.coreai_run import CoreAISession

    asset = Path(cfg.asset)
    if not asset.is_dir():
        raise UserError(f"--asset {asset}: no such asset")
    ref = load_reference(cfg.model, cfg.adapter, cfg.prompt)
    t = time.perf_counter()
    with CoreAISession(asset, options) as session:
        load_s = time.perf_counter() - t
        check_fits(ref, cfg.steps, session.context)
        suffix = f"_{ref.adapter}" if ref.adapter else ""
        session.function(f"decode{suffix}")  # a missing function is refused before timing
        session.function(f"prefill{suffix}")
        state = session.new_state()
        t = time.perf_counter()
        rows = [session.prefill(ref.prompt, state, ref.adapter)[-1]]
        ttft = time.perf_counter() - t
        tokens = [int(rows[-1].argmax())]
        t = time.perf_counter()
        for i in range(cfg.steps - 1):
            rows.append(session.decode(tokens[-1], len(ref.prompt) + i, state, ref.adapter))
            tokens.append(int(rows[-1].argmax()))
        decode_s = time.perf_counter() - t
    print(f"asset {asset} ({cfg.compute_unit}), functions prefill{suffix}/decode{suffix}")
    print(f"load+compile {load_s:.1f} s")
    report("Core AI", Run(rows, ttft, decode_s), ref, tokens, cfg.min_agreement)


def main(argv: list[str] | None = None) -> None:
    run_main(
        lambda: main_body(
            parse_config(CheckConfig, argv, "scripts/coreai_check.py", __doc__.splitlines()[0])
        )
    )


if __name__ == "__main__":
    main()
