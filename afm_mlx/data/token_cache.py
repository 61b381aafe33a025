"""The memory-mapped token cache, and its train/validation split.

Documents are streamed one at a time, tokenized once, joined with EOS separators into one token
stream and cached as a raw ``.bin`` (uint16/uint32) + ``.starts.bin`` (int64 document offsets) +
``.json`` description, then memory-mapped; the cache key hashes every corpus file's content and
the tokenizer. Memory stays bounded by the largest document (plus a small encoding batch), not by
the corpus. The train/validation split is a ``TokenStream``: segments of the mapped stream, never
a copy.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from afm_mlx.core.errors import UserError
from afm_mlx.core.fileio import atomic_write_json
from afm_mlx.data.corpus import corpus_digest, iter_corpus

CACHE_FORMAT = b"afm_mlx token cache v3\n"


def _fingerprint(source: str, tokenizer_dir: Path) -> str:
    """Cache key: the corpus's contents (``corpus_digest``) and the tokenizer.json."""
    h = hashlib.sha256(CACHE_FORMAT)
    h.update(corpus_digest(source).encode())
    h.update((tokenizer_dir / "tokenizer.json").read_bytes())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("AFM_MLX_CACHE", Path.home() / ".cache" / "afm_mlx")) / "tokens"


# Documents are encoded in batches of about this many characters (one longer document is its own
# batch): enough for the tokenizer's threads, small enough that memory does not grow with the
# corpus.
ENCODE_BATCH_CHARS = 1 << 18


@dataclass
class TokenCache:
    """A tokenized corpus: the token stream and each document's start offset (memory-mapped)."""

    tokens: np.ndarray
    doc_starts: np.ndarray
    eos_id: int
    max_id: int


def _write_token_files(
    source: str, tokenizer_dir: Path, bin_tmp: Path, starts_tmp: Path
) -> dict[str, Any]:
    """Stream the corpus through the tokenizer into the two files; returns the description."""
    from afm_mlx.data.tokenizer import TextTokenizer

    tok = TextTokenizer(tokenizer_dir)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)
    n_tokens = n_docs = max_id = 0
    batch: list[str] = []
    chars = 0

    with bin_tmp.open("wb") as fb, starts_tmp.open("wb") as fs:

        def flush() -> None:
            nonlocal n_tokens, n_docs, max_id
            encodings = tok.tokenizer.encode_batch(batch, add_special_tokens=False)
            batch.clear()
            starts = np.empty(len(encodings), dtype=np.int64)
            for i, enc in enumerate(encodings):
                ids = np.empty(len(enc.ids) + 1, dtype=dtype)
                ids[:-1] = enc.ids
                ids[-1] = tok.eos_id
                ids.tofile(fb)
                starts[i] = n_tokens
                n_tokens += len(ids)
                max_id = max(max_id, int(ids.max()))
            del encodings
            starts.tofile(fs)
            n_docs += len(starts)

        for doc in iter_corpus(source):
            batch.append(doc)
            chars += len(doc)
            if chars >= ENCODE_BATCH_CHARS:
                flush()
                chars = 0
        if batch:
            flush()
        if n_docs == 0:
            raise UserError(f"--data {source}: corpus is empty")
        for f in (fb, fs):
            f.flush()
            os.fsync(f.fileno())
    return {
        "source": source,
        "dtype": dtype.name,
        "tokens": n_tokens,
        "documents": n_docs,
        "eos_id": tok.eos_id,
        "max_id": max_id,
    }


def _complete(meta_path: Path, bin_path: Path, starts_path: Path) -> dict[str, Any] | None:
    """The cache's description if its three files are present and consistent, else None."""
    try:
        meta = json.loads(meta_path.read_text())
        ok = (
            bin_path.stat().st_size == meta["tokens"] * np.dtype(meta["dtype"]).itemsize
            and starts_path.stat().st_size == meta["documents"] * 8
            and isinstance(meta["max_id"], int)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if ok else None


def build_token_cache(
    source: str, tokenizer_dir: str | Path, cache_dir: str | Path | None = None
) -> TokenCache:
    """Tokenize ``source`` once (cached by corpus content + tokenizer) and memory-map it.

    Documents are streamed and encoded a small batch at a time, their tokens and start offsets
    appended to temporary files (named with the pid, so concurrent builders never collide) that
    are renamed into place; the ``.json`` description is written last, so its presence means the
    cache is complete.
    """
    tokenizer_dir = Path(tokenizer_dir)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = _fingerprint(source, tokenizer_dir)
    meta_path, bin_path, starts_path = (
        cache / f"{key}{ext}" for ext in (".json", ".bin", ".starts.bin")
    )
    meta = _complete(meta_path, bin_path, starts_path)
    if meta is None:
        cache.mkdir(parents=True, exist_ok=True)
        tmps = [p.with_name(f".tmp-{os.getpid()}-{p.name}") for p in (bin_path, starts_path)]
        try:
            meta = _write_token_files(source, tokenizer_dir, *tmps)
            for tmp, path in zip(tmps, (bin_path, starts_path)):
                os.replace(tmp, path)
        finally:
            for tmp in tmps:
                tmp.unlink(missing_ok=True)
        atomic_write_json(meta_path, meta)
    tokens = np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))
    doc_starts = np.memmap(starts_path, dtype=np.int64, mode="r", shape=(meta["documents"],))
    return TokenCache(
        tokens=tokens, doc_starts=doc_starts, eos_id=meta["eos_id"], max_id=int(meta["max_id"])
    )


