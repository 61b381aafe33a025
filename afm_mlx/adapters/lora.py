"""LoRA adapters over any linear base (fp, mlx-lm affine-quantized, or our palettized), and their files.

``LoRALinear`` is mlx-lm's layer (same ``lora_a`` (in, r) / ``lora_b`` (r, out) parameters, same
forward ``linear(x) + scale * (x @ a) @ b``) taught to wrap any layer that either is an
``nn.Linear``/``nn.QuantizedLinear`` or exposes ``dequantize()`` (our ``PalettizedLinear``).

An adapter folder is mlx-lm's layout, so ``mlx_lm.load(base, adapter_path=folder)`` opens ours:

* ``adapters.safetensors``: ``model.layers.N.self_attn.q_proj.lora_a`` etc., stored as float16;
* ``adapter_config.json``: ``fine_tune_type: lora``, ``num_layers``, ``lora_parameters`` {rank,
  scale, alpha, dropout, keys}, plus ``base_fingerprint`` (``afm_mlx.models.io.model_fingerprint`` of
  the base it was trained on), which ``load_adapter`` checks before touching the model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear as _MlxLmLoRALinear

from afm_mlx.core.errors import UserError
from afm_mlx.core.families import LLAMA_PROJECTIONS, model_family, split_points
from afm_mlx.core.fileio import (
    atomic_save_safetensors,
    atomic_write_json,
    load_safetensors,
    read_json,
)
from afm_mlx.models.io import model_fingerprint

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Apple's recipe: every attention and FFN projection of every layer.
DEFAULT_KEYS = LLAMA_PROJECTIONS
# float16 rather than bfloat16: adapter values are small, and fp16's 10-bit mantissa keeps them
# 8x more precisely; it is also the Neural Engine's native type.
SAVE_DTYPE = mx.float16


def is_linear_base(layer: nn.Module) -> bool:
    """True for a layer ``LoRALinear`` can wrap."""
    if isinstance(layer, LoRALinear):
        return False
    return isinstance(layer, (nn.Linear, nn.QuantizedLinear)) or callable(
        getattr(layer, "dequantize", None)
    )


def dense_weight(layer: nn.Module) -> mx.array:
    """The (out, in) weight a base layer's forward multiplies by (dequantized if stored compressed)."""
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(
            layer.weight,
            layer.scales,
            layer.get("biases"),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
    if callable(getattr(layer, "dequantize", None)):
        return layer.dequantize()
    return layer.weight


def base_dims(layer: nn.Module) -> tuple[int, int]:
    """(input_dims, output_dims) of a base layer; shapes only, nothing is computed (MLX is lazy)."""
    if isinstance(layer, nn.QuantizedLinear):
        out_dims, packed = layer.weight.shape
        return packed * 32 // layer.bits, out_dims
    out_dims, in_dims = dense_weight(layer).shape
    return in_dims, out_dims


def is_lossless_base(layer: nn.Module) -> bool:
    """True when fusing into this base keeps the adapter exactly (a plain dense weight, fused
    projections such as afm7's ``FusedLinear`` included)."""
    return isinstance(layer, nn.Linear)


class SplitLinear(nn.Linear):
    """A dense linear layer returning its output split at ``split_at`` (what fusing an adapter
    into afm7's q|k|v projection gives: it saves as the plain weight mlx-lm's class loads)."""

    def __init__(self, input_dims: int, output_dims: int, split_at: tuple[int, ...], bias=False):
        super().__init__(input_dims, output_dims, bias=bias)
        self.split_at = tuple(split_at)

    def __call__(self, x: mx.array) -> tuple[mx.array, ...]:
        return tuple(super().__call__(x).split(list(self.split_at), axis=-1))


class LoRALinear(_MlxLmLoRALinear):
    """mlx-lm's LoRA layer over an fp, affine-quantized or palettized base (kept as ``.linear``)."""

    @staticmethod
    def from_base(
        linear: nn.Module,
        r: int = 16,
        dropout: float = 0.0,
        scale: float = 2.0,
        key: mx.array | None = None,
    ) -> LoRALinear:
        """Wrap ``linear``; ``lora_b`` starts at zero so the output equals the base's at init."""
        if not is_linear_base(linear):
            raise TypeError(f"cannot attach LoRA to a {type(linear).__name__}")
        in_dims, out_dims = base_dims(linear)
        layer = LoRALinear(in_dims, out_dims, r=r, dropout=dropout, scale=scale)
        layer.linear = linear
        if key is not None:  # seeded init (mlx-lm draws from the global generator)
            bound = 1 / math.sqrt(in_dims)
            layer.lora_a = mx.random.uniform(-bound, bound, (in_dims, r), key=key)
        return layer

    def __call__(self, x: mx.array):
        y = self.linear(x)
        z = (self.scale * ((self.dropout(x) @ self.lora_a) @ self.lora_b)).astype(x.dtype)
        if isinstance(y, (tuple, list)):  # a fused projection: its update is split like its output
            z = z.split(list(split_points(self.linear)), axis=-1)
            return tuple(yi + zi for yi, zi in zip(y, z, strict=True))
        return y + z

    def delta(self) -> mx.array:
        """The dense (out, in) update ``scale * b^T a^T`` that the adapter adds to the weight."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def fuse(self, dequantize: bool = False, allow_lossy: bool = False) -> nn.Module:
        """The base with the update folded in: exact for ``nn.Linear``.

        A compressed base (palettized or affine-quantized) is dequantized, updated and compressed
        again with its own settings, which can round the update away (mlx-lm issue #1172); that
        needs ``allow_lossy`` (or ``dequantize`` for a dense fp result).
        """
        base = self.linear
        weight = dense_weight(base)
        if split_points(base):
            fused = SplitLinear(
                weight.shape[1], weight.shape[0], split_points(base), "bias" in base
            )
        else:
            fused = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in base)
        fused.weight = (weight.astype(mx.float32) + self.delta()).astype(weight.dtype)
        if "bias" in base:
            fused.bias = base.bias
        if is_lossless_base(base) or dequantize:
            return fused
        if not allow_lossy:
            raise UserError(
                f"fusing an adapter into a {type(base).__name__} base re-compresses the weights and "
                "can erase the adapter; keep the adapter unfused (the deployment path), or allow "
                "the loss explicitly (--allow-lossy)"
            )
        if isinstance(base, nn.QuantizedLinear):
            return nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits, mode=base.mode)
        recompress = getattr(base, "recompress", None)
        if recompress is None:
            raise UserError(
                f"{type(base).__name__} offers no way to re-compress a fused weight "
                "(it needs a recompress(linear) method); fuse with dequantize instead"
            )
        return recompress(fused)


@dataclass
class LoRASettings:
    """Which layers get adapters and how: mlx-lm's ``lora_parameters`` plus ``num_layers``."""

    rank: int = 16
    scale: float = 2.0
    dropout: float = 0.0
    keys: list[str] = field(default_factory=lambda: list(DEFAULT_KEYS))
    num_layers: int = -1  # -1: every layer (mlx-lm counts from the last layer)

    @property
    def alpha(self) -> float:
        """The PEFT-style alpha: mlx-lm multiplies by ``scale``, PEFT by ``alpha / rank``."""
        return self.scale * self.rank

    @classmethod
    def from_flags(cls, rank: int, scale: float | None, alpha: float | None, **kw) -> LoRASettings:
        """Build from CLI values where either ``scale`` or ``alpha`` may be given (not both)."""
        if rank <= 0:
            raise UserError(f"--rank {rank}: must be a positive integer")
        if scale is not None and alpha is not None:
            raise UserError(
                "--scale and --alpha say the same thing (scale = alpha / rank); give one"
            )
        if alpha is not None:
            scale = alpha / rank
        return cls(rank=rank, scale=2.0 if scale is None else scale, **kw)

    def lora_parameters(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "scale": self.scale,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "keys": list(self.keys),
        }


def model_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise UserError(f"{type(model).__name__} has no .layers; cannot attach LoRA adapters")
    return list(layers)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(path, layer) of every LoRA layer in ``model``."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, _MlxLmLoRALinear)]


def model_projections(model: nn.Module) -> tuple[str, ...]:
    """The block-relative projection paths of ``model``'s family (a module that names no
    ``model_type``, e.g. a hand-built one, gets the Llama layout's)."""
    try:
        return model_family(model).projections
    except UserError:
        return DEFAULT_KEYS


def settings_for_model(settings: LoRASettings, model: nn.Module) -> LoRASettings:
    """``settings`` with the default keys (every projection of a Llama-layout block) replaced by
    the projections of the model's family when they are named otherwise (Phi-3's fused
    ``qkv_proj`` ...); keys given explicitly are kept as they are."""
    projections = model_projections(model)
    if list(settings.keys) == list(DEFAULT_KEYS) and tuple(projections) != DEFAULT_KEYS:
        return dataclasses.replace(settings, keys=list(projections))
    return settings


def attach_lora(model: nn.Module, settings: LoRASettings, seed: int = 0) -> list[str]:
    """Wrap the target layers of ``model`` in place and freeze everything but the adapters.

    Returns the wrapped paths (``model.layers.N.self_attn.q_proj``...). Keys naming no layer of
    a block are refused, so a typo cannot silently train nothing.
    """
    if lora_layers(model):
        raise ValueError("model already carries LoRA layers; remove_lora first")
    layers = model_layers(model)
    where = {id(m): path for path, m in model.named_modules()}  # afm7: layers, kv_reuse_layers
    n = len(layers) if settings.num_layers < 0 else min(settings.num_layers, len(layers))
    key = mx.random.key(seed)
    paths: list[str] = []
    found: set[str] = set()
    for i in range(len(layers) - n, len(layers)):
        block = dict(layers[i].named_modules())
        updates = []
        for k in settings.keys:
            base = block.get(k)
            if base is None or not is_linear_base(base):
                continue
            found.add(k)
            key, sub = mx.random.split(key)
            updates.append(
                (
                    k,
                    LoRALinear.from_base(
                        base, settings.rank, settings.dropout, settings.scale, sub
                    ),
                )
            )
        layers[i].update_modules(tree_unflatten(updates))
        paths += [f"{where[id(layers[i])]}.{k}" for k, _ in updates]
    missing = sorted(set(settings.keys) - found)
    if missing:
        raise UserError(
            f"LoRA keys {', '.join(missing)} name no linear layer of this model "
            f"(its projections are {', '.join(model_projections(model))})"
        )
    model.freeze()
    for _, layer in lora_layers(model):
        layer.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    return paths


def remove_lora(model: nn.Module) -> None:
    """Put every wrapped base layer back in place (the base weights were never changed)."""
    restored = [(p, m.linear) for p, m in lora_layers(model)]
    if restored:
        model.update_modules(tree_unflatten(restored))


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The adapter parameters by their mlx-lm names."""
    return {
        k: v
        for k, v in tree_flatten(model.parameters())
        if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
    }


def base_fingerprint(model: nn.Module) -> str:
    """``model_fingerprint`` of the base alone, even while adapters are attached."""
    wrapped = lora_layers(model)
    if not wrapped:
        return model_fingerprint(model)
    remove_lora(model)
    try:
        return model_fingerprint(model)
    finally:
        model.update_modules(tree_unflatten(wrapped))


@dataclass
class Adapter:
    """An adapter read from disk: its settings, weights (as stored) and the full config."""

    path: Path
    settings: LoRASettings
    weights: dict[str, mx.array]
    config: dict[str, Any]

    @property
    def base_fingerprint(self) -> str | None:
        return self.config.get("base_fingerprint")


def save_adapter(
    out_dir: str | Path,
    model: nn.Module,
    settings: LoRASettings,
    fingerprint: str,
    dtype: mx.Dtype = SAVE_DTYPE,
    **info: Any,
) -> Path:
    """Write ``adapters.safetensors`` (``dtype``) + ``adapter_config.json``, each atomically.

    ``fingerprint`` is the base's; ``info`` (e.g. kind, base model path, steps) is recorded too.
    The config, which makes the folder an adapter, is removed first and written last, so a kill
    mid-save never leaves new weights under an old config (or the reverse).
    """
    out = Path(out_dir)
    weights = {k: v.astype(dtype) for k, v in adapter_weights(model).items()}
    if not weights:
        raise ValueError("model carries no LoRA layers to save")
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).unlink(missing_ok=True)
    atomic_save_safetensors(out / ADAPTER_WEIGHTS, weights, metadata={"format": "mlx"})
    config = {
        "fine_tune_type": "lora",
        "num_layers": settings.num_layers,
        "lora_parameters": settings.lora_parameters(),
        "base_fingerprint": fingerprint,
        **info,
    }
    atomic_write_json(out / ADAPTER_CONFIG, config)
    return out


def read_adapter(path: str | Path) -> Adapter:
    """Read and validate an adapter folder (config fields and weight names), without a model."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--adapter {path}: no such adapter folder")
    config = read_json(path / ADAPTER_CONFIG, "adapter config")
    if config.get("fine_tune_type", "lora") != "lora":
        raise UserError(
            f"{path / ADAPTER_CONFIG}: fine_tune_type {config.get('fine_tune_type')!r} is not "
            "supported (only lora)"
        )
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or not isinstance(params.get("rank"), int):
        raise UserError(f"{path / ADAPTER_CONFIG}: missing lora_parameters.rank")
    scale = params.get("scale")
    if scale is None and params.get("alpha") is not None:
        scale = params["alpha"] / params["rank"]
    if scale is None:
        raise UserError(f"{path / ADAPTER_CONFIG}: lora_parameters has neither scale nor alpha")
    keys = params.get("keys") or list(DEFAULT_KEYS)
    settings = LoRASettings(
        rank=params["rank"],
        scale=float(scale),
        dropout=float(params.get("dropout", 0.0)),
        keys=list(keys),
        num_layers=int(config.get("num_layers", -1)),
    )
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"--adapter {path}: {ADAPTER_WEIGHTS} not found")
    weights = load_safetensors(path / ADAPTER_WEIGHTS)
    odd = sorted(k for k in weights if k.rsplit(".", 1)[-1] not in ("lora_a", "lora_b"))
    if odd:
        raise UserError(f"{path / ADAPTER_WEIGHTS}: not LoRA weights (e.g. {odd[0]})")
    return Adapter(path, settings, weights, config)


