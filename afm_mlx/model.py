"""AFM model presets, and loading/saving checkpoints in the Hugging Face qwen3 layout.

The AFM architecture (pre-norm RMSNorm, per-head QK-norm, GQA, SwiGLU, RoPE 500k, tied embedding)
is exactly mlx-lm's ``qwen3`` model, so we build on its classes instead of re-implementing them.
Checkpoints are ``config.json`` + ``model.safetensors`` (sharded with an index when large) + tokenizer
files, which ``mlx_lm.load`` and ``transformers.AutoModelForCausalLM`` open unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import glob
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.utils import _get_classes

from afm_mlx.errors import UserError
from afm_mlx.families import family_for, standard_config
from afm_mlx.fileio import (
    atomic_copy,
    atomic_save_safetensors,
    atomic_write_json,
    load_safetensors,
    read_json,
)

_QWEN3_COMMON = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "rms_norm_eps": 1e-6,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
    "use_cache": True,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}

PRESETS: dict[str, dict[str, Any]] = {
    # For tests: < 1M parameters.
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 192,
        "vocab_size": 512,
        "max_position_embeddings": 512,
    },
    # The demo: trains usefully on a 2-core CPU in minutes.
    "small": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "intermediate_size": 1024,
        "vocab_size": 8192,
        "max_position_embeddings": 2048,
    },
    # AFM-on-device (Gunter et al., 2024, Table 1).
    "afm-3b": {
        "hidden_size": 3072,
        "num_hidden_layers": 26,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 8192,
        "vocab_size": 49152,
        "max_position_embeddings": 4096,
    },
}

MAX_SHARD_BYTES = 5 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The full HF-style config of preset ``name`` with ``overrides`` applied and validated."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    config = {**_QWEN3_COMMON, **PRESETS[name], **overrides}
    validate_config(config, f"preset '{name}'")
    return config


def validate_config(config: dict[str, Any], source: str) -> None:
    """Refuse configs that cannot build a model, naming ``source`` and the bad keys (sizes are
    read under the Llama layout's names: ``families.standard_config``)."""
    family_for(config, source)
    config = standard_config(config)
    required = [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
    ]
    missing = [k for k in required if not isinstance(config.get(k), int) or config[k] <= 0]
    if missing:
        raise UserError(f"{source}: missing or non-positive integer(s): {', '.join(missing)}")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if kv_heads <= 0 or heads % kv_heads:
        raise UserError(
            f"{source}: num_attention_heads ({heads}) must be a multiple of "
            f"num_key_value_heads ({kv_heads})"
        )
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if "head_dim" not in config and config["hidden_size"] % heads:
        raise UserError(
            f"{source}: hidden_size ({config['hidden_size']}) is not divisible by "
            f"num_attention_heads ({heads}); set head_dim explicitly"
        )
    if head_dim % 2:
        raise UserError(f"{source}: head_dim ({head_dim}) must be even for RoPE")


def build_model(config: dict[str, Any]) -> nn.Module:
    """Instantiate the mlx-lm model class for ``config`` (parameters stay lazy until evaluated)."""
    validate_config(config, "config")
    family = family_for(config, "config")
    if family.setup is not None:
        family.setup()
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def init_weights(model: nn.Module, config: dict[str, Any], seed: int = 0) -> None:
    """GPT-style init: N(0, 0.02); residual output projections scaled by 1/sqrt(2 * layers)."""
    std = config.get("initializer_range", 0.02)
    residual_std = std / math.sqrt(2 * standard_config(config)["num_hidden_layers"])
    key = mx.random.key(seed)

    def init(path: str, p: mx.array) -> mx.array:
        nonlocal key
        if p.ndim < 2:
            return p  # norms keep ones (and biases zeros)
        key, sub = mx.random.split(key)
        scale = residual_std if re.search(r"(o_proj|out_proj|down_proj)\.weight$", path) else std
        return mx.random.normal(p.shape, key=sub, scale=scale).astype(p.dtype)

    model.update(tree_map_with_path(init, model.parameters()))


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


def count_parameters(config: dict[str, Any]) -> dict[str, int]:
    """Parameter counts from shapes only (MLX is lazy, so nothing is allocated)."""
    model = build_model(config)
    total = embedding = 0
    embeddings = {
        f"{path}.weight" for path, m in model.named_modules() if isinstance(m, nn.Embedding)
    }
    for name, p in tree_flatten(model.parameters()):
        total += p.size
        if name in embeddings or name.startswith("lm_head"):
            embedding += p.size
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's stored weights (names, shapes, dtypes, bytes).

    Adapters record the fingerprint of the base they were trained on, so loading them onto a
    different base (another checkpoint, or the same one palettized differently) is refused.
    """
    h = hashlib.sha256()
    for name, p in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(memoryview(mx.contiguous(p).reshape(-1).view(mx.uint8)))  # raw bytes, any dtype
    return h.hexdigest()[:16]


def resolve_model_path(path_or_repo: str | Path) -> Path:
    """A local checkpoint folder, or a Hugging Face repo id fetched with huggingface-hub."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path}: expected a model folder (config.json + *.safetensors)")
        return path
    repo = str(path_or_repo)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise UserError(f"{repo}: no such model folder (and not a Hugging Face repo id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo,
                allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"],
            )
        )
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{repo}: not a local folder and could not be fetched ({msg})") from e


