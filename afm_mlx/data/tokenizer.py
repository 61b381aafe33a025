"""SentencePiece BPE tokenizer (byte fallback, split digits: AFM's choice), saved for HF/mlx-lm.

We train with SentencePiece, keep its ``tokenizer.model``, and also write the equivalent
``tokenizer.json`` (a ``tokenizers`` BPE with byte fallback) so that ``AutoTokenizer`` and
mlx-lm's tokenizer wrapper load it with no SentencePiece conversion step. ``TextTokenizer`` is the
fast batch encoder the token cache uses.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from afm_mlx.core.errors import UserError
from afm_mlx.core.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, seed_sentences: int = 2_000_000
) -> bytes:
    """Train a SentencePiece BPE model on ``texts``; returns the serialized model proto."""
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            character_coverage=0.9999,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            unk_id=SPECIAL_IDS["unk"],
            bos_id=SPECIAL_IDS["bos"],
            eos_id=SPECIAL_IDS["eos"],
            pad_id=SPECIAL_IDS["pad"],
            input_sentence_size=seed_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(
            f"tokenizer training failed ({str(e).splitlines()[0]}); "
            f"the corpus may be too small for --vocab-size {vocab_size}"
        ) from e
    return buf.getvalue()


def _hf_tokenizer_from_sentencepiece(model_proto: bytes) -> Tokenizer:
    """The ``tokenizers`` equivalent of a SentencePiece BPE model (byte fallback kept)."""
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # SentencePiece ranks merges by the merged piece's id; rebuild that order for HF BPE.
    merges = []
    for piece, rank in vocab.items():
        if sp.is_control(rank) or sp.is_byte(rank) or sp.is_unknown(rank):
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    merges.sort()
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(m[3], m[4]) for m in merges],
            unk_token=SPECIAL_TOKENS["unk"],
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    # SentencePiece always adds the dummy "▁" prefix (even before a leading space) and splits
    # before each "▁"; HF's Metaspace would skip the prefix there, so normalize explicitly.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="never", split=True
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return tok


def save_tokenizer(model_proto: bytes, out_dir: str | Path, model_max_length: int = 4096) -> Path:
    """Write tokenizer.model, tokenizer.json and tokenizer_config.json into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "tokenizer.model", model_proto)
    atomic_write_text(
        out / "tokenizer.json", _hf_tokenizer_from_sentencepiece(model_proto).to_str()
    )
    atomic_write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS["bos"],
            "eos_token": SPECIAL_TOKENS["eos"],
            "unk_token": SPECIAL_TOKENS["unk"],
            "pad_token": SPECIAL_TOKENS["pad"],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
        },
    )
    return out


class TextTokenizer:
    """Fast batch encoding for the data pipeline (the saved ``tokenizer.json``)."""

    def __init__(self, tokenizer_dir: str | Path):
        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise UserError(
                f"{tokenizer_dir}: no tokenizer.json (train one with afm_mlx.tokenizer)"
            )
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unparsable files
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f"{path}: not a valid tokenizer file ({msg}); re-create or re-download it"
            ) from e
        config_path = Path(tokenizer_dir) / "tokenizer_config.json"
        config = read_json(config_path, "tokenizer config") if config_path.is_file() else {}
        eos = config.get("eos_token", SPECIAL_TOKENS["eos"])
        eos = eos["content"] if isinstance(eos, dict) else eos
        eos_id = self.tokenizer.token_to_id(eos)
        if eos_id is None:
            raise UserError(f"{tokenizer_dir}: tokenizer has no end-of-sequence token '{eos}'")
        self.eos_id = eos_id
        self.vocab_size = self.tokenizer.get_vocab_size()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)
