"""LUT-matmul kernels: the CPU extension equals dequantize + matmul (every bit width, both group
axes, odd shapes, 1 to 128 rows, every instruction-set path), the first-use check catches a wrong
or failing kernel and falls back, ``--lut-kernel`` modes, gradients through the kernel path, the
fallback's memory bound, and an install without a compiler. The GPU kernel: test_gpu_kernel.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import REPO, one_line_error, run_cli

from afm_mlx.core.errors import UserError
from afm_mlx.palettization import kernels
from afm_mlx.palettization.layers import PalettizedLinear
from afm_mlx.palettization.lut import lut_to_dense
from afm_mlx.palettization.packing import PACKABLE_BITS, pack_indices

CAN_BUILD = shutil.which("cmake") is not None and shutil.which(os.environ.get("CXX", "c++"))
needs_cpu_kernel = pytest.mark.skipif(
    "cpu" not in kernels.KERNELS, reason="the CPU LUT kernel is not built here"
)


@pytest.fixture(autouse=True)
def _fresh_checks():
    """Every test starts with no first-use verdicts and the default mode."""
    kernels.reset()
    with kernels.using("auto"):
        yield
    kernels.reset()


def random_layer(rows: int, cols: int, bits: int, group_size: int, axis: int, seed: int = 0):
    """A PalettizedLinear with random indices and LUTs (k-means is not what is tested here)."""
    layer = PalettizedLinear(cols, rows, bias=False, bits=bits, group_size=group_size, axis=axis)
    k1, k2 = mx.random.split(mx.random.key(seed))
    indices = mx.random.randint(0, 1 << bits, (rows, cols), key=k1).astype(mx.uint8)
    layer.packed = pack_indices(indices, bits)
    layer.lut = mx.random.normal(layer.lut.shape, key=k2).astype(mx.float16)
    return layer, lut_to_dense(layer.lut, indices, group_size, axis).astype(mx.float32)


def test_kernel_is_built_where_a_compiler_exists():
    """CI has a compiler and CMake: a broken build must fail here, not hide in a fallback."""
    if not CAN_BUILD:
        pytest.skip("no C++ compiler or CMake: the install keeps the pure-MLX path")
    assert "cpu" in kernels.KERNELS, kernels._cpu_missing
    assert "CPU LUT kernel" in kernels.describe()


@needs_cpu_kernel
def test_a_kernel_built_for_another_mlx_is_not_loaded(monkeypatch):
    monkeypatch.setattr(mx, "__version__", "9.9.9")
    module, why = kernels._load_cpu_extension()
    assert module is None
    assert f"built for mlx {kernels._cpu_extension.mlx_version} but mlx 9.9.9" in why
    assert "reinstall afm_mlx" in why


# Shapes: the AVX-512 path (inputs a multiple of 16), AVX2 (of 8), and the portable one (odd).
SHAPES = [(48, 64, 16), (96, 128, 32), (32, 40, 8), (24, 36, 4)]


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ["widest", "avx2", "scalar"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("bits", PACKABLE_BITS)
def test_cpu_kernel_equals_dequantize_matmul(bits, axis, isa, monkeypatch):
    # Caps the path (widest: AVX-512 or NEON where the CPU has it), so every one runs here.
    monkeypatch.setenv("AFM_MLX_LUT_ISA", isa)
    kernel, _ = kernels.KERNELS["cpu"]
    for rows, cols, group_size in SHAPES:
        layer, dense = random_layer(rows, cols, bits, group_size, axis, seed=bits + 7 * axis)
        for m in (*range(1, 9), 13, 128):
            x = mx.random.normal((m, cols), key=mx.random.key(m))
            got = kernel(x, layer.packed, layer.lut, bits, group_size, axis)
            want = x @ dense.T
            assert got.shape == want.shape and got.dtype == mx.float32
            assert mx.allclose(got, want, rtol=1e-5, atol=1e-5), (rows, cols, group_size, m)


@needs_cpu_kernel
def test_cpu_kernel_keeps_the_input_dtype_and_batch_shape():
    layer, dense = random_layer(64, 64, 4, 16, 0)
    x = mx.random.normal((2, 3, 64))
    for dtype in (mx.float16, mx.bfloat16, mx.float32):
        y = layer(x.astype(dtype))
        assert y.dtype == dtype and y.shape == (2, 3, 64)
        want = (x.astype(dtype).astype(mx.float32) @ dense.T).astype(dtype)
        assert mx.allclose(y.astype(mx.float32), want.astype(mx.float32), rtol=1e-2, atol=1e-2)


@needs_cpu_kernel
def test_cpu_kernel_reports_its_instruction_set():
    ext = kernels._cpu_extension
    assert ext.isa(4, 4096, 16, 0) in ("avx512", "avx2", "scalar")
    assert ext.isa(4, 36, 4, 0) == "scalar"  # 36 inputs: no 8-wide vector path
    assert ext.isa(8, 4096, 16, 0) in ("avx2", "scalar")  # 256 entries: gathers, not permutes


@needs_cpu_kernel
def test_cpu_kernel_refuses_bad_arguments():
    layer, _ = random_layer(32, 64, 4, 16, 0)
    kernel = kernels._cpu_extension.lut_matmul
    with pytest.raises(ValueError, match="in_dims"):
        kernel(mx.zeros((1, 48)), layer.packed, layer.lut, 4, 16, 0, 64)
    with pytest.raises(ValueError, match="1 to 256 rows"):
        kernel(mx.zeros((300, 64)), layer.packed, layer.lut, 4, 16, 0, 64)
    with pytest.raises(ValueError, match="lut"):
        kernel(mx.zeros((1, 64)), layer.packed, layer.lut, 3, 16, 0, 64)


# The row kernels alone (lut_rows.h), built by a small harness: natively, and for AArch64 under
# qemu, which is how the NEON path is checked without an ARM machine.
HARNESS = REPO / "tests" / "csrc" / "lut_rows_check.cpp"
CROSS = shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")


def _ok(cmd: list[str]) -> str:
    """Run a build or check command; its stdout, or the test fails with its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