def checkpoint_digest(path_or_repo: str | Path) -> str:
    """A cheap digest of a checkpoint: its config.json bytes and each weight file's name and
    size (ranks of one run compare these before they start)."""
    path = resolve_model_path(path_or_repo)
    h = hashlib.sha256(
        (path / "config.json").read_bytes() if (path / "config.json").is_file() else b""
    )
    for f in weight_files(path):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    return h.hexdigest()


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "weight index").get("weight_map", {})
        return [path / f for f in sorted(set(weight_map.values()))]
    return [Path(f) for f in sorted(glob.glob(str(path / "model*.safetensors")))]


def check_weights_match(
    model: nn.Module, shapes: dict[str, tuple[tuple[int, ...], str]], source: str
) -> None:
    """Compare checkpoint names/shapes with the model's; list every mismatch in one error."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    problems = [f"missing {k}" for k in sorted(set(expected) - set(shapes))]
    problems += [f"unexpected {k}" for k in sorted(set(shapes) - set(expected))]
    problems += [
        f"{k} has shape {shapes[k][0]}, expected {expected[k]}"
        for k in sorted(set(expected) & set(shapes))
        if shapes[k][0] != expected[k]
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (
            f"; ... {len(problems) - 8} more" if len(problems) > 8 else ""
        )
        raise UserError(f"{source}: weights do not match config.json: {shown}")


def load_model(
    path_or_repo: str | Path, lazy: bool = False
) -> tuple[nn.Module, dict[str, Any], Path]:
    """Load a checkpoint folder or hub repo; returns (model, config, resolved path)."""
    path = resolve_model_path(path_or_repo)
    config = read_json(path / "config.json", "model config (config.json)")
    validate_config(config, str(path / "config.json"))
    model = build_model(config)
    if "palettization" in config:
        from afm_mlx.palettized import apply_palettization_config

        try:
            apply_palettization_config(model, config["palettization"])
        except ValueError as e:
            raise UserError(f"{path / 'config.json'}: {e}") from e
    files = weight_files(path)
    if not files:
        raise UserError(f"{path}: no model*.safetensors weights found")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(load_safetensors(f))  # lazy: nothing is read before the checks pass
    if hasattr(model, "sanitize"):
        # Once: some families' sanitize changes the model too (Gemma drops its untied head).
        weights = model.sanitize(weights)
    shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in weights.items()}
    check_weights_match(model, shapes, str(path))
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config, path


def block_releaser(model: nn.Module, path: Path) -> Callable[[int | None], None] | None:
    """For a model loaded with ``lazy=True`` from ``path``: a function that gives block ``i``'s
    weights (``None``: the weights outside the blocks, the embedding and head among them) back
    to the checkpoint, replacing them with fresh, unread arrays of the same file.
    A pass that releases each block after running it holds one block in memory at a time, not
    the whole model; running the block again reads it again (from the page cache: about 0.15 s
    for all of Qwen3-0.6B's blocks). Only weights stored under the name, shape and dtype the
    model holds them by are released (a palettized candidate swapped into the block stays).
    None when a block's weight is not stored as the model holds it (a family whose
    ``sanitize`` reshapes them)."""
    blocks = list(model.model.layers)
    files = weight_files(path)
    stored: dict[str, tuple[Path, tuple[int, ...], mx.Dtype]] = {}
    for f in files:
        stored.update({k: (f, tuple(v.shape), v.dtype) for k, v in load_safetensors(f).items()})
    for i, block in enumerate(blocks):
        for k, v in tree_flatten(block.parameters()):
            if stored.get(f"model.layers.{i}.{k}", (None,))[1:] != (tuple(v.shape), v.dtype):
                return None

    def release(i: int | None) -> None:
        if i is None:
            module = model
            names = {
                k: k
                for k, v in tree_flatten(model.parameters())
                if not k.startswith("model.layers.")
                and stored.get(k, (None,))[1:] == (tuple(v.shape), v.dtype)
            }
        else:
            module = blocks[i]
            names = {f"model.layers.{i}.{k}": k for k, _ in tree_flatten(module.parameters())}
            names = {full: k for full, k in names.items() if full in stored}
        fresh = []
        for f in sorted({stored[full][0] for full in names}):
            arrays = mx.load(str(f))  # lazy: nothing is read until a pass evaluates it
            fresh += [(k, arrays[full]) for full, k in names.items() if stored[full][0] == f]
        module.load_weights(fresh, strict=False)

    return release


class StreamedBlock:
    """Stands in for a block during forward passes: runs it widened (``float32_on_cpu``),
    evaluates its output, then gives its weights back to disk when ``release`` is given
    (``block_releaser``): a pass holds one block in memory at a time. Evaluates eagerly, so a
    model wearing these cannot run inside ``mx.compile`` or under autodiff."""

    def __init__(self, block: nn.Module, release: Callable[[], None] | None = None):
        self.block, self.release = block, release

    def __getattr__(self, name: str):  # a model may read its blocks' settings (use_sliding, ...)
        return getattr(self.block, name)

    def __call__(self, x, *args, **kwargs):
        with float32_on_cpu(self.block) as block:
            out = self.run(block, x, *args, **kwargs)
            mx.eval(out)
        if self.release is not None:
            self.release()
        return out

    def run(self, block: nn.Module, x, *args, **kwargs):
        """The widened block's call (a subclass may watch it)."""
        return block(x, *args, **kwargs)


