"""Generate text, with or without adapters: ``python -m afm_mlx.generate --model DIR --prompt ...``.

Built on mlx-lm's ``stream_generate``, ``make_sampler`` and KV-cache quantization
(``afm_mlx.inference.generator.Generator``). The base loads once; adapters are read once, stay cached and
swap without reloading it.
Several ``--adapter`` flags answer the same prompt with each in turn (``--adapter none``: the
bare base).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from afm_mlx.adapters.lora import read_adapter
from afm_mlx.core.config import stage_main
from afm_mlx.core.errors import UserError
from afm_mlx.inference.generator import Generator
from afm_mlx.palettization import kernels
from afm_mlx.palettization.layers import DENSE_CACHE


@dataclass
class GenerateConfig:
    model: str | None = field(default=None, metadata={"help": "model folder (required)"})
    adapter: list[str] = field(
        default_factory=list,
        metadata={"help": "adapter folder(s), each answers the prompt ('none': bare base)"},
    )
    prompt: str | None = field(
        default=None, metadata={"help": "prompt text (required); '-' reads it from stdin"}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "system message (implies --chat), as mlx-lm"}
    )
    max_tokens: int = field(default=100, metadata={"help": "tokens to generate"})
    # mlx-lm's defaults: greedy unless a temperature is asked for.
    temp: float = field(default=0.0, metadata={"help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1: off)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    kv_bits: int | None = field(
        default=None, metadata={"help": "quantize the KV cache to 4 or 8 bits"}
    )
    kv_group_size: int = field(default=64, metadata={"help": "KV quantization group size"})
    max_kv_size: int | None = field(
        default=None,
        metadata={"help": "keep at most this many tokens in the KV cache (a rotating cache)"},
    )
    chat: bool = field(default=False, metadata={"help": "wrap the prompt in the chat template"})
    verbose: bool = field(
        default=True, metadata={"help": "print tokens/s and peak memory to stderr (as mlx-lm)"}
    )
    dense_cache: str = field(
        default="auto",
        metadata={
            "help": "keep dense copies of palettized weights (auto: only on a CPU without the "
            "LUT kernel, if they fit in a quarter of memory)",
            "choices": list(DENSE_CACHE),
        },
    )

    lut_kernel: str | None = kernels.flag_field()

    def validate(self) -> None:
        if not self.model:
            raise UserError("--model is required")
        if self.prompt is None:
            raise UserError("--prompt is required")
        if self.max_tokens <= 0:
            raise UserError("--max-tokens must be positive")
        if self.temp < 0:
            raise UserError("--temp must be >= 0")
        if self.max_kv_size is not None and self.max_kv_size <= 0:
            raise UserError("--max-kv-size must be positive")
        if not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")


def _generate(cfg: GenerateConfig) -> None:
    cfg.validate()
    if cfg.prompt == "-":
        cfg.prompt = sys.stdin.read()
        if not cfg.prompt.strip():
            raise UserError("--prompt -: nothing was read from stdin")
    kernels.apply_flag(cfg.lut_kernel)
    names = cfg.adapter or [None]
    for name in names:  # validate every adapter folder before generating anything
        if name is not None and name.lower() != "none":
            read_adapter(name)
    gen = Generator(cfg.model, cfg.dense_cache)
    gen.check_kv(cfg.kv_bits, cfg.kv_group_size)
    for name in names:
        adapter = None if name is None or name.lower() == "none" else name
        gen.use(adapter)
        if len(names) > 1:
            print(f"=== {adapter or 'base'} ===", flush=True)
        for piece in gen.stream(
            cfg.prompt,
            max_tokens=cfg.max_tokens,
            temp=cfg.temp,
            top_p=cfg.top_p,
            seed=cfg.seed,
            kv_bits=cfg.kv_bits,
            kv_group_size=cfg.kv_group_size,
            chat=cfg.chat,
            system_prompt=cfg.system_prompt,
            max_kv_size=cfg.max_kv_size,
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if cfg.verbose and gen.last_stats:
            st = gen.last_stats
            print(
                f"prompt: {st['prompt_tokens']} tokens, {st['prompt_tps']:.1f} tokens/s | "
                f"generation: {st['generation_tokens']} tokens, {st['generation_tps']:.1f} "
                f"tokens/s | peak memory {st['peak_memory_gb']:.3f} GB"
                + (" | dense weights cached" if gen.dense_cached else ""),
                file=sys.stderr,
                flush=True,
            )


def main(argv: list[str] | None = None) -> None:
    stage_main(GenerateConfig, _generate, "python -m afm_mlx.generate", __doc__, argv)


if __name__ == "__main__":
    main()