class TokenStream:
    """A virtual concatenation of ``[start, end)`` segments of one token array (no copy).

    ``len`` is the total token count; ``stream[a:b]`` returns those tokens as a (small) array,
    concatenating just the pieces of the segments a window spans. ``np.asarray(stream)``
    materializes the whole stream (tests, tiny corpora only).
    """

    def __init__(self, tokens: np.ndarray, segments: np.ndarray | list[tuple[int, int]]):
        seg = np.asarray(segments, dtype=np.int64).reshape(-1, 2)
        seg = seg[seg[:, 1] > seg[:, 0]]
        self.base = tokens
        self.starts = seg[:, 0].copy()
        self.ends = seg[:, 1].copy()
        # offsets[i] is where segment i begins in the virtual stream; offsets[-1] its length.
        self.offsets = np.concatenate([[0], np.cumsum(self.ends - self.starts)]).astype(np.int64)

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def num_segments(self) -> int:
        return len(self.starts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"TokenStream({len(self)} tokens in {self.num_segments} segments)"

    def _slice(self, a: int, b: int) -> np.ndarray:
        if a >= b:
            return np.zeros(0, dtype=self.dtype)
        i = int(np.searchsorted(self.offsets, a, side="right")) - 1
        pieces = []
        while a < b:
            seg_end = int(self.offsets[i + 1])
            take = min(b, seg_end) - a
            s = int(self.starts[i]) + a - int(self.offsets[i])
            pieces.append(self.base[s : s + take])
            a += take
            i += 1
        return np.asarray(pieces[0]) if len(pieces) == 1 else np.concatenate(pieces)

    def __getitem__(self, key: slice | int) -> np.ndarray | np.integer:
        n = len(self)
        if isinstance(key, slice):
            a, b, step = key.indices(n)
            if step != 1:
                raise ValueError("TokenStream slices must have step 1")
            return self._slice(a, b)
        i = operator.index(key)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"token index {key} out of range for {n} tokens")
        return self._slice(i, i + 1)[0]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False and self.num_segments > 1:
            raise ValueError("a TokenStream of several segments cannot be viewed without a copy")
        out = self._slice(0, len(self))
        if copy and self.num_segments == 1:
            out = out.copy()
        return out if dtype is None else out.astype(dtype, copy=False)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, last) indices of each run of consecutive True values in ``mask``."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.diff(padded)
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1


def _doc_segments(cache: TokenCache, docs: np.ndarray) -> np.ndarray:
    """[start, end) token ranges covering the documents where ``docs`` is True (runs merged)."""
    n_docs, total = len(cache.doc_starts), len(cache.tokens)
    first, last = _runs(docs)
    starts = np.asarray(cache.doc_starts[first], dtype=np.int64)
    nxt = last + 1
    ends = np.where(
        nxt < n_docs, np.asarray(cache.doc_starts[np.minimum(nxt, n_docs - 1)]), total
    ).astype(np.int64)
    return np.stack([starts, ends], axis=1)


def split_train_valid(
    cache: TokenCache, valid_fraction: float, seed: int
) -> tuple[TokenStream, TokenStream]:
    """Hold out whole documents (seeded) when there are enough, else the stream's tail.

    Both parts are ``TokenStream`` views of the memory-mapped cache, in document order: nothing
    of the stream is copied.
    """
    n_docs = len(cache.doc_starts)
    total = len(cache.tokens)
    if valid_fraction <= 0:
        return TokenStream(cache.tokens, [(0, total)]), TokenStream(cache.tokens, [])
    if n_docs >= 10:
        n_valid = max(1, round(valid_fraction * n_docs))
        held = np.zeros(n_docs, dtype=bool)
        held[np.random.default_rng(seed).permutation(n_docs)[:n_valid]] = True
        return (
            TokenStream(cache.tokens, _doc_segments(cache, ~held)),
            TokenStream(cache.tokens, _doc_segments(cache, held)),
        )
    cut = int(total * (1 - valid_fraction))
    return TokenStream(cache.tokens, [(0, cut)]), TokenStream(cache.tokens, [(cut, total)])
