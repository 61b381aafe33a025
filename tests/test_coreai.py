"""Core AI export, executed by Apple's own runtime (coreai-core's CPU interpreter on Linux).

Every asset here is run: a prompt is prefilled, then decode steps continue through the shared KV
state, and the logits are compared with MLX (float32 compute: within rtol 1e-4; float16 compute:
within fp16 error), greedy continuations with ``python -m afm_mlx.generate --temp 0``, and the
same prompts with the Core ML package run by the reference executor. Weights are read back from
the saved asset and compared with the MLX model's stored bytes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import REPO, mixed_bits, one_line_error, palettized_copy, run_cli
from mlx.utils import tree_flatten
from test_coreml import assert_logits_close, coreml_logits, mlx_logits
from test_coreml_adapters import make_adapter
from test_coreml_executor import open_package

from afm_mlx.adapters.lora import AdapterCache, load_adapter
from afm_mlx.core.errors import UserError
from afm_mlx.models.files import save_model
from afm_mlx.models.io import load_model
from afm_mlx.models.presets import build_model, init_weights, preset_config
from afm_mlx.palettization.layers import AFM_EMBEDDING_SETTINGS
from converters.coreai import CoreAIConfig, convert
from converters.coreai_run import CoreAISession, require_coreai
from converters.coreml import ConvertConfig
from converters.coreml import convert as convert_coreml
from converters.export import package_bytes

CONTEXT, CHUNK = 64, 8  # room for a prompt and a 32-token continuation
PROMPT = [5, 17, 99, 3, 250, 41, 7, 300, 12, 64, 128]  # one full prefill chunk + a padded one
DECODE = [77, 1, 420, 9, 33, 2, 480, 15]  # 8 decode steps through the state
TEXT_PROMPT = "ROMEO.\nWhat"

# coreai-core has wheels for CPython >= 3.11 only (the CLI says so in one line, tested below).
pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="coreai-core needs Python 3.11+")


def lut4(path: str, module: nn.Module):
    """AFM's recipe: every projection 4-bit (16 rows per LUT), the embedding 8-bit per row."""
    return dict(AFM_EMBEDDING_SETTINGS) if isinstance(module, nn.Embedding) else True


@pytest.fixture(scope="module")
def models(tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """fp, LUT 4-bit (8-bit embedding) and mixed bits (1/2/3/4/6/8, both group axes) of a tiny
    random model initialized wide (std 0.3) so that its greedy text varies token to token (at
    std 0.02 it repeats one token, and a 32-token comparison would test one decision)."""
    root = tmp_path_factory.mktemp("coreai_models")
    config = preset_config("tiny", initializer_range=0.3)
    model = build_model(config)
    init_weights(model, config, seed=1)
    fp = save_model(root / "fp", model, config, tiny_tokenizer)
    return {
        "fp": fp,
        "lut4": palettized_copy(fp, root / "lut4", lut4, tiny_tokenizer),
        "mixed": palettized_copy(fp, root / "mixed", mixed_bits, tiny_tokenizer),
    }


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory) -> dict[str, Path]:
    """Two adapters trained (here: randomized) on the LUT-4 base."""
    root = tmp_path_factory.mktemp("coreai_adapters")
    return {
        n: make_adapter(models["lut4"], root / n, seed) for seed, n in enumerate(["chat", "code"])
    }


def to_aimodel(model_dir: Path, out: Path, **kw) -> Path:
    kw = {"context": CONTEXT, "prefill_chunk": CHUNK, "compute_dtype": "float32", **kw}
    convert(CoreAIConfig(model=str(model_dir), out=str(out), **kw))
    return out


