"""Core ML and Core AI conversion benchmark: time and size, against the size the weights predict.

    python scripts/bench_convert.py                      # small (random) + AFM-3B-shaped palettized
    python scripts/bench_convert.py --run runs/small     # the trained demo model instead
    python scripts/bench_convert.py --skip-3b            # only the demo model (about a minute)

Rows:
1. demo model, fp16;
2. demo model palettized (4-bit, 16 rows per LUT; 8-bit per-row embedding) + one rank-16 adapter,
   and the same package without the adapter (what the adapter adds);
3. peer: coremltools' own ``palettize_weights`` (k-means, 4-bit, per_grouped_channel, group 16)
   applied to row 1's package, the route that re-clusters instead of keeping our LUTs;
4. an AFM-3B-shaped model (26 layers, d_model 3072, vocab 49,152) with random LUTs and indices,
   mixed 4/2-bit (16 of 26 down_proj at 2-bit, ~3.7 bpw like Apple's shipped model), built layer
   by layer without ever materialising dense weights.

Every model is converted twice in the same run: to a Core ML ``.mlpackage`` and to a Core AI
``.aimodel`` (float16 compute, what ships), so the Core AI rows carry their ratio to Core ML.

"expected" = stored parameters x bits per weight / 8 (fp16 for unpalettized tensors) + RoPE tables
+ adapters; the package / asset should be within 2% of it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm at import: no per-pass progress bars

from afm_mlx.core.blas import preload_openblas

preload_openblas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from afm_mlx.models.files import save_model  # noqa: E402
from afm_mlx.models.io import load_model  # noqa: E402
from afm_mlx.models.presets import build_model, init_weights, preset_config  # noqa: E402
from afm_mlx.palettization.layers import (  # noqa: E402
    AFM_EMBEDDING_SETTINGS,
    PalettizedLinear,
    apply_palettization_config,
    palettize_model,
    palettized_layers,
)
from converters.coreai import CoreAIConfig  # noqa: E402
from converters.coreai import convert as convert_coreai  # noqa: E402
from converters.coreml import ConvertConfig, convert  # noqa: E402


def expected_bytes(model: nn.Module, context: int, head_dim: int, adapter_bytes: int = 0) -> dict:
    """Stored bytes the package should hold: palettized layers as packed indices + fp16 LUTs,
    everything else fp16, plus the RoPE cos/sin tables and adapters."""
    params = stored = 0
    for name, p in tree_flatten(model.parameters()):
        if name.endswith(".packed"):
            stored += p.nbytes
        elif name.endswith(".lut"):
            stored += p.nbytes
        else:
            params += p.size
            stored += 2 * p.size
    proj_bits = proj_weights = 0
    for _, layer in palettized_layers(model):
        weights = layer.packed.shape[0] * layer._cols
        params += weights
        if isinstance(layer, PalettizedLinear):
            proj_weights += weights
            proj_bits += 8 * (layer.packed.nbytes + layer.lut.nbytes)
    rope = 2 * context * head_dim * 2
    return {
        "params": params,
        "bpw": 8 * stored / params,
        "proj_bpw": proj_bits / proj_weights if proj_weights else 16.0,
        "expected": stored + rope + adapter_bytes,
    }


def random_palettized_afm(out: Path, down_2bit_layers: range) -> Path:
    """An AFM-3B-shaped palettized checkpoint with random LUTs/indices, written without ever
    allocating a dense weight (MLX leaves the dense init lazy; each layer is filled and saved)."""
    config = preset_config("afm-3b")
    model = build_model(config)
    layers = {}
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(module, nn.Embedding):
            layers[path] = dict(AFM_EMBEDDING_SETTINGS)
        elif isinstance(module, nn.Linear):
            i = int(path.split(".")[2])
            bits = 2 if path.endswith("down_proj") and i in down_2bit_layers else 4
            layers[path] = {"bits": bits, "group_size": 16, "axis": 0}
    apply_palettization_config(model, {"layers": layers})
    key = mx.random.key(0)
    for _, layer in palettized_layers(model):
        key, k1, k2 = mx.random.split(key, 3)
        layer.packed = mx.random.randint(0, 256, layer.packed.shape, key=k1).astype(mx.uint8)
        lut = mx.sort(0.02 * mx.random.normal(layer.lut.shape, key=k2), axis=-1)
        layer.lut = lut.astype(mx.float16)
        mx.eval(layer.packed, layer.lut)
    mx.eval(model.parameters())  # norms: ones
    save_model(out, model, {**config, "palettization": {"layers": layers}})
    return out


def make_adapter(base_dir: Path, out: Path, rank: int = 16) -> Path:
    from afm_mlx.adapters.lora import LoRASettings, attach_lora, lora_layers, save_adapter
    from afm_mlx.models.io import model_fingerprint

    model, _, _ = load_model(base_dir)
    fingerprint = model_fingerprint(model)
    settings = LoRASettings(rank=rank, scale=2.0)
    attach_lora(model, settings)
    for _, layer in lora_layers(model):
        layer.lora_b = 0.01 * mx.random.normal(layer.lora_b.shape)
    return save_adapter(out, model, settings, fingerprint)


def weights_bytes(package: Path) -> int:
    return (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size


def row(name: str, result, sizes: dict) -> None:
    p, weights = result.phases, weights_bytes(result.path)
    print(
        f"{name:<34} {sizes['params'] / 1e6:9.1f}M {sizes['bpw']:5.2f} "
        f"{sizes['expected'] / 1e6:11.2f} {weights / 1e6:10.2f} "
        f"{100 * (weights / sizes['expected'] - 1):+6.2f}% {result.bytes / 1e6:10.2f} "
        f"{100 * (result.bytes / sizes['expected'] - 1):+6.2f}% {result.seconds:8.1f} "
        f"(load {p['load']:.1f}, build {p['build']:.1f}, save {p['save']:.1f}); "
        f"projections {sizes['proj_bpw']:.2f} bpw",
        flush=True,
    )


def row_coreai(name: str, result, sizes: dict, coreml) -> None:
    """A Core AI asset has no separate weights file: its size is compared whole."""
    p = result.phases
    print(
        f"{name:<34} {sizes['params'] / 1e6:9.1f}M {sizes['bpw']:5.2f} "
        f"{sizes['expected'] / 1e6:11.2f} {'':>10} {'':>7} {result.bytes / 1e6:10.2f} "
        f"{100 * (result.bytes / sizes['expected'] - 1):+6.2f}% {result.seconds:8.1f} "
        f"(load {p['load']:.1f}, build {p['build']:.1f}, save {p['save']:.1f}); "
        f"vs Core ML: {coreml.seconds / result.seconds:.2f}x the speed, "
        f"{result.bytes / coreml.bytes:.3f}x the size",
        flush=True,
    )


def header() -> None:
    print(
        f"{'model':<34} {'params':>10} {'bpw':>5} {'expected MB':>11} {'weights MB':>10} "
        f"{'dev':>7} {'package MB':>10} {'dev':>7} {'convert s':>8}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="trained demo model folder (default: random small preset)")
    ap.add_argument("--skip-3b", action="store_true", help="only the demo model")
    ap.add_argument("--no-peer", action="store_true", help="skip coremltools palettize_weights")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prefill-chunk", type=int, default=64)
    ap.add_argument("--work", help="scratch folder (default: a temporary one, removed)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    opts = {"context": args.context, "prefill_chunk": args.prefill_chunk, "overwrite": True}

    def run_convert(model_dir: Path, out: str, adapters=()):
        cfg = ConvertConfig(
            model=str(model_dir), out=str(work / out), adapter=list(adapters), **opts
        )
        return convert(cfg)

    def run_coreai(model_dir: Path, out: str, adapters=()):
        cfg = CoreAIConfig(
            model=str(model_dir), out=str(work / out), adapter=list(adapters), **opts
        )
        result = convert_coreai(cfg)
        shutil.rmtree(result.path)  # the scratch disk holds one 3B asset at a time
        return result

    try:
        print(f"context {args.context}, prefill chunk {args.prefill_chunk}; scratch {work}")
        header()
        if args.run:
            demo_dir = Path(args.run)
            demo_name = f"demo {demo_dir.name} fp16"
        else:
            config = preset_config("small")
            model = build_model(config)
            init_weights(model, config, seed=0)
            demo_dir = save_model(work / "small", model, config)
            demo_name = "demo small (random) fp16"
        model, config, _ = load_model(demo_dir)
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        fp16 = run_convert(demo_dir, "demo_fp16.mlpackage")
        row(demo_name, fp16, expected_bytes(model, args.context, head_dim))
        row_coreai(
            "  Core AI .aimodel",
            run_coreai(demo_dir, "demo_fp16.aimodel"),
            expected_bytes(model, args.context, head_dim),
            fp16,
        )

        t = time.perf_counter()
        chosen = palettize_model(
            model,
            class_predicate=lambda p, m: (
                dict(AFM_EMBEDDING_SETTINGS) if isinstance(m, nn.Embedding) else True
            ),
        )
        pal_seconds = time.perf_counter() - t
        pal_dir = save_model(
            work / "demo_pal", model, {**config, "palettization": {"layers": chosen}}
        )
        pal = run_convert(pal_dir, "demo_pal.mlpackage")
        row(
            "demo palettized 4-bit (MLX k-means)",
            pal,
            expected_bytes(model, args.context, head_dim),
        )
        pal_ai = run_coreai(pal_dir, "demo_pal.aimodel")
        row_coreai("  Core AI .aimodel", pal_ai, expected_bytes(model, args.context, head_dim), pal)
        adapter = make_adapter(pal_dir, work / "adapter")
        adapter_bytes = (adapter / "adapters.safetensors").stat().st_size
        with_adapter = run_convert(pal_dir, "demo_pal_adapter.mlpackage", [f"chat={adapter}"])
        sizes = expected_bytes(model, args.context, head_dim, adapter_bytes)
        row("  + 1 adapter (rank 16)", with_adapter, sizes)
        with_adapter_ai = run_coreai(pal_dir, "demo_pal_adapter.aimodel", [f"chat={adapter}"])
        row_coreai("  Core AI .aimodel", with_adapter_ai, sizes, with_adapter)
        grown = weights_bytes(with_adapter.path) - weights_bytes(pal.path)
        print(
            f"  the adapter grows weight.bin by {grown / 1e6:.3f} MB (adapters.safetensors: "
            f"{adapter_bytes / 1e6:.3f} MB) and the package by "
            f"{(with_adapter.bytes - pal.bytes) / 1e6:.2f} MB (two more functions' program text), "
            f"the Core AI asset by {(with_adapter_ai.bytes - pal_ai.bytes) / 1e6:.3f} MB; "
            f"MLX k-means palettization of the demo took {pal_seconds:.1f} s"
        )
        if not args.no_peer:
            peer_palettize(demo_dir, work / "peer", args.context)
        del model

        if not args.skip_3b:
            t = time.perf_counter()
            afm_dir = random_palettized_afm(work / "afm3b", range(5, 21))
            print(
                f"  (AFM-3B random palettized checkpoint written in {time.perf_counter() - t:.0f} s)"
            )
            model, config, _ = load_model(afm_dir)
            sizes = expected_bytes(model, args.context, 128)
            del model
            result = run_convert(afm_dir, "afm3b_pal.mlpackage")
            row("AFM-3B shape, palettized 4/2-bit", result, sizes)
            shutil.rmtree(result.path)
            row_coreai(
                "  Core AI .aimodel", run_coreai(afm_dir, "afm3b_pal.aimodel"), sizes, result
            )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def peer_palettize(model_dir: Path, work: Path, context: int) -> None:
    """coremltools' palettize_weights (the re-clustering route) on our fp16 decode function.

    It refuses multifunction packages, so the peer gets a single-function one; only the
    palettize_weights call is timed."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    try:
        import sklearn  # noqa: F401  (coremltools' k-means needs it)
    except ImportError:
        print("peer: ct palettize_weights skipped (needs scikit-learn, not installed)")
        return
    from converters.coreml_program import build_function
    from converters.extract import extract_weights

    model, config, _ = load_model(model_dir)
    prog = build_function(extract_weights(model, config, context), 1, context)
    fp16 = ct.convert(
        prog,
        minimum_deployment_target=ct.target.iOS18,
        pass_pipeline=ct.PassPipeline.EMPTY,
        skip_model_load=True,
    )
    op_config = cto.OpPalettizerConfig(
        mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16
    )
    t = time.perf_counter()
    compressed = cto.palettize_weights(fp16, cto.OptimizationConfig(global_config=op_config))
    seconds = time.perf_counter() - t
    compressed.save(str(work.with_suffix(".mlpackage")))
    size = weights_bytes(work.with_suffix(".mlpackage"))
    print(
        f"{'peer: ct palettize_weights 4-bit':<34} {'':>10} {'':>5} {'':>11} {size / 1e6:10.2f} "
        f"{'':>7} {'':>10} {'':>7} {seconds:8.1f} (decode only; re-clusters all, emb. 4-bit)",
        flush=True,
    )


if __name__ == "__main__":
    main()
