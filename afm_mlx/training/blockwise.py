"""A training step one block at a time: the same loss and gradients as ``nn.value_and_grad``,
holding one block's decoded weights and activations at a time (adapters over a palettized base).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path


class _StopPass(Exception):
    """Ends a pass at the LM head (what follows is computed separately)."""


class _StandIn:
    """Stands in for a block or the LM head during a blockwise step's passes: its calls go to
    ``run(module, x, ...)`` (a tied head's embedding lookups still go to the embedding)."""

    def __init__(self, module: nn.Module, run: Callable, tied_head: bool = False):
        self.module, self.run, self.tied_head = module, run, tied_head

    def __getattr__(self, name: str):  # a model may read its blocks' settings (use_sliding, ...)
        return getattr(self.module, name)

    def __call__(self, x, *args, **kwargs):
        if self.tied_head:
            return self.module(x, *args, **kwargs)
        return self.run(self.module, x, *args, **kwargs)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.run(self.module, x)


@contextmanager
def _stand_ins(model: nn.Module, blocks: list[Callable], head: Callable):
    """Inside: the model's blocks call ``blocks[i]`` and its LM head ``head``."""
    layers, tied = model.model.layers, "lm_head" not in model
    owner, key = (model.model, "embed_tokens") if tied else (model, "lm_head")
    originals, original_head = list(layers), owner[key]
    try:
        for i, run in enumerate(blocks):
            layers[i] = _StandIn(originals[i], run)
        owner[key] = _StandIn(original_head, head, tied)
        yield
    finally:
        for i, block in enumerate(originals):
            layers[i] = block
        owner[key] = original_head


def blockwise_unsupported(model: nn.Module) -> str | None:
    """Why ``blockwise_value_and_grad`` cannot train ``model`` (None when it can): its blocks
    must form one chain (each block's output is the next one's input, as the families that
    replay blocks guarantee) and every trainable parameter must live in a block."""
    from afm_mlx.core.families import model_family

    if not model_family(model).replay_blocks:
        return f"{model.model_type} blocks read caches earlier blocks fill during the pass"
    outside = [
        name
        for name, _ in tree_flatten(model.trainable_parameters())
        if not name.startswith("model.layers.")
    ]
    if outside:
        return f"trainable parameters outside the blocks ({outside[0]}, ...)"
    return None


def blockwise_value_and_grad(model: nn.Module, loss_fn: Callable) -> Callable:
    """``nn.value_and_grad(model, loss_fn)`` computed a block (and a slice of the LM head) at a
    time, so that only that part's working memory is alive: a palettized model decodes each
    weight when it runs, and one evaluation of a whole training step decodes its
    vocabulary-sized head whole (Qwen3-0.6B's tied 151936 x 1024 table: 0.6 GB in float32)
    with many blocks' weights beside it. Measured on Qwen3-0.6B at 4 bits, one 64-token
    sequence: 1.75 GB of peak MLX memory for the whole step, 0.62-0.66 GB this way, 1.2-1.4x
    the time (the small demo model: 1.2x, 0.40 against 0.59 GB).

    1. A forward pass runs and evaluates each block in turn, keeping its input and call
       arguments (block ``i`` draws its random numbers, LoRA dropout, after
       ``mx.random.seed(base + i)``, ``base`` drawn from the random stream: MLX offers no way
       to put a saved key back), and stops at the head, keeping its input;
    2. the logits, one slice of the head at a time (``models.streaming.head_slices``); the loss and its
       gradient with respect to them, with the blocks and head standing aside (only the
       embedding lookup runs again); the gradient of the head's input, a slice at a time;
       then through the final norm to the last block's output;
    3. from the last block down, each block is run again from its input under its seed (the
       same dropout masks) and differentiated, evaluating the gradients of its parameters and
       of its input, which is the previous block's output gradient.

    The same values as the whole step (without dropout; with it, other masks of the same
    distribution), for one extra forward pass of the blocks, for a model that
    ``blockwise_unsupported`` accepts. It evaluates eagerly, so it runs outside ``mx.compile``.
    """
    from afm_mlx.models.streaming import head_slices

    def value_and_grad(model: nn.Module, *args):
        n = len(model.model.layers)
        records: list[tuple] = []
        outputs: list[mx.array] = []
        base = mx.random.randint(0, 2**31 - n - 1).item()

        def record(block, x, *a, **k):
            mx.random.seed(base + len(records))
            records.append((x, a, k))
            out = block(x, *a, **k)
            mx.eval(out)
            outputs[:] = [out]
            return out

        def identity(block, x, *a, **k):
            return x

        def feeding(h: mx.array) -> list[Callable]:
            return [identity] * (n - 1) + [lambda block, x, *a, **k: h]

        def head_input(blocks: list[Callable]) -> mx.array:
            """The head's input in a pass through ``blocks`` (the pass stops there)."""
            seen = []

            def stop(head, x):
                seen.append(x)
                raise _StopPass

            with _stand_ins(model, blocks, stop):
                try:
                    loss_fn(model, *args)
                except _StopPass:
                    pass
            if len(seen) != 1:
                raise RuntimeError(f"{model.model_type}: the loss did not reach the LM head")
            return seen[0]

        # 1. Forward, block by block.
        h = head_input([record] * n)
        mx.eval(h)
        if len(records) != n:
            raise RuntimeError(f"{model.model_type}: the pass ran {len(records)} of {n} blocks")
        last = outputs.pop()
        # 2. The head and the loss.
        slices = list(head_slices(model, widen=False))
        parts = []
        for logits_of in slices:
            parts.append(logits_of(h))
            mx.eval(parts[-1])
        logits = mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]

        def loss_of(logits: mx.array) -> mx.array:
            with _stand_ins(model, feeding(last), lambda head, x: logits):
                return loss_fn(model, *args)

        loss, g_logits = mx.value_and_grad(loss_of)(logits)
        mx.eval(loss, g_logits)
        del logits
        g_h, start = None, 0
        for logits_of, part in zip(slices, parts):
            stop = start + part.shape[-1]
            (g,) = mx.vjp(logits_of, [h], [g_logits[..., start:stop]])[1]
            g_h = g if g_h is None else g_h + g
            mx.eval(g_h)
            start = stop
        del parts, g_logits
        (cotangent,) = mx.vjp(lambda x: head_input(feeding(x)), [last], [g_h])[1]
        mx.eval(cotangent)
        # 3. The blocks, last to first.
        flat: dict[str, mx.array] = {}
        for i in reversed(range(n)):
            x, a, k = records.pop()
            block = model.model.layers[i]

            def block_dot(params, x, block=block, a=a, k=k, g=cotangent):
                block.update(params)
                return (block(x, *a, **k).astype(mx.float32) * g).sum()

            mx.random.seed(base + i)
            grads, cotangent = mx.grad(block_dot, argnums=(0, 1))(block.trainable_parameters(), x)
            mx.eval(grads, cotangent)
            flat.update((f"model.layers.{i}.{p}", g) for p, g in tree_flatten(grads))
        mx.random.seed(base + n)
        return loss, tree_map_with_path(lambda p, _: flat[p], model.trainable_parameters())

    return value_and_grad
