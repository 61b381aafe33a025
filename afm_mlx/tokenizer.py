"""SentencePiece BPE tokenizer (byte fallback, split digits: AFM's choice), saved for HF/mlx-lm.

We train with SentencePiece, keep its ``tokenizer.model``, and also write the equivalent
``tokenizer.json`` (a ``tokenizers`` BPE with byte fallback) so that ``AutoTokenizer`` and
mlx-lm's tokenizer wrapper load it with no SentencePiece conversion step.

CLI: ``python -m afm_mlx.tokenizer --data CORPUS --out DIR [--vocab-size 8192]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from afm_mlx.core.config import stage_main
from afm_mlx.core.fileio import check_new_output, output_lock, staged_dir
from afm_mlx.data.tokenizer import save_tokenizer, train_sentencepiece


@dataclass
class TokenizerConfig:
    data: str = field(
        default="shakespeare",
        metadata={"help": "corpus: text file/folder, .jsonl with {'text'}, or 'shakespeare'"},
    )
    out: str = field(default="tokenizer", metadata={"help": "output folder"})
    vocab_size: int = field(default=8192, metadata={"help": "vocabulary size"})


def _train_tokenizer(cfg: TokenizerConfig) -> None:
    from afm_mlx.data.corpus import check_corpus, iter_corpus

    out = Path(cfg.out)
    check_new_output(out)
    with output_lock(out):
        check_new_output(out)
        check_corpus(cfg.data)
        model_proto = train_sentencepiece(iter_corpus(cfg.data), cfg.vocab_size)
        with staged_dir(out) as staged:
            save_tokenizer(model_proto, staged)
    print(f"tokenizer with {cfg.vocab_size} pieces written to {out}")


def main(argv: list[str] | None = None) -> None:
    stage_main(
        TokenizerConfig,
        _train_tokenizer,
        "python -m afm_mlx.tokenizer",
        "Train a SentencePiece BPE tokenizer.",
        argv,
        fast_blas=False,
    )


if __name__ == "__main__":
    main()
