"""Palettized (LUT-quantized) layers and the model transform that creates them.

A palettized weight stores, per group of ``group_size`` channels, a LUT of ``2**bits`` fp16 values
(``lut``: (n_groups, 2**bits)) and for every weight the index of its LUT entry, bit-packed along the
input dimension (``packed``: uint8, see ``afm_mlx.palettization.packing``). ``axis=0`` groups output channels
(rows), Apple's and coremltools' "per_grouped_channel"; ``axis=1`` groups input columns.

Forward is ``x @ W.T`` (+ bias) with W's exact fp16 LUT values and the product in ``compute_dtype``
(float32 by default: the CPU backend's fast matmul type). Small batches (decode) run on the
device's LUT-matmul kernel straight from the packed indices (``afm_mlx.palettization.kernels``: the CPU
extension, or the Metal/CUDA kernel); larger ones dequantize the layer and run a GEMM. ``cache_dense_weight()``
keeps a dense copy instead, for speed where no kernel exists (never saved: not a parameter).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from afm_mlx.core.errors import UserError
from afm_mlx.core.families import split_points
from afm_mlx.palettization.kernels import kernel_matmul, kernel_usable
from afm_mlx.palettization.kmeans import kmeans_lut
from afm_mlx.palettization.lut import check_palettization_settings, lut_to_dense
from afm_mlx.palettization.packing import pack_indices, packed_length, unpack_indices

SETTING_KEYS = ("bits", "group_size", "axis")
# AFM's embedding: 8-bit, every row (token) its own 256-entry LUT.
AFM_EMBEDDING_SETTINGS = {"bits": 8, "group_size": 1, "axis": 0}


# Output rows a layer decodes at a time in its forward pass when it has more (a vocabulary-sized
# head: 16384 rows of 2048 columns are 128 MB in float32).
DECODE_ROWS = 16384


def _evaluate_now(y: mx.array) -> None:
    """Compute a dequantized layer's output before the next layer is built: MLX's CPU backend
    allocates every op's output when it is scheduled, so a lazy forward pass would otherwise hold
    all layers' dense weights at once. Inside ``mx.compile`` nothing may be evaluated; the
    compiled graph then decides (training keeps the weights for the backward pass anyway)."""
    try:
        mx.eval(y)
    except ValueError as e:
        if "function transformations" not in str(e):
            raise


class _Palettized(nn.Module):
    """Storage and dequantization shared by the palettized layers."""

    def __init__(self, rows: int, cols: int, bits: int, group_size: int, axis: int):
        super().__init__()
        n_groups = check_palettization_settings((rows, cols), bits, group_size, axis)
        self.bits, self.group_size, self.axis = bits, group_size, axis
        self.packed = mx.zeros((rows, packed_length(cols, bits)), mx.uint8)
        self.lut = mx.zeros((n_groups, 1 << bits), mx.float16)
        self.compute_dtype = mx.float32
        self._set_dense(None)

    def _set_dense(self, dense: mx.array | None) -> None:
        # A plain instance attribute, not a dict entry: invisible to parameters(), update() and
        # saving, so the cache can never be written to a checkpoint.
        object.__setattr__(self, "_dense", dense)

    @property
    def settings(self) -> dict[str, int]:
        """The per-layer choice recorded in config.json."""
        return {"bits": self.bits, "group_size": self.group_size, "axis": self.axis}

    def _fill(self, weight: mx.array, importance: mx.array | None) -> None:
        lut, indices = kmeans_lut(weight, self.bits, self.group_size, self.axis, importance)
        self.lut = lut
        self.packed = pack_indices(indices, self.bits)
        mx.eval(self.lut, self.packed)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the weight the indices stand for."""
        return (self.packed.shape[0], self._cols)

    def indices(self) -> mx.array:
        """Unpacked uint8 indices, (rows, cols)."""
        return unpack_indices(self.packed, self.bits, self._cols)

    def dequantize(self, dtype: mx.Dtype | None = None) -> mx.array:
        """Dense (rows, cols) weight exactly as forward uses it: fp16 LUT values in ``dtype``
        (default ``compute_dtype``)."""
        dense = lut_to_dense(self.lut, self.indices(), self.group_size, self.axis)
        return dense.astype(dtype or self.compute_dtype)

    def row_slices(self, rows: int) -> list[tuple[int, int]]:
        """(start, stop) pairs of about ``rows`` output rows each covering the weight, cut on LUT
        group boundaries (``dequantize_rows``)."""
        total, g = self.packed.shape[0], self.group_size
        step = max(g, rows // g * g) if self.axis == 0 else max(1, rows)
        return [(a, min(a + step, total)) for a in range(0, total, step)]

    def dequantize_rows(self, start: int, stop: int, dtype: mx.Dtype | None = None) -> mx.array:
        """Rows ``start:stop`` of ``dequantize`` (on group boundaries with ``axis=0``: see
        ``row_slices``), decoding only their codes and LUTs."""
        lut = self.lut
        if self.axis == 0:
            lut = lut[start // self.group_size : stop // self.group_size]
        codes = unpack_indices(self.packed[start:stop], self.bits, self._cols)
        dense = lut_to_dense(lut, codes, self.group_size, self.axis)
        return dense.astype(dtype or self.compute_dtype)

    def matmul_rows(self, x: mx.array, start: int, stop: int) -> mx.array:
        """``x @ W[start:stop].T`` in ``compute_dtype``, returned in x's dtype, decoding only
        those rows (``row_slices``)."""
        w = self.dequantize_rows(start, stop)
        return (x.astype(w.dtype) @ w.T).astype(x.dtype)

    def cache_dense_weight(self, dtype: mx.Dtype | None = None) -> None:
        """Keep the dense weight for fast forward passes (memory of a dense layer; not saved)."""
        if dtype is not None:
            self.compute_dtype = dtype
        self._set_dense(self.dequantize())
        mx.eval(self._dense)

    def clear_dense_cache(self) -> None:
        self._set_dense(None)

    @property
    def decodes_on_call(self) -> bool:
        """Whether each forward pass decodes the weight (no dense cache is kept)."""
        return self._dense is None

    @property
    def dense_nbytes(self) -> int:
        """Bytes a dense cache of this weight takes in ``compute_dtype``."""
        return self.packed.shape[0] * self._cols * self.compute_dtype.size

    def _dense_weight(self) -> mx.array:
        if self._dense is not None and self._dense.dtype == self.compute_dtype:
            return self._dense
        return self.dequantize()

    def _matmul(self, x: mx.array) -> mx.array:
        """``x @ W.T`` in ``compute_dtype``, returned in x's dtype: the dense cache if there is
        one, else the device's LUT kernel for small batches (``afm_mlx.palettization.kernels``), else
        dequantize + matmul."""
        if self._dense is None:
            y = kernel_matmul(x, self.packed, self.lut, self.bits, self.group_size, self.axis)
            if y is not None:
                return y
        if self.decodes_on_call and self.packed.shape[0] > DECODE_ROWS:
            # A vocabulary-sized head: decoding it whole would take 3.5 bytes per weight
            # (codes, fp16 values, their float32 copy) beside the output.
            parts = []
            for start, stop in self.row_slices(DECODE_ROWS):
                parts.append(self.matmul_rows(x, start, stop))
                _evaluate_now(parts[-1])
            return mx.concatenate(parts, axis=-1)
        w = self._dense_weight()
        y = (x.astype(w.dtype) @ w.T).astype(x.dtype)
        if w is not self._dense:
            _evaluate_now(y)
        return y

    def unfreeze(self, *args, **kwargs) -> nn.Module:
        # Keep the codes frozen even when a whole model is unfrozen (as nn.QuantizedLinear does).
        super().unfreeze(*args, **kwargs)
        self.freeze(recurse=False)
        return self

    def _extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, axis={self.axis}"


class PalettizedLinear(_Palettized):
    """A linear layer whose (out, in) weight is stored as packed LUT indices plus fp16 LUTs.

    With ``split_at`` (a fused projection such as afm7's q|k|v) it returns the tuple of the
    output's slices, as the layer it replaces does."""

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int = 16,
        axis: int = 0,
        split_at: tuple[int, ...] = (),
    ):
        super().__init__(output_dims, input_dims, bits, group_size, axis)
        self.input_dims, self.output_dims = input_dims, output_dims
        if bias:
            self.bias = mx.zeros((output_dims,))
        if split_at:
            self.split_at = tuple(split_at)  # a tuple: not a parameter, not saved
        self.freeze()  # like nn.QuantizedLinear: stored codes (and bias) are not trainable

    @property
    def _cols(self) -> int:
        return self.input_dims

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int = 16,
        axis: int = 0,
        importance: mx.array | None = None,
    ) -> PalettizedLinear:
        """Palettize ``linear`` with grouped k-means (``importance``: optional per-weight weights)."""
        output_dims, input_dims = linear.weight.shape
        layer = cls(
            input_dims, output_dims, "bias" in linear, bits, group_size, axis, split_points(linear)
        )
        layer._fill(linear.weight, importance)
        if "bias" in linear:
            layer.bias = linear.bias
        return layer

    def recompress(self, linear: nn.Linear) -> PalettizedLinear:
        """Palettize another linear layer (e.g. a LoRA-fused one) with this layer's settings."""
        layer = PalettizedLinear.from_linear(linear, self.bits, self.group_size, self.axis)
        if split_points(self) and not split_points(layer):
            layer.split_at = split_points(self)
        return layer

    def __call__(self, x: mx.array) -> mx.array:
        y = self._matmul(x)
        if "bias" in self:
            y = y + self.bias.astype(y.dtype)
        if "split_at" in self:
            return tuple(y.split(list(self.split_at), axis=-1))
        return y

    def _extra_repr(self) -> str:
        return (
            f"input_dims={self.input_dims}, output_dims={self.output_dims}, "
            f"bias={'bias' in self}, {super()._extra_repr()}"
        )


