"""Run reports: the loss-curve PNG and a short generated sample."""

from __future__ import annotations

import os
from pathlib import Path


def plot_losses(history: list[dict], path: str | Path) -> None:
    """Training and validation loss against step, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if not train and not valid:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def sample_text(model_dir: str | Path, prompt: str, max_tokens: int, seed: int = 0) -> str:
    """Generate ``max_tokens`` from a saved model with mlx-lm's generation (temperature 0.8)."""
    import mlx.core as mx
    from mlx_lm.generate import generate
    from mlx_lm.sample_utils import make_sampler

    from afm_mlx.model import load

    model, tokenizer = load(model_dir)
    mx.random.seed(seed)
    return prompt + generate(
        model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.8, top_p=0.95)
    )