def check_base_fingerprint(adapter: Adapter, fingerprint: str) -> None:
    """Refuse an adapter trained on another base, naming both fingerprints."""
    theirs = adapter.base_fingerprint
    if theirs is not None and theirs != fingerprint:
        trained_on = adapter.config.get("base_model", "unknown path")
        raise UserError(
            f"--adapter {adapter.path}: trained on base {theirs} ({trained_on}), but this model's "
            f"fingerprint is {fingerprint}; use the base it was trained on"
        )


def check_adapter_fits(model: nn.Module, adapter: Adapter) -> None:
    """Refuse adapter weights that do not fit ``model``'s LoRA layers, listing every mismatch."""
    expected = {k: tuple(v.shape) for k, v in adapter_weights(model).items()}
    problems = [f"missing {k}" for k in sorted(set(expected) - set(adapter.weights))]
    problems += [f"unexpected {k}" for k in sorted(set(adapter.weights) - set(expected))]
    problems += [
        f"{k} has shape {tuple(adapter.weights[k].shape)}, expected {expected[k]}"
        for k in sorted(set(expected) & set(adapter.weights))
        if tuple(adapter.weights[k].shape) != expected[k]
    ]
    if problems:
        more = f"; ... {len(problems) - 6} more" if len(problems) > 6 else ""
        shown = "; ".join(problems[:6]) + more
        raise UserError(f"--adapter {adapter.path}: weights do not fit this model: {shown}")


