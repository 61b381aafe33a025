"""Half-precision models on the CPU, where MLX has no fast half-precision matmul: widen them
to float32 (exactly) for a pass, the whole model or one layer at a time, and put the stored dtypes
back before saving.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def _half_on_cpu(params: list[tuple[str, mx.array]]) -> list[tuple[str, mx.array]]:
    """The bfloat16/float16 parameters among ``params`` when running on the CPU, where MLX has
    no fast half-precision matmul (a Qwen3-0.6B forward pass in bfloat16 is 15-25x slower there
    than in float32); none elsewhere. Widening them to float32 is exact."""
    if mx.default_device().type != mx.cpu:
        return []
    return [(k, v) for k, v in params if v.dtype in (mx.bfloat16, mx.float16)]


def needs_widening(model: nn.Module) -> bool:
    """Whether ``model`` holds half-precision parameters and runs on the CPU (``_half_on_cpu``)."""
    return bool(_half_on_cpu(tree_flatten(model.parameters())))


def widen_for_cpu(model: nn.Module) -> dict[str, mx.Dtype]:
    """Widen a half-precision model to float32 when it runs on the CPU (``_half_on_cpu``).
    Returns the stored dtypes (empty when nothing changed), for ``restore_dtypes`` before
    saving."""
    params = tree_flatten(model.parameters())
    if not _half_on_cpu(params):
        return {}
    model.set_dtype(mx.float32)
    return {k: v.dtype for k, v in params}


@contextlib.contextmanager
def float32_on_cpu(module: nn.Module):
    """``module``'s half-precision parameters widened to float32 inside the block, on the CPU
    (``_half_on_cpu``): a pass can hold one layer in float32 at a time instead of a float32 copy
    of the whole model. Evaluate what the module computes inside. Palettized layers' fp16 LUTs
    (parameters named ``lut``) stay as they are."""
    half = [(k, v) for k, v in _half_on_cpu(tree_flatten(module.parameters())) if k[-3:] != "lut"]
    if not half:
        yield module
        return
    module.load_weights([(k, v.astype(mx.float32)) for k, v in half], strict=False)
    try:
        yield module
    finally:
        module.load_weights(half, strict=False)


def restore_dtypes(model: nn.Module, stored: dict[str, mx.Dtype]) -> None:
    """Put back the dtypes ``widen_for_cpu`` recorded, on the parameters still there."""
    if stored:
        params = tree_flatten(model.parameters())
        back = [(k, v.astype(stored[k])) for k, v in params if k in stored and v.dtype != stored[k]]
        model.load_weights(back, strict=False)