class PalettizedEmbedding(_Palettized):
    """An embedding whose (num_embeddings, dims) table is palettized (AFM: 8-bit, per row)."""

    def __init__(
        self,
        num_embeddings: int,
        dims: int,
        bits: int = 8,
        group_size: int = 1,
        axis: int = 0,
    ):
        super().__init__(num_embeddings, dims, bits, group_size, axis)
        self.num_embeddings, self.dims = num_embeddings, dims
        self.freeze()

    @property
    def _cols(self) -> int:
        return self.dims

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        bits: int = 8,
        group_size: int = 1,
        axis: int = 0,
        importance: mx.array | None = None,
        source=None,
    ) -> PalettizedEmbedding:
        """Palettize ``embedding`` (default: AFM's 8-bit per-channel LUTs). ``source``, when
        given, is the table as stored (``models.streaming.StoredTable``): k-means, whose groups of rows it
        takes a slice at a time, reads those rows from the file instead of the whole weight."""
        num_embeddings, dims = embedding.weight.shape
        layer = cls(num_embeddings, dims, bits, group_size, axis)
        if source is not None and (
            axis != 0
            or (tuple(source.shape), source.dtype)
            != (tuple(embedding.weight.shape), embedding.weight.dtype)
        ):
            raise ValueError(f"{source.name}: not this embedding's table, or groups of columns")
        layer._fill(embedding.weight if source is None else source, importance)
        return layer

    def __call__(self, ids: mx.array) -> mx.array:
        if self._dense is not None or self.axis != 0:
            return self._dense_weight()[ids]
        # Only the requested rows are decoded: their packed codes and their groups' LUTs.
        codes = unpack_indices(self.packed[ids], self.bits, self.dims)
        luts = self.lut[ids // self.group_size]
        return mx.take_along_axis(luts, codes.astype(mx.int32), axis=-1).astype(self.compute_dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        """``x @ table.T``: the tied output head, with the same dequantized table."""
        return self._matmul(x)

    def _extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dims}, {super()._extra_repr()}"


# --- model transforms --------------------------------------------------------------------------


def _default_predicate(path: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def _settings(choice: Any, defaults: dict[str, int], path: str) -> dict[str, int]:
    if choice is True:
        return dict(defaults)
    if isinstance(choice, Mapping):
        unknown = set(choice) - set(SETTING_KEYS)
        if unknown:
            raise ValueError(f"{path}: unknown palettization settings {sorted(unknown)}")
        return {**defaults, **{k: int(v) for k, v in choice.items()}}
    raise ValueError(f"{path}: class_predicate must return a bool or a dict of settings")


def palettize_model(
    model: nn.Module,
    class_predicate: Callable[[str, nn.Module], bool | dict] | None = None,
    bits: int = 4,
    group_size: int = 16,
    axis: int = 0,
    importance: Mapping[str, mx.array] | Callable[[str, nn.Module], mx.array | None] | None = None,
    on_layer: Callable[[str, int, int], None] | None = None,
    errors: dict[str, float] | None = None,
    sources: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, int]]:
    """Replace ``nn.Linear`` (and, if the predicate accepts them, ``nn.Embedding``) layers in place.

    ``class_predicate(path, module)`` returns False, True (use ``bits``/``group_size``/``axis``) or a
    dict of per-layer settings; the default palettizes every ``nn.Linear``. ``importance`` maps a path
    (or a callable maps ``(path, module)``) to per-weight importance for weighted k-means.
    Layers are palettized one at a time, each replaced right away so its dense weight can be freed
    (with a lazily loaded model, ``load_model(lazy=True)``, each weight is also read from disk
    only when its turn comes: the peak is the palettized model plus one dense layer);
    ``on_layer(path, done, total)`` is called after each (a progress bar). ``errors``, if given,
    receives each linear layer's relative reconstruction error ``|W - W_q|^2 / |W|^2``.
    ``sources`` maps an embedding's path to its table as stored (``models.streaming.StoredTable``), read a
    slice of rows at a time (``PalettizedEmbedding.from_embedding``).

    Returns ``{path: {"bits", "group_size", "axis"}}`` for every palettized layer, the record that
    ``apply_palettization_config`` rebuilds the layers from.
    """
    predicate = class_predicate or _default_predicate
    chosen = _choose(model, predicate, {"bits": bits, "group_size": group_size, "axis": axis})
    for done, (path, settings) in enumerate(chosen.items(), 1):
        module = _module_at(model, path)
        if callable(importance):
            imp = importance(path, module)
        else:
            imp = None if importance is None else importance.get(path)
        if isinstance(module, nn.Embedding):
            source = None if sources is None else sources.get(path)
            new = PalettizedEmbedding.from_embedding(
                module, importance=imp, source=source, **settings
            )
        else:
            new = PalettizedLinear.from_linear(module, importance=imp, **settings)
            if errors is not None:
                w = module.weight.astype(mx.float32)
                q = new.dequantize(mx.float32)
                errors[path] = (mx.sum((w - q) ** 2) / mx.sum(w * w)).item()
                del w, q
        del module, imp
        model.update_modules(tree_unflatten([(path, new)]))
        if on_layer is not None:
            on_layer(path, done, len(chosen))
    return chosen


def _choose(model: nn.Module, predicate: Callable, defaults: dict) -> dict[str, dict[str, int]]:
    """Validated settings for every layer the predicate accepts (before anything changes)."""
    chosen = {}
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        choice = predicate(path, module)
        if choice is False or choice is None:
            continue
        settings = _settings(choice, defaults, path)
        try:
            check_palettization_settings(tuple(module.weight.shape), **settings)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        chosen[path] = settings
    return chosen


def _module_at(model: nn.Module, path: str) -> nn.Module:
    node: Any = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def apply_palettization_config(model: nn.Module, config: Mapping[str, Any]) -> None:
    """Swap in empty palettized layers, shaped as recorded, so that saved weights can be loaded.

    ``config`` is the ``"palettization"`` entry of config.json (``{"layers": {path: settings}}``)
    or the bare ``{path: settings}`` returned by ``palettize_model``. Every problem is reported in
    one ValueError before anything changes.
    """
    layers = config.get("layers", config)
    modules = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    problems, replacements = [], {}
    for path, raw in layers.items():
        module = modules.get(path)
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            found = "missing" if module is None else type(module).__name__
            problems.append(f"{path}: expected a Linear or Embedding layer, found {found}")
            continue
        try:
            settings = _settings(dict(raw), {}, path)
            if set(settings) != set(SETTING_KEYS):
                raise ValueError(f"{path}: settings need {', '.join(SETTING_KEYS)}, got {raw}")
            check_palettization_settings(tuple(module.weight.shape), **settings)
        except (ValueError, TypeError) as err:
            problems.append(f"{path}: {err}" if not str(err).startswith(path) else str(err))
            continue
        rows, cols = module.weight.shape
        if isinstance(module, nn.Embedding):
            replacements[path] = PalettizedEmbedding(rows, cols, **settings)
        else:
            replacements[path] = PalettizedLinear(
                cols, rows, "bias" in module, **settings, split_at=split_points(module)
            )
    if problems:
        raise ValueError("palettization config does not fit the model: " + "; ".join(problems))
    for path, new in replacements.items():
        model.update_modules(tree_unflatten([(path, new)]))


def palettized_layers(model: nn.Module) -> list[tuple[str, _Palettized]]:
    """(path, layer) for every palettized layer in ``model`` (path "" for the model itself)."""
    return sorted((p, m) for p, m in model.named_modules() if isinstance(m, _Palettized))


def recorded_palettization(model: nn.Module, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with its ``"palettization"`` entry listing exactly the layers ``model`` still
    has palettized (dropped when none are), so the saved checkpoint loads back; e.g. after a fuse
    with ``--dequantize`` turned the adapted projections dense."""
    new = dict(config)
    layers = {path: m.settings for path, m in palettized_layers(model)}
    if layers:
        new["palettization"] = {**dict(config.get("palettization", {})), "layers": layers}
    else:
        new.pop("palettization", None)
    return new


def bits_per_weight(model: nn.Module) -> dict[str, float]:
    """Storage per weight, counting every stored byte.

    ``palettized``: (packed indices + LUTs + biases of the palettized layers) / their weight count.
    ``model``: all stored parameter bytes / all weights, where a palettized layer counts as its
    dense rows * cols (+ bias) and every other parameter as its size.
    """
    layers = palettized_layers(model)
    pal_bits = sum(8 * a.nbytes for _, m in layers for _, a in tree_flatten(m.parameters()))
    pal_weights = sum(m.packed.shape[0] * m._cols for _, m in layers)
    total_bits = total_weights = 0
    inside = tuple(f"{p}." if p else "" for p, _ in layers)
    for name, a in tree_flatten(model.parameters()):
        total_bits += 8 * a.nbytes
        if not (inside and name.startswith(inside)):
            total_weights += a.size
    total_weights += pal_weights + sum(m.bias.size for _, m in layers if "bias" in m)
    return {
        "palettized": pal_bits / pal_weights if pal_weights else 0.0,
        "model": total_bits / total_weights if total_weights else 0.0,
        "palettized_weights": pal_weights,
        "model_weights": total_weights,
    }


DENSE_CACHE = ("auto", "on", "off")
# "auto" keeps dense copies of palettized weights only up to this share of physical memory.
_DENSE_CACHE_MEMORY_SHARE = 0.25


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def cache_dense_weights(model, mode: str = "auto") -> bool:
    """Keep dense copies of the palettized weights for decoding (returns whether it did).

    Only worth it where decode has no LUT kernel: then every forward pass dequantizes every
    layer, ~13x slower on the CPU than a dense copy. ``auto`` caches on the CPU when no kernel
    is usable there (``afm_mlx.palettization.kernels``) and the dense weights fit in a quarter of physical
    memory; ``on`` always; ``off`` never. The cache holds exactly what forward would dequantize,
    so outputs equal the dequantize path's bit for bit (and the kernel's to fp32 rounding);
    files are never changed.
    """
    if mode not in DENSE_CACHE:
        raise UserError(f"--dense-cache {mode!r}: choose one of {', '.join(DENSE_CACHE)}")
    layers = [m for _, m in palettized_layers(model)]
    if not layers or mode == "off":
        return False
    if mode == "auto":
        if mx.default_device().type != mx.cpu or kernel_usable():
            return False
        dense_bytes = sum(m.dense_nbytes for m in layers)
        memory = _physical_memory()
        if memory is None or dense_bytes > _DENSE_CACHE_MEMORY_SHARE * memory:
            return False
    for m in layers:
        m.cache_dense_weight()
    return True
