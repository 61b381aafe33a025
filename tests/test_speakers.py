"""The demo task (speaker attribution) and multiple-choice scoring.

The split must be honest (whole scenes held out of the task's training data and of the language
model's corpus); the cached scoring must equal scoring each full sequence; bad records are one
line; the pipeline's plan and run record behave as documented.
"""

from __future__ import annotations

import json
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from afm_mlx.core.errors import UserError
from afm_mlx.data.speakers import (
    ANSWER_SUFFIX,
    PROMPT_SUFFIX,
    build_speaker_task,
    parse_play,
    write_task,
)
from afm_mlx.data.tasks import encode_record


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("speakers")
    return out, write_task(out, seed=0, train_per_speaker=40, eval_per_speaker=10)


def _records(out, split):
    return [json.loads(x) for x in (out / "task" / f"{split}.jsonl").read_text().splitlines()]


def test_parse_play_finds_scenes_speakers_and_drops_stage_directions():
    from afm_mlx.data.corpus import shakespeare_files

    othello = next(f for f in shakespeare_files() if f.stem == "othello")
    lines, scenes, speeches = parse_play(othello)
    assert 15 < len(scenes) < 30  # Othello: 15 scenes in 5 acts, plus act headings and the title
    assert speeches[0].speaker == "RODERIGO" and speeches[0].text.startswith("Tush!")
    assert speeches[1].speaker == "IAGO"
    assert not any(s.text.startswith("_") for s in speeches)
    assert sum(sc.end - sc.start for sc in scenes) == len(lines)  # scenes tile the play


def test_split_holds_out_whole_scenes_and_is_balanced(task):
    out, description = task
    names = [s["name"] for s in description["speakers"]]
    assert len(names) == 6 and len(set(names)) == 6
    assert len({s["play"] for s in description["speakers"]}) == 6  # one character per play
    assert description["chance"] == pytest.approx(1 / 6)
    splits = {s: _records(out, s) for s in ("train", "valid", "test")}
    for split, records in splits.items():
        assert len(records) == description["examples"][split]
        counts = Counter(r["completion"] for r in records)
        assert set(counts) <= {n + ANSWER_SUFFIX for n in names}
        assert max(counts.values()) <= (40 if split == "train" else 10)
        for r in records:
            assert r["prompt"].endswith(PROMPT_SUFFIX) and r["completion"] in r["choices"]
    train = {r["prompt"] for r in splits["train"]}
    assert not train & {r["prompt"] for r in splits["test"]}
    assert not train & {r["prompt"] for r in splits["valid"]}
    # The corpus the language model trains on lacks every held-out scene, and only those.
    from afm_mlx.data.corpus import shakespeare_files

    corpus = {f.name: f.read_text() for f in (out / "corpus").iterdir()}
    assert sorted(corpus) == sorted(f.name for f in shakespeare_files())
    for r in splits["test"][:40]:
        line = r["prompt"].split("\n")[0]
        if len(line) > 30:
            assert not any(line in text for text in corpus.values()), line
    assert description["corpus_lines_held_out"] > 0
    # Deterministic for a seed, different for another.
    again, _, _ = build_speaker_task(train_per_speaker=40, eval_per_speaker=10, seed=0)
    assert [r["prompt"] for r in again["test"]] == [r["prompt"] for r in splits["test"]]
    other, _, _ = build_speaker_task(train_per_speaker=40, eval_per_speaker=10, seed=1)
    assert [r["prompt"] for r in other["test"]] != [r["prompt"] for r in splits["test"]]


