"""Tokenizer equivalence with SentencePiece, corpus reading, token cache, packing, batch order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
from conftest import one_line_error, run_cli

from afm_mlx.core.errors import UserError
from afm_mlx.data.batches import DataPosition, PackedDataset, eval_batches, train_batches
from afm_mlx.data.corpus import read_corpus, strip_markdown
from afm_mlx.data.token_cache import build_token_cache, split_train_valid

SAMPLES = [
    "ROMEO.\nBut soft, what light through yonder window breaks?",
    "In 1599, 42 players paid 1234567 ducats.",
    "  double  spaces,\ttabs and a snowman ☃ and émigré",
    "",
    "x",
]


def test_hf_tokenizer_matches_sentencepiece(tiny_tokenizer, tiny_corpus):
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(tiny_tokenizer)
    texts = SAMPLES + [p for d in read_corpus(str(tiny_corpus))[:3] for p in d.split("\n\n")[:150]]
    for text in texts:
        assert hf.encode(text) == sp.encode(text), text
        assert hf.decode(hf.encode(text)) == text


def test_digits_are_split_and_bytes_fall_back(tiny_tokenizer):
    from afm_mlx.data.tokenizer import train_sentencepiece

    # Numbers repeated this often would be merged by plain BPE; split_digits must prevent it.
    texts = [f"year {n} and {n * 7} ducats, 1234 1234 1234" for n in range(1000, 3000)]
    sp = spm.SentencePieceProcessor(model_proto=train_sentencepiece(texts, 300))
    pieces = sp.encode("1234 2024", out_type=str)
    assert [p.strip("▁") for p in pieces if p.strip("▁")] == list("12342024"), pieces
    tiny = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer / "tokenizer.model"))
    assert "<0xE2>" in tiny.encode("☃", out_type=str)  # not in the corpus: UTF-8 bytes


def test_tokenizer_cli(tmp_path, tiny_corpus):
    proc = run_cli(
        "afm_mlx.tokenizer", "--data", tiny_corpus, "--out", tmp_path / "tok", "--vocab-size", "400"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["type"] == "BPE"


def test_read_corpus_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\n")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "c.md").write_text("# Title\n\n**ROMEO**  \nHello _there_\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    assert read_corpus(str(tmp_path)) == [
        "plain text\n",
        "one",
        "two",
        "Title\n\nROMEO\nHello there\n",
    ]
    assert strip_markdown("### SCENE I.\n\n\n\n_Enter ADAM_") == "SCENE I.\n\nEnter ADAM\n"


def test_shakespeare_is_the_embedded_default():
    docs = read_corpus("shakespeare")
    assert len(docs) >= 37
    assert sum(map(len, docs)) > 4_000_000
    assert not any("**" in d for d in docs)


@pytest.mark.parametrize(
    "files, match",
    [
        ({}, "no such file"),
        ({"empty.txt": ""}, "corpus is empty"),
        ({"bad.jsonl": '{"text": 1}\n'}, 'expected an object with a "text" string'),
        ({"bad.jsonl": "{not json\n"}, "not valid JSON"),
    ],
)
def test_bad_corpora(tmp_path, files, match):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    target = tmp_path / next(iter(files)) if files else tmp_path / "missing"
    with pytest.raises(UserError, match=match):
        read_corpus(str(target))


def test_token_cache_is_built_once_and_memory_mapped(tiny_corpus, tiny_tokenizer):
    from afm_mlx.data.tokenizer import TextTokenizer

    first = build_token_cache(str(tiny_corpus), tiny_tokenizer)
    assert isinstance(first.tokens, np.memmap)
    second = build_token_cache(str(tiny_corpus), tiny_tokenizer)
    assert second.tokens.filename == first.tokens.filename
    tok = TextTokenizer(tiny_tokenizer)
    docs = read_corpus(str(tiny_corpus))
    expected = np.concatenate([np.array(ids + [tok.eos_id]) for ids in tok.encode_batch(docs)])
    np.testing.assert_array_equal(np.asarray(first.tokens), expected)
    assert len(first.doc_starts) == len(docs)
    assert (first.tokens[first.doc_starts[1:] - 1] == tok.eos_id).all()


def test_split_holds_out_whole_documents(tiny_corpus, tiny_tokenizer):
    cache = build_token_cache(str(tiny_corpus), tiny_tokenizer)
    train, valid = split_train_valid(cache, 0.1, seed=0)
    assert len(train) + len(valid) == len(cache.tokens)
    assert valid[-1] == cache.eos_id and 0 < len(valid) < len(train)
    again = split_train_valid(cache, 0.1, seed=0)
    np.testing.assert_array_equal(again[1], valid)


def test_packing_and_resumable_order():
    tokens = np.arange(1001, dtype=np.uint16)
    data = PackedDataset(tokens, seq_len=10)
    assert len(data) == 100
    np.testing.assert_array_equal(data.window(3), np.arange(30, 41))  # seq_len + 1, stride seq_len
    stream = train_batches(data, 8, seed=5, position=DataPosition())
    full = [next(stream) for _ in range(30)]  # crosses an epoch boundary (12 batches/epoch)
    assert full[12][1].epoch == 1
    resumed = train_batches(data, 8, seed=5, position=full[16][1])
    for (expected, _), (batch, _) in zip(full[17:], resumed):
        np.testing.assert_array_equal(batch, expected)
    seen = np.concatenate([b[:, 0] for b, _ in full[:12]])
    assert len(set(seen.tolist())) == 96  # one epoch visits distinct windows
    assert sum(1 for _ in eval_batches(data, 8, max_batches=0)) == 13


def test_too_little_data_for_a_batch():
    data = PackedDataset(np.arange(50, dtype=np.uint16), seq_len=10, name="--data x")
    with pytest.raises(UserError, match="fewer than --batch-size 8"):
        next(train_batches(data, 8, 0, DataPosition()))


def test_tokenizer_cli_bad_input(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    line = one_line_error(
        run_cli("afm_mlx.tokenizer", "--data", tmp_path / "empty.txt", "--out", tmp_path / "tok")
    )
    assert "corpus is empty" in line
