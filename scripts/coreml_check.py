"""Mac only: run a converted package on the Neural Engine and compare it with MLX token by token.

    python scripts/coreml_check.py --package small.mlpackage --model runs/small
    python scripts/coreml_check.py --package small.mlpackage --model runs/small-pal \\
        --adapter chat=runs/chat-adapter --prompt "ROMEO." --steps 64

Prefills the prompt through ``prefill[_NAME]`` in chunks, then decodes greedily with
``decode[_NAME]`` on one shared ``MLState``. Every step's Core ML logits are compared with MLX's for
the same tokens (MLX follows Core ML's choices, so one divergence does not cascade), and Core ML's
time to first token and decode tokens/s are printed next to MLX's on the same machine
(``device_check.py``, shared with ``coreai_check.py``).

Needs macOS 15+ (Core ML states, iOS18 opset); elsewhere it stops with a one-line message. This
script has not been run yet (written on Linux, where no Core ML runtime exists): treat its first
run on a Mac as the check of the check.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_check import Run, check_fits, load_reference, report  # noqa: E402

from afm_mlx.core.config import parse_config, run_main
from afm_mlx.core.errors import UserError

COMPUTE_UNITS = ("CPU_AND_NE", "CPU_ONLY", "CPU_AND_GPU", "ALL")


@dataclass
class CheckConfig:
    package: str = field(default="", metadata={"help": "the converted .mlpackage"})
    model: str = field(default="", metadata={"help": "the MLX model folder it was converted from"})
    adapter: str = field(default="", metadata={"help": "NAME=DIR: check decode_NAME/prefill_NAME"})
    prompt: str = field(default="The ", metadata={"help": "prompt text (needs the tokenizer)"})
    steps: int = field(default=32, metadata={"help": "greedy decode steps"})
    compute_units: str = field(
        default="CPU_AND_NE", metadata={"help": "Core ML compute units", "choices": COMPUTE_UNITS}
    )
    min_agreement: float = field(
        default=0.9, metadata={"help": "fail below this fraction of steps with MLX's argmax"}
    )


def require_macos() -> None:
    """Core ML prediction with states needs macOS 15; say so plainly anywhere else."""
    if sys.platform != "darwin":
        raise UserError(
            f"coreml_check.py runs Core ML models, which needs macOS 15 or later; this is "
            f"{platform.system()} ({platform.machine()}), so nothing was run"
        )
    major = int(platform.mac_ver()[0].split(".")[0] or 0)
    if major < 15:
        raise UserError(f"macOS {platform.mac_ver()[0]}: Core ML states need macOS 15 or later")


def package_metadata(path: Path) -> dict[str, str]:
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    meta = dict(spec.description.metadata.userDefined)
    if "afm_mlx.context" not in meta:
        raise UserError(f"--package {path}: not made by converters.coreml (no afm_mlx metadata)")
    return meta


def main_body(cfg: CheckConfig) -> None:
    require_macos()
    import coremltools as ct
    import numpy as np

    package = Path(cfg.package)
    if not package.is_dir():
        raise UserError(f"--package {package}: no such package")
    meta = package_metadata(package)
    context, chunk = int(meta["afm_mlx.context"]), int(meta["afm_mlx.prefill_chunk"])
    ref = load_reference(cfg.model, cfg.adapter, cfg.prompt)
    suffix = f"_{ref.adapter}" if ref.adapter else ""
    functions = json.loads(meta["afm_mlx.functions"])
    if f"decode{suffix}" not in functions:
        raise UserError(f"--package {package}: no function decode{suffix} (has {functions})")
    check_fits(ref, cfg.steps, context)
    prompt = ref.prompt

    units = getattr(ct.ComputeUnit, cfg.compute_units)
    t = time.perf_counter()
    prefill = ct.models.MLModel(str(package), compute_units=units, function_name=f"prefill{suffix}")
    decode = ct.models.MLModel(str(package), compute_units=units, function_name=f"decode{suffix}")
    load_s = time.perf_counter() - t
    state = decode.make_state()  # one KV cache, shared by both functions

    def logits_of(out: dict) -> np.ndarray:
        names = sorted(out, key=lambda k: int(k.rsplit("_", 1)[1]))
        return np.concatenate([np.asarray(out[k]) for k in names], axis=-1)[0].astype(np.float32)

    # Core ML: prefill in chunks (last chunk padded), then greedy decode.
    t = time.perf_counter()
    for start in range(0, len(prompt), chunk):
        ids = prompt[start : start + chunk]
        out = prefill.predict(
            {
                "input_ids": np.array([ids + [0] * (chunk - len(ids))], np.int32),
                "position": np.array([start], np.int32),
            },
            state=state,
        )
        last = logits_of(out)[len(ids) - 1]
    ttft = time.perf_counter() - t
    rows, tokens = [last], [int(last.argmax())]
    t = time.perf_counter()
    for i in range(cfg.steps - 1):
        out = decode.predict(
            {
                "input_ids": np.array([[tokens[-1]]], np.int32),
                "position": np.array([len(prompt) + i], np.int32),
            },
            state=state,
        )
        rows.append(logits_of(out)[0])
        tokens.append(int(rows[-1].argmax()))
    decode_s = time.perf_counter() - t

    print(f"package {package} ({cfg.compute_units}), functions prefill{suffix}/decode{suffix}")
    print(f"load+compile {load_s:.1f} s")
    report("Core ML", Run(rows, ttft, decode_s), ref, tokens, cfg.min_agreement)


def main(argv: list[str] | None = None) -> None:
    run_main(
        lambda: main_body(
            parse_config(CheckConfig, argv, "scripts/coreml_check.py", __doc__.splitlines()[0])
        )
    )


if __name__ == "__main__":
    main()
