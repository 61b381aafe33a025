"""Gemma 3, SmolLM3, Phi-3 and AFM (afm7) through the MLX stages, each as a tiny random model: our
loader's logits equal mlx-lm's, the palettized forward is the dense forward of the dequantized weights, mixed-bit
sensitivity replays the family's own masks, a recovery adapter trains and loads back, generate
runs with it; the converters run every family to MLX's logits (Core AI in Apple's runtime), storing
the palettized weights byte for byte, and every stage refuses a family afm_mlx does not handle."""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import one_line_error, run_cli
from mlx.utils import tree_flatten

from afm_mlx.adapters.lora import AdapterCache, read_adapter
from afm_mlx.calibration.replay import linear_paths, swap_module
from afm_mlx.calibration.sensitivity import measure_sensitivity
from afm_mlx.core.families import family_for, standard_config, supported_types
from afm_mlx.finetune import FinetuneConfig, finetune
from afm_mlx.models.files import save_model
from afm_mlx.models.io import load, load_model
from afm_mlx.models.presets import build_model
from afm_mlx.palettization.layers import PalettizedLinear
from afm_mlx.palettize import PalettizeConfig, palettize
from afm_mlx.recover import RecoverConfig, recover

# Longer than Gemma's sliding window below, so its local layers really mask.
TOKENS = mx.array([[5, 17, 300, 42, 9, 77, 123, 4, 250, 8, 61, 99, 31, 7, 140, 12, 3, 88, 27, 64]])

