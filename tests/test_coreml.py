"""Core ML converter: package structure, ANE op allow-list, logits vs MLX through the KV-cache state
(reference executor), adapters as extra functions over one base, and bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import one_line_error
from coremltools.converters.mil.mil import types
from mlx.utils import tree_flatten
from test_coreml_executor import new_states, open_package, run_function

from afm_mlx.models.io import load_model
from converters.coreml import ConvertConfig, convert, package_bytes

CONTEXT, CHUNK = 32, 8
PROMPT = [5, 17, 99, 3, 250, 41, 7, 300, 12, 64, 128]  # 11 tokens: one full chunk + a padded one
DECODE = [77, 1, 420, 9]

# The ops this converter may emit: those Apple's ANE reference transformer (ml-ane-transformers)
# and its stateful-LLM Core ML examples run on the Neural Engine (1x1 conv, matmul, softmax,
# elementwise, reductions, layout ops, gather, select, LUT-compressed weights, state read/update).
# The int32 add/concat/greater/equal/maximum/minimum/cast only compute positions, the mask and the
# embedding chunk of each token (a few elements) and may run on CPU.
# There is no public per-op ANE table, so this list is a review gate, not a device measurement.
ANE_OPS = {
    "const",
    "constexpr_lut_to_dense",
    "conv",
    "matmul",
    "add",
    "mul",
    "rsqrt",
    "reduce_sum",
    "softmax",
    "silu",
    "tanh",
    "round",
    "clip",
    "reshape",
    "transpose",
    "expand_dims",
    "slice_by_index",
    "concat",
    "gather",
    "greater",
    "equal",
    "maximum",
    "minimum",
    "select",
    "cast",
    "read_state",
    "slice_update",
    "coreml_update_state",
}


def convert_tiny(model_dir: Path, out: Path, **kw) -> Path:
    convert(
        ConvertConfig(
            model=str(model_dir), out=str(out), context=CONTEXT, prefill_chunk=CHUNK, **kw
        )
    )
    return out


@pytest.fixture(scope="module")
def fp_package(tiny_model_dir, tmp_path_factory) -> Path:
    return convert_tiny(tiny_model_dir, tmp_path_factory.mktemp("coreml") / "tiny.mlpackage")


@pytest.fixture(scope="module")
def fp_program(fp_package):
    return open_package(fp_package)


def mlx_logits(model, prompt: list[int], decode: list[int]) -> np.ndarray:
    """Logits for every prompt position, then one row per decode step, via mlx-lm's KV cache."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    rows = [model(mx.array([prompt]), cache=cache)[0]]
    for t in decode:
        rows.append(model(mx.array([[t]]), cache=cache)[0])
    return np.array(mx.concatenate(rows, axis=0).astype(mx.float32))


def coreml_logits(prog, prompt: list[int], decode: list[int], suffix: str = "") -> np.ndarray:
    """The same through the package's prefill/decode functions, sharing one state."""
    states = new_states(prog, "decode" + suffix)

    def call(fn, ids, position):
        out = run_function(
            prog,
            fn + suffix,
            {"input_ids": np.array([ids], np.int32), "position": np.array([position], np.int32)},
            states,
        )
        chunks = sorted(out, key=lambda k: int(k.rsplit("_", 1)[1]))
        return np.concatenate([out[k] for k in chunks], axis=-1)[0].astype(np.float32)

    rows = []
    for start in range(0, len(prompt), CHUNK):
        ids = prompt[start : start + CHUNK]
        logits = call("prefill", ids + [0] * (CHUNK - len(ids)), start)
        rows.append(logits[: len(ids)])  # padded positions are junk by design (masked later)
    for i, t in enumerate(decode):
        rows.append(call("decode", [t], len(prompt) + i))
    return np.concatenate(rows, axis=0)


def assert_logits_close(got: np.ndarray, want: np.ndarray) -> None:
    """Within fp16 error: max deviation under 2% of the logits' spread, same argmax per row."""
    assert got.shape == want.shape
    err = np.abs(got - want).max()
    print(f"max |coreml - mlx| = {err:.2e}, logits std {want.std():.2e}")
    assert err < 0.02 * want.std(), (err, want.std())
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_package_opens_with_functions_inputs_and_states(fp_program):
    model, spec, prog = fp_program
    desc = spec.description
    assert [f.name for f in desc.functions] == ["decode", "prefill"]
    assert desc.defaultFunctionName == "decode"
    meta = dict(desc.metadata.userDefined)
    assert meta["afm_mlx.context"] == str(CONTEXT) and meta["afm_mlx.prefill_chunk"] == str(CHUNK)
    for f, seq in zip(desc.functions, (1, CHUNK)):
        shapes = {i.name: list(i.type.multiArrayType.shape) for i in f.input}
        assert shapes == {"input_ids": [1, seq], "position": [1]}
        assert [list(o.type.multiArrayType.shape) for o in f.output] == [[1, seq, 512]]
        states = {s.name: list(s.type.stateType.arrayType.shape) for s in f.state}
        assert states == {f"{t}_cache_{i}": [2, CONTEXT, 16] for i in range(2) for t in "kv"}


