"""Bounded memory for data: a streamed corpus, a content-keyed token cache, zero-copy splits."""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest

from afm_mlx.core.errors import UserError
from afm_mlx.data import token_cache
from afm_mlx.data.batches import (
    DataPosition,
    PackedDataset,
    corpus_splits,
    eval_batches,
    train_batches,
)
from afm_mlx.data.corpus import check_corpus, iter_corpus, read_corpus
from afm_mlx.data.token_cache import TokenCache, TokenStream, build_token_cache, split_train_valid

_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))
_RNG = np.random.default_rng(1234)
WORDS = ["".join(_RNG.choice(_LETTERS, int(_RNG.integers(2, 9)))) for _ in range(400)]


def random_doc(rng: np.random.Generator, n_words: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words)) + "\n"


def write_corpus(folder, n_docs: int, words: int | tuple[int, int], seed: int = 0):
    """``n_docs`` text files of random words (a fixed count, or a count drawn from a range)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        n = words if isinstance(words, int) else int(rng.integers(*words))
        (folder / f"doc{i:04d}.txt").write_text(random_doc(rng, n))
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from afm_mlx.data.tokenizer import save_tokenizer, train_sentencepiece

    rng = np.random.default_rng(7)
    texts = [random_doc(rng, 2000) for _ in range(20)]
    return save_tokenizer(train_sentencepiece(texts, 300), tmp_path_factory.mktemp("tok"))


def reference_split(cache: TokenCache, valid_fraction: float, seed: int):
    """The split as it was before streaming: the held-out documents' tokens copied out."""
    n_docs, total = len(cache.doc_starts), len(cache.tokens)
    tokens = np.array(cache.tokens)
    if valid_fraction <= 0:
        return tokens, np.zeros(0, dtype=tokens.dtype)
    if n_docs >= 10:
        n_valid = max(1, round(valid_fraction * n_docs))
        held = set(np.random.default_rng(seed).permutation(n_docs)[:n_valid].tolist())
        ends = np.append(np.array(cache.doc_starts[1:]), total)
        train_parts, valid_parts = [], []
        for i, (s, e) in enumerate(zip(np.array(cache.doc_starts), ends)):
            (valid_parts if i in held else train_parts).append(tokens[s:e])
        return np.concatenate(train_parts), np.concatenate(valid_parts)
    cut = int(total * (1 - valid_fraction))
    return tokens[:cut], tokens[cut:]


