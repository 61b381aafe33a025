"""The palettize stage: CLI, mixed bits to a budget, saved files, reload, bad input."""

from __future__ import annotations

import itertools
import json
import struct

import mlx.core as mx
import numpy as np
import pytest
from conftest import one_line_error, run_cli
from mlx.utils import tree_flatten

from afm_mlx.calibration.allocation import allocate_bits, layer_storage_bits
from afm_mlx.core.errors import UserError
from afm_mlx.models.io import load, load_model
from afm_mlx.palettization.layers import PalettizedEmbedding, PalettizedLinear, bits_per_weight
from afm_mlx.palettize import PalettizeConfig, palettize

TOKENS = mx.array([[5, 17, 300, 42, 9, 77, 123, 4, 250, 8]])


@pytest.fixture(scope="module")
def lut4_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lut4") / "model"
    proc = run_cli("afm_mlx.palettize", "--model", tiny_model_dir, "--out", out, "--bits", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bpw" in proc.stdout and "model.layers.1.mlp.down_proj" in proc.stdout
    # Progress per layer (14 projections + the embedding), not one step for the whole model.
    assert "15/15" in proc.stderr and "layer" in proc.stderr, proc.stderr[-500:]
    return out


def test_palettized_checkpoint_reloads_and_matches_its_dequantized_weights(
    lut4_dir, tiny_model_dir
):
    model, config, _ = load_model(lut4_dir)
    layers = config["palettization"]["layers"]
    assert layers["model.layers.0.self_attn.q_proj"] == {"bits": 4, "group_size": 16, "axis": 0}
    assert layers["model.embed_tokens"]["bits"] == 8
    assert isinstance(model.model.layers[1].mlp.up_proj, PalettizedLinear)
    assert isinstance(model.model.embed_tokens, PalettizedEmbedding)
    # The same architecture in float, given the dequantized weights, computes the same logits.
    dense, _, _ = load_model(tiny_model_dir)
    replacement = []
    for name, module in tree_flatten(model.leaf_modules(), is_leaf=lambda m: hasattr(m, "lut")):
        if hasattr(module, "dequantize"):
            replacement.append((f"{name}.weight", module.dequantize(mx.float32)))
    dense.load_weights(replacement, strict=False)
    np.testing.assert_allclose(np.array(model(TOKENS)), np.array(dense(TOKENS)), atol=1e-5)
    # ... and differs from the float original by a small, nonzero amount.
    fp, _, _ = load_model(tiny_model_dir)
    diff = np.abs(np.array(model(TOKENS)) - np.array(fp(TOKENS))).max()
    assert 0 < diff < 0.5


def test_size_on_disk_is_the_counted_bits(lut4_dir):
    model, _, _ = load_model(lut4_dir)
    counted = bits_per_weight(model)
    path = lut4_dir / "model.safetensors"
    raw = path.read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    data_bytes = len(raw) - 8 - header
    assert data_bytes == pytest.approx(counted["model"] * counted["model_weights"] / 8, rel=1e-9)


def test_palettized_model_generates(lut4_dir):
    from mlx_lm import generate

    model, tokenizer = load(lut4_dir)
    text = generate(model, tokenizer, "ROMEO.", max_tokens=8)
    assert len(tokenizer.encode(text)) >= 4


def test_target_bpw_is_met_with_mixed_bits(tiny_model_dir, tmp_path):
    cfg = PalettizeConfig(
        model=str(tiny_model_dir),
        out=str(tmp_path / "mix"),
        target_bpw=3.2,
        bit_choices=[2, 4],
        calibration_batches=1,
        calibration_seq_len=32,
    )
    summary = palettize(cfg)
    assert 3.0 <= summary["projection_bpw"] <= 3.2
    assert {row["bits"] for row in summary["layers"]} == {2, 4}
    model, config, _ = load_model(tmp_path / "mix")
    recorded = config["palettization"]["layers"]
    assert {recorded[r["layer"]]["bits"] for r in summary["layers"]} == {2, 4}
    two_bit = [r["rel_mse"] for r in summary["layers"] if r["bits"] == 2]
    four_bit = [r["rel_mse"] for r in summary["layers"] if r["bits"] == 4]
    assert min(two_bit) > max(four_bit)  # error follows the assigned bits


@pytest.mark.slow  # about 10-15 s
def test_a_bfloat16_model_is_calibrated_in_float32_and_saved_as_stored(
    tiny_model_dir, tmp_path, monkeypatch
):
    """On the CPU the calibration passes run in float32 (MLX has no fast bfloat16 matmul there),
    one block at a time: the model stays bfloat16 between its blocks' turns. Widening is exact,
    so each layer's LUTs are those of its stored bfloat16 weight, and what stays unpalettized is
    saved in bfloat16 as it was stored."""
    import mlx.nn as nn

    import afm_mlx.models.streaming
    import afm_mlx.palettize as stage
    from afm_mlx.calibration import replay, sensitivity
    from afm_mlx.models.files import save_model
    from afm_mlx.palettization.kmeans import kmeans_lut

    model, config, _ = load_model(tiny_model_dir)
    model.set_dtype(mx.bfloat16)
    bf16 = save_model(tmp_path / "bf16", model, config, tiny_model_dir)
    projections, whole, slices = set(), set(), []
    measure, linear, head = stage.measure_sensitivity, nn.Linear.__call__, replay.head_slices

    def recording(model, *args, **kwargs):
        whole.update(v.dtype for _, v in tree_flatten(model.parameters()))
        return measure(model, *args, **kwargs)

    def projection(self, x):
        projections.add(self.weight.dtype)
        return linear(self, x)

    def head_slices(model):
        for logits in head(model):

            def recorded(h, logits=logits):
                out = logits(h)
                slices.append((out.shape[-1], out.dtype))
                return out

            yield recorded

    monkeypatch.setattr(stage, "measure_sensitivity", recording)
    monkeypatch.setattr(nn.Linear, "__call__", projection)
    for module in (replay, sensitivity):  # the reference's slices, then the candidates'
        monkeypatch.setattr(module, "head_slices", head_slices)
    monkeypatch.setattr(
        afm_mlx.models.streaming, "HEAD_ROWS", 100
    )  # several slices of the 512-row tied head
    cfg = PalettizeConfig(
        model=str(bf16), out=str(tmp_path / "mix"), target_bpw=3.2, bit_choices=[2, 4],
        calibration_batches=1, calibration_seq_len=32,
    )  # fmt: skip
    palettize(cfg)
    assert whole == {mx.bfloat16}  # no float32 copy of the whole model
    assert projections == {mx.float32}  # every projection ran widened
    assert slices[:6] == [(100, mx.float32)] * 5 + [(12, mx.float32)]  # the head, in slices
    # The KL computed slice by slice from the bf16 model's hidden states is the KL of the
    # widened model's full distributions, computed in float64: for a small change (where
    # subtracting two log-sum-exps would lose digits) and, with the head scaled up, for a
    # change so large that exp(d) overflows float32.
    h = mx.random.normal((2, 3, config["hidden_size"]), key=mx.random.key(0))
    h2 = h + 0.3 * mx.random.normal(h.shape, key=mx.random.key(1))
    for factor, low, high in ((1, 1e-4, 1e-2), (3000, 10, 1e4)):
        model = load_model(bf16)[0]
        model.model.embed_tokens.weight = model.model.embed_tokens.weight * factor
        model32 = load_model(bf16)[0]
        model32.set_dtype(mx.float32)
        model32.model.embed_tokens.weight = model.model.embed_tokens.weight.astype(mx.float32)
        p, q = (
            np.array(model32.model.embed_tokens.as_linear(model32.model.norm(x)), np.float64)
            for x in (h, h2)
        )
        p, q = (z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
                - z.max(-1, keepdims=True) for z in (p, q))  # fmt: skip
        want = (np.exp(p) * (p - q)).sum(axis=-1).mean()
        got = sensitivity._kl_from_hidden(model, h2, replay.reference_stats(model, h))
        assert low < want < high and got == pytest.approx(want, rel=1e-5), factor
    saved = mx.load(str(tmp_path / "mix" / "model.safetensors"))
    norms = [k for k in saved if k.endswith("norm.weight")]
    assert norms and all(saved[k].dtype == mx.bfloat16 for k in norms)
    stored = mx.load(str(bf16 / "model.safetensors"))
    recorded = json.loads((tmp_path / "mix" / "config.json").read_text())["palettization"]
    path = "model.layers.1.mlp.down_proj"
    settings = recorded["layers"][path]
    lut, _ = kmeans_lut(stored[f"{path}.weight"], settings["bits"], settings["group_size"])
    assert mx.array_equal(saved[f"{path}.lut"], lut).item()


def test_allocation_matches_brute_force():
    rng = np.random.default_rng(0)
    shapes = {f"l{i}": (64, 64 * (1 + i % 3)) for i in range(6)}
    damage = {
        p: {
            2: float(rng.uniform(1, 5)),
            3: float(rng.uniform(0.3, 1)),
            4: float(rng.uniform(0, 0.3)),
        }
        for p in shapes
    }
    for target in (2.5, 3.0, 3.4, 3.9):
        ours = allocate_bits(shapes, damage, target, 16, 0)
        budget = target * sum(r * c for r, c in shapes.values())

        def cost(choice):
            return sum(layer_storage_bits(shapes[p], b, 16, 0) for p, b in choice.items())

        assert cost(ours) <= budget
        best = min(
            (
                dict(zip(shapes, combo))
                for combo in itertools.product([2, 3, 4], repeat=len(shapes))
                if cost(dict(zip(shapes, combo))) <= budget
            ),
            key=lambda c: sum(damage[p][b] for p, b in c.items()),
        )
        ours_damage = sum(damage[p][b] for p, b in ours.items())
        best_damage = sum(damage[p][b] for p, b in best.items())
        assert ours_damage <= best_damage * 1.001 + 1e-9, (target, ours, best)


@pytest.mark.parametrize("sensitivity", ["activation", "fisher"])
def test_sensitivity_weighting_runs_and_is_recorded(tiny_model_dir, tmp_path, sensitivity):
    cfg = PalettizeConfig(
        model=str(tiny_model_dir),
        out=str(tmp_path / sensitivity),
        bits=3,
        sensitivity=sensitivity,
        calibration_batches=1,
        calibration_seq_len=32,
    )
    palettize(cfg)
    config = json.loads((tmp_path / sensitivity / "config.json").read_text())
    assert config["palettization"]["sensitivity"] == sensitivity
    assert [p.name for p in tmp_path.iterdir()] == [sensitivity]  # no scratch files left


def test_budget_below_two_bits_and_below_reach(tiny_model_dir, tmp_path):
    line = one_line_error(
        run_cli(
            "afm_mlx.palettize",
            "--model",
            tiny_model_dir,
            "--out",
            tmp_path / "x",
            "--target-bpw",
            "1.5",
        )
    )
    assert "--target-bpw 1.5: must be between 2 and 8" in line
    with pytest.raises(UserError, match="below the smallest achievable"):
        allocate_bits({"a": (16, 16)}, {"a": {2: 1.0, 4: 0.1}}, 2.0, 16, 0)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--group-size", "7"], "group"),
        (["--bits", "5"], "--bits 5 is not valid"),
        (["--bit-choices", "2", "5"], "--bit-choices [5]"),
        (["--model", "{tmp}/absent"], "no such model folder"),
    ],
)
def test_bad_input(tiny_model_dir, tmp_path, args, match):
    args = [a.format(tmp=tmp_path) for a in args]
    base = ["--out", str(tmp_path / "out")]
    if "--model" not in args:
        base += ["--model", str(tiny_model_dir)]
    line = one_line_error(run_cli("afm_mlx.palettize", *base, *args))
    assert match.format(tmp=tmp_path) in line
    assert not (tmp_path / "out").exists()