def test_only_ane_ops_static_fp16_rank_at_most_4(fp_program):
    _, _, prog = fp_program
    for name, func in prog.functions.items():
        ops = {op.op_type for op in func.operations}
        assert ops <= ANE_OPS, f"{name}: ops outside the ANE allow-list: {ops - ANE_OPS}"
        for op in func.operations:
            for v in op.outputs:
                assert all(isinstance(d, int) for d in v.shape), (op.name, v.shape)  # static
                assert len(v.shape) <= 4, (op.name, v.shape)
                if op.op_type != "const":  # consts also hold uint4 indices, strings, ...
                    dtype = types.builtin_to_string(v.dtype)
                    assert dtype in ("fp16", "int32", "bool"), (op.name, dtype)


def test_fp_logits_match_mlx_through_prefill_and_decode(tiny_model_dir, fp_program):
    model, _, _ = load_model(tiny_model_dir)
    want = mlx_logits(model, PROMPT, DECODE)
    got = coreml_logits(fp_program[2], PROMPT, DECODE)
    assert_logits_close(got, want)


def test_decode_uses_the_cache(tiny_model_dir, fp_program):
    """Decoding from a cache with a different history changes the logits: the state matters."""
    _, _, prog = fp_program
    a = coreml_logits(prog, PROMPT, DECODE[:1])[-1]
    b = coreml_logits(prog, [p + 1 for p in PROMPT], DECODE[:1])[-1]
    assert np.abs(a - b).max() > 0.05 * np.abs(a).max()


def test_fp_package_stores_weights_once(tiny_model_dir, fp_package):
    model, _, _ = load_model(tiny_model_dir)
    params = sum(p.size for _, p in tree_flatten(model.parameters()))
    weights = fp_package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    # fp16 weights + RoPE tables (2 x context x head_dim fp16): both functions share one copy.
    expected = params * 2 + 2 * CONTEXT * 16 * 2
    assert abs(weights.stat().st_size - expected) / expected < 0.02
    # The rest is the program text (~55 KB per function here), independent of the weights' size.
    assert package_bytes(fp_package) - weights.stat().st_size < 100_000 * 2


def test_lm_head_split_into_chunks(tiny_model_dir, tmp_path):
    out = convert_tiny(tiny_model_dir, tmp_path / "chunked.mlpackage", head_chunk=200)
    model, spec, prog = open_package(out)
    decode = next(f for f in spec.description.functions if f.name == "decode")
    assert [list(o.type.multiArrayType.shape) for o in decode.output] == [
        [1, 1, 200],
        [1, 1, 200],
        [1, 1, 112],
    ]
    # The tied table is stored as three row chunks, each feeding the embedding lookup and its
    # head chunk: no op holds all 512 rows (for AFM-3B that would be a 302 MB fp16 table).
    for op in prog.functions["decode"].operations:
        for v in op.outputs:
            assert 512 not in v.shape, (op.name, v.shape)
    tables = {
        op.name: op.outputs[0].shape
        for op in prog.functions["decode"].operations
        if re.fullmatch(r"embed_tokens_\d", op.name)
    }
    assert tables == {f"embed_tokens_{j}": (n, 64, 1, 1) for j, n in enumerate((200, 200, 112))}
    model_mlx, _, _ = load_model(tiny_model_dir)
    assert_logits_close(
        coreml_logits(prog, PROMPT, DECODE[:2]), mlx_logits(model_mlx, PROMPT, DECODE[:2])
    )


# --- bad input: one line on stderr, exit 2, nothing left behind ------------------------------------


def _nothing_left(folder: Path) -> None:
    assert list(folder.iterdir()) == [], list(folder.iterdir())


def test_failure_while_writing_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    import coremltools as ct

    def broken(model, path):
        Path(path).mkdir()  # a partial package...
        (Path(path) / "Manifest.json").write_text("{")
        raise OSError("disk full")  # ...then the write fails

    monkeypatch.setattr(ct.models.MLModel, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_tiny(tiny_model_dir, tmp_path / "m.mlpackage")
    _nothing_left(tmp_path)


def test_llama_with_biases_and_untied_head(tmp_path):
    """The other family layout: no QK-norm, attention biases, a separate lm_head."""
    from afm_mlx.models.files import save_model
    from afm_mlx.models.presets import build_model, init_weights, preset_config

    config = preset_config(
        "tiny", model_type="llama", attention_bias=True, tie_word_embeddings=False
    )
    model = build_model(config)
    init_weights(model, config, seed=2)
    key = mx.random.key(5)
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            proj = getattr(layer.self_attn, name)
            key, sub = mx.random.split(key)
            proj.bias = 0.1 * mx.random.normal(proj.bias.shape, key=sub)
    model_dir = save_model(tmp_path / "llama", model, config)
    _, _, prog = open_package(convert_tiny(model_dir, tmp_path / "llama.mlpackage"))
    ops = {op.op_type for op in prog.functions["decode"].operations}
    assert ops <= ANE_OPS
    model, _, _ = load_model(model_dir)
    assert_logits_close(coreml_logits(prog, PROMPT, DECODE), mlx_logits(model, PROMPT, DECODE))


@pytest.mark.skipif(sys.platform == "darwin", reason="the gate under test is for non-Macs")
def test_coreml_check_is_gated_off_mac(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "coreml_check.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--package", str(tmp_path / "m.mlpackage"), "--model", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "needs macOS 15" in one_line_error(proc) and "nothing was run" in proc.stderr
