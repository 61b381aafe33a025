"""The conversion flow both Apple targets share: flags, checks, reading the model and adapters into
the plan, the list of functions, the metadata, and writing the output atomically.

``converters.coreml`` and ``converters.coreai`` only build and save their own format in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afm_mlx.core.config import parse_config, run_main
from afm_mlx.core.errors import UserError
from afm_mlx.core.fileio import output_lock, staged_dir
from converters.extract import extract_weights, parse_adapter_spec, read_lora
from converters.weights import DEFAULT_HEAD_CHUNK, LoraWeights, ModelWeights, check_convertible


@dataclass
class ExportConfig:
    """Flags every converter takes (the format-specific ones extend it)."""

    model: str = field(default="", metadata={"help": "model folder: fp or palettized checkpoint"})
    out: str = field(default="", metadata={"help": "output path"})
    adapter: list[str] = field(
        default_factory=list,
        metadata={"help": "LoRA adapters as NAME=DIR; each adds decode_NAME and prefill_NAME"},
    )
    context: int = field(default=512, metadata={"help": "KV-cache rows (max tokens in context)"})
    prefill_chunk: int = field(
        default=64, metadata={"help": "tokens per prefill call; must divide --context"}
    )
    head_chunk: int = field(
        default=DEFAULT_HEAD_CHUNK,
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
    phases: dict[str, float]  # seconds: "load" (read + extract), "build", "save"


@dataclass
class Function:
    """One function of the output: ``seq`` tokens per call, with ``lora`` or the bare base."""

    name: str
    seq: int
    lora: LoraWeights | None


@dataclass
class ModelPlan:
    """What a converter emits: the weights plan, the adapters and the functions."""

    model_dir: Path
    weights: ModelWeights
    loras: list[LoraWeights]
    fingerprint: str
    functions: list[Function]

    def release(self) -> None:
        """Drop the weights once every function is built (a writer that saves afterwards frees
        what its program does not hold before its own memory peak)."""
        self.weights = None  # type: ignore[assignment]
        self.loras = []
        for f in self.functions:
            f.lora = None

    def metadata(self, cfg: ExportConfig) -> dict[str, Any]:
        """What a runner needs to drive the output, and where it came from."""
        return {
            "afm_mlx.context": cfg.context,
            "afm_mlx.prefill_chunk": cfg.prefill_chunk,
            "afm_mlx.logit_chunks": self.weights.logit_chunks(),
            "afm_mlx.functions": [f.name for f in self.functions],
            "afm_mlx.adapters": {x.name: str(x.folder) for x in self.loras},
            "afm_mlx.source_model": str(self.model_dir.resolve()),
            "afm_mlx.base_fingerprint": self.fingerprint,
        }


def package_bytes(path: str | Path) -> int:
    """Total size of the files in a package / asset folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def validate(cfg: ExportConfig, suffix: str) -> tuple[Path, Path, list[tuple[str, Path]]]:
    """Check every flag before anything heavy happens; returns (model dir, out, adapters)."""
    if not cfg.model:
        raise UserError("--model is required (a model folder)")
    if not cfg.out:
        raise UserError(f"--out is required (e.g. --out model{suffix})")
    out = Path(cfg.out)
    if out.suffix != suffix:
        raise UserError(f"--out {out}: the name must end in {suffix}")
    if out.exists() and not cfg.overwrite:
        raise UserError(f"--out {out}: already exists; pass --overwrite or choose another name")
    if cfg.context < 1 or cfg.prefill_chunk < 1 or cfg.head_chunk < 1:
        raise UserError("--context, --prefill-chunk and --head-chunk must be positive")
    if cfg.context % cfg.prefill_chunk:
        raise UserError(
            f"--context {cfg.context} is not a multiple of --prefill-chunk {cfg.prefill_chunk}; "
            "prefill writes whole chunks into the cache, so pick a divisor"
        )
    adapters = [parse_adapter_spec(s) for s in cfg.adapter]
    names = [n for n, _ in adapters]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"--adapter: name {duplicate!r} is given twice")
    model_dir = Path(cfg.model)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model {model_dir}: no config.json (expected a model folder)")
    return model_dir, out, adapters


def read_model(cfg: ExportConfig, model_dir: Path, adapters: list[tuple[str, Path]]) -> ModelPlan:
    """Load the model (fp or palettized) and its adapters into the plan; refuses what cannot be
    converted before reading any weights."""
    from afm_mlx.core.fileio import read_json
    from afm_mlx.models.io import load_model, model_fingerprint
    from afm_mlx.models.streaming import block_releaser

    config = read_json(model_dir / "config.json", "model config (config.json)")
    check_convertible(config, str(model_dir / "config.json"))
    # fp or palettized (config.json "palettization"), read a block at a time into the plan: each
    # block is given back to disk once read (the plan holds a palettized model's packed indices,
    # views of the arrays read, and copies of everything else: the model beside it doubled that).
    model, config, path = load_model(model_dir, lazy=True)
    release = block_releaser(model, path)
    fingerprint = ""
    if adapters:
        fingerprint = model_fingerprint(model)  # reads every weight: give them back
        for i in range(len(model.model.layers) if release is not None else 0):
            release(i)
    weights = extract_weights(model, config, cfg.context, cfg.head_chunk, release)
    loras = [read_lora(name, folder, weights, fingerprint) for name, folder in adapters]
    functions = [Function("decode", 1, None), Function("prefill", cfg.prefill_chunk, None)]
    for lora in loras:
        functions += [
            Function(f"decode_{lora.name}", 1, lora),
            Function(f"prefill_{lora.name}", cfg.prefill_chunk, lora),
        ]
    return ModelPlan(model_dir, weights, loras, fingerprint, functions)


def convert_with(
    cfg: ExportConfig,
    suffix: str,
    write: Callable[[ModelPlan, Path, Callable[[str], None]], dict[str, float]],
    progress: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Validate, read the model into the plan, let ``write`` build and save the output at the
    staged path it is given (returning its phase timings), then move it into place; ``--out``
    is locked throughout."""
    say = progress or (lambda _msg: None)
    model_dir, out, adapter_specs = validate(cfg, suffix)
    with output_lock(out):
        start = time.perf_counter()
        plan = read_model(cfg, model_dir, adapter_specs)
        phases = {"load": time.perf_counter() - start}
        say(
            f"read {model_dir} ({len(plan.weights.layers)} layers, {len(plan.loras)} adapters) "
            f"in {phases['load']:.1f} s"
        )
        names, chunks = [f.name for f in plan.functions], plan.weights.logit_chunks()
        with staged_dir(out, replace=cfg.overwrite) as staged:
            phases.update(write(plan, staged, say))
    return ConvertResult(
        path=out,
        functions=names,
        seconds=time.perf_counter() - start,
        bytes=package_bytes(out),
        logit_chunks=chunks,
        phases=phases,
    )


def cli_main(
    config_cls: type[ExportConfig],
    convert: Callable[..., ConvertResult],
    prog: str,
    doc: str,
    argv: list[str] | None,
) -> None:
    """A converter's ``main()``: flags -> config -> ``convert``
    with progress lines, a summary line, and one-line errors."""

    def body() -> None:
        cfg = parse_config(config_cls, argv, prog, doc.splitlines()[0])
        result = convert(cfg, progress=print)
        print(
            f"wrote {result.path} ({result.bytes / 1e6:.1f} MB) in {result.seconds:.1f} s; "
            f"functions: {', '.join(result.functions)}; logits chunks {result.logit_chunks}"
        )

    run_main(body)
