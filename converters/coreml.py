"""Convert an afm_mlx / mlx-lm qwen3-family model (fp or palettized) to a Core ML ``.mlpackage``.

    python -m converters.coreml --model runs/small --out small.mlpackage
    python -m converters.coreml --model runs/small-pal --adapter chat=runs/chat-adapter \\
        --out small.mlpackage --context 512 --prefill-chunk 64

The package holds one multifunction model: ``prefill`` (a chunk of ``--prefill-chunk`` tokens at a
position) and ``decode`` (one token), plus ``prefill_NAME`` / ``decode_NAME`` per adapter, all
sharing one stateful KV cache of ``--context`` rows and one copy of the base weights (constants
of equal value share one blob, ``_share_weights``). The MIL program is built directly from the
MLX weights (no PyTorch) by the lowering shared with ``converters.coreai``; palettized layers keep
their LUTs and indices bit for bit.
"""

from __future__ import annotations

import hashlib
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


def _share_weights(prog) -> int:
    """Give the constants that several functions hold with equal values one ``weight_id``, so
    the package stores each once (what coremltools' ``save_multifunction`` does after reading
    every function back from disk). Values are compared by digest, each memory region hashed
    once: the functions mostly hold the very same arrays (the plan's), and reading nothing
    back keeps the conversion's peak at the plan's size. Returns the number of shared values."""
    import numpy as np

    digests: dict[tuple, str] = {}
    groups: dict[tuple, list] = {}
    for func in prog.functions.values():
        for op in func.operations:
            val = op.outputs[0].val if op.op_type == "const" else None
            if not isinstance(val, np.ndarray) or val.size == 0:
                continue
            region = (val.__array_interface__["data"][0], val.shape, val.dtype.str, val.strides)
            if region not in digests:
                data = np.ascontiguousarray(val)
                digests[region] = hashlib.sha1(data.view(np.uint8).reshape(-1)).hexdigest()
            groups.setdefault((val.shape, val.dtype.str, digests[region]), []).append(op)
    shared = [ops for ops in groups.values() if len({id(op) for op in ops}) > 1]
    for i, ops in enumerate(shared):
        for op in ops:
            op.weight_id = str(i)
    return len(shared)


def _write_package(
    cfg: ConvertConfig, plan: ModelPlan, staged: Path, say: Callable[[str], None]
) -> dict[str, float]:
    ct = _quiet_coremltools()
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil import Program
    from coremltools.proto import Model_pb2

    from converters.coreml_program import build_function

    start = time.perf_counter()
    # One program holding every function, built the way coremltools' save_multifunction builds
    # it, but from the programs in memory: writing each function as a package and reading it
    # back (unpacking its indices again) doubled the conversion's peak.
    multi, functions = Program(), []
    for fn in plan.functions:
        prog = build_function(plan.weights, fn.seq, cfg.context, fn.lora)
        # No graph passes: the package holds exactly the ops built here (what the tests and
        # the op allow-list check); the Core ML compiler on device does its own fusion. The
        # conversion gives the function's interface (inputs, outputs, states).
        single = ct.convert(
            prog,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT16,
            pass_pipeline=ct.PassPipeline.EMPTY,
            skip_model_load=True,
        )
        d = single.get_spec().description
        functions.append(
            Model_pb2.FunctionDescription(
                name=fn.name, input=d.input, output=d.output, state=d.state
            )
        )
        del single
        ct.utils._multifunction_program_append_unifunction_program(multi, prog, "main", fn.name)
        say(f"built {fn.name} ({fn.seq} tokens per call) at {time.perf_counter() - start:.1f} s")
    build = time.perf_counter() - start
    _share_weights(multi)
    multi.default_function_name = "decode"
    multi.skip_all_passes = True
    multi.export_as_multifunction = True
    mlmodel = mil_convert(
        multi,
        convert_to="mlprogram",
        convert_from="milinternal",
        specification_version=ct.target.iOS18,
        compute_units=ct.ComputeUnit.CPU_ONLY,
        model_description=Model_pb2.ModelDescription(
            functions=functions, defaultFunctionName="decode"
        ),
        skip_model_load=True,
    )
    mlmodel.save(str(staged))
    del mlmodel, multi
    metadata = {
        k: v if isinstance(v, str) else json.dumps(v) for k, v in plan.metadata(cfg).items()
    }
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
