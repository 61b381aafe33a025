"""Packed, resumable batches.

Training windows of ``seq_len + 1`` tokens tile the token stream; their order is a seeded
permutation per epoch, so a data position is just ``(epoch, index)`` and resuming reproduces the
exact batch sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from afm_mlx.core.errors import UserError
from afm_mlx.data.token_cache import TokenStream, build_token_cache, split_train_valid


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