def _harness(compiler: str, runner: list[str], out: Path) -> str:
    _ok([compiler, "-O2", "-std=c++20", "-static", str(HARNESS), "-o", str(out)])
    return _ok([*runner, str(out)])


@pytest.mark.skipif(not shutil.which("c++"), reason="no C++ compiler")
def test_row_kernels_native(tmp_path):
    out = _harness("c++", [], tmp_path / "check")
    assert "halves: 65536 ok" in out and out.count("480 layouts x rows ok") == 3


@pytest.mark.skipif(
    not CROSS, reason="needs g++-aarch64-linux-gnu and qemu-user (.ci/run has them)"
)
def test_row_kernels_neon_under_qemu(tmp_path):
    out = _harness("aarch64-linux-gnu-g++", ["qemu-aarch64"], tmp_path / "check")
    assert "widest: 480 layouts x rows ok (widest path here: neon)" in out


# The GPU kernel body (Metal and CUDA share it). No GPU here: its logic runs on the CPU with 32
# threads per simdgroup and a barrier-based simd_sum, and its CUDA text goes through nvcc.
# --- dispatch, first-use check, modes ------------------------------------------------------------


def _counting(fn, calls: list):
    def kernel(*args):
        calls.append(args[0].shape)
        return fn(*args)

    return kernel


def _reference(x, packed, lut, bits, group_size, axis):
    from afm_mlx.palettization.packing import unpack_indices

    w = lut_to_dense(lut, unpack_indices(packed, bits, x.shape[-1]), group_size, axis)
    return (x.astype(mx.float32) @ w.astype(mx.float32).T).astype(x.dtype)


def test_the_checks_reference_by_reduction_equals_a_float64_product():
    """The GPU path of the first-use check's reference (products summed, not a TF32 matmul)."""
    import numpy as np

    x = mx.random.normal((5, 96), key=mx.random.key(1))
    dense = mx.random.normal((40, 96), key=mx.random.key(2)).astype(mx.float16)
    want = np.asarray(x, dtype=np.float64) @ np.asarray(dense.astype(mx.float32), np.float64).T
    for by_reduction in (True, False):
        got = kernels.reference_matmul(x, dense, by_reduction)
        assert got.shape == (5, 40) and got.dtype == mx.float32
        assert np.abs(np.asarray(got) - want).max() < 1e-5 * np.abs(want).max()