def assert_same_dataset(ours: PackedDataset, ref: PackedDataset, batch_size: int = 4) -> None:
    assert len(ours) == len(ref)
    for i in range(len(ref)):
        np.testing.assert_array_equal(ours.window(i), ref.window(i))
    np.testing.assert_array_equal(ours.batch(np.arange(len(ref))), ref.batch(np.arange(len(ref))))
    for a, b in zip(
        eval_batches(ours, batch_size, 0), eval_batches(ref, batch_size, 0), strict=True
    ):
        assert a.dtype == b.dtype == np.int32
        np.testing.assert_array_equal(a, b)
    if len(ref) >= batch_size:
        ours_it = train_batches(ours, batch_size, 3, DataPosition())
        ref_it = train_batches(ref, batch_size, 3, DataPosition())
        for _ in range(2 * (len(ref) // batch_size) + 1):  # into the second epoch
            (a, pa), (b, pb) = next(ours_it), next(ref_it)
            np.testing.assert_array_equal(a, b)
            assert pa == pb


@pytest.mark.parametrize("n_docs, valid_fraction", [(30, 0.0), (30, 0.1), (30, 0.35), (6, 0.2)])
def test_token_stream_split_matches_the_copying_split(tmp_path, tok_dir, n_docs, valid_fraction):
    corpus = write_corpus(tmp_path / "corpus", n_docs, (5, 300), seed=n_docs)
    cache = build_token_cache(str(corpus), tok_dir, tmp_path / "cache")
    train, valid = split_train_valid(cache, valid_fraction, seed=11)
    ref_train, ref_valid = reference_split(cache, valid_fraction, seed=11)
    assert isinstance(train, TokenStream) and isinstance(valid, TokenStream)
    for ours, ref in ((train, ref_train), (valid, ref_valid)):
        assert len(ours) == len(ref) and ours.dtype == ref.dtype
        np.testing.assert_array_equal(np.asarray(ours), ref)
        if len(ref):
            assert ours[-1] == ref[-1] and ours[0] == ref[0]
            np.testing.assert_array_equal(
                ours[len(ref) // 3 : len(ref) // 2 + 37], ref[len(ref) // 3 : len(ref) // 2 + 37]
            )
    if valid_fraction <= 0:
        assert len(valid) == 0 and train.num_segments == 1
    elif n_docs >= 10:
        n_valid = max(1, round(valid_fraction * n_docs))
        # Adjacent documents merge: train has at most one segment more than held-out documents.
        assert 1 < train.num_segments <= n_valid + 1 and valid.num_segments <= n_valid
    else:
        assert train.num_segments == valid.num_segments == 1  # the tail cut
    for seq_len in (7, 16):
        assert_same_dataset(PackedDataset(train, seq_len), PackedDataset(ref_train, seq_len))
        assert_same_dataset(PackedDataset(valid, seq_len), PackedDataset(ref_valid, seq_len))


def test_corpus_splits_lives_in_data(tmp_path, tok_dir):
    corpus = write_corpus(tmp_path / "corpus", 12, (20, 200))
    train, held = corpus_splits(str(corpus), tok_dir, 16, 0.2, 5)
    assert train.name == f"--data {corpus}" and held.name == "validation split"
    assert isinstance(train.tokens, TokenStream) and isinstance(held.tokens, TokenStream)
    ref_train, ref_valid = reference_split(build_token_cache(str(corpus), tok_dir), 0.2, 5)
    assert_same_dataset(train, PackedDataset(ref_train, 16))
    assert_same_dataset(held, PackedDataset(ref_valid, 16))


def test_split_and_batches_copy_nothing_of_the_stream(tmp_path, tok_dir):
    corpus = write_corpus(tmp_path / "corpus", 60, 4000)
    cache = build_token_cache(str(corpus), tok_dir, tmp_path / "cache")
    assert isinstance(cache.tokens, np.memmap) and isinstance(cache.doc_starts, np.memmap)
    stream_bytes = cache.tokens.nbytes
    assert stream_bytes > 2_000_000
    tail_cache = TokenCache(cache.tokens, cache.doc_starts[:5], cache.eos_id, cache.max_id)
    tracemalloc.start()
    try:
        for c, fraction in ((cache, 0.1), (cache, 0.0), (tail_cache, 0.1)):
            train, valid = split_train_valid(c, fraction, seed=0)
            train_data = PackedDataset(train, 128, "train")
            valid_data = PackedDataset(valid, 128, "valid")
            batches = train_batches(train_data, 8, 0, DataPosition())
            for _ in range(5):
                next(batches)
            for _ in zip(range(5), eval_batches(valid_data, 8, 0)):
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.1 * stream_bytes, (peak, stream_bytes)


def _traced_build(corpus, tok_dir, cache_dir) -> int:
    tracemalloc.start()
    try:
        build_token_cache(str(corpus), tok_dir, cache_dir)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_tokenization_memory_does_not_grow_with_the_corpus(tmp_path, tok_dir):
    n = 100
    small = write_corpus(tmp_path / "small", n, 900, seed=1)  # ~5 KB documents
    large = write_corpus(tmp_path / "large", 4 * n, 900, seed=2)
    large_text = sum(p.stat().st_size for p in large.iterdir())
    peak_small = _traced_build(small, tok_dir, tmp_path / "cache_small")
    peak_large = _traced_build(large, tok_dir, tmp_path / "cache_large")
    assert peak_large < 1.5 * peak_small + 256_000, (peak_small, peak_large)
    assert peak_large < large_text / 3, (peak_large, large_text)
    cache = build_token_cache(str(large), tok_dir, tmp_path / "cache_large")
    assert len(cache.doc_starts) == 4 * n


def test_cache_key_is_the_content_not_size_and_mtime(tmp_path, tok_dir):
    from afm_mlx.data.tokenizer import TextTokenizer

    corpus = write_corpus(tmp_path / "corpus", 3, 200)
    first = build_token_cache(str(corpus), tok_dir, tmp_path / "cache")
    old_tokens = np.array(first.tokens)
    path = corpus / "doc0001.txt"
    st = path.stat()
    text = path.read_text()
    changed = text[::-1].strip() + "\n"  # same length, different content
    assert len(changed) == len(text) and changed != text
    path.write_text(changed)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = build_token_cache(str(corpus), tok_dir, tmp_path / "cache")
    assert second.tokens.filename != first.tokens.filename
    assert not np.array_equal(np.array(second.tokens), old_tokens)
    tok = TextTokenizer(tok_dir)
    docs = read_corpus(str(corpus))
    expected = np.concatenate([np.array(ids + [tok.eos_id]) for ids in tok.encode_batch(docs)])
    np.testing.assert_array_equal(np.array(second.tokens), expected)


def test_max_id_is_recorded(tmp_path, tok_dir):
    corpus = write_corpus(tmp_path / "corpus", 12, (50, 300))
    cache = build_token_cache(str(corpus), tok_dir, tmp_path / "cache")
    stream_max = int(np.array(cache.tokens).max())
    assert cache.max_id == stream_max > cache.eos_id
    meta_path = next((tmp_path / "cache").glob("*.json"))
    meta = json.loads(meta_path.read_text())
    assert meta["max_id"] == stream_max
    # A description without max_id is not a complete cache: it is rebuilt, and records it.
    del meta["max_id"]
    meta_path.write_text(json.dumps(meta))
    again = build_token_cache(str(corpus), tok_dir, tmp_path / "cache")
    assert again.max_id == stream_max
    assert json.loads(meta_path.read_text())["max_id"] == stream_max


def test_cache_is_written_through_pid_temporaries(tmp_path, tok_dir, monkeypatch):
    seen = []
    real = token_cache._write_token_files

    def spy(source, tokenizer_dir, bin_tmp, starts_tmp):
        seen.extend([bin_tmp.name, starts_tmp.name])
        return real(source, tokenizer_dir, bin_tmp, starts_tmp)

    monkeypatch.setattr(token_cache, "_write_token_files", spy)
    corpus = write_corpus(tmp_path / "corpus", 3, 100)
    build_token_cache(str(corpus), tok_dir, tmp_path / "cache")
    assert len(seen) == 2 and all(n.startswith(f".tmp-{os.getpid()}-") for n in seen)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".bin", ".bin", ".json"]
    # A build that fails part-way (a bad line after good documents) leaves nothing behind.
    (corpus / "zz.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(UserError, match=r"zz\.jsonl:2: expected an object"):
        build_token_cache(str(corpus), tok_dir, tmp_path / "cache2")
    assert list((tmp_path / "cache2").iterdir()) == []


def test_iter_and_check_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\n")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "  "}\n{"text": "two"}\n')
    (tmp_path / "blank.txt").write_text(" \n")
    (tmp_path / "c.md").write_text("# Title\n\n**ROMEO**  \nHello _there_\n")
    docs = iter_corpus(str(tmp_path))
    assert not isinstance(docs, list)
    expected = ["plain text\n", "one", "two", "Title\n\nROMEO\nHello there\n"]
    assert list(docs) == expected == read_corpus(str(tmp_path))
    assert check_corpus(str(tmp_path)) == 4
    with pytest.raises(UserError, match="no such file"):
        iter_corpus(str(tmp_path / "missing"))  # at once, not on first use

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_text("\n\n")
    (empty / "y.jsonl").write_text('{"text": ""}\n')
    assert list(iter_corpus(str(empty))) == []
    with pytest.raises(UserError, match="corpus is empty") as e:
        check_corpus(str(empty))
    assert str(e.value) == f"--data {empty}: corpus is empty"

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_text("first document\n")
    (bad / "b.jsonl").write_text('{"text": "ok"}\n\n{not json\n')
    docs = iter_corpus(str(bad))
    assert next(docs) == "first document\n"  # streamed: the bad line is only met when reached
    with pytest.raises(UserError) as e:
        check_corpus(str(bad))
    msg = str(e.value)
    assert msg.startswith(f"{bad / 'b.jsonl'}:3: not valid JSON") and "\n" not in msg