def test_choice_scoring_with_a_shared_prompt_cache_equals_full_sequences(tiny_model_dir):
    from afm_mlx.models.io import load
    from afm_mlx.training.losses import choice_accuracy, choice_nll, token_nll

    model, tokenizer = load(tiny_model_dir)
    text = "Who speaks these words?\nSpeaker:"
    prompt = tokenizer.encode(text, add_special_tokens=False)
    choices = [tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id]
               for c in (" HAMLET", " IAGO", " DUKE VINCENTIO")]  # fmt: skip
    cached = choice_nll(model, prompt, choices)
    for c, got in zip(choices, cached):
        seq = mx.array(prompt + c)[None]
        nll = token_nll(model(seq[:, :-1]).astype(mx.float32), seq[:, 1:])[0, len(prompt) - 1 :]
        assert got == pytest.approx(nll.sum().item(), rel=1e-5)
    # With a target mask only the marked tokens count (a choice's leading tokens that belong to
    # its prompt, when the choice merged with the prompt's last token).
    masks = [[False] + [True] * (len(c) - 1) for c in choices]
    masked = choice_nll(model, prompt, choices, masks)
    for c, got in zip(choices, masked):
        seq = mx.array(prompt + c)[None]
        nll = token_nll(model(seq[:, :-1]).astype(mx.float32), seq[:, 1:])[0, len(prompt) :]
        assert got == pytest.approx(nll.sum().item(), rel=1e-5)
    # choice_accuracy scores each choice as training tokenizes the record (prompt and
    # completion together): its prediction is the argmin of those full-sequence scores.
    names = [" HAMLET", " IAGO", " DUKE VINCENTIO"]
    full = []
    for c in names:
        ids, mask = encode_record({"prompt": text, "completion": c}, tokenizer)
        seq = mx.array(ids)[None]
        nll = token_nll(model(seq[:, :-1]).astype(mx.float32), seq[:, 1:])[0]
        full.append(float((nll * mx.array(mask[1:], dtype=mx.float32)).sum()))
    best = names[int(np.argmin(full))]
    record = {"prompt": text, "completion": best, "choices": names}
    assert choice_accuracy(model, tokenizer, [record])["accuracy"] == 1.0
    other = next(n for n in names if n != best)
    assert choice_accuracy(model, tokenizer, [{**record, "completion": other}])["accuracy"] == 0.0
    # The prediction is the most likely choice; accuracy counts it against the answer.
    records = [
        {"prompt": "Who speaks these words?\nSpeaker:", "completion": c, "choices": names}
        for names in [[" HAMLET", " IAGO", " DUKE VINCENTIO"]]
        for c in names
    ]
    result = choice_accuracy(model, tokenizer, records)
    # One prompt, three answers: whatever the model prefers, it is right exactly once.
    assert result == {
        "accuracy": pytest.approx(1 / 3),
        "balanced_accuracy": pytest.approx(1 / 3),
        "chance": pytest.approx(1 / 3),
    }
    # A skewed test set: the same prompt, answered A twice and B once. Whichever name the model
    # prefers, its balanced accuracy is 1/2, while its plain accuracy is 2/3 or 1/3.
    skewed = [
        {"prompt": "Who speaks?\nSpeaker:", "completion": c, "choices": [" IAGO", " HAMLET"]}
        for c in (" IAGO", " IAGO", " HAMLET")
    ]
    result = choice_accuracy(model, tokenizer, skewed)
    assert result["balanced_accuracy"] == pytest.approx(0.5)
    assert result["accuracy"] in (pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert int(np.argmin(cached)) in range(3)
    with pytest.raises(UserError, match="record 1: .*non-empty prompt"):
        choice_accuracy(model, tokenizer, [{**skewed[0], "prompt": ""}])


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "a", "completion": " X", "choices": [" X"]}, "at least two strings"),
        ({"prompt": "a", "completion": " X", "choices": " X Y"}, "at least two strings"),
        ({"prompt": "a", "completion": " Z", "choices": [" X", " Y"]}, "one of"),
    ],
)
def test_bad_choice_records_are_one_line(tmp_path, record, message):
    from afm_mlx.data.tasks import read_task_records

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match=message) as e:
        read_task_records(path)
    assert str(e.value).startswith(f"{path}:1:")


def test_pipeline_plan_and_run_record(tmp_path):
    from afm_mlx.pipeline import PipelineConfig, Run, _stages

    plan = PipelineConfig(preset="tiny", task_steps=7).resolved()
    assert plan["task_steps"] == 7 and plan["recover_steps"] == 40
    names = [name for name, _ in _stages(Run(tmp_path / "a", plan, False))]
    assert names[:3] == ["task data", "train", "palettize"] and names[-1] == "Core AI"
    given = PipelineConfig(preset="tiny", model=str(tmp_path), coreai=False).resolved()
    names = [name for name, _ in _stages(Run(tmp_path / "b", given, False))]
    assert "train" not in names and "Core AI" not in names
    with pytest.raises(UserError, match="--train-steps"):
        PipelineConfig(model="x", train_steps=3).validate()

    run = Run(tmp_path / "c", plan, False)
    run.out.mkdir()
    run.finish("task data", 1.0)
    assert json.loads((run.out / "pipeline.json").read_text())["stages"]["task data"]
    other = Run(run.out, PipelineConfig(preset="tiny").resolved(), False)
    with pytest.raises(UserError, match="task_steps: 7 -> 30"):
        other.load_state()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        Run(tmp_path / "d", plan, False).load_state()