@pytest.fixture(scope="module")
def assets(models, adapters, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coreai_assets")
    out = {k: to_aimodel(v, root / f"{k}.aimodel") for k, v in models.items()}
    # The adapters through the CLI, with a repeated --adapter flag.
    both = root / "adapters.aimodel"
    proc = run_cli(
        "converters.coreai",
        *("--model", models["lut4"], "--out", both, "--compute-dtype", "float32"),
        *("--context", CONTEXT, "--prefill-chunk", CHUNK),
        *("--adapter", f"chat={adapters['chat']}", "--adapter", f"code={adapters['code']}"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decode_chat" in proc.stdout and "prefill_code" in proc.stdout
    out["adapters"] = both
    return out


def coreai_logits(asset: Path, prompt=PROMPT, decode=DECODE, adapter: str | None = None):
    """Logits of every prompt token (prefill, last chunk padded), then one row per decode step,
    all through one state."""
    with CoreAISession(asset) as s:
        state = s.new_state()
        rows = [s.prefill(prompt, state, adapter)]
        for i, t in enumerate(decode):
            rows.append(s.decode(t, len(prompt) + i, state, adapter)[None])
    return np.concatenate(rows, axis=0)


def assert_fp32_close(got: np.ndarray, want: np.ndarray) -> None:
    """float32 compute: equal to MLX within rtol 1e-4 (atol 1e-4 of the largest logit, for
    logits near zero), same argmax everywhere."""
    assert got.shape == want.shape
    print(
        f"max |coreai - mlx| = {np.abs(got - want).max():.2e}, max |logit| {np.abs(want).max():.2f}"
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


# --- the asset ---------------------------------------------------------------------------------


def test_asset_interface_and_metadata(assets):
    with CoreAISession(assets["adapters"]) as s:
        assert s.functions == [
            "decode",
            "prefill",
            "decode_chat",
            "prefill_chat",
            "decode_code",
            "prefill_code",
        ]
        assert (s.context, s.prefill_chunk, s.logit_chunks) == (CONTEXT, CHUNK, [512])
        assert s.compute_dtype == "float32"
        for name, seq in (("decode", 1), ("prefill", CHUNK), ("decode_code", 1)):
            desc = s.function(name).desc
            assert list(desc.input_names) == ["input_ids", "position"]
            assert list(desc.output_names) == ["logits_0"]
            assert sorted(desc.state_names) == sorted(
                f"{t}_cache_{i}" for i in range(2) for t in "kv"
            )
            assert list(desc.input_descriptor("input_ids").shape) == [1, seq]
            assert list(desc.state_descriptor("k_cache_0").shape) == [2, CONTEXT, 16]
            assert list(desc.output_descriptor("logits_0").shape) == [1, seq, 512]


def _resources(asset: Path) -> dict[str, bytes]:
    """The asset's weight blobs by name, read back from its bytecode by coreai itself."""
    from coreai.authoring import AIModelAsset

    text = str(AIModelAsset.load(asset).program)
    section = text[text.index("dialect_resources") :]
    # Each blob prints as "0x" + its alignment (4 bytes, little-endian) + the data, in hex.
    return {
        name: bytes.fromhex(hexdata[8:])
        for name, hexdata in re.findall(r"(\w+): \"0x([0-9A-F]+)\"", section)
    }


def _blob(resources: dict[str, bytes], stem: str) -> bytes:
    (name,) = [n for n in resources if re.fullmatch(rf"{stem}_\d+", n)]
    return resources[name]


def test_palettized_weights_bit_exact(models, assets):
    """Every LUT and index tensor in the asset equals the MLX model's stored bytes: 1/2/3/4/6/8
    bits, groups of rows and of columns, the 8-bit embedding (stored once, also the tied head)."""
    model, _, _ = load_model(models["mixed"])
    blobs = _resources(assets["mixed"])
    seen = set()
    for path, layer in model.named_modules():
        if "lut" not in layer or not callable(getattr(layer, "indices", None)):
            continue
        stem = "embed_tokens" if path == "model.embed_tokens" else None
        if stem is None:
            i, rel = re.fullmatch(r"model\.layers\.(\d+)\.\w+\.(\w+)", path).groups()
            stem = f"l{i}_{rel}_weight"
        assert _blob(blobs, stem + "_indices") == np.array(layer.packed).tobytes(), path
        assert _blob(blobs, stem + "_lut") == np.array(layer.lut).tobytes(), path
        seen.add((layer.bits, layer.axis))
    assert {b for b, _ in seen} == {1, 2, 3, 4, 6, 8} and {a for _, a in seen} == {0, 1}
    assert len([n for n in blobs if n.startswith("embed_tokens_indices")]) == 1


@pytest.mark.parametrize("kind", ["fp", "lut4", "mixed"])
def test_logits_equal_mlx_float32(models, assets, kind):
    model, _, _ = load_model(models[kind])
    assert_fp32_close(coreai_logits(assets[kind]), mlx_logits(model, PROMPT, DECODE))


def test_logits_float16_compute(tiny_model_dir, tmp_path):
    """What ships: fp16 weights, activations and cache; within fp16 error of MLX's fp32."""
    asset = to_aimodel(tiny_model_dir, tmp_path / "fp16.aimodel", compute_dtype="float16")
    model, _, _ = load_model(tiny_model_dir)
    with CoreAISession(asset) as s:
        assert s.compute_dtype == "float16"
    assert_logits_close(
        coreai_logits(asset, decode=DECODE[:3]), mlx_logits(model, PROMPT, DECODE[:3])
    )


def test_lm_head_in_chunks(models, tmp_path):
    """Vocabulary chunks: logits_0..2 concatenate to MLX's logits, and the embedding lookup reads
    each token from its chunk of the palettized table."""
    asset = to_aimodel(models["lut4"], tmp_path / "chunked.aimodel", head_chunk=200)
    with CoreAISession(asset) as s:
        assert s.logit_chunks == [200, 200, 112]
        assert list(s.function("decode").desc.output_names) == [f"logits_{j}" for j in range(3)]
    from coreai.authoring import AIModelAsset

    program = str(AIModelAsset.load(asset).program)
    assert re.search(r"tensor<512x64x", program) is None  # no op holds the whole table
    index_rows = {int(n) for n in re.findall(r"tensor<(\d+)x64xui8>", program)}
    assert {200, 112} <= index_rows and max(index_rows) == 200  # chunk tables (+ gathered rows)
    model, _, _ = load_model(models["lut4"])
    assert_fp32_close(
        coreai_logits(asset, decode=DECODE[:3]), mlx_logits(model, PROMPT, DECODE[:3])
    )


def test_state_carries_the_sequence(assets):
    """A second state is an independent sequence; decoding after another history differs."""
    with CoreAISession(assets["fp"]) as s:
        a, b = s.new_state(), s.new_state()
        s.prefill(PROMPT, a)
        s.prefill([t + 1 for t in PROMPT], b)
        la, lb = s.decode(DECODE[0], len(PROMPT), a), s.decode(DECODE[0], len(PROMPT), b)
        assert np.abs(la - lb).max() > 0.05 * np.abs(la).max()
        again = s.new_state()
        s.prefill(PROMPT, again)
        np.testing.assert_array_equal(s.decode(DECODE[0], len(PROMPT), again), la)


# --- adapters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chat", "code"])
def test_adapter_function_equals_mlx_with_adapter(models, adapters, assets, name):
    model, _, _ = load_model(models["lut4"])
    load_adapter(model, adapters[name])
    want = mlx_logits(model, PROMPT, DECODE)
    got = coreai_logits(assets["adapters"], adapter=name)
    assert_fp32_close(got, want)
    base = coreai_logits(assets["adapters"])
    assert np.abs(got - base).max() > 0.1 * np.abs(want).max()  # the adapter does something


def test_switching_adapters_between_calls_on_one_state(models, adapters, assets):
    """Prefill with chat, decode with code, then with the bare base, on one state: equal to MLX
    swapping the same adapters over one KV cache."""
    from mlx_lm.models.cache import make_prompt_cache

    model, _, _ = load_model(models["lut4"])
    swap = AdapterCache(model)
    plan = [("chat", None), ("code", DECODE[:3]), (None, DECODE[3:6])]
    cache = make_prompt_cache(model)
    swap.activate(adapters["chat"])
    want = [model(mx.array([PROMPT]), cache=cache)[0]]
    for name, tokens in plan[1:]:
        swap.activate(adapters[name] if name else None)
        want += [model(mx.array([[t]]), cache=cache)[0] for t in tokens]
    want = np.array(mx.concatenate(want, axis=0))

    with CoreAISession(assets["adapters"]) as s:
        state = s.new_state()
        got, position = [s.prefill(PROMPT, state, "chat")], len(PROMPT)
        for name, tokens in plan[1:]:
            for t in tokens:
                got.append(s.decode(t, position, state, name)[None])
                position += 1
    assert_fp32_close(np.concatenate(got, axis=0), want)


def test_adapters_grow_the_asset_by_their_size(models, assets):
    """Base weights are stored once for all functions: two adapters add about their own bytes."""
    growth = package_bytes(assets["adapters"]) - package_bytes(assets["lut4"])
    with CoreAISession(assets["adapters"]) as s:
        names = s.functions
    model, _, _ = load_model(models["lut4"])
    # fp32 compute stores A and B in fp32: 2 adapters x 14 projections x rank 16 x (in + out).
    dims = sum(m.packed.shape[0] + m._cols for n, m in model.named_modules() if n.endswith("proj"))
    adapter_bytes = 2 * 16 * dims * 4
    # Plus the program of four more functions (~50 KB each at this tiny size).
    assert adapter_bytes < growth < adapter_bytes + 4 * 60_000, (growth, adapter_bytes, names)


def test_asset_size_matches_bits_per_weight(tiny_tokenizer, tmp_path):
    """fp16 asset of a model whose weights dominate: within 2% of params x bpw / 8 (bpw as
    stored: packed indices + LUTs, fp16 norms), and one adapter adds about its fp16 size."""
    config = preset_config(
        "tiny",
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=4096,
    )
    model = build_model(config)
    init_weights(model, config, seed=4)
    fp_dir = save_model(tmp_path / "fp", model, config, tiny_tokenizer)
    pal_dir = palettized_copy(fp_dir, tmp_path / "pal", mixed_bits, tiny_tokenizer)
    model, _, _ = load_model(pal_dir)
    expected = sum(
        p.nbytes if name.endswith(("packed", "lut")) else p.size * 2
        for name, p in tree_flatten(model.parameters())
    )
    opts = {"compute_dtype": "float16", "context": 32, "prefill_chunk": 8}
    base = package_bytes(to_aimodel(pal_dir, tmp_path / "base.aimodel", **opts))
    print(f"asset {base} B, params x bpw / 8 = {expected} B")
    assert abs(base - expected) / expected < 0.02
    adapter = make_adapter(pal_dir, tmp_path / "a", seed=1)
    with_adapter = package_bytes(
        to_aimodel(pal_dir, tmp_path / "a.aimodel", adapter=[f"a={adapter}"], **opts)
    )
    adapter_bytes = (adapter / "adapters.safetensors").stat().st_size  # fp16, as stored
    assert abs((with_adapter - base) - adapter_bytes) / adapter_bytes < 0.10


# --- generation and cross-checks -----------------------------------------------------------------


def generate_cli(model_dir: Path, adapter: Path | None = None) -> str:
    args = ["--model", model_dir, "--prompt", TEXT_PROMPT, "--max-tokens", "32", "--temp", "0"]
    args += ["--no-verbose"] + (["--adapter", adapter] if adapter else [])
    proc = run_cli("afm_mlx.generate", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("kind", ["fp", "lut4", "mixed", "chat", "code"])
def test_greedy_continuation_equals_generate_cli(models, adapters, assets, kind):
    """32 greedy tokens through Apple's runtime = ``generate --temp 0`` (fp, LUT-4, mixed bits,
    and each adapter function of the two-adapter asset over the LUT-4 base)."""
    from mlx_lm.utils import load_tokenizer

    adapter = kind if kind in adapters else None
    model_dir = models["lut4" if adapter else kind]
    tokenizer = load_tokenizer(model_dir)
    prompt = list(tokenizer.encode(TEXT_PROMPT, add_special_tokens=False))
    with CoreAISession(assets["adapters" if adapter else kind]) as s:
        ids = s.greedy(prompt, 32, adapter, eos=set(tokenizer.eos_token_ids))
        text = s.generate(tokenizer, TEXT_PROMPT, 32, adapter)
    assert len(ids) == 32 and len(set(ids)) > 8, ids  # varied: many decisions are compared
    assert text + "\n" == generate_cli(model_dir, adapters[adapter] if adapter else None)


def test_core_ml_executor_agrees_with_core_ai(models, adapters, assets, tmp_path):
    """The same prompts through the Core ML package (NumPy reference executor) and the Core AI
    asset (Apple's runtime) agree within fp16 error: a check of the executor itself."""
    package = tmp_path / "m.mlpackage"
    convert_coreml(
        ConvertConfig(
            model=str(models["lut4"]),
            out=str(package),
            context=CONTEXT,
            prefill_chunk=CHUNK,
            adapter=[f"chat={adapters['chat']}"],
        )
    )
    _, _, prog = open_package(package)
    for suffix, adapter in (("", None), ("_chat", "chat")):
        core_ml = coreml_logits(prog, PROMPT, DECODE[:4], suffix=suffix)
        core_ai = coreai_logits(assets["adapters"], decode=DECODE[:4], adapter=adapter)
        assert_logits_close(core_ml, core_ai)


# --- bad input: one line on stderr, exit 2, nothing left behind -----------------------------------


def _nothing_left(folder: Path) -> None:
    assert list(folder.iterdir()) == [], list(folder.iterdir())


def test_adapter_of_another_base_is_refused(tiny_model_dir, adapters, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_cli(
        "converters.coreai",
        *("--model", tiny_model_dir, "--out", out_dir / "x.aimodel"),
        *("--adapter", f"chat={adapters['chat']}"),
    )
    line = one_line_error(proc)
    assert "trained on base" in line and "fingerprint" in line
    _nothing_left(out_dir)


def test_bad_compute_dtype(tiny_model_dir, tmp_path):
    line = one_line_error(
        run_cli(
            "converters.coreai",
            *("--model", tiny_model_dir, "--out", tmp_path / "m.aimodel"),
            *("--compute-dtype", "bfloat16"),
        )
    )
    assert "--compute-dtype" in line and "float16" in line
    _nothing_left(tmp_path)


def test_python_too_old_is_one_line(monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    with pytest.raises(UserError, match=r"needs Python >= 3\.11"):
        require_coreai()


def test_missing_coreai_is_one_line(tiny_model_dir, tmp_path):
    """Without coreai-core installed: one line naming the package to install, nothing written."""
    code = (
        "import sys; sys.modules['coreai'] = None; "  # makes every `import coreai...` fail
        "from converters.coreai import main; main(sys.argv[1:])"
    )
    out = tmp_path / "m.aimodel"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--model", str(tiny_model_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert "coreai-core==" in one_line_error(proc)
    _nothing_left(tmp_path)


def test_saved_as_save_asset_saves_it(models, tmp_path):
    """``save_program`` (``save_asset``'s steps with the bytecode hashed in pieces) writes the
    files coreai's own ``AIProgram.save_asset`` writes: the same bytecode, its SHA-256 as
    ``main.hash``, the same metadata but for the creation time."""
    import hashlib
    import json

    from coreai.runtime import AIModelAssetMetadata

    from converters.coreai_program import build_program, save_program
    from converters.export import read_model

    cfg = CoreAIConfig(
        model=str(models["lut4"]), out="x.aimodel", context=CONTEXT, prefill_chunk=CHUNK
    )
    plan = read_model(cfg, models["lut4"], [])
    program, _ = build_program(plan, CONTEXT, "float32")
    metadata = {**plan.metadata(cfg), "afm_mlx.compute_dtype": "float32"}
    ours, theirs = tmp_path / "ours.aimodel", tmp_path / "theirs.aimodel"
    save_program(program, ours, metadata)
    meta = AIModelAssetMetadata()
    meta.model_description = (
        "afm_mlx language model: prefill/decode functions over a shared KV-cache state"
    )
    for key, value in metadata.items():
        meta.set_custom(key, value)
    program.save_asset(theirs, metadata=meta)
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    code = (ours / "main.mlirb").read_bytes()
    assert code == (theirs / "main.mlirb").read_bytes()
    assert (ours / "main.hash").read_bytes() == hashlib.sha256(code).digest()
    assert (ours / "main.hash").read_bytes() == (theirs / "main.hash").read_bytes()
    ours_meta, theirs_meta = (json.loads((p / "metadata.json").read_text()) for p in (ours, theirs))
    assert ours_meta.pop("creationDate") and theirs_meta.pop("creationDate")
    assert ours_meta == theirs_meta
    model, _, _ = load_model(models["lut4"])  # and coreai loads and runs it
    assert_fp32_close(coreai_logits(ours), mlx_logits(model, PROMPT, DECODE))


def test_failure_while_writing_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    import converters.coreai_program as program

    def broken(prog, path, metadata):
        path.mkdir()  # a partial asset...
        (path / "main.mlirb").write_bytes(b"\0" * 10)
        raise OSError("disk full")  # ...then the write fails

    monkeypatch.setattr(program, "save_program", broken)
    with pytest.raises(OSError, match="disk full"):
        to_aimodel(tiny_model_dir, tmp_path / "m.aimodel")
    _nothing_left(tmp_path)


def test_overwrite_replaces_only_when_done(tiny_model_dir, tmp_path):
    out = to_aimodel(tiny_model_dir, tmp_path / "m.aimodel")
    to_aimodel(tiny_model_dir, out, overwrite=True, compute_dtype="float16")
    with CoreAISession(out) as s:
        assert s.compute_dtype == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.aimodel"]


# --- the device check script -----------------------------------------------------------------------


def _check_script(*args: str) -> subprocess.CompletedProcess:
    script = REPO / "scripts" / "coreai_check.py"
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_coreai_check_runs_on_the_cpu_interpreter(models, adapters, assets):
    """The Mac check script, on the runtime available here: every step agrees with MLX."""
    proc = _check_script(
        *("--asset", assets["adapters"], "--model", models["lut4"]),
        *("--adapter", f"code={adapters['code']}", "--compute-unit", "cpu", "--steps", "12"),
        *("--prompt", TEXT_PROMPT, "--min-agreement", "1.0"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "argmax agreement with MLX: 12/12" in proc.stdout
    assert "prefill_code/decode_code" in proc.stdout and "tok/s" in proc.stdout


@pytest.mark.skipif(sys.platform == "darwin", reason="the gate under test is for non-Macs")
def test_coreai_check_neural_engine_is_gated_off_macos_27(models, assets):
    proc = _check_script("--asset", assets["fp"], "--model", models["fp"])
    line = one_line_error(proc)
    assert "needs macOS 27" in line and "nothing was run" in line