def set_adapter_weights(model: nn.Module, adapter: Adapter, dtype: mx.Dtype | None = None) -> None:
    """Copy the adapter's values (cast to ``dtype``, default the base's) into the LoRA layers."""
    wrapped = lora_layers(model)
    dtype = dtype or dense_weight(wrapped[0][1].linear).dtype
    model.load_weights([(k, v.astype(dtype)) for k, v in adapter.weights.items()], strict=False)
    for _, layer in wrapped:
        layer.scale = adapter.settings.scale


def load_adapter(
    model: nn.Module,
    path: str | Path | Adapter,
    fingerprint: str | None = None,
    check_base: bool = True,
) -> Adapter:
    """Attach the adapter at ``path`` to a bare ``model`` (validated first; nothing changes on error).

    ``fingerprint`` of the base may be passed when already known (it costs a pass over the weights).
    """
    adapter = path if isinstance(path, Adapter) else read_adapter(path)
    if check_base:
        check_base_fingerprint(adapter, fingerprint or base_fingerprint(model))
    attach_lora(model, adapter.settings)
    try:
        check_adapter_fits(model, adapter)
    except UserError:
        remove_lora(model)
        raise
    set_adapter_weights(model, adapter)
    mx.eval(model.parameters())
    return adapter


def fuse_lora(
    model: nn.Module, allow_lossy: bool = False, dequantize: bool = False
) -> list[dict[str, Any]]:
    """Fold every adapter into its base in place; returns per-layer reports.

    Each report has ``path``, ``exact`` and ``adapter_error``: ``||W_fused - (W + dW)|| / ||dW||``,
    0 for an exact fuse and 1 when re-compression erased the adapter entirely.
    """
    wrapped = lora_layers(model)
    lossy = [p for p, m in wrapped if not (is_lossless_base(m.linear) or dequantize)]
    if lossy and not allow_lossy:
        kind = type(dict(wrapped)[lossy[0]].linear).__name__
        raise UserError(
            f"fusing into a {kind} base re-compresses {len(lossy)} layers and can erase the "
            "adapter (mlx-lm #1172); keep it unfused, or pass --allow-lossy to fuse and measure the loss"
        )
    reports, fused_layers = [], []
    for path, layer in wrapped:
        target = dense_weight(layer.linear).astype(mx.float32) + layer.delta()
        fused = layer.fuse(dequantize=dequantize, allow_lossy=allow_lossy)
        got = dense_weight(fused).astype(mx.float32)
        err = mx.linalg.norm(got - target) / mx.maximum(mx.linalg.norm(layer.delta()), 1e-30)
        exact = is_lossless_base(layer.linear) or dequantize
        reports.append({"path": path, "exact": exact, "adapter_error": float(err.item())})
        fused_layers.append((path, fused))
    model.update_modules(tree_unflatten(fused_layers))
    return reports


