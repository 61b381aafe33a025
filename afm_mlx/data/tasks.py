"""Task data for adapters: jsonl records with the loss on the answer tokens only.

Each line of a ``.jsonl`` file is one of:

* ``{"text": ...}``: every token is a target (plain language modelling);
* ``{"prompt": ..., "completion": ...}``: only the completion (and the closing EOS) is a target;
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: only assistant turns are targets. The
  tokenizer's own chat template is used when it has one; otherwise the built-in template::

      ### System:\\n{content}\\n\\n      (optional)
      ### User:\\n{content}\\n\\n
      ### Assistant:\\n{content}</s>\\n\\n

Token ids and their loss mask travel together in one int32 array (``encode_masked``): a token
that is not a target is stored as ``-(id + 1)``. That keeps the trainer's ``(inputs, targets)``
step unchanged; the loss (``afm_mlx.training.losses.masked_nll``) decodes both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from afm_mlx.core.errors import UserError
from afm_mlx.data.corpus import iter_jsonl

ROLES = ("system", "user", "assistant")
BUILTIN_HEADERS = {
    "system": "### System:\n",
    "user": "### User:\n",
    "assistant": "### Assistant:\n",
}


def read_task_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a task ``.jsonl`` file, each checked to be one of the three formats."""
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        raise UserError(
            f"--data {path}: expected a .jsonl file of text/prompt-completion/chat records"
        )
    records = []
    for n, record in iter_jsonl(path):
        problem = _format_problem(record)
        if problem:
            raise UserError(f"{path}:{n}: {problem}")
        records.append(record)
    if not records:
        raise UserError(f"--data {path}: no records")
    return records


def _format_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "expected a JSON object"
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return '"messages" must be a non-empty list'
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                return f"each message needs a role in {ROLES}"
            if not isinstance(m.get("content"), str):
                return 'each message needs a "content" string'
        if not any(m["role"] == "assistant" for m in msgs):
            return "a chat record needs at least one assistant message (the loss is on those)"
        return None
    if "prompt" in record or "completion" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(
            record.get("completion"), str
        ):
            return '"prompt" and "completion" must both be strings'
        if "choices" in record:  # a multiple-choice record (evaluate reports accuracy)
            choices = record["choices"]
            if (
                not isinstance(choices, list)
                or len(choices) < 2
                or not all(isinstance(c, str) for c in choices)
            ):
                return '"choices" must be a list of at least two strings'
            if record["completion"] not in choices:
                return '"completion" must be one of "choices"'
        return None
    if isinstance(record.get("text"), str):
        return None
    return 'expected {"text"}, {"prompt", "completion"} or {"messages"}'


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _encode_parts(tokenizer, parts: list[tuple[str | int, bool]]) -> list[tuple[list[int], bool]]:
    """(ids, is_target) segments of ``parts``: texts, or token ids (EOS) that texts cannot spell.

    Consecutive texts are tokenized together, as generation tokenizes them: a part's ids are what
    encoding the text through it adds past the encoding of the text before it. Encoding each part
    alone would not give the same ids: a SentencePiece tokenizer starts every encoding with a
    word boundary, so a completion " Paris" would become ``"▁", "▁Paris"`` after its prompt
    instead of ``"▁Paris"`` (mlx-lm, too, takes a completion's ids from the joint encoding). A
    token that straddles a boundary belongs to the later part. A token id ends the run of text.
    """
    segments: list[tuple[list[int], bool]] = []
    text, run = "", []  # the current run of text and its encoding
    for part, target in parts:
        if isinstance(part, int):
            segments.append(([part], target))
            text, run = "", []
            continue
        text += part
        ids = _encode(tokenizer, text)
        keep = 0
        while keep < min(len(run), len(ids)) and run[keep] == ids[keep]:
            keep += 1
        drop = len(run) - keep  # tokens of earlier parts that the new text re-tokenized
        while drop:
            seg, was_target = segments.pop()
            if len(seg) > drop:
                segments.append((seg[: len(seg) - drop], was_target))
                drop = 0
            else:
                drop -= len(seg)
        segments.append((ids[keep:], target))
        run = ids
    return [(ids, target) for ids, target in segments if ids]


