"""Convert an afm_mlx / mlx-lm qwen3-family model (fp or palettized) to a Core ML ``.mlpackage``.

    python -m converters.coreml --model runs/small --out small.mlpackage
    python -m converters.coreml --model runs/small-pal --adapter chat=runs/chat-adapter \\
        --out small.mlpackage --context 512 --prefill-chunk 64

The package holds one multifunction model: ``prefill`` (a chunk of ``--prefill-chunk`` tokens at a
position) and ``decode`` (one token), plus ``prefill_NAME`` / ``decode_NAME`` per adapter, all
sharing one stateful KV cache of ``--context`` rows and one copy of the base weights (coremltools
deduplicates identical constants across functions). The MIL program is built directly from the
MLX weights (no PyTorch); palettized layers keep their LUTs and indices bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from afm_mlx.cli import UserError, parse_config, run_main

PROG = "python -m converters.coreml"


@dataclass
class ConvertConfig:
    model: str = field(default="", metadata={"help": "model folder: fp or palettized checkpoint"})
    out: str = field(default="", metadata={"help": "output package, NAME.mlpackage"})
    adapter: list[str] = field(
        default_factory=list,
        metadata={"help": "LoRA adapters as NAME=DIR; each adds decode_NAME and prefill_NAME"},
    )
    context: int = field(default=512, metadata={"help": "KV-cache rows (max tokens in context)"})
    prefill_chunk: int = field(
        default=64, metadata={"help": "tokens per prefill call; must divide --context"}
    )
    head_chunk: int = field(
        default=16384,
        metadata={"help": "max vocabulary rows per LM-head output (ANE dimension limit)"},
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out"})


@dataclass
class ConvertResult:
    path: Path
    functions: list[str]
    seconds: float
    bytes: int
    logit_chunks: list[int]
    phases: dict[str, float]  # seconds: "load" (read + extract), "build" (MIL + serialize), "save"


def _merge_repeated_adapter_flags(argv: list[str]) -> list[str]:
    """``--adapter a=x --adapter b=y`` means both (argparse alone would keep only the last)."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--adapter":
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        elif argv[i].startswith("--adapter="):
            values.append(argv[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + (["--adapter", *values] if values else [])


def package_bytes(path: str | Path) -> int:
    """Total size of the files in a package folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def validate(cfg: ConvertConfig) -> tuple[Path, Path, list[tuple[str, Path]]]:
    """Check every flag before anything heavy happens; returns (model dir, out, adapters)."""
    if not cfg.model:
        raise UserError("--model is required (a model folder)")
    if not cfg.out:
        raise UserError("--out is required (e.g. --out model.mlpackage)")
    out = Path(cfg.out)
    if out.suffix != ".mlpackage":
        raise UserError(f"--out {out}: the name must end in .mlpackage")
    if out.exists() and not cfg.overwrite:
        raise UserError(f"--out {out}: already exists; pass --overwrite or choose another name")
    if cfg.context < 1 or cfg.prefill_chunk < 1 or cfg.head_chunk < 1:
        raise UserError("--context, --prefill-chunk and --head-chunk must be positive")
    if cfg.context % cfg.prefill_chunk:
        raise UserError(
            f"--context {cfg.context} is not a multiple of --prefill-chunk {cfg.prefill_chunk}; "
            "prefill writes whole chunks into the cache, so pick a divisor"
        )
    from converters.coreml_weights import parse_adapter_spec

    adapters = [parse_adapter_spec(s) for s in cfg.adapter]
    names = [n for n, _ in adapters]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"--adapter: name {duplicate!r} is given twice")
    model_dir = Path(cfg.model)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model {model_dir}: no config.json (expected a model folder)")
    return model_dir, out, adapters


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


def convert(cfg: ConvertConfig, progress: Callable[[str], None] | None = None) -> ConvertResult:
    """Validate, read the model (and adapters), build every function, write the package atomically.

    ``progress`` receives one line per finished phase (the CLI prints them: a 3B model takes minutes).
    """
    say = progress or (lambda _msg: None)
    model_dir, out, adapter_specs = validate(cfg)
    from afm_mlx.fileio import read_json
    from converters.coreml_weights import check_convertible

    config = read_json(model_dir / "config.json", "model config (config.json)")
    check_convertible(config, str(model_dir / "config.json"))
    start = time.perf_counter()

    from afm_mlx.model import load_model, model_fingerprint
    from converters.coreml_weights import extract_weights, read_lora

    model, config, _ = load_model(model_dir)  # fp or palettized (config.json "palettization")
    weights = extract_weights(model, config, cfg.context)
    fingerprint = model_fingerprint(model) if adapter_specs else ""
    loras = [read_lora(name, folder, weights, fingerprint) for name, folder in adapter_specs]
    del model  # everything needed is in ``weights`` now
    phases = {"load": time.perf_counter() - start}
    say(
        f"read {model_dir} ({len(weights.layers)} layers, {len(loras)} adapters) in {phases['load']:.1f} s"
    )

    ct = _quiet_coremltools()
    from converters.coreml_program import build_function

    functions = [("decode", 1, None), ("prefill", cfg.prefill_chunk, None)]
    for lora in loras:
        functions += [
            (f"decode_{lora.name}", 1, lora),
            (f"prefill_{lora.name}", cfg.prefill_chunk, lora),
        ]

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=out.parent))
    staged = work / out.name
    try:
        desc = ct.utils.MultiFunctionDescriptor()
        for name, seq, lora in functions:
            prog = build_function(weights, seq, cfg.context, lora, cfg.head_chunk)
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
            part = work / f"{name}.mlpackage"
            mlmodel.save(str(part))
            del mlmodel, prog
            desc.add_function(str(part), "main", name)
            say(f"built {name} ({seq} tokens per call) at {time.perf_counter() - start:.1f} s")
        desc.default_function_name = "decode"
        phases["build"] = time.perf_counter() - start - phases["load"]
        vocab, names = weights.vocab, [f[0] for f in functions]
        adapters_meta = {x.name: str(x.folder) for x in loras}
        # The unpacked indices (1 byte per weight) are no longer needed: free them before
        # save_multifunction reads every function back (the conversion's memory peak).
        del weights, loras, lora, functions
        ct.utils.save_multifunction(desc, str(staged))
        chunks = [min(cfg.head_chunk, vocab - s) for s in range(0, vocab, cfg.head_chunk)]
        _set_metadata(
            staged,
            {
                "afm_mlx.context": str(cfg.context),
                "afm_mlx.prefill_chunk": str(cfg.prefill_chunk),
                "afm_mlx.logit_chunks": json.dumps(chunks),
                "afm_mlx.functions": json.dumps(names),
                "afm_mlx.adapters": json.dumps(adapters_meta),
                "afm_mlx.source_model": str(model_dir.resolve()),
                "afm_mlx.base_fingerprint": fingerprint,
            },
        )
        if out.exists():  # --overwrite: move the old package aside only once the new one is done
            shutil.move(str(out), str(work / "replaced.mlpackage"))
            try:
                os.replace(staged, out)
            except OSError:
                shutil.move(str(work / "replaced.mlpackage"), str(out))
                raise
        else:
            os.replace(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ConvertResult(
        path=out,
        functions=names,
        seconds=time.perf_counter() - start,
        bytes=package_bytes(out),
        logit_chunks=chunks,
        phases={**phases, "save": time.perf_counter() - start - phases["load"] - phases["build"]},
    )


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""

    # tqdm reads its settings when first imported: coremltools' per-pass bars are noise here.
    os.environ.setdefault("TQDM_DISABLE", "1")

    def body() -> None:
        args = _merge_repeated_adapter_flags(sys.argv[1:] if argv is None else argv)
        cfg = parse_config(ConvertConfig, args, PROG, __doc__.splitlines()[0])
        result = convert(cfg, progress=print)
        print(
            f"wrote {result.path} ({result.bytes / 1e6:.1f} MB) in {result.seconds:.1f} s; "
            f"functions: {', '.join(result.functions)}; logits chunks {result.logit_chunks}"
        )

    run_main(body)


if __name__ == "__main__":
    main()
