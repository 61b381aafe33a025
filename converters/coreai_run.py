"""Run a converted ``.aimodel`` with Apple's Core AI runtime: prefill a prompt, decode greedily.

    from converters.coreai_run import CoreAISession
    with CoreAISession("small.aimodel") as s:
        state = s.new_state()
        logits = s.prefill(prompt_ids, state)          # (len(prompt), vocab)
        ids = s.greedy(prompt_ids, max_tokens=32)      # a fresh state of its own
        text = s.generate(tokenizer, "ROMEO.", 32, adapter="chat")  # as generate --temp 0

On Linux this is the CPU interpreter bundled with ``coreai-core``; on macOS 27 pass the runtime's
``SpecializationOptions`` to pick the GPU or the Neural Engine (``scripts/coreai_check.py``). The
runtime is async; this wraps it in a private event loop so callers stay synchronous.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import numpy as np

from afm_mlx.core.errors import UserError

COREAI_VERSION = "1.0.0b3"  # pinned in pyproject.toml: the authoring API is a beta ("in flux")


def require_coreai() -> None:
    """Import ``coreai`` (authoring first, then the dialect: the other order is circular), or
    explain in one line why it cannot be used here."""
    if sys.version_info < (3, 11):
        major, minor = sys.version_info[:2]
        raise UserError(
            f"Core AI export needs Python >= 3.11 (coreai-core {COREAI_VERSION} has no wheels for "
            f"Python {major}.{minor}); run it with a newer Python"
        )
    try:
        import coreai.authoring  # noqa: F401
        from coreai._compiler.dialects import coreai as _  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"Core AI export needs coreai-core ({e}); install it: "
            f"pip install 'coreai-core=={COREAI_VERSION}'"
        ) from e


def asset_metadata(asset: Any) -> dict[str, Any]:
    """The asset's custom metadata (``creator_defined_metadata`` in the shipped binary; the type
    stubs of coreai-core 1.0.0b3 call it ``custom_metadata``)."""
    meta = asset.metadata
    return dict(getattr(meta, "creator_defined_metadata", None) or meta.custom_metadata)


class CoreAISession:
    """One loaded asset; every call takes the KV state it works on (``new_state()``)."""

    def __init__(self, path: str | Path, specialization_options: Any = None):
        require_coreai()
        from coreai.authoring import AIModelAsset

        self.path = Path(path)
        if not AIModelAsset.is_valid(self.path):
            raise UserError(f"{self.path}: not a Core AI asset (.aimodel folder)")
        asset = AIModelAsset.load(self.path)
        meta = asset_metadata(asset)
        if "afm_mlx.context" not in meta:
            raise UserError(f"{self.path}: not made by converters.coreai (no afm_mlx metadata)")
        self.context = int(meta["afm_mlx.context"])
        self.prefill_chunk = int(meta["afm_mlx.prefill_chunk"])
        self.logit_chunks = [int(n) for n in meta["afm_mlx.logit_chunks"]]
        self.functions = list(meta["afm_mlx.functions"])
        self.compute_dtype = str(meta.get("afm_mlx.compute_dtype", "float16"))
        self._loop = asyncio.new_event_loop()
        self._executable = asset.executable(specialization_options)
        self._model = self._loop.run_until_complete(self._executable.__aenter__())
        self._fns: dict[str, Any] = {}

    def __enter__(self) -> CoreAISession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._model is not None:
            self._fns.clear()
            self._model = None
            self._loop.run_until_complete(self._executable.__aexit__(None, None, None))
            self._loop.close()

    def function(self, name: str):
        if name not in self.functions:
            raise UserError(f"{self.path}: no function {name} (has {', '.join(self.functions)})")
        if name not in self._fns:
            self._fns[name] = self._model.load_function(name)
        return self._fns[name]

    def new_state(self) -> dict[str, Any]:
        """Zero-filled KV caches for one sequence (the runtime's own state buffers start with
        whatever memory held; zeros keep every cache row finite before it is written)."""
        from coreai.runtime import NDArray

        desc = self.function("decode").desc
        state = {}
        for name in desc.state_names:
            d = desc.state_descriptor(name)
            state[name] = NDArray(np.zeros([int(n) for n in d.shape], np.dtype(d.dtype)))
        return state

    def call(self, function: str, ids: list[int], position: int, state: dict) -> np.ndarray:
        """Run ``function`` on ``ids`` (its full width) at ``position``: (len(ids), vocab) fp32."""
        from coreai.runtime import NDArray

        fn = self.function(function)
        inputs = {
            "input_ids": NDArray(np.array([ids], np.int32)),
            "position": NDArray(np.array([position], np.int32)),
        }
        out = self._loop.run_until_complete(fn(inputs, state))
        chunks = [
            out[f"logits_{j}"].numpy().astype(np.float32) for j in range(len(self.logit_chunks))
        ]
        return np.concatenate(chunks, axis=-1)[0]

    def prefill(
        self, tokens: list[int], state: dict, adapter: str | None = None, start: int = 0
    ) -> np.ndarray:
        """Logits of every token of ``tokens`` written at rows ``start``..., in prefill chunks
        (the last one padded; its padded rows are overwritten by later calls)."""
        if start + len(tokens) > self.context:
            raise UserError(
                f"{len(tokens)} tokens at position {start} exceed the context {self.context}"
            )
        suffix = f"_{adapter}" if adapter else ""
        rows, chunk = [], self.prefill_chunk
        for at in range(0, len(tokens), chunk):
            ids = tokens[at : at + chunk]
            if start + at + chunk > self.context:  # a padded chunk must still fit the cache
                for i, t in enumerate(ids):
                    rows.append(self.decode(t, start + at + i, state, adapter)[None])
                continue
            logits = self.call(
                "prefill" + suffix, ids + [0] * (chunk - len(ids)), start + at, state
            )
            rows.append(logits[: len(ids)])
        return np.concatenate(rows, axis=0)

    def decode(self, token: int, position: int, state: dict, adapter: str | None = None):
        """Logits (vocab,) of one token at ``position``."""
        if position >= self.context:
            raise UserError(f"position {position} is past the context {self.context}")
        return self.call("decode" + (f"_{adapter}" if adapter else ""), [token], position, state)[0]

    def greedy(
        self,
        prompt: list[int],
        max_tokens: int,
        adapter: str | None = None,
        eos: set[int] | None = None,
    ) -> list[int]:
        """Greedy continuation of ``prompt``; stops before an ``eos`` token, as mlx-lm's
        ``generate`` does."""
        state = self.new_state()
        logits = self.prefill(prompt, state, adapter)[-1]
        out: list[int] = []
        for _ in range(max_tokens):
            token = int(np.argmax(logits))
            if eos and token in eos:
                break
            out.append(token)
            if len(prompt) + len(out) >= self.context:
                break
            logits = self.decode(token, len(prompt) + len(out) - 1, state, adapter)
        return out

    def generate(self, tokenizer: Any, prompt: str, max_tokens: int, adapter: str | None = None):
        """Greedy text for ``prompt`` with an mlx-lm tokenizer wrapper, tokenized and detokenized
        as ``python -m afm_mlx.generate --temp 0`` does (stops at the tokenizer's EOS)."""
        ids = list(tokenizer.encode(prompt, add_special_tokens=False))
        if not ids:
            raise UserError("the prompt is empty")
        detokenizer = tokenizer.detokenizer
        detokenizer.reset()
        for t in self.greedy(ids, max_tokens, adapter, set(tokenizer.eos_token_ids)):
            detokenizer.add_token(t)
        detokenizer.finalize()
        return detokenizer.text
