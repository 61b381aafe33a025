"""Passes over a model larger than memory allows: blocks read from disk and given back.

``block_releaser`` gives a lazily loaded model's blocks back to the checkpoint once they have run,
``StreamedBlock`` / ``blocks_streamed`` run them one at a time widened, ``StoredTable`` reads an
embedding's rows (or a head's slice) straight from its safetensors file, ``head_slices`` computes
the logits a vocabulary slice at a time, and ``streamed_logits`` puts it together: float32 logits
of a half-precision model without a float32 copy of it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from afm_mlx.core.errors import UserError
from afm_mlx.core.fileio import load_safetensors
from afm_mlx.models.files import weight_files
from afm_mlx.models.precision import float32_on_cpu


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
    tied = "lm_head" not in model
    head = model.model.embed_tokens if tied else model.lm_head
    cast = (lambda y: y.astype(mx.float32)) if widen else (lambda y: y)
    # A head that decodes its weight as it computes (a palettized one) offers it in row slices.
    if getattr(head, "decodes_on_call", False):
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
