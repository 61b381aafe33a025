"""The demo task: speaker attribution on the bundled plays.

Given a speech from a play, name its speaker from a fixed set of characters. The characters are
the ones with the most speeches in the corpus whose name is unique to one play. Whole *scenes*
are dealt to train / validation / test (seeded), so a test speech comes from a scene the task
adapter never saw; and the language-model corpus the pipeline trains on (``write_task``'s
``corpus/``) is the plays with every validation and test scene cut out, so the base model never
saw those lines either.

Records are ``{"prompt": speech + "\\nSpoken by **", "completion": "NAME**", "choices": [...]}``:
a prompt/completion task for ``finetune`` (loss on the name only), and a multiple-choice test for
``evaluate`` (accuracy: the choice with the highest likelihood). The name is written as the plays
write a speaker's heading (``**HAMLET**``), so the answer's tokens are ones the language model
learned to predict; as a plain " HAMLET" it is a token the corpus has a dozen times, and the task
adapters mostly spent their steps learning to spell it (measured on the small demo model: answer
loss 3.6-3.9 nats per token after 70 steps at any learning rate tried, against 0.8 after 100
steps at 5e-4 in the heading form).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from afm_mlx.core.errors import UserError
from afm_mlx.core.fileio import atomic_write_json, atomic_write_text
from afm_mlx.data.corpus import shakespeare_files

PROMPT_SUFFIX = "\nSpoken by **"
ANSWER_SUFFIX = "**"
SPLITS = ("train", "valid", "test")
_SCENE = re.compile(r"^#{2,3}\s*(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b", re.IGNORECASE)
_SPEAKER = re.compile(r"^\*\*([A-Z][A-Z .,'&-]*[A-Z.])\*\*\s*$")


@dataclass(frozen=True)
class Speech:
    play: str
    scene: int  # index of the scene within its play
    speaker: str
    text: str


@dataclass(frozen=True)
class Scene:
    """The lines of one scene: (first line, end line) in its play's markdown."""

    play: str
    index: int
    start: int
    end: int


def parse_play(path: Path) -> tuple[list[str], list[Scene], list[Speech]]:
    """A play's markdown lines, its scenes (an act heading starts one too) and its speeches."""
    lines = path.read_text(encoding="utf-8").splitlines()
    play = path.stem
    starts = [i for i, line in enumerate(lines) if _SCENE.match(line)] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)  # title and cast list: a scene of their own
    scenes = [
        Scene(play, k, s, e) for k, (s, e) in enumerate(zip(starts, [*starts[1:], len(lines)]))
    ]
    speeches = []
    for scene in scenes:
        i = scene.start
        while i < scene.end:
            m = _SPEAKER.match(lines[i].strip())
            i += 1
            if not m:
                continue
            body = []
            while i < scene.end and lines[i].strip() and not _SPEAKER.match(lines[i].strip()):
                line = lines[i].strip()
                if not (line.startswith("_") and line.endswith("_")):  # stage directions
                    body.append(line.rstrip())
                i += 1
            text = "\n".join(body).strip()
            if text:
                speeches.append(Speech(play, scene.index, m.group(1).strip(" ."), text))
    return lines, scenes, speeches


def _prompt(text: str, max_words: int) -> str:
    kept, n = [], 0
    for line in text.splitlines():
        w = line.split()
        if n + len(w) > max_words:
            kept.append(" ".join(w[: max(max_words - n, 0)]))
            break
        kept.append(line)
        n += len(w)
    return "\n".join(k for k in kept if k) + PROMPT_SUFFIX


