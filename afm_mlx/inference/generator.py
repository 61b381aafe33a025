"""Generation shared by ``afm_mlx.generate`` and ``afm_mlx.server``: one loaded base, adapters
swapped without reloading it, mlx-lm's ``stream_generate`` and samplers underneath.

``Generator`` loads the base once; ``use(adapter)`` switches adapters through an ``AdapterCache``
(each read and checked once). ``stream`` yields text pieces; ``stream_tokens`` works from token
ids and can keep a prompt cache (mlx-lm's KV caches), reusing the prefix a request shares with
the one before it under the same adapter. ``chat_tokens`` renders a conversation with the
tokenizer's chat template, or the built-in one the task adapters are trained with.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from afm_mlx.adapters.lora import Adapter, AdapterCache
from afm_mlx.core.errors import UserError
from afm_mlx.core.families import standard_config
from afm_mlx.data.tasks import BUILTIN_HEADERS
from afm_mlx.models.io import load_base
from afm_mlx.palettization.layers import cache_dense_weights

KV_BITS = (4, 8)


class Generator:
    """A loaded base model plus an adapter cache: ``use(adapter)``, then ``stream``/``generate``."""

    def __init__(self, model_path: str | Path, dense_cache: str = "auto"):
        self.model_path = model_path
        self.model, self.tokenizer, self.config = load_base(model_path)
        self.adapters = AdapterCache(self.model)
        self.dense_cached = cache_dense_weights(self.model, dense_cache)
        self.last_stats: dict[str, float] = {}  # mlx-lm's speed figures of the last completion
        self.cached_tokens = 0  # prompt tokens the last stream_tokens call took from its cache
        self._prompt_cache: tuple | None = None  # (adapter, prompt tokens, KV cache) kept

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
        config = standard_config(self.config)
        head_dim = config.get("head_dim") or (
            config["hidden_size"] // config["num_attention_heads"]
        )
        if head_dim % kv_group_size:
            raise UserError(
                f"--kv-group-size {kv_group_size} does not divide this model's head_dim {head_dim}; "
                "pick a divisor among 32, 64, 128"
            )

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation rendered for generation: the tokenizer's chat template with the
        generation prompt, or the built-in template task adapters are trained with
        (``afm_mlx.data.tasks``) ending in an open assistant turn."""
        if getattr(self.tokenizer, "chat_template", None):
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        eos = self.tokenizer.eos_token or ""
        text = ""
        for m in messages:
            end = eos if m["role"] == "assistant" else ""
            text += f"{BUILTIN_HEADERS[m['role']]}{m['content']}{end}\n\n"
        text += BUILTIN_HEADERS["assistant"]
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_tokens(self, prompt: str, chat: bool, system_prompt: str | None = None) -> list[int]:
        """Token ids of a prompt: as is, or (``chat``, or a ``system_prompt`` given) a user turn
        after the optional system message in the chat template."""
        if chat or system_prompt is not None:
            system = [{"role": "system", "content": system_prompt}] if system_prompt else []
            return self.chat_tokens([*system, {"role": "user", "content": prompt}])
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def stream_tokens(
        self,
        tokens: list[int],
        max_tokens: int,
        sampler,
        reuse_prefix: bool = False,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        max_kv_size: int | None = None,
    ) -> Iterator:
        """mlx-lm ``GenerationResponse``s for prompt ``tokens`` under the active adapter.

        With ``reuse_prefix`` the KV cache of the previous such call is kept, and when the active
        adapter is the same, the prompt prefix the two calls share is not computed again
        (``self.cached_tokens`` says how many tokens were reused; never across adapters).
        """
        cache, feed = None, tokens
        self.cached_tokens = 0
        if reuse_prefix:
            cache, self.cached_tokens = self._reusable_cache(tokens)
            feed = tokens[self.cached_tokens :]
        kept = False
        try:
            yield from stream_generate(
                self.model,
                self.tokenizer,
                mx.array(feed),
                max_tokens=max_tokens,
                sampler=sampler,
                prompt_cache=cache,
                kv_bits=kv_bits,
                kv_group_size=kv_group_size,
                max_kv_size=max_kv_size if cache is None else None,
                quantized_kv_start=0,  # mlx-lm's default (5000) would leave short chats unquantized
            )
            kept = reuse_prefix
        except GeneratorExit:  # the caller stopped early (a stop sequence): the cache is sound
            kept = reuse_prefix
            raise
        finally:
            self._prompt_cache = None
            if kept and can_trim_prompt_cache(cache) and cache[0].offset >= len(tokens):
                trim_prompt_cache(cache, cache[0].offset - len(tokens))  # back to the prompt
                self._prompt_cache = (self._adapter_key(), list(tokens), cache)

    def _adapter_key(self):
        return None if self.adapters.active is None else self.adapters.active.path

    def _reusable_cache(self, tokens: list[int]) -> tuple[list, int]:
        """(KV cache, reused prefix length) for ``tokens`` under the active adapter."""
        saved = self._prompt_cache
        if saved is not None and saved[0] == self._adapter_key():
            _, cached, cache = saved
            prefix = 0
            for a, b in zip(cached, tokens):
                if a != b:
                    break
                prefix += 1
            prefix = min(prefix, len(tokens) - 1)  # at least one token is fed to get logits
            if prefix > 0:
                trim_prompt_cache(cache, len(cached) - prefix)
                return cache, prefix
        return make_prompt_cache(self.model), 0

    def stream(
        self,
        prompt: str,
        max_tokens: int = 100,
        temp: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        chat: bool = False,
        system_prompt: str | None = None,
        max_kv_size: int | None = None,
    ) -> Iterator[str]:
        """Text pieces as they are produced; the same seed gives the same text."""
        self.check_kv(kv_bits, kv_group_size)
        tokens = self.prompt_tokens(prompt, chat, system_prompt)
        if not tokens:
            raise UserError("--prompt is empty")
        mx.random.seed(seed)
        sampler = make_sampler(temp=temp, top_p=top_p if 0 < top_p < 1 else 0.0)
        for response in self.stream_tokens(
            tokens, max_tokens, sampler, False, kv_bits, kv_group_size, max_kv_size
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