CONFIGS = {
    "gemma3_text": {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "sliding_window": 6,
        "sliding_window_pattern": 2,  # local, global, local, global
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
    },
    "smollm3": {
        "model_type": "smollm3",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10_000.0,
        "no_rope_layer_interval": 2,  # RoPE, none, RoPE, none
        "tie_word_embeddings": False,
    },
    "phi3": {  # fused projections: qkv_proj rows 64 | 32 | 32, gate_up_proj 128 | 128
        "model_type": "phi3",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10_000.0,
        # Phi-3-128k's longrope: per-frequency factors and a sqrt(1 + ln 4 / ln 16) scale.
        "rope_scaling": {
            "type": "longrope",
            "short_factor": [1.0] * 8,
            "long_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 3.0, 4.5, 6.0],
        },
        "original_max_position_embeddings": 16,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    },
    "afm7": {  # 2 regular blocks (qkv_proj rows 64 | 32 | 32), then 2 reading the last one's cache
        "model_type": "afm7",
        "hidden_dim": 64,
        "num_layers": 4,
        "num_kv_reuse_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "hidden_dim_scale_factor": 2.0,
        "rope_theta": 10_000.0,
    },
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def family_dir(request, tiny_corpus, tiny_tokenizer, tmp_path_factory):
    """A model of the family, briefly trained (``train --init``) from a random init: a random
    model predicts almost uniformly, leaving a recovery adapter nothing to learn."""
    from tokenizers import Tokenizer

    from afm_mlx.train import TrainConfig, train

    vocab = Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json")).get_vocab_size()
    config = {**CONFIGS[request.param], "vocab_size": vocab, "eos_token_id": 2}
    tmp = tmp_path_factory.mktemp(request.param)
    mx.random.seed(7)
    model = build_model(config)
    if request.param == "afm7":
        # Fine 8-bit steps for keys and values, as a trained AFM has (the init's 1.0 rounds
        # them to whole numbers).
        for block in model.model.layers:
            block.self_attn.quant_key_scale = mx.array(1 / 16)
            block.self_attn.quant_value_scale = mx.array(1 / 32)
    mx.eval(model.parameters())
    save_model(tmp / "random", model, config, tiny_tokenizer)
    cfg = TrainConfig(
        init=str(tmp / "random"),
        data=str(tiny_corpus),
        out=str(tmp / "fp"),
        max_steps=60,
        batch_size=8,
        seq_len=32,
        learning_rate=3e-3,
        warmup_steps=5,
        eval_every=1000,
        save_every=1000,
        sample_tokens=0,
        progress=False,
    )
    return train(cfg)


@pytest.fixture(scope="module")
def palettized_dir(family_dir):
    out = family_dir.parent / "lut"
    cfg = PalettizeConfig(
        model=str(family_dir),
        out=str(out),
        target_bpw=3.0,
        bit_choices=[2, 4],
        group_size=16,
        calibration_batches=1,
        calibration_seq_len=24,
    )
    palettize(cfg)
    return out


def test_our_loader_computes_mlx_lms_logits(family_dir):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    ours, _, _ = load_model(family_dir)
    theirs, _ = mlx_lm_load_model(family_dir)
    assert type(ours) is type(theirs)
    np.testing.assert_array_equal(np.array(ours(TOKENS)), np.array(theirs(TOKENS)))


def test_a_tied_gemma_checkpoint_loads(tiny_tokenizer, tmp_path):
    """Gemma-3-1B stores no LM head (tied to the embedding); mlx-lm's Gemma class builds one and
    drops it in ``sanitize``, which therefore must run once."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    config = {**CONFIGS["gemma3_text"], "vocab_size": 512}
    model = build_model(config)
    model.pop("lm_head")
    mx.eval(model.parameters())
    folder = save_model(tmp_path / "tied", model, config, tiny_tokenizer)
    ours, _, _ = load_model(folder)
    assert "lm_head" not in ours
    theirs, _ = mlx_lm_load_model(folder)
    np.testing.assert_array_equal(np.array(ours(TOKENS)), np.array(theirs(TOKENS)))


def test_palettized_forward_is_the_dense_forward_of_its_dequantized_weights(
    family_dir, palettized_dir
):
    model, config, _ = load_model(palettized_dir)
    bits = {v["bits"] for k, v in config["palettization"]["layers"].items() if "layers." in k}
    assert bits == {2, 4}, bits  # the budget was met by mixing, as chosen by sensitivity
    dense, _, _ = load_model(family_dir)
    replacement = [
        (f"{name}.weight", module.dequantize(mx.float32))
        for name, module in tree_flatten(model.leaf_modules(), is_leaf=lambda m: hasattr(m, "lut"))
        if hasattr(module, "dequantize")
    ]
    # Every projection of every block, plus the embedding (8-bit rows, AFM's default).
    assert len(replacement) == len(linear_paths(dense)) + 1
    projections = family_for(config, "t").projections
    assert {p.split(".", 3)[-1] for p in linear_paths(dense)} == set(projections)
    fp = np.array(dense(TOKENS))
    dense.load_weights(replacement, strict=False)
    np.testing.assert_allclose(np.array(model(TOKENS)), np.array(dense(TOKENS)), atol=1e-4)
    assert np.abs(np.array(model(TOKENS)) - fp).max() > 1e-3  # and it is not the fp model


def test_sensitivity_replays_the_familys_masks(family_dir):
    """Replaying blocks from recorded inputs gives the KL a full forward pass gives."""
    model, _, _ = load_model(family_dir)
    batches = [mx.concatenate([TOKENS, TOKENS[:, :1]], axis=1)]
    # An attention output projection of the second block, and the last projection of all.
    attention_out = [p for p in linear_paths(model) if p.endswith(("o_proj", "out_proj"))]
    paths = [attention_out[1], linear_paths(model)[-1]]
    got = measure_sensitivity(model, paths, [2], batches, group_size=16)

    def logprobs():  # in float64: a float32 log-softmax loses digits of a KL of 1e-5
        z = np.array(model(TOKENS), np.float64)
        z -= z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    ref = logprobs()
    modules = dict(tree_flatten(model.leaf_modules(), is_leaf=lambda m: hasattr(m, "weight")))
    for path in paths:
        original = modules[path]
        swap_module(model, path, PalettizedLinear.from_linear(original, 2, 16, 0, None))
        want = (np.exp(ref) * (ref - logprobs())).sum(axis=-1).mean()
        swap_module(model, path, original)
        assert want > 0 and got[path][2] == pytest.approx(want, rel=1e-4)


def test_importance_a_block_at_a_time_equals_the_whole_model(family_dir, tmp_path):
    """``--sensitivity activation|fisher`` run the family's blocks one at a time (its masks and
    embedding scale come from the model's own pass): the same input statistics and mean squared
    gradients as a whole pass of the resident model."""
    from afm_mlx.calibration.importance import (
        activation_importance,
        fisher_importance,
        fisher_importance_streamed,
    )
    from afm_mlx.models.streaming import block_releaser

    model, config, _ = load_model(family_dir)
    if not family_for(config, "t").replay_blocks:
        pytest.skip("afm7's blocks read caches that earlier blocks fill: whole passes only")
    paths = linear_paths(model)
    batches = [mx.concatenate([TOKENS, TOKENS[:, :1]], axis=1), TOKENS[:, ::-1]]
    act_whole = activation_importance(model, paths, batches)
    fisher_whole = fisher_importance(model, paths, batches)
    lazy = load_model(family_dir, lazy=True)[0]
    release = block_releaser(lazy, family_dir)
    act = activation_importance(lazy, paths, batches, True, release)
    fisher = fisher_importance_streamed(lazy, paths, batches, release, tmp_path)
    for p in paths:
        np.testing.assert_allclose(act.columns[p], act_whole.columns[p], rtol=1e-5)
        top = fisher_whole[p].max().item()
        np.testing.assert_allclose(fisher[p], fisher_whole[p], rtol=1e-4, atol=1e-5 * top)


def test_a_half_precision_model_streamed_block_by_block_gives_its_widened_logits(
    family_dir, tmp_path
):
    """``streamed_logits`` (a recovery teacher's passes): one bfloat16 block read from disk
    and widened at a time, the head in slices, gives the logits of the float32 copy (that the
    peak holds a block, not the model, is tested in test_palettize on a larger model)."""
    from afm_mlx.core.families import model_family
    from afm_mlx.models.streaming import block_releaser, stored_tables, streamed_logits

    model, config, _ = load_model(family_dir)
    if not model_family(model).replay_blocks:
        pytest.skip("its blocks read each other's caches: it runs whole, widened")
    model.set_dtype(mx.bfloat16)
    bf16 = save_model(tmp_path / "bf16", model, config, family_dir)
    model.set_dtype(mx.float32)
    want = np.array(model(TOKENS))
    lazy = load_model(bf16, lazy=True)[0]
    release = block_releaser(lazy, bf16)
    assert release is not None
    mx.eval(TOKENS)
    # The embedding and head read whole, or their rows read from the file as needed.
    assert all(t is not None for t in stored_tables(lazy, bf16))
    for tables in ((None, None), stored_tables(lazy, bf16)):
        before = mx.get_active_memory()
        got = np.array(streamed_logits(lazy, release, TOKENS, tables=tables))
        np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
        # Blocks, embedding and head all went back to disk: the pass left nothing in memory.
        assert mx.get_active_memory() - before < 1024, mx.get_active_memory() - before
    half = np.array(load_model(bf16)[0](TOKENS).astype(mx.float32))
    assert np.abs(half - want).max() > 1e-4  # run in bfloat16 it differs


@pytest.mark.slow  # about 15 s per family
def test_recovery_adapter_trains_loads_back_and_generates(
    family_dir, palettized_dir, tiny_corpus, tmp_path
):
    out = tmp_path / "recovery"
    cfg = RecoverConfig(
        model=str(palettized_dir),
        teacher=str(family_dir),
        data=str(tiny_corpus),
        out=str(out),
        rank=4,
        max_steps=24,
        learning_rate=2e-3,
        batch_size=4,
        seq_len=24,
        warmup_steps=2,
        eval_every=1000,
        eval_batches=2,
        log_every=1,
        progress=False,
    )
    report = recover(cfg)
    saved = json.loads((out / "adapter_config.json").read_text())
    config = json.loads((family_dir / "config.json").read_text())
    assert saved["lora_parameters"]["keys"] == list(family_for(config, "t").projections)
    # Every adapted projection's weights moved from their zero init, every slice of a fused one
    # too (afm7's k and v reach the loss only through its 8-bit fake quantization).
    fused = family_for(config, "t").fused(config)
    for name, b in read_adapter(out).weights.items():
        if not name.endswith("lora_b"):
            continue
        rel = next((r for r in fused if f".{r}." in name), None)
        bounds = np.cumsum([0, *fused[rel]]) if rel else [0, b.shape[1]]
        b = np.abs(np.array(b.astype(mx.float32)))
        assert all(b[:, lo:hi].max() > 0 for lo, hi in zip(bounds, bounds[1:])), name
    # Loaded back onto a fresh base, the adapter moves the compressed model's distribution
    # toward the teacher's (KL on tokens it never trained on), the same way each time.
    teacher, tokenizer = load(family_dir)
    text = sorted(tiny_corpus.rglob("*.txt"))[-1].read_text()[-4000:]
    tokens = mx.array(tokenizer.encode(text)[-256:])[None]
    ref = teacher(tokens).astype(mx.float32)
    ref = ref - mx.logsumexp(ref, axis=-1, keepdims=True)

    def kl(m) -> float:
        logits = m(tokens).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return mx.mean(mx.sum(mx.exp(ref) * (ref - logp), axis=-1)).item()

    model, _, _ = load_model(palettized_dir)
    before = kl(model)
    AdapterCache(model).activate(read_adapter(out))
    after = kl(model)
    assert after < 0.9 * before, (before, after, report)
    model2, _, _ = load_model(palettized_dir)
    AdapterCache(model2).activate(read_adapter(out))
    np.testing.assert_array_equal(np.array(model2(TOKENS)), np.array(model(TOKENS)))
    # A task adapter starts from the recovery adapter (its keys: the family's projections) and
    # trains; fused into a dense copy (--dequantize: exact), it computes the adapted logits.
    task_file = tmp_path / "task.jsonl"
    task_file.write_text(
        "".join(
            json.dumps({"prompt": f"Count {i}:", "completion": f" {i + 1}"}) + "\n"
            for i in range(40)
        )
    )
    task = tmp_path / "task"
    ft = FinetuneConfig(
        model=str(palettized_dir), init_adapter=str(out), data=str(task_file), out=str(task),
        max_steps=6, batch_size=4, seq_len=16, learning_rate=1e-3, warmup_steps=1,
        eval_every=1000, eval_batches=1, log_every=1, progress=False,
    )  # fmt: skip
    finetune(ft)
    saved = json.loads((task / "adapter_config.json").read_text())
    assert saved["lora_parameters"]["keys"] == list(family_for(config, "t").projections)
    fused = tmp_path / "fused"
    proc = run_cli(
        "afm_mlx.fuse", "--model", palettized_dir, "--adapter", task, "--out", fused,
        "--dequantize", "--data", tiny_corpus, "--eval-batches", "2", "--seq-len", "32",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-1500:]
    adapted, _, _ = load_model(palettized_dir)
    AdapterCache(adapted).activate(read_adapter(task))
    np.testing.assert_allclose(
        np.array(load_model(fused)[0](TOKENS)), np.array(adapted(TOKENS)), atol=1e-3, rtol=1e-3
    )

    proc = run_cli(
        "afm_mlx.generate", "--model", palettized_dir, "--adapter", out, "--prompt", "The king",
        "--max-tokens", "8", "--no-verbose",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-1500:]
    # mlx-lm's default is greedy: the CLI prints the argmax continuation of the adapted model.
    ids = tokenizer.encode("The king")
    for _ in range(8):
        ids.append(int(mx.argmax(model(mx.array(ids)[None])[0, -1]).item()))
        if ids[-1] == tokenizer.eos_token_id:
            ids.pop()
            break
    expected = tokenizer.decode(ids[len(tokenizer.encode("The king")) :])
    assert proc.stdout == expected + "\n", (proc.stdout, expected)


def test_afm7_keys_and_values_pass_gradients_to_every_adapted_projection(monkeypatch):
    """mlx-lm's afm7 rounds keys and values to 8 bits (``fake_8bit_quant``), and ``round`` has no
    gradient in MLX: an adapter's k and v slices of ``qkv_proj`` would never train. Built by
    afm_mlx, the function has a straight-through gradient; with mlx-lm's own they get none."""
    import mlx.nn as nn
    from mlx_lm.models import afm7

    from afm_mlx.adapters.lora import LoRASettings, attach_lora, settings_for_model

    config = {**CONFIGS["afm7"], "vocab_size": 512}
    mx.random.seed(3)
    model = build_model(config)
    attach_lora(model, settings_for_model(LoRASettings.from_flags(4, None, None), model), seed=1)
    mx.eval(model.parameters())
    bounds = np.cumsum([0, *family_for(config, "t").fused(config)["self_attn.qkv_proj"]])

    def slice_gradients() -> dict[str, list[float]]:
        def loss(m):
            logits = m(TOKENS[:, :-1]).astype(mx.float32)
            return nn.losses.cross_entropy(logits, TOKENS[:, 1:]).mean()

        _, grads = nn.value_and_grad(model, loss)(model)
        out = {}
        for name, g in tree_flatten(grads):
            if name.endswith("lora_b"):
                g = np.abs(np.array(g))
                cuts = bounds if "qkv_proj" in name else [0, g.shape[1]]
                out[name] = [float(g[:, lo:hi].max()) for lo, hi in zip(cuts, cuts[1:])]
        return out

    got = slice_gradients()
    # 2 regular blocks (qkv, out, gate, up, down) + 2 KV-reuse blocks (q, out, gate, up, down).
    assert len(got) == 20 and all(min(v) > 0 for v in got.values()), got

    def mlx_lms_fake_8bit_quant(x, scale):  # mlx-lm's definition: round, clip, rescale
        q = mx.clip((x.astype(mx.float32) / scale).round(), -128, 127)
        return (q * scale).astype(x.dtype)

    monkeypatch.setattr(afm7, "fake_8bit_quant", mlx_lms_fake_8bit_quant)
    without = slice_gradients()
    qkv = [v for k, v in without.items() if "qkv_proj" in k]
    assert len(qkv) == 2 and all(q > 0 and k == 0 and v == 0 for q, k, v in qkv), qkv


def assert_asset_stores_the_palettized_weights(model, config, asset) -> None:
    """The Core AI asset's index and LUT blobs, read back through coreai, are the MLX model's
    stored bytes: a fused projection's slices (Phi-3, afm7) are its rows and their LUTs' rows."""
    import re

    from test_coreai import _blob, _resources

    config = standard_config(config)
    family = family_for(config, "t")
    llama_name = {own: rel for rel, own in family.aliases.items()}
    regular = len(model.model.layers)
    blobs = _resources(asset)
    fused, checked = family.fused(config), 0
    for path, layer in model.named_modules():
        if not isinstance(layer, PalettizedLinear):
            continue
        kind, j, rel = re.fullmatch(r"model\.(\w+)\.(\d+)\.(\w+\.\w+)", path).groups()
        i = int(j) + (regular if kind == "kv_reuse_layers" else 0)  # the converters' index
        packed, lut, start = np.array(layer.packed), np.array(layer.lut), 0
        assert layer.axis == 0  # groups of rows: a slice's LUTs are rows of the layer's
        parts = family.fused_parts.get(rel, (llama_name.get(rel, rel),))
        for rows, part in zip(fused.get(rel, [packed.shape[0]]), parts):
            stem = f"l{i}_{part.rsplit('.', 1)[-1]}_weight"
            assert _blob(blobs, stem + "_indices") == packed[start : start + rows].tobytes(), stem
            g = layer.group_size
            assert _blob(blobs, stem + "_lut") == lut[start // g : (start + rows) // g].tobytes()
            start, checked = start + rows, checked + 1
        assert start == packed.shape[0]
    # q, k, v, o, gate, up, down per block; afm7's KV-reuse blocks project queries only.
    reuse = config.get("num_kv_reuse_layers", 0)
    assert checked == 7 * (config["num_hidden_layers"] - reuse) + 5 * reuse
    embedding = model.model["embedding" if "embedding" in model.model else "embed_tokens"]
    assert _blob(blobs, "embed_tokens_indices") == np.array(embedding.packed).tobytes()
    assert _blob(blobs, "embed_tokens_lut") == np.array(embedding.lut).tobytes()


def test_converted_package_and_asset_compute_mlxs_logits(family_dir, palettized_dir, tmp_path):
    """Core ML (our reference executor of the saved program) and Core AI (Apple's runtime, float32
    compute, with and without an adapter) run the palettized model to MLX's logits, prefill and
    decode through the state; the asset stores the palettized weights byte for byte."""
    import test_coreai
    import test_coreml
    from test_coreml_adapters import make_adapter
    from test_coreml_executor import open_package

    from converters.coreml import ConvertConfig
    from converters.coreml import convert as convert_coreml

    family = family_for(json.loads((family_dir / "config.json").read_text()), "t")
    model, _, _ = load_model(palettized_dir)
    # With an adapter too: on a fused projection (Phi-3's qkv_proj) it is split with the weight.
    adapter = make_adapter(palettized_dir, tmp_path / "adapter", seed=3)
    package = tmp_path / "m.mlpackage"
    c = test_coreml
    convert_coreml(
        ConvertConfig(model=str(palettized_dir), out=str(package), context=c.CONTEXT,
                      prefill_chunk=c.CHUNK, adapter=[f"task={adapter}"])
    )  # fmt: skip
    prog = open_package(package)[2]
    got = c.coreml_logits(prog, c.PROMPT, c.DECODE)
    c.assert_logits_close(got, c.mlx_logits(model, c.PROMPT, c.DECODE))
    # The adapter adds a B per projection and an A per adapted layer: the slices of a fused one
    # (Phi-3, afm7) share their A x.
    adapted = {k.rsplit(".", 1)[0] for k in read_adapter(adapter).weights}
    slices = sum(len(family.fused_parts.get(path.split(".", 3)[3], (path,))) for path in adapted)
    convs = {
        fn: sum(op.op_type == "conv" for op in prog.functions[fn].operations)
        for fn in ("decode", "decode_task")
    }
    assert convs["decode_task"] == convs["decode"] + len(adapted) + slices, convs
    if sys.version_info < (3, 11):
        return  # coreai-core has wheels for CPython >= 3.11 only
    a = test_coreai
    asset = a.to_aimodel(palettized_dir, tmp_path / "m.aimodel", adapter=[f"task={adapter}"])
    assert_asset_stores_the_palettized_weights(model, load_model(palettized_dir)[1], asset)
    a.assert_fp32_close(a.coreai_logits(asset), c.mlx_logits(model, a.PROMPT, a.DECODE))
    AdapterCache(model).activate(read_adapter(adapter))
    want = c.mlx_logits(model, a.PROMPT, a.DECODE)
    assert (
        np.abs(want - c.mlx_logits(load_model(palettized_dir)[0], a.PROMPT, a.DECODE)).max() > 0.1
    )
    a.assert_fp32_close(a.coreai_logits(asset, adapter="task"), want)


def test_an_unsupported_family_is_one_line(tiny_model_dir, tmp_path):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_moe"}))
    for module, args in (
        ("afm_mlx.palettize", ["--model", moe, "--out", tmp_path / "out", "--bits", "4"]),
        ("afm_mlx.generate", ["--model", moe, "--prompt", "x"]),
        ("converters.coreml", ["--model", moe, "--out", tmp_path / "m.mlpackage"]),
    ):
        line = one_line_error(run_cli(module, *args))
        assert "qwen3_moe" in line and "mixture-of-experts" in line, line
        assert all(t in line for t in supported_types())
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.mlpackage").exists()


def test_a_lut_group_never_straddles_two_slices_of_a_fused_projection(family_dir, tmp_path):
    config = json.loads((family_dir / "config.json").read_text())
    fused = family_for(config, "t").fused(config)
    if not fused:
        pytest.skip("no fused projections in this family")
    # 64 divides every fused matrix's 128 or 256 rows, but not qkv_proj's 32-row k and v slices.
    out = tmp_path / "out"
    proc = run_cli("afm_mlx.palettize", "--model", family_dir, "--out", out, "--group-size", "64")
    line = one_line_error(proc)
    assert "qkv_proj" in line and "[64, 32, 32]" in line and "straddle" in line, line
    assert not out.exists()
