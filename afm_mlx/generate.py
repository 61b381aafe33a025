"""Generate text, with or without adapters: ``python -m afm_mlx.generate --model DIR --prompt ...``.

Built on mlx-lm's ``stream_generate``, ``make_sampler`` and KV-cache quantization. The base loads
once; adapters are read once, stay cached and swap without reloading it (``Generator.use``).
Several ``--adapter`` flags answer the same prompt with each in turn (``--adapter none``: the
bare base).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from afm_mlx import lut_kernels
from afm_mlx.cli import stage_main
from afm_mlx.errors import UserError
from afm_mlx.lora import Adapter, AdapterCache, read_adapter
from afm_mlx.model import load_base
from afm_mlx.palettized import DENSE_CACHE, cache_dense_weights

KV_BITS = (4, 8)


class Generator:
    """A loaded base model plus an adapter cache: ``use(adapter)``, then ``stream``/``generate``."""

    def __init__(self, model_path: str | Path, dense_cache: str = "auto"):
        self.model, self.tokenizer, self.config = load_base(model_path)
        self.adapters = AdapterCache(self.model)
        self.dense_cached = cache_dense_weights(self.model, dense_cache)
        self.last_stats: dict[str, float] = {}  # mlx-lm's speed figures of the last completion

    def use(self, adapter: str | Path | Adapter | None) -> Generator:
        """Switch to ``adapter`` (a folder, or None for the bare base); cheap after the first time."""
        self.adapters.activate(adapter)
        return self

    def check_kv(self, kv_bits: int | None, kv_group_size: int) -> None:
        """Refuse KV-cache quantization settings this model's head size cannot take."""
        if kv_bits is None:
            return
        if kv_bits not in KV_BITS:
            raise UserError(f"--kv-bits {kv_bits}: choose one of {', '.join(map(str, KV_BITS))}")
        head_dim = self.config.get("head_dim") or (
            self.config["hidden_size"] // self.config["num_attention_heads"]
        )
        if head_dim % kv_group_size:
            raise UserError(
                f"--kv-group-size {kv_group_size} does not divide this model's head_dim {head_dim}; "
                "pick a divisor among 32, 64, 128"
            )

    def prompt_tokens(self, prompt: str, chat: bool) -> list[int]:
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                from afm_mlx.task_data import BUILTIN_HEADERS

                text = f"{BUILTIN_HEADERS['user']}{prompt}\n\n{BUILTIN_HEADERS['assistant']}"
                return list(self.tokenizer.encode(text, add_special_tokens=False))
            messages = [{"role": "user", "content": prompt}]
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def stream(
        self,
        prompt: str,
        max_tokens: int = 100,
        temp: float = 0.7,
        top_p: float = 1.0,
        seed: int = 0,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        chat: bool = False,
    ) -> Iterator[str]:
        """Text pieces as they are produced; the same seed gives the same text."""
        self.check_kv(kv_bits, kv_group_size)
        tokens = self.prompt_tokens(prompt, chat)
        if not tokens:
            raise UserError("--prompt is empty")
        mx.random.seed(seed)
        sampler = make_sampler(temp=temp, top_p=top_p if 0 < top_p < 1 else 0.0)
        for response in stream_generate(
            self.model,
            self.tokenizer,
            mx.array(tokens),
            max_tokens=max_tokens,
            sampler=sampler,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
            quantized_kv_start=0,  # mlx-lm's default (5000) would leave short chats unquantized
        ):
            self.last_stats = {
                "prompt_tokens": response.prompt_tokens,
                "prompt_tps": response.prompt_tps,
                "generation_tokens": response.generation_tokens,
                "generation_tps": response.generation_tps,
                "peak_memory_gb": response.peak_memory,
            }
            yield response.text

    def generate(self, prompt: str, **kwargs) -> str:
        """The whole completion of ``prompt`` (same options as ``stream``)."""
        return "".join(self.stream(prompt, **kwargs))


@dataclass
class GenerateConfig:
    model: str | None = field(default=None, metadata={"help": "model folder (required)"})
    adapter: list[str] = field(
        default_factory=list,
        metadata={"help": "adapter folder(s), each answers the prompt ('none': bare base)"},
    )
    prompt: str | None = field(default=None, metadata={"help": "prompt text (required)"})
    max_tokens: int = field(default=100, metadata={"help": "tokens to generate"})
    temp: float = field(default=0.7, metadata={"help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1: off)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    kv_bits: int | None = field(
        default=None, metadata={"help": "quantize the KV cache to 4 or 8 bits"}
    )
    kv_group_size: int = field(default=64, metadata={"help": "KV quantization group size"})
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

    lut_kernel: str | None = field(
        default=None,
        metadata={
            "help": "palettized layers' LUT kernel: auto, on or off (default: "
            "$AFM_MLX_LUT_KERNEL, else auto)"
        },
    )

    def validate(self) -> None:
        if not self.model:
            raise UserError("--model is required")
        if self.prompt is None:
            raise UserError("--prompt is required")
        if self.max_tokens <= 0:
            raise UserError("--max-tokens must be positive")
        if self.temp < 0:
            raise UserError("--temp must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")


def _generate(cfg: GenerateConfig) -> None:
    cfg.validate()
    lut_kernels.apply_flag(cfg.lut_kernel)
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