def build_speaker_task(
    n_speakers: int = 6,
    train_per_speaker: int = 120,
    eval_per_speaker: int = 30,
    min_words: int = 8,
    max_words: int = 32,
    seed: int = 0,
    files: list[Path] | None = None,
) -> tuple[dict[str, list[dict]], dict[str, set[int]], dict]:
    """(records per split, held-out scene indices per play, description).

    The ``n_speakers`` characters with the most speeches of at least ``min_words`` words, one per
    play (a name that speaks in two plays is skipped: it would not name one character). In the
    plays they come
    from, scenes are dealt 70/10/20 to train/valid/test; each split takes at most
    ``train_per_speaker`` (train) or ``eval_per_speaker`` (valid, test) speeches per speaker,
    seeded, so the classes are balanced and chance is ``1 / n_speakers``.
    """
    files = files if files is not None else shakespeare_files()
    plays = {f.stem: parse_play(f) for f in files}
    counts: Counter[tuple[str, str]] = Counter()
    for _, _, speeches in plays.values():
        counts.update((s.play, s.speaker) for s in speeches if len(s.text.split()) >= min_words)
    name_plays: dict[str, set[str]] = defaultdict(set)
    for play, name in counts:
        name_plays[name].add(play)
    chosen: list[tuple[str, str]] = []
    for (play, name), _ in counts.most_common():
        # One character per play: who speaks is then told apart by more than a shared plot.
        if len(name_plays[name]) == 1 and all(play != p for p, _ in chosen):
            chosen.append((play, name))
    chosen = chosen[:n_speakers]
    if len(chosen) < 2:
        raise UserError("the corpus has fewer than two speakers to tell apart")
    names = sorted(name for _, name in chosen)
    rng = np.random.default_rng(seed)
    split_of: dict[tuple[str, int], str] = {}
    held: dict[str, set[int]] = {}
    for play in sorted({p for p, _ in chosen}):
        scenes = [s.index for s in plays[play][1]]
        order = [scenes[i] for i in rng.permutation(len(scenes))]
        n_test, n_valid = max(1, round(0.2 * len(order))), max(1, round(0.1 * len(order)))
        for k, index in enumerate(order):
            split = "test" if k < n_test else "valid" if k < n_test + n_valid else "train"
            split_of[play, index] = split
        held[play] = {i for i in scenes if split_of[play, i] != "train"}
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    caps = {"train": train_per_speaker, "valid": eval_per_speaker, "test": eval_per_speaker}
    for play, name in chosen:
        by_split: dict[str, list[Speech]] = defaultdict(list)
        for s in plays[play][2]:
            if s.speaker == name and len(s.text.split()) >= min_words:
                by_split[split_of[play, s.scene]].append(s)
        for split in SPLITS:
            pool = by_split[split]
            for i in sorted(rng.permutation(len(pool))[: caps[split]].tolist()):
                records[split].append(
                    {
                        "prompt": _prompt(pool[i].text, max_words),
                        "completion": name + ANSWER_SUFFIX,
                        "choices": [n + ANSWER_SUFFIX for n in names],
                    }
                )
    for split in SPLITS:
        order = rng.permutation(len(records[split]))
        records[split] = [records[split][i] for i in order]
        if not records[split]:
            raise UserError(f"the speaker task has no {split} examples; lower its caps")
    description = {
        "task": "speaker attribution",
        "speakers": [{"name": n, "play": p, "speeches": counts[p, n]} for p, n in chosen],
        "chance": 1 / len(names),
        "examples": {s: len(records[s]) for s in SPLITS},
        "held_out_scenes": {p: len(v) for p, v in sorted(held.items())},
        "seed": seed,
    }
    return records, held, description


def write_task(out: str | Path, seed: int = 0, **kwargs) -> dict:
    """Write ``out/task/{train,valid,test}.jsonl`` + ``task.json`` and ``out/corpus/`` (the plays
    without the held-out scenes); returns the task description."""
    out = Path(out)
    files = shakespeare_files()
    records, held, description = build_speaker_task(seed=seed, files=files, **kwargs)
    (out / "task").mkdir(parents=True, exist_ok=True)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        text = "".join(json.dumps(r) + "\n" for r in records[split])
        atomic_write_text(out / "task" / f"{split}.jsonl", text)
    removed = 0
    for f in files:
        lines, scenes, _ = parse_play(f)
        keep = [
            line
            for sc in scenes
            if sc.index not in held.get(f.stem, ())
            for line in lines[sc.start : sc.end]
        ]
        removed += len(lines) - len(keep)
        atomic_write_text(out / "corpus" / f.name, "\n".join(keep) + "\n")
    description["corpus_lines_held_out"] = removed
    atomic_write_json(out / "task" / "task.json", description)
    return description
