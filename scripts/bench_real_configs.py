"""The models users bring, at their real sizes, loaded by Hugging Face repo id with the hub offline.

    python scripts/bench_real_configs.py                          # all three (an hour or more on 2 cores)
    python scripts/bench_real_configs.py --models Qwen/Qwen3-0.6B --skip-target-bpw

For each public config (Qwen3-0.6B; Llama-3.2-1B with llama3 RoPE scaling; Gemma-3-1B), random
bf16 weights are written into a local Hugging Face cache (``--cache``, the hub's own layout:
``models--ORG--NAME/snapshots/REV`` + ``refs/main``), and every stage then runs as its CLI in a
subprocess with ``HF_HUB_OFFLINE=1``, naming the model by its repo id:

1. palettize to 4 bits (16 rows per LUT; the embedding 8-bit, 16 rows per LUT: the defaults), and to ``--target-bpw 3.7``
   (bits per layer chosen by sensitivity, 2 or 4);
2. peer, side by side: mlx-lm's own ``mlx_lm.convert -q --q-bits 4`` of the same repo id;
3. recover a few steps (the fp model by repo id is the teacher);
4. Core AI conversion (and Core ML), package size against stored parameters x bpw / 8;
5. one generate step on the palettized model: loaded as ``generate`` loads it, 8 prompt tokens
   and one sampled (the repos' tokenizers cannot be fetched, so no text is decoded).

Each row: wall time and the peak resident memory of that process (``wait4``'s ``ru_maxrss``), next
to the dense bf16 checkpoint's size. Random weights make quality figures meaningless, so none are
printed; the bench measures cost. A stage that refuses a family prints its one-line reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from afm_mlx.core.blas import preload_openblas  # noqa: E402

preload_openblas()

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from afm_mlx.models.files import save_model  # noqa: E402
from afm_mlx.models.presets import build_model  # noqa: E402

# The public config.json values of each repo (text model only), as published on the hub.
CONFIGS = {
    "Qwen/Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 40960,
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 151936,
    },
    "meta-llama/Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072,
        "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 16,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256,
    },
    "google/gemma-3-1b-it": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
        "intermediate_size": 6912, "max_position_embeddings": 32768, "num_attention_heads": 4,
        "num_hidden_layers": 26, "num_key_value_heads": 1, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "vocab_size": 262144,
    },
}  # fmt: skip
REVISION = "0" * 40


def write_cached_repo(cache: Path, repo: str, tokenizer_dir: Path) -> tuple[Path, int, int]:
    """Random bf16 weights for ``repo``'s config in the hub cache; (snapshot, params, bytes)."""
    folder = cache / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / REVISION
    if (snapshot / "config.json").is_file():
        size = sum(f.stat().st_size for f in snapshot.glob("*.safetensors"))
        return snapshot, size // 2, size
    config = CONFIGS[repo]
    model = build_model(config)
    if config.get("tie_word_embeddings", True) and "lm_head" in model:
        model.pop("lm_head")  # a tied head is not stored (Gemma's class builds one until loaded)
    key = [mx.random.key(0)]

    def fill(p: mx.array) -> mx.array:
        key[0], sub = mx.random.split(key[0])
        if p.ndim < 2:
            return p.astype(mx.bfloat16)
        return (0.02 * mx.random.normal(p.shape, key=sub)).astype(mx.bfloat16)

    model.update(tree_map(fill, model.parameters()))
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    save_model(snapshot, model, config, tokenizer_dir)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(REVISION)
    del model
    size = sum(f.stat().st_size for f in snapshot.glob("*.safetensors"))
    return snapshot, params, size


