"""A training step one block at a time (``training.blockwise.blockwise_value_and_grad``): the same loss and
gradients as ``nn.value_and_grad`` for every family that chains its blocks, the same dropout
masks when a block runs again, the same optimizer steps through ``Trainer``, and a fraction of
the whole step's memory on a palettized model (whose head decodes a slice at a time)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from test_families import CONFIGS

from afm_mlx.adapters.lora import LoRASettings, attach_lora, settings_for_model
from afm_mlx.models import streaming
from afm_mlx.models.presets import build_model
from afm_mlx.palettization.layers import palettize_model
from afm_mlx.training.blockwise import blockwise_unsupported, blockwise_value_and_grad
from afm_mlx.training.loop import Trainer
from afm_mlx.training.losses import distillation_loss, make_loss

VOCAB = 400
QWEN3 = {
    "model_type": "qwen3",
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10_000.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 128,
}
FAMILIES = {"qwen3": QWEN3, **{k: v for k, v in CONFIGS.items() if k != "afm7"}}


def adapted_model(config: dict, dropout: float = 0.0, vocab: int = VOCAB) -> nn.Module:
    """A palettized model (every linear layer and the embedding, so a tied head decodes too)
    wearing LoRA adapters whose B is not zero (every adapter weight then has a gradient)."""
    mx.random.seed(0)
    model = build_model({**config, "vocab_size": vocab})
    mx.eval(model.parameters())
    palettize_model(model, lambda p, m: isinstance(m, (nn.Linear, nn.Embedding)), group_size=16)
    model.freeze()
    attach_lora(model, settings_for_model(LoRASettings(rank=4, dropout=dropout), model))
    model.update(tree_map(lambda p: 0.05 * mx.random.normal(p.shape), model.trainable_parameters()))
    mx.eval(model.parameters())
    model.train()
    return model


def batch(seed: int = 1, shape=(2, 20)):
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(0, VOCAB, shape)), mx.array(rng.integers(0, VOCAB, shape))


def assert_same_gradients(expected, got, rtol=1e-5):
    expected, got = dict(tree_flatten(expected)), dict(tree_flatten(got))
    assert expected.keys() == got.keys()
    for name, g in expected.items():
        scale = mx.abs(g).max().item()
        assert scale > 0, name  # every adapter weight has a gradient
        err = mx.abs(g - got[name]).max().item()
        assert err <= rtol * scale, f"{name}: {err} vs {scale}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_blockwise_gradients_are_the_whole_steps(family, monkeypatch):
    # A head of 400 rows decoded 96 rows (six 16-row LUT groups) at a time.
    monkeypatch.setattr(streaming, "HEAD_ROWS", 100)
    model = adapted_model(FAMILIES[family])
    assert blockwise_unsupported(model) is None
    x, y = batch()
    teacher_logits = mx.random.normal((*x.shape, VOCAB))
    for loss_fn, extra in (
        (make_loss(), ()),
        (distillation_loss("kl", 0.7, 2.0), (teacher_logits,)),
    ):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y, *extra)
        got_loss, got = blockwise_value_and_grad(model, loss_fn)(model, x, y, *extra)
        assert got_loss.item() == pytest.approx(loss.item(), rel=1e-6)
        assert_same_gradients(grads, got)


def test_a_block_run_again_draws_its_dropout_masks_again(monkeypatch):
    model = adapted_model(QWEN3, dropout=0.5)
    x, y = batch()
    blocks = model.model.layers
    mx.random.seed(3)
    base = mx.random.randint(0, 2**31 - len(blocks) - 1).item()
    # The reference: block i draws after mx.random.seed(base + i), as the blockwise passes do.
    seeds = {id(b): base + i for i, b in enumerate(blocks)}
    cls = type(blocks[0])
    call = cls.__call__

    def seeded(self, *args, **kwargs):
        mx.random.seed(seeds[id(self)])
        return call(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", seeded)
    loss, grads = nn.value_and_grad(model, make_loss())(model, x, y)
    mx.eval(loss, grads)
    monkeypatch.undo()
    mx.random.seed(3)
    got_loss, got = blockwise_value_and_grad(model, make_loss())(model, x, y)
    assert got_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert_same_gradients(grads, got)
    # The masks matter: without dropout the gradients are others.
    model.eval()
    _, plain = nn.value_and_grad(model, make_loss())(model, x, y)
    name, g = tree_flatten(plain)[0]
    assert mx.abs(g - dict(tree_flatten(got))[name]).max().item() > 1e-3 * mx.abs(g).max().item()


def test_trainer_steps_blockwise_as_it_steps_whole():
    x = np.random.default_rng(2).integers(0, VOCAB, (4, 17)).astype(np.int32)
    results = []
    for blockwise in (False, True):
        model = adapted_model(QWEN3)
        # Plain SGD moves by the gradients themselves (Adam's 1/|g| would amplify rounding).
        opt = optim.SGD(learning_rate=0.5)
        opt.init(model.trainable_parameters())
        trainer = Trainer(model, opt, make_loss(), 2, 1.0, blockwise=blockwise)
        losses = [trainer.step([x[:2], x[2:]])[0].item() for _ in range(3)]
        results.append((losses, dict(tree_flatten(model.trainable_parameters()))))
    (losses, params), (got_losses, got_params) = results
    np.testing.assert_allclose(got_losses, losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    for name, p in params.items():
        np.testing.assert_allclose(np.array(got_params[name]), np.array(p), atol=1e-6, err_msg=name)


def test_a_blockwise_step_decodes_a_block_or_a_head_slice_at_a_time(monkeypatch):
    """The whole step decodes the 4096-row tied head at once (4.2 MB in float32, beside its
    16-bit values and codes); the blockwise one a 1024-row slice of it, or a block."""
    monkeypatch.setattr(streaming, "HEAD_ROWS", 1024)
    config = {**QWEN3, "hidden_size": 256, "num_hidden_layers": 6, "intermediate_size": 512}
    model = adapted_model({**config, "head_dim": 64}, vocab=4096)
    head = model.model.embed_tokens.dense_nbytes
    x, y = batch(shape=(1, 16))
    x, y = x * 10, y * 10  # ids over the whole vocabulary
    peaks = {}
    for name, value_and_grad in (
        ("whole", nn.value_and_grad(model, make_loss())),
        ("blockwise", blockwise_value_and_grad(model, make_loss())),
    ):
        mx.eval(x, y)
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(value_and_grad(model, x, y))
        peaks[name] = mx.get_peak_memory() - base
    assert peaks["whole"] > head, (peaks, head)
    assert peaks["blockwise"] < peaks["whole"] / 2.5, (peaks, head)


def test_what_cannot_step_blockwise_says_why():
    model = build_model({**CONFIGS["afm7"], "vocab_size": VOCAB})
    model.freeze()
    attach_lora(model, settings_for_model(LoRASettings(rank=4), model))
    assert "caches earlier blocks fill" in blockwise_unsupported(model)
    model = adapted_model(QWEN3)
    model.model.norm.unfreeze()
    assert "model.norm.weight" in blockwise_unsupported(model)