def _chat_parts(tokenizer, messages: list[dict]) -> list[tuple[list[int], bool]]:
    """(ids, is_target) segments of a conversation."""
    eos = tokenizer.eos_token_id
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        # The text ``Generator.chat_tokens`` renders for generation, EOS as its id.
        parts: list[tuple[str | int, bool]] = []
        for m in messages:
            if m["role"] == "assistant":
                parts += [(BUILTIN_HEADERS["assistant"], False), (m["content"], True), (eos, True)]
                parts.append(("\n\n", False))
            else:
                parts.append((BUILTIN_HEADERS[m["role"]] + m["content"] + "\n\n", False))
        return _encode_parts(tokenizer, parts)
    # With a real template: each assistant turn's tokens are what the full rendering adds past
    # the rendering of the conversation before it with the generation prompt.
    segments, done = [], []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = list(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True))
        full = list(tokenizer.apply_chat_template(messages[: i + 1]))
        if full[: len(prompt)] != prompt or prompt[: len(done)] != done:
            raise UserError("the tokenizer's chat template does not render turns as prefixes")
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return segments


def encode_record(record: dict[str, Any], tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of one record and, per token, whether it is a loss target."""
    eos = tokenizer.eos_token_id
    if "messages" in record:
        segments = _chat_parts(tokenizer, record["messages"])
    elif "prompt" in record:
        parts = [(record["prompt"], False), (record["completion"], True), (eos, True)]
        segments = _encode_parts(tokenizer, parts)
    else:
        segments = [(_encode(tokenizer, record["text"]) + [eos], True)]
    ids = [t for seg, _ in segments for t in seg]
    mask = [target for seg, target in segments for _ in seg]
    return ids, mask


def encode_masked(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """One int32 array: target tokens as their id, the others as ``-(id + 1)``."""
    ids = np.asarray(ids, dtype=np.int32)
    return np.where(np.asarray(mask, dtype=bool), ids, -ids - 1).astype(np.int32)


def decode_masked(x: mx.array) -> tuple[mx.array, mx.array]:
    """Inverse of ``encode_masked`` (works on numpy-encoded windows): (ids, target mask)."""
    mask = x >= 0
    return mx.where(mask, x, -x - 1), mask


class MaskedDataset:
    """One window of ``seq_len + 1`` tokens per example (truncated / padded, padding masked).

    Offers ``PackedDataset``'s interface (``len``, ``batch``, ``name``), so ``train_batches`` and
    its resumable ``DataPosition`` work unchanged.
    """

    def __init__(
        self, examples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int, name: str
    ):
        self.seq_len = seq_len
        self.name = name
        width = seq_len + 1
        self.windows = np.full((len(examples), width), -pad_id - 1, dtype=np.int32)
        self.truncated = 0
        for i, (ids, mask) in enumerate(examples):
            self.truncated += len(ids) > width
            ids, mask = ids[:width], mask[:width]
            self.windows[i, : len(ids)] = encode_masked(ids, mask)
        self.targets = int((self.windows[:, 1:] >= 0).sum())

    def __len__(self) -> int:
        return len(self.windows)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        return self.windows[np.asarray(indices, dtype=np.int64)]


def is_task_folder(path: str | Path) -> bool:
    """An mlx-lm data folder: ``train.jsonl`` (+ ``valid.jsonl``, ``test.jsonl``)."""
    return Path(path).is_dir() and (Path(path) / "train.jsonl").is_file()


def task_datasets(
    path: str | Path, tokenizer, seq_len: int, valid_fraction: float, seed: int
) -> tuple[MaskedDataset, MaskedDataset]:
    """(train, held-out) datasets of a task file; whole records are held out (seeded).

    ``path`` may also be an mlx-lm data folder: ``train.jsonl`` trains and ``valid.jsonl`` (when
    there is one) is the held-out set, as ``mlx_lm.lora`` uses them.
    """
    if is_task_folder(path):
        folder = Path(path)
        if not (folder / "valid.jsonl").is_file():
            return task_datasets(folder / "train.jsonl", tokenizer, seq_len, valid_fraction, seed)
        train, _ = task_datasets(folder / "train.jsonl", tokenizer, seq_len, 0.0, seed)
        valid, _ = task_datasets(folder / "valid.jsonl", tokenizer, seq_len, 0.0, seed)
        valid.name = "validation split"
        return train, valid
    records = read_task_records(path)
    examples = [encode_record(r, tokenizer) for r in records]
    n_valid = round(valid_fraction * len(examples)) if len(examples) >= 2 else 0
    order = np.random.default_rng(seed).permutation(len(examples))
    held = set(order[:n_valid].tolist())
    pad = tokenizer.eos_token_id
    train = [e for i, e in enumerate(examples) if i not in held]
    valid = [e for i, e in enumerate(examples) if i in held]
    train_set = MaskedDataset(train, seq_len, pad, f"--data {path}")
    if train_set.targets == 0:
        raise UserError(f"--data {path}: no answer tokens within --seq-len {seq_len} to train on")
    return train_set, MaskedDataset(valid, seq_len, pad, "validation split")