class adapters_disabled:
    """Context manager: the model runs as its bare base inside (LoRA layers swapped out, exactly)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.wrapped: list[tuple[str, nn.Module]] = []

    def __enter__(self) -> nn.Module:
        self.wrapped = lora_layers(self.model)
        remove_lora(self.model)
        return self.model

    def __exit__(self, *exc) -> None:
        if self.wrapped:
            self.model.update_modules(tree_unflatten(self.wrapped))


class AdapterCache:
    """One loaded base, many adapters: each is read (and checked) once, kept in memory, and
    swapped in by replacing only the LoRA parameters; the base is never reloaded."""

    def __init__(self, model: nn.Module, fingerprint: str | None = None):
        if lora_layers(model):
            raise ValueError("AdapterCache needs the bare base model")
        self.model = model
        self.fingerprint = fingerprint or model_fingerprint(model)
        self.active: Adapter | None = None
        self._adapters: dict[Path, Adapter] = {}
        self._layout: tuple | None = None  # (rank, keys, num_layers) of the attached layers
        self._dtype = dense_weight(
            next(m for _, m in model.named_modules() if is_linear_base(m))
        ).dtype

    def get(self, path: str | Path | Adapter) -> Adapter:
        """The adapter at ``path``, read and validated against this base on first use."""
        if isinstance(path, Adapter):
            path = path.path
        key = Path(path).resolve()
        if key not in self._adapters:
            adapter = read_adapter(path)
            check_base_fingerprint(adapter, self.fingerprint)
            adapter.weights = {k: v.astype(self._dtype) for k, v in adapter.weights.items()}
            mx.eval(adapter.weights)
            self._adapters[key] = adapter
        return self._adapters[key]

    def activate(self, path: str | Path | Adapter | None) -> Adapter | None:
        """Make the model run with the adapter at ``path`` (None: the bare base)."""
        if path is None:
            remove_lora(self.model)
            self._layout = self.active = None
            return None
        adapter = self.get(path)
        s = adapter.settings
        layout = (s.rank, tuple(s.keys), s.num_layers)
        if layout != self._layout:  # another shape of adapter: re-wrap (base modules unchanged)
            remove_lora(self.model)
            self._layout = None
            attach_lora(self.model, s)
            self._layout = layout
        try:
            check_adapter_fits(self.model, adapter)
        except UserError:
            self.activate(None)
            raise
        set_adapter_weights(self.model, adapter, self._dtype)
        self.active = adapter
        return adapter
