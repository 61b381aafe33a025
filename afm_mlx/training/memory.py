"""What a training step holds: the memory plan of a model and batch, and gradient
checkpointing.
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from afm_mlx.training.loop import _CHECKPOINTED

ALLOCATOR_MARGIN = 1.10  # measured peaks run ~10% over the sum of the parts (buffers in flight)


def device_memory() -> int:
    """Bytes of memory the default device can use (unified memory on a Mac, RAM elsewhere)."""
    info = getattr(mx, "device_info", None)
    if info is not None:
        try:
            size = int(info().get("memory_size", 0))
            if size:
                return size
        except Exception:  # a backend without device_info: fall back to the RAM size
            pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_memory(
    config: dict[str, Any],
    batch_per_rank: int,
    seq_len: int,
    dtype_bytes: int,
    grad_checkpoint: bool,
    trainable: int | None = None,
) -> dict[str, float]:
    """Estimated peak memory (bytes) of one training rank, without allocating the model.

    Weights, gradients and AdamW's two moments are exact from the shapes (``trainable``
    parameters: all unless given). Activations kept for the backward pass, per token and layer:
    the attention block's inputs, norms, q/k/v before and after their norms and RoPE, its output
    and residual; the attention scores and probabilities (heads x sequence); the MLP's norm,
    gate, up, SiLU, product and output; plus the logits, their exponentials and gradient (fp32).
    With ``grad_checkpoint`` only each block's input is kept, and one block's activations are
    live at a time. Calibrated on the ``small`` preset (tests/test_distributed.py measures it).
    """
    from afm_mlx.core.families import standard_config
    from afm_mlx.models.presets import count_parameters

    counts = count_parameters(config)
    total = counts["total"]
    trainable = total if trainable is None else trainable
    config = standard_config(config)
    d, n = config["hidden_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", 0)
    kv = kv or heads
    hd = config.get("head_dim") or d // heads
    f, vocab = config["intermediate_size"], config["vocab_size"]
    tokens = batch_per_rank * seq_len
    per_token_layer = 4 * d + 3 * heads * hd + 4 * kv * hd + heads * hd  # attention block
    per_token_layer += 2 * heads * seq_len  # scores and probabilities
    per_token_layer += 2 * d + 4 * f + d  # MLP block
    layer_bytes = tokens * per_token_layer * dtype_bytes
    if grad_checkpoint:
        activations = n * tokens * d * dtype_bytes + layer_bytes
    else:
        activations = n * layer_bytes
    activations += 3 * tokens * vocab * 4  # logits (fp32), exps, their gradient
    parts = {
        "parameters": float(total),
        "weights": float(total * dtype_bytes),
        "gradients": float(trainable * dtype_bytes),
        "optimizer": float(2 * trainable * dtype_bytes),
        "activations": float(activations),
    }
    parts["total"] = ALLOCATOR_MARGIN * sum(
        parts[k] for k in ("weights", "gradients", "optimizer", "activations")
    )
    return parts


def use_grad_checkpoint(model: nn.Module) -> int:
    """Recompute each transformer block's activations in the backward pass instead of keeping
    them (``mx.checkpoint``): activation memory falls from all layers' to one layer's plus each
    block's input. Only these blocks change (their class is swapped for a subclass; parameter
    names stay), so other models of the same family in the process are untouched. Returns the
    number of blocks."""
    layers = list(getattr(model, "layers", []))
    for layer in layers:
        cls = type(layer)
        if cls not in _CHECKPOINTED:
            call = cls.__call__

            def checkpointed(self, *args, _call=call, **kwargs):
                def inner(params, *args, **kwargs):
                    self.update(params)
                    return _call(self, *args, **kwargs)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

            _CHECKPOINTED[cls] = type(
                f"Checkpointed{cls.__name__}", (cls,), {"__call__": checkpointed}
            )
        if cls not in _CHECKPOINTED.values():
            layer.__class__ = _CHECKPOINTED[cls]
    return len(layers)
