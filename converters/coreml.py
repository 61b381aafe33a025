"""Convert an afm_mlx / mlx-lm qwen3-family model (fp or palettized) to a Core ML ``.mlpackage``.

    python -m converters.coreml --model runs/small --out small.mlpackage
    python -m converters.coreml --model runs/small-pal --adapter chat=runs/chat-adapter \\
        --out small.mlpackage --context 512 --prefill-chunk 64

The package holds one multifunction model: ``prefill`` (a chunk of ``--prefill-chunk`` tokens at a
position) and ``decode`` (one token), plus ``prefill_NAME`` / ``decode_NAME`` per adapter, all
sharing one stateful KV cache of ``--context`` rows and one copy of the base weights (coremltools
deduplicates identical constants across functions). The MIL program is built directly from the
MLX weights (no PyTorch) by the lowering shared with ``converters.coreai``; palettized layers keep
their LUTs and indices bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from converters.export import (
    ConvertResult,
    ExportConfig,
    ModelPlan,
    cli_main,
    convert_with,
    package_bytes,
)

PROG = "python -m converters.coreml"
__all__ = ["ConvertConfig", "ConvertResult", "convert", "main", "package_bytes"]


@dataclass
class ConvertConfig(ExportConfig):
    out: str = field(default="", metadata={"help": "output package, NAME.mlpackage"})


def _quiet_coremltools():
    """Import coremltools without its Linux warnings about the missing runtime (it cannot run
    models here, which is expected)."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import coremltools as ct

    return ct


def _set_metadata(package: Path, metadata: dict[str, str]) -> None:
    """Add user metadata to a saved package's spec in place (the weights file is not rewritten)."""
    from coremltools.libmodelpackage import ModelPackage
    from coremltools.proto import Model_pb2

    spec_path = Path(ModelPackage(str(package)).getRootModel().path())
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    spec.description.metadata.userDefined.update(metadata)
    spec.description.metadata.shortDescription = (
        "afm_mlx language model: prefill/decode functions over a shared stateful KV cache"
    )
    spec_path.write_bytes(spec.SerializeToString())


def _write_package(
    cfg: ConvertConfig, plan: ModelPlan, staged: Path, say: Callable[[str], None]
) -> dict[str, float]:
    ct = _quiet_coremltools()
    from converters.coreml_program import build_function

    start = time.perf_counter()
    work = staged.parent
    desc = ct.utils.MultiFunctionDescriptor()
    for fn in plan.functions:
        prog = build_function(plan.weights, fn.seq, cfg.context, fn.lora)
        # No graph passes: the package holds exactly the ops built here (what the tests and
        # the op allow-list check); the Core ML compiler on device does its own fusion.
        mlmodel = ct.convert(
            prog,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT16,
            pass_pipeline=ct.PassPipeline.EMPTY,
            skip_model_load=True,
        )
        part = work / f"{fn.name}.mlpackage"
        mlmodel.save(str(part))
        del mlmodel, prog
        desc.add_function(str(part), "main", fn.name)
        say(f"built {fn.name} ({fn.seq} tokens per call) at {time.perf_counter() - start:.1f} s")
    desc.default_function_name = "decode"
    build = time.perf_counter() - start
    metadata = {
        k: v if isinstance(v, str) else json.dumps(v) for k, v in plan.metadata(cfg).items()
    }
    # The unpacked indices (1 byte per weight) are no longer needed: free them before
    # save_multifunction reads every function back (the conversion's memory peak).
    plan.release()
    ct.utils.save_multifunction(desc, str(staged))
    _set_metadata(staged, metadata)
    return {"build": build, "save": time.perf_counter() - start - build}


def convert(cfg: ConvertConfig, progress: Callable[[str], None] | None = None) -> ConvertResult:
    """Validate, read the model (and adapters), build every function, write the package atomically.

    ``progress`` receives one line per finished phase (the CLI prints them: a 3B model takes minutes).
    """
    return convert_with(
        cfg,
        ".mlpackage",
        lambda plan, staged, say: _write_package(cfg, plan, staged, say),
        progress,
    )


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    # tqdm reads its settings when first imported: coremltools' per-pass bars are noise here.
    os.environ.setdefault("TQDM_DISABLE", "1")

    cli_main(ConvertConfig, convert, PROG, __doc__, argv)


if __name__ == "__main__":
    main()