def test_already_palettized_model_has_no_linear_layers(lut4_dir, tmp_path):
    line = one_line_error(
        run_cli("afm_mlx.palettize", "--model", lut4_dir, "--out", tmp_path / "o")
    )
    assert "no float linear layers to palettize (it is already palettized)" in line


def test_existing_output_is_not_overwritten(tiny_model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    line = one_line_error(
        run_cli("afm_mlx.palettize", "--model", tiny_model_dir, "--out", tmp_path / "out")
    )
    assert "not an empty folder" in line and (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.slow  # about 10-15 s
def test_fixed_bits_read_and_free_one_layer_at_a_time(tiny_tokenizer, tmp_path, monkeypatch):
    """Without calibration nothing needs the whole dense model: it stays on disk, and each layer
    is read, palettized and freed in turn. MLX's peak is measured against the same run with the
    whole model loaded first (what palettize did before): it must save most of the dense size
    (the rest of the peak is k-means' working set, bounded per slice of groups)."""
    import afm_mlx.palettize as stage
    from afm_mlx.models.files import save_model
    from afm_mlx.models.presets import build_model, preset_config

    config = preset_config(
        "tiny", hidden_size=256, intermediate_size=1024, num_hidden_layers=8, head_dim=32
    )
    model = build_model(config)
    mx.eval(model.parameters())
    dense = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    folder = save_model(tmp_path / "fp", model, config, tiny_tokenizer)
    del model

    def peak_of(out: str) -> tuple[int, dict]:
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        summary = palettize(PalettizeConfig(model=str(folder), out=str(tmp_path / out), bits=4))
        return mx.get_peak_memory() - base, summary

    lazy, summary = peak_of("lazy")
    eager_load = stage.load_model
    monkeypatch.setattr(stage, "load_model", lambda path, lazy=False: eager_load(path))
    eager, _ = peak_of("eager")
    print(
        f"MLX peak: layer by layer {lazy / 1e6:.1f} MB, whole model first {eager / 1e6:.1f} MB, dense {dense / 1e6:.1f} MB"
    )
    assert dense > 20e6 and eager - lazy > 0.7 * dense, (lazy, eager, dense)
    assert (tmp_path / "lazy/model.safetensors").read_bytes() == (
        tmp_path / "eager/model.safetensors"
    ).read_bytes()
    # The error table is still there, computed layer by layer: each layer's own error.
    lut, _, _ = load_model(tmp_path / "lazy")
    fp, _, _ = load_model(folder)
    fp_modules = dict(tree_flatten(fp.leaf_modules(), is_leaf=lambda m: hasattr(m, "weight")))
    lut_modules = dict(tree_flatten(lut.leaf_modules(), is_leaf=lambda m: hasattr(m, "lut")))
    for row in summary["layers"][:3]:
        w = fp_modules[row["layer"]].weight
        q = lut_modules[row["layer"]].dequantize(mx.float32)
        want = (mx.sum((w - q) ** 2) / mx.sum(w * w)).item()
        assert row["rel_mse"] == pytest.approx(want, rel=1e-5)


def test_the_embedding_is_read_a_slice_of_rows_at_a_time(tiny_tokenizer, tmp_path, monkeypatch):
    """k-means reads the embedding's rows from the checkpoint a slice at a time
    (``models.streaming.StoredTable``) instead of the whole bfloat16 table: the same checkpoint, byte for
    byte, for most of the table's size less MLX memory. (k-means' slices are made small here,
    as a real vocabulary's are against its 2^22-position budget: Gemma-3-1B's table is 80
    slices.)"""
    import afm_mlx.palettization.kmeans as kmeans
    import afm_mlx.palettize as stage
    from afm_mlx.models.files import save_model
    from afm_mlx.models.presets import build_model, init_weights, preset_config

    monkeypatch.setattr(kmeans, "_MAX_POSITIONS_PER_CHUNK", 1 << 16)  # 1024 rows of 64

    vocab, hidden = 32768, 64
    config = preset_config(
        "tiny", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, intermediate_size=256
    )
    model = build_model(config)
    init_weights(model, config, seed=2)
    model.set_dtype(mx.bfloat16)
    folder = save_model(tmp_path / "bf16", model, config, tiny_tokenizer)
    del model
    table_bytes = vocab * hidden * 2

    def peak_of(out: str) -> int:
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        palettize(PalettizeConfig(model=str(folder), out=str(tmp_path / out), bits=4))
        return mx.get_peak_memory() - base

    sliced = peak_of("sliced")
    monkeypatch.setattr(stage, "stored_tables", lambda model, path: (None, None))
    whole = peak_of("whole")
    assert whole - sliced > 0.6 * table_bytes, (sliced, whole, table_bytes)
    assert (tmp_path / "sliced/model.safetensors").read_bytes() == (
        tmp_path / "whole/model.safetensors"
    ).read_bytes()


def _six_blocks(tokenizer, tmp_path, dtype=None):
    """(folder, bytes of its blocks) of a saved 6-block random model, in ``dtype`` if given."""
    from afm_mlx.models.files import save_model
    from afm_mlx.models.presets import build_model, init_weights, preset_config

    config = preset_config("tiny", hidden_size=256, intermediate_size=1024, num_hidden_layers=6)
    model = build_model(config)
    init_weights(model, config, seed=3)
    if dtype is not None:
        model.set_dtype(dtype)
    folder = save_model(tmp_path / "m", model, config, tokenizer)
    return folder, sum(v.nbytes for _, v in tree_flatten(model.model.parameters()["layers"]))


def test_sensitivity_replays_hold_one_block_at_a_time(tiny_tokenizer, tmp_path):
    """With ``block_releaser`` the replays give each block back to disk after its turn: the
    peak holds a couple of blocks, not the model; and the blocks read back are the model's own
    (the damage is the same as with the model resident)."""
    from afm_mlx.calibration.replay import linear_paths
    from afm_mlx.calibration.sensitivity import measure_sensitivity
    from afm_mlx.models.streaming import block_releaser

    folder, block_bytes = _six_blocks(tiny_tokenizer, tmp_path)
    batches = [mx.concatenate([TOKENS, TOKENS[:, :1]], axis=1)]
    damage, peaks = [], []
    for streamed in (True, False):
        model = load_model(folder, lazy=True)[0]
        release = block_releaser(model, folder) if streamed else None
        assert streamed is (release is not None)
        paths = linear_paths(model)
        mx.reset_peak_memory()
        damage.append(
            measure_sensitivity(model, paths[:2], [2], batches, group_size=16, release=release)
        )
        peaks.append(mx.get_peak_memory())
        del model, release
    assert damage[0] == damage[1] and min(damage[0][p][2] for p in damage[0]) > 0
    assert peaks[0] < 0.45 * block_bytes < 0.45 * peaks[1], (peaks, block_bytes)


def test_activation_statistics_hold_one_block_at_a_time(tiny_tokenizer, tmp_path):
    """``--sensitivity activation`` collects each projection's input statistics with the blocks
    run one at a time and given back to disk (never the model widened whole): the same E[x^2]
    per input channel as a whole pass of the resident model, at a fraction of its peak; a
    lookup broadcasts the channel vector down the rows."""
    from afm_mlx.calibration.importance import activation_importance
    from afm_mlx.calibration.replay import linear_paths
    from afm_mlx.models.streaming import block_releaser

    folder, block_bytes = _six_blocks(tiny_tokenizer, tmp_path)
    batches = [mx.concatenate([TOKENS, TOKENS[:, :1]], axis=1), TOKENS[:, ::-1]]
    got, peaks = [], []
    for streamed in (True, False):
        model = load_model(folder, lazy=True)[0]
        release = block_releaser(model, folder) if streamed else None
        paths = linear_paths(model)
        mx.reset_peak_memory()
        imp = activation_importance(model, paths, batches, streamed, release)
        peaks.append(mx.get_peak_memory())
        got.append(imp)
        del model, release
    ours, whole = got
    assert sorted(ours) == sorted(whole) == sorted(paths) and len(paths) == 6 * 7
    for p in paths:
        np.testing.assert_allclose(ours.columns[p], whole.columns[p], rtol=1e-5)
        assert ours[p].shape == whole[p].shape == ours.shapes[p]
        np.testing.assert_array_equal(ours[p], mx.broadcast_to(ours.columns[p], ours.shapes[p]))
    # The inputs of q/k/v are one normed hidden state: one vector; o_proj's is another.
    q, k = (ours.columns[f"model.layers.2.self_attn.{n}_proj"] for n in "qk")
    assert mx.array_equal(q, k) and not mx.array_equal(
        q, ours.columns["model.layers.2.self_attn.o_proj"]
    )
    assert peaks[0] < 0.45 * block_bytes < 0.45 * peaks[1], (peaks, block_bytes)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fisher_a_block_at_a_time_equals_the_whole_gradient(tiny_tokenizer, tmp_path, dtype):
    """``--sensitivity fisher`` differentiates one block at a time (widened, then given back to
    disk) and keeps the importance on disk: the same mean squared gradients as
    ``nn.value_and_grad`` over the whole float32 model, at a fraction of its peak memory, and
    a lookup reads one layer's array from disk."""
    from afm_mlx.calibration.importance import fisher_importance, fisher_importance_streamed
    from afm_mlx.calibration.replay import linear_paths
    from afm_mlx.models.precision import widen_for_cpu
    from afm_mlx.models.streaming import block_releaser

    folder, block_bytes = _six_blocks(tiny_tokenizer, tmp_path, getattr(mx, dtype))
    batches = [mx.concatenate([TOKENS, TOKENS[:, :1]], axis=1), TOKENS[:, ::-1]]
    peaks = []
    model = load_model(folder, lazy=True)[0]
    paths = linear_paths(model)
    (tmp_path / "scratch").mkdir()
    mx.reset_peak_memory()
    ours = fisher_importance_streamed(
        model, paths, batches, block_releaser(model, folder), tmp_path / "scratch"
    )
    peaks.append(mx.get_peak_memory())
    del model
    model = load_model(folder)[0]
    widen_for_cpu(model)
    mx.reset_peak_memory()
    whole = fisher_importance(model, paths, batches)
    peaks.append(mx.get_peak_memory())
    assert sorted(ours) == sorted(whole) == sorted(paths) and len(paths) == 6 * 7
    before = mx.get_active_memory()
    for p in paths:
        got = ours[p]
        np.testing.assert_allclose(got, whole[p], rtol=1e-4, atol=1e-5 * whole[p].max().item())
        assert got.dtype == mx.float32 and got.shape == whole[p].shape
    del got
    assert mx.get_active_memory() - before < 1024  # nothing kept from the lookups
    assert len(list((tmp_path / "scratch").iterdir())) == 6  # one file per block
    assert peaks[0] < 0.5 * peaks[1], (peaks, block_bytes)


def test_a_palettized_model_streams_block_by_block_as_it_runs_whole(lut4_dir):
    """A palettized teacher (its LUTs are float16: it counts as half precision) streams too:
    its blocks read back from disk, its 8-bit embedding as the head in one piece."""
    from afm_mlx.models.streaming import block_releaser, streamed_logits

    lazy = load_model(lut4_dir, lazy=True)[0]
    release = block_releaser(lazy, lut4_dir)
    assert release is not None
    want = np.array(load_model(lut4_dir)[0](TOKENS))
    got = np.array(streamed_logits(lazy, release, TOKENS))
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