def test_a_wrong_kernel_is_caught_at_first_use_and_falls_back(monkeypatch, capsys):
    calls = []
    wrong = _counting(lambda *a: _reference(*a) * 1.001, calls)  # off by 0.1%: still caught
    monkeypatch.setitem(kernels.KERNELS, kernels.backend(), (wrong, 8))
    layer, dense = random_layer(64, 64, 4, 16, 0)
    x = mx.random.normal((1, 64))
    for _ in range(3):
        assert mx.allclose(layer(x), x @ dense.T, rtol=1e-6, atol=1e-6)  # the reference logits
    err = capsys.readouterr().err
    assert err.count("LUT kernel for 4-bit") == 1 and "falling back" in err  # warned once
    n_checked = len(calls)
    layer(x)
    assert len(calls) == n_checked  # after the check, the bad kernel is never called again
    with kernels.using("on"), pytest.raises(UserError, match="differs from dequantize"):
        kernels.reset()
        layer(x)


def test_a_failing_kernel_falls_back(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("compile error: no such intrinsic")

    monkeypatch.setitem(kernels.KERNELS, kernels.backend(), (broken, 8))
    layer, dense = random_layer(32, 64, 2, 16, 1)
    x = mx.random.normal((2, 64))
    assert mx.allclose(layer(x), x @ dense.T, rtol=1e-6, atol=1e-6)
    assert "RuntimeError: compile error" in capsys.readouterr().err


def test_a_good_kernel_is_used(monkeypatch):
    calls = []
    good = _counting(_reference, calls)
    monkeypatch.setitem(kernels.KERNELS, kernels.backend(), (good, 8))
    layer, dense = random_layer(32, 64, 4, 16, 0)
    layer(mx.random.normal((3, 64)))
    checked = len(calls)
    layer(mx.random.normal((3, 64)))
    assert len(calls) == checked + 1  # the real call went to the kernel
    layer(mx.random.normal((9, 64)))  # more rows than the kernel takes: dequantize + GEMM
    assert len(calls) == checked + 1


def test_off_never_calls_a_kernel_and_on_needs_one(monkeypatch):
    calls = []
    monkeypatch.setitem(kernels.KERNELS, kernels.backend(), (_counting(_reference, calls), 8))
    layer, dense = random_layer(32, 64, 4, 16, 0)
    with kernels.using("off"):
        assert mx.array_equal(layer(mx.ones((1, 64))), mx.ones((1, 64)) @ dense.T)
    assert calls == []
    monkeypatch.delitem(kernels.KERNELS, kernels.backend())
    with kernels.using("on"):
        with pytest.raises(UserError, match="--lut-kernel on: .*LUT kernel"):
            kernels.apply_flag(None)
        with pytest.raises(UserError, match="--lut-kernel on"):
            layer(mx.ones((1, 64)))
    with pytest.raises(UserError, match="--lut-kernel 'fast'"):
        kernels.set_mode("fast")


def test_bad_mode_flag_and_env_are_one_line(tiny_model_dir, monkeypatch):
    args = ["--model", tiny_model_dir, "--prompt", "Hi", "--lut-kernel", "fast"]
    line = one_line_error(run_cli("afm_mlx.generate", *args))
    assert "--lut-kernel 'fast'" in line and "auto, on, off" in line
    monkeypatch.setenv(kernels.ENV, "fast")
    assert kernels.get_mode() == "auto"  # a mode set in the process wins over the variable
    monkeypatch.setattr(kernels, "_mode", None)
    with pytest.raises(UserError, match="AFM_MLX_LUT_KERNEL='fast'"):
        kernels.get_mode()


# --- gradients and whole models ------------------------------------------------------------------


@needs_cpu_kernel
def test_gradient_through_the_kernel_equals_the_dense_layer():
    layer, dense = random_layer(48, 64, 3, 16, 1)
    x = mx.random.normal((4, 64))
    r = mx.random.normal((4, 48))
    grad = mx.grad(lambda v: (layer(v) * r).sum())(x)
    assert mx.allclose(grad, r @ dense, rtol=1e-5, atol=1e-5)
    with kernels.using("off"):
        assert mx.allclose(mx.grad(lambda v: (layer(v) * r).sum())(x), grad, atol=1e-5)


@needs_cpu_kernel
def test_lora_training_step_over_a_palettized_base_on_the_kernel_path(tiny_model_dir):
    """batch x sequence <= the kernel's rows: the LoRA gradients equal the dequantize path's."""
    from mlx.utils import tree_flatten

    from afm_mlx.adapters.lora import LoRASettings, attach_lora
    from afm_mlx.models.io import load_model
    from afm_mlx.palettization.layers import palettize_model

    model, _, _ = load_model(tiny_model_dir)
    palettize_model(model)
    attach_lora(model, LoRASettings(rank=4, scale=2.0), seed=0)
    ids = mx.array([[5, 17, 99, 3, 250, 41, 7]])

    def loss(m):
        logits = m(ids[:, :-1])
        return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()

    grads = dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))
    with kernels.using("off"):
        want = dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))
    assert grads.keys() == want.keys() and any("lora_a" in k for k in grads)
    for k in grads:
        assert mx.allclose(grads[k], want[k], rtol=1e-3, atol=1e-5), k