def generate_step(model_dir: str) -> None:
    """Load the palettized model as ``generate`` does, prefill 8 tokens and sample one (mlx-lm's
    ``generate_step``; the repos' own tokenizers are not here, so no text is decoded)."""
    from mlx_lm.generate import generate_step

    from afm_mlx.inference.generator import Generator

    start = time.perf_counter()
    gen = Generator(model_dir)
    loaded = time.perf_counter()
    prompt = mx.array([5, 17, 300, 42, 9, 77, 123, 4])
    token, _ = next(generate_step(prompt, gen.model, max_tokens=1))
    done = time.perf_counter()
    print(f"loaded in {loaded - start:.1f} s; 8-token prefill + 1 token in {done - loaded:.2f} s "
          f"(token {int(token)})")  # fmt: skip


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """(seconds, peak resident GB of the process, exit code, last output line)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    lines = [line for line in out.splitlines() if line.strip()]
    return seconds, usage.ru_maxrss / 1024**2, proc.returncode, lines[-1] if lines else ""


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--cache", default="runs/bench-real/hf", help="the local Hugging Face cache")
    ap.add_argument("--out", default="runs/bench-real", help="outputs of every stage")
    ap.add_argument("--skip-target-bpw", action="store_true", help="4-bit only (no sensitivity)")
    ap.add_argument("--recover-steps", type=int, default=2)
    ap.add_argument("--write-repo", help=argparse.SUPPRESS)  # internal: one repo, in a child
    ap.add_argument("--generate-step", help=argparse.SUPPRESS)  # internal: in a child
    args = ap.parse_args()
    if args.generate_step:
        generate_step(args.generate_step)
        return

    cache, out = Path(args.cache).resolve(), Path(args.out).resolve()
    # A tokenizer for the repos (theirs cannot be fetched here): the demo's, trained once.
    tok = out / "tokenizer"
    if args.write_repo:
        write_cached_repo(cache, args.write_repo, tok)
        return
    if not (tok / "tokenizer.json").is_file():
        from afm_mlx.data.corpus import read_corpus
        from afm_mlx.data.tokenizer import save_tokenizer, train_sentencepiece

        save_tokenizer(train_sentencepiece(read_corpus("shakespeare"), 8192), tok)
    env = {**os.environ, "HF_HOME": str(cache), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    py = [sys.executable, "-m"]
    rows = []
    for repo in args.models:
        name = repo.split("/")[1]
        # Written by a child process: a forked child's peak resident memory (ru_maxrss) starts at
        # its parent's, so this process stays small.
        subprocess.run([sys.executable, __file__, "--write-repo", repo, "--cache", str(cache),
                        "--out", str(out)], check=True)  # fmt: skip
        snapshot, params, dense = write_cached_repo(cache, repo, tok)
        print(
            f"\n{repo}: {params / 1e9:.2f}B parameters, dense bf16 checkpoint {dense / 1e9:.2f} GB"
        )
        work = out / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)

        def stage(
            label: str, cmd: list[str], result: Path | None = None, name: str = name
        ) -> tuple[float, int]:
            s, gb, rc, last = run(cmd, env)
            size = folder_bytes(result) if result is not None and result.exists() else 0
            rows.append((name, label, s, gb, rc, size, last))
            status = "ok" if rc == 0 else f"exit {rc}: {last}"
            extra = f", {size / 1e6:.1f} MB" if size else ""
            print(f"  {label:<28} {s:8.1f} s  peak {gb:6.2f} GB{extra}  {status}")
            return s, rc

        lut4 = work / "lut4"
        stage("palettize 4-bit", [*py, "afm_mlx.palettize", "--model", repo, "--out", str(lut4),
                                  "--bits", "4"], lut4)  # fmt: skip
        # The peer reads the same snapshot (by path: its model-card step needs the network).
        stage("peer: mlx_lm.convert -q 4", [*py, "mlx_lm", "convert", "--hf-path", str(snapshot),
              "--mlx-path", str(work / "mlx-q4"), "-q", "--q-bits", "4"], work / "mlx-q4")  # fmt: skip
        if not args.skip_target_bpw:
            mixed = work / "bpw3.7"
            stage("palettize --target-bpw 3.7", [*py, "afm_mlx.palettize", "--model", repo, "--out",
                  str(mixed), "--target-bpw", "3.7", "--bit-choices", "2", "4",
                  "--calibration-batches", "1", "--calibration-seq-len", "64"], mixed)  # fmt: skip
        if (lut4 / "config.json").is_file():
            stage(f"recover {args.recover_steps} steps", [*py, "afm_mlx.recover", "--model",
                  str(lut4), "--teacher", repo, "--out", str(work / "recovery"), "--max-steps",
                  str(args.recover_steps), "--batch-size", "1", "--seq-len", "64",
                  "--eval-batches", "1", "--eval-every", "1000", "--no-progress"])  # fmt: skip
            stage("generate: load + 1 step", [sys.executable, __file__, "--generate-step",
                  str(lut4)])  # fmt: skip
            for module, suffix in (("converters.coreai", ".aimodel"),
                                   ("converters.coreml", ".mlpackage")):  # fmt: skip
                package = work / f"model{suffix}"
                stage(module, [*py, module, "--model", str(lut4), "--out", str(package),
                               "--context", "512"], package)  # fmt: skip
            config = json.loads((lut4 / "config.json").read_text())
            layers = config["palettization"]["layers"]
            stored = sum(f.stat().st_size for f in lut4.glob("*.safetensors"))
            print(
                f"  palettized weights {stored / 1e6:.1f} MB ({len(layers)} layers palettized) "
                f"vs dense bf16 {dense / 1e6:.1f} MB; params x 4 / 8 = {params / 2e6:.1f} MB"
            )
    print("\nmodel, stage, seconds, peak GB, exit code, output MB")
    for name, label, s, gb, rc, size, _ in rows:
        print(f"{name}, {label}, {s:.1f}, {gb:.2f}, {rc}, {size / 1e6:.1f}")


if __name__ == "__main__":
    main()
