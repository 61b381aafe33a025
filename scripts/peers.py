"""The peers the benchmarks measure against, built the way their users build them."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from afm_mlx.models.io import load_model


def is_projection(path: str, module: nn.Module) -> bool:
    """The attention and MLP projections: the layers both sides compress in like-for-like rows."""
    return isinstance(module, nn.Linear) and "embed" not in path and "lm_head" not in path


def affine_quantized(model_dir: Path, bits: int, group_size: int = 64, class_predicate=None):
    """mlx-lm's affine quantization (what ``mlx_lm.convert -q`` does) of every Linear and the
    embedding (or what ``class_predicate`` picks), from fp16 weights so scales and biases are
    stored in fp16. Returns (model, projection bpw, whole-model bpw); the model computes in fp32
    (the CPU's fast type; the stored values are unchanged)."""
    model, _, _ = load_model(model_dir)
    # Only the layers being quantized go through fp16 (their scales and biases are then fp16);
    # every other parameter keeps the checkpoint's precision, as on our side.
    chosen = class_predicate or (lambda _path, m: hasattr(m, "to_quantized"))
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if chosen(path, module):
            module.set_dtype(mx.float16)
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=class_predicate)
    stored = proj_bits = proj_weights = total_weights = 0
    for _, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        params = dict(tree_flatten(m.parameters()))
        bits_here = sum(8 * a.nbytes for a in params.values())
        stored += bits_here
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding):
            n = m.weight.shape[0] * m.weight.shape[1] * 32 // bits
            total_weights += n
            if isinstance(m, nn.QuantizedLinear):
                proj_bits += bits_here
                proj_weights += n
        else:
            total_weights += sum(a.size for a in params.values())
    model.set_dtype(mx.float32)
    return model, proj_bits / max(1, proj_weights), stored / total_weights