@needs_cpu_kernel
def test_palettized_model_decodes_the_same_on_both_paths(tiny_model_dir):
    from mlx_lm.models.cache import make_prompt_cache

    from afm_mlx.models.io import load_model
    from afm_mlx.palettization.layers import palettize_model

    model, _, _ = load_model(tiny_model_dir)
    palettize_model(model, class_predicate=lambda p, m: {"bits": 3} if "mlp" in p else True)

    def run():
        cache = make_prompt_cache(model)
        rows = [model(mx.array([[5, 17, 99, 3, 250]]), cache=cache)[0]]
        rows += [model(mx.array([[t]]), cache=cache)[0] for t in (77, 1, 420)]
        return mx.concatenate(rows)

    fast = run()
    with kernels.using("off"):
        slow = run()
    assert mx.allclose(fast, slow, rtol=1e-4, atol=1e-4)
    assert mx.array_equal(fast.argmax(-1), slow.argmax(-1))


def test_fallback_holds_one_layer_of_dense_weights_at_a_time():
    """Without the kernel, a forward pass through 6 layers peaks at about one layer's transients
    (dense fp32 + fp16 + uint8 indices: 7 bytes per weight), not six."""
    rows = cols = 1024
    layers = [random_layer(rows, cols, 4, 16, 0, seed=i)[0] for i in range(6)]
    mx.eval([layer.parameters() for layer in layers])
    x = mx.random.normal((1, cols))
    mx.eval(x)
    with kernels.using("off"):
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        h = x
        for layer in layers:
            h = layer(h)
        mx.eval(h)
        extra = mx.get_peak_memory() - base
    one_layer = 7 * rows * cols
    assert extra < 1.5 * one_layer, (extra, one_layer)


# --- the install without a compiler --------------------------------------------------------------


def test_install_without_a_compiler_keeps_the_pure_mlx_path(tmp_path):
    """setup.py's kernel build fails without CMake and says so, the build still succeeds, and the
    package then reports and uses the fallback (one warning) instead of failing."""
    tree = tmp_path / "src"
    shutil.copytree(
        REPO,
        tree,
        ignore=shutil.ignore_patterns(".git", "*.so", "build", "runs", "__pycache__", "*.egg-info"),
    )
    # This checkout may be installed in editable mode, whose import hook would find the kernel
    # built here: hide the hook so the copy behaves like a fresh install.
    (tree / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n"
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": str(bin_dir), "PYTHONPATH": str(tree)}
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    assert "CPU LUT kernel was not built (cmake is not installed)" in build.stderr
    assert not list((tree / "afm_mlx" / "palettization").glob("_lut_cpu*"))
    report = subprocess.run(
        [sys.executable, "-m", "afm_mlx.runtime"],
        cwd=tree,
        env={**env, "AFM_MLX_BLAS_REEXEC": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    assert (
        "palettized layers: dequantize + matmul (the CPU LUT kernel is not built" in report.stdout
    )
    code = (
        "import mlx.core as mx, mlx.nn as nn\n"
        "from afm_mlx.palettization.layers import PalettizedLinear\n"
        "layer = PalettizedLinear.from_linear(nn.Linear(64, 32), bits=4)\n"
        "for _ in range(3): mx.eval(layer(mx.ones((1, 64))))\n"
        "print('ok')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    assert run.stderr.count("the CPU LUT kernel is not built") == 1  # one warning, not per call
    assert Path(tree / "afm_mlx" / "palettization" / "kernels.py").is_file()