@contextlib.contextmanager
def blocks_streamed(model: nn.Module, release: Callable[[int], None] | None, wrap=StreamedBlock):
    """Inside: the model's blocks are ``wrap(block, release)`` stand-ins (``StreamedBlock``);
    yields the stand-ins."""
    blocks = model.model.layers
    stand_ins = [
        wrap(b, None if release is None else functools.partial(release, i))
        for i, b in enumerate(blocks)
    ]
    try:
        for i, s in enumerate(stand_ins):
            blocks[i] = s
        yield stand_ins
    finally:
        for i, s in enumerate(stand_ins):
            blocks[i] = s.block


class StoredTable:
    """A 2-D float tensor of a safetensors file, read a few rows at a time straight from the
    file: ``mx.load`` reads a tensor whole as soon as any of it is used, and for a
    vocabulary-sized embedding of which a pass needs 64 rows (and then one slice of the head at
    a time) that whole read was the largest allocation of the pass (Gemma-3-1B's bfloat16
    table: 604 MB). Rows come in the stored dtype, with plain reads (no memory map, whose
    touched pages would stay resident)."""

    # stored dtype -> (how NumPy reads it, the MLX dtype it is)
    _DTYPES = {
        "BF16": (np.uint16, mx.bfloat16),
        "F16": (np.float16, mx.float16),
        "F32": (np.float32, mx.float32),
    }

    def __init__(self, file: Path, name: str, dtype: str, shape: tuple[int, int], offset: int):
        self.file, self.name, self.shape = file, name, shape
        self._np, self.dtype = self._DTYPES[dtype]
        self._offset = offset
        self._row_bytes = shape[1] * np.dtype(self._np).itemsize

    @classmethod
    def find(cls, path: Path, name: str) -> StoredTable | None:
        """``name`` in the model folder ``path``'s weight files, or None when it is not stored
        there as a 2-D float16, bfloat16 or float32 tensor."""
        for file in weight_files(path):
            with open(file, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
            entry = header.get(name)
            if entry is None:
                continue
            shape, (begin, end) = tuple(entry["shape"]), entry["data_offsets"]
            if entry["dtype"] not in cls._DTYPES or len(shape) != 2:
                return None
            table = cls(file, name, entry["dtype"], shape, 8 + size + begin)
            return table if end - begin == shape[0] * table._row_bytes else None
        return None

    def _read(self, fd: int, start: int, count: int) -> np.ndarray:
        data = os.pread(fd, count * self._row_bytes, self._offset + start * self._row_bytes)
        if len(data) != count * self._row_bytes:
            raise UserError(f"{self.file}: {self.name} is truncated; re-create or re-download it")
        return np.frombuffer(data, self._np).reshape(count, self.shape[1])

    def _array(self, a: np.ndarray) -> mx.array:
        out = mx.array(a)
        return out.view(self.dtype) if self.dtype == mx.bfloat16 else out

    def __getitem__(self, rows: slice) -> mx.array:
        """Rows of a slice, as ``weight[a:b]`` gives them (what k-means takes of a weight whose
        LUTs group rows)."""
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError(f"{self.name}: rows are read in contiguous slices")
        return self.rows(start, stop)

    def rows(self, start: int, stop: int) -> mx.array:
        """Rows ``start:stop``."""
        stop = min(stop, self.shape[0])
        fd = os.open(self.file, os.O_RDONLY)
        try:
            return self._array(self._read(fd, start, stop - start))
        finally:
            os.close(fd)

    def take(self, ids: mx.array) -> mx.array:
        """The rows of ``ids`` (any shape), as an embedding lookup gives them."""
        flat = np.array(ids).reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise UserError(f"token ids outside the {self.shape[0]}-row {self.name}")
        unique, where = np.unique(flat, return_inverse=True)
        got = np.zeros((len(unique), self.shape[1]), self._np)
        fd = os.open(self.file, os.O_RDONLY)
        try:
            for j, row in enumerate(unique):
                got[j] = self._read(fd, int(row), 1)[0]
        finally:
            os.close(fd)
        return self._array(got[where]).reshape(*ids.shape, self.shape[1])


class _StoredLookup(nn.Module):
    """Stands in for a dense ``nn.Embedding`` during a pass: its rows come from the file."""

    def __init__(self, table: StoredTable):
        super().__init__()
        object.__setattr__(self, "_table", table)  # not a parameter

    def __call__(self, ids: mx.array) -> mx.array:
        return self._table.take(ids)


@contextlib.contextmanager
def _embedding_from(model: nn.Module, table: StoredTable | None):
    """Inside: ``model.model.embed_tokens`` looks its rows up in ``table`` (if given)."""
    if table is None:
        yield
        return
    inner = model.model
    original = inner.embed_tokens
    inner.embed_tokens = _StoredLookup(table)
    try:
        yield
    finally:
        inner.embed_tokens = original


# Vocabulary rows of the LM head widened at a time (a 16384 x 2048 slice is 128 MB in float32).
HEAD_ROWS = 16384


def head_slices(model: nn.Module, widen: bool = True, table: StoredTable | None = None):
    """Functions ``f(h)`` giving the logits of the LM head (or the tied embedding), about
    ``HEAD_ROWS`` vocabulary rows each, so that no more than a slice of the head's weight is
    ever widened or decoded at once: in float32 (``widen``: each slice widened when called),
    else as the head itself computes them. A palettized head decodes one slice of rows at a
    time; a head that needs neither (float32, or unwidened, or quantized) comes whole. With
    ``table`` (the dense head's weight as stored, ``StoredTable``), each slice of rows is read
    from the file when its function is called, so the weight is never read whole."""
    from afm_mlx.palettized import _Palettized

    tied = "lm_head" not in model
    head = model.model.embed_tokens if tied else model.lm_head
    cast = (lambda y: y.astype(mx.float32)) if widen else (lambda y: y)
    if isinstance(head, _Palettized) and head.decodes_on_call:
        for start, stop in head.row_slices(HEAD_ROWS):

            def decoded(h: mx.array, start: int = start, stop: int = stop) -> mx.array:
                y = head.matmul_rows(h, start, stop)
                if not tied and "bias" in head:
                    y = y + head.bias[start:stop].astype(y.dtype)
                return cast(y)

            yield decoded
        return
    dense = type(head) in (nn.Linear, nn.Embedding)
    if table is None and (not widen or not dense or head.weight.dtype == mx.float32):
        yield lambda h: cast(head.as_linear(h) if tied else head(h))
        return
    if table is not None and not (widen and dense and tuple(head.weight.shape) == table.shape):
        raise ValueError(f"{table.name}: not the widened dense head's weight")
    weight, bias = head.weight, None if tied else head.get("bias")
    for start in range(0, weight.shape[0], HEAD_ROWS):

        def logits(h: mx.array, start: int = start) -> mx.array:
            stop = start + HEAD_ROWS
            rows = weight[start:stop] if table is None else table.rows(start, stop)
            out = h @ rows.astype(mx.float32).T
            return out if bias is None else out + bias[start:stop].astype(mx.float32)

        yield logits


def stored_tables(model: nn.Module, path: Path) -> tuple[StoredTable | None, StoredTable | None]:
    """(embedding, head) of a lazily loaded ``model`` as ``StoredTable``s of its folder
    ``path``, each None where the model's layer is not a plain dense one stored as it holds it
    (the head is the embedding's table when tied)."""

    def stored(name: str, layer: nn.Module, kind: type) -> StoredTable | None:
        if type(layer) is not kind:
            return None
        t = StoredTable.find(path, name)
        held = (tuple(layer.weight.shape), layer.weight.dtype)
        return t if t is not None and (t.shape, t.dtype) == held else None

    embed = getattr(model.model, "embed_tokens", None)  # afm7 names its own otherwise
    table = None if embed is None else stored("model.embed_tokens.weight", embed, nn.Embedding)
    if "lm_head" not in model:
        return table, table
    return table, stored("lm_head.weight", model.lm_head, nn.Linear)


def streamed_logits(
    model: nn.Module,
    release: Callable[[int | None], None] | None,
    x: mx.array,
    tables: tuple[StoredTable | None, StoredTable | None] = (None, None),
) -> mx.array:
    """float32 logits of a half-precision model without a float32 copy of it: each block runs
    widened in turn (and, with ``release``, is read from disk and given back, ``block_releaser``,
    as are the embedding and head at the end), the head widened a slice at a time. With
    ``tables`` (``stored_tables`` of the model's folder, found once for all passes), the
    embedding's rows and each slice of the head are read from the file as they are needed,
    never the whole table. Exact: the
    values are the widened model's, but for a family that scales its embedding (Gemma), which
    scales it in the stored precision, as the model itself does."""
    embedding, head = tables
    with (
        blocks_streamed(model, release),
        float32_on_cpu(model.model.norm),
        _embedding_from(model, embedding),
    ):
        h = model.model(x).astype(mx.float32)  # the blocks' stack and final norm
        mx.eval(h)
    parts = []
    for logits in head_slices(model, table=head):
        parts.append(logits(h))
        mx.eval(parts[-1])
    if release is not None:
        release(None)  # the embedding and head too (Gemma-3-1B's table: 604 MB in bfloat16)
    return mx.concatenate(parts, axis=-1)


def save_model(
    out_dir: str | Path,
    model: nn.Module,
    config: dict[str, Any],
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write safetensors (+ index when sharded) + tokenizer files + ``config.json``, each atomically.

    ``config.json`` is what makes a folder a model (``load_model`` refuses one without it), so it
    is removed first when the folder held a model and written last: a process killed mid-save
    leaves a folder that is refused, never one that mixes old and new weights. Stages that write
    a new model folder build it beside the target and rename it (``afm_mlx.fileio.staged_dir``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    # Remove stale weights from an earlier save with a different sharding.
    for old in weight_files(out):
        if old.name not in names:
            old.unlink(missing_ok=True)
    for shard, name in zip(shards, names):
        atomic_save_safetensors(out / name, shard, metadata={"format": "mlx"})
    index = out / "model.safetensors.index.json"
    if n > 1:
        weight_map = {k: name for shard, name in zip(shards, names) for k in shard}
        total = sum(v.nbytes for v in weights.values())
        atomic_write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    else:
        index.unlink(missing_ok=True)
    floats = [v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)]
    dtype = max(set(floats), key=floats.count) if floats else mx.float32
    saved = copy.deepcopy(config)
    saved["torch_dtype"] = str(dtype).split(".")[-1]
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                atomic_copy(src, out / name)
    atomic_write_json(out / "config.json", saved)  # last: the folder is a model from here on
    return out


def load(path_or_repo: str | Path, lazy: bool = False):
    """Open any afm_mlx (or qwen3/llama-family) checkpoint: returns (model, tokenizer).

    The tokenizer is mlx-lm's ``TokenizerWrapper`` (streaming detokenizer included).
    """
    from mlx_lm.utils import load_tokenizer

    model, config, path = load_model(path_or_repo, lazy=lazy)
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:
        raise UserError(f"{path}: could not load the tokenizer ({e})") from e
    return model, tokenizer


def load_base(path_or_repo: str | Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer, config) of a base for adapters: afm_mlx checkpoints of any kind, and
    mlx-lm affine-quantized ones (for QLoRA comparisons)."""
    from mlx_lm.utils import load_tokenizer

    path = resolve_model_path(path_or_repo)
    config = read_json(path / "config.json", "model config (config.json)")
    try:
        model, config, path = load_model(path)
    except UserError:
        # afm_mlx's loader is authoritative; an mlx-lm affine-quantized checkpoint it does not
        # know is opened by mlx-lm itself.
        if "quantization" not in config:
            raise
        from mlx_lm.utils import load_model as mlx_lm_load_model

        model, config = mlx_lm_load_model(path)
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:
        raise UserError(f"{path}: could not load the tokenizer ({e})") from e
    model.eval()
    return model, tokenizer, config
