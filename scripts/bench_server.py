"""Serving with a different adapter on every request: ours vs ``mlx_lm.server``, same run.

    python scripts/bench_server.py                      # runs/small (train it first)
    python scripts/bench_server.py --model runs/small --requests 24 --max-tokens 32

Both servers serve the same full-precision model with the same two LoRA adapters (rank 16 on
every projection, random non-zero updates, written in mlx-lm's adapter layout), and the client
alternates the adapters on every request, one request at a time, streaming, greedy. mlx-lm picks
the adapter with the request's ``adapters`` field; ours with ``model`` (adapters are loaded once
and swapped without reloading the base). A warm-up request per adapter goes first on both.
Printed: requests/s, median time to first token, generated tokens/s, the server's peak RSS, and
ours / mlx-lm ratios; then the same with one adapter throughout (no switching), which shows how
much of the difference is the switching. Both servers run on the same BLAS (OpenBLAS on Linux). ``--palettized DIR`` adds a row for ours over a palettized copy (adapters
trained for the fp model do not fit it, so that row serves its own random adapters).
"""

# ruff: noqa: E402  (OpenBLAS must be loaded before mlx is imported)
from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from afm_mlx.core.blas import preload_openblas

preload_openblas()

import httpx
import mlx.core as mx
import numpy as np


def make_adapters(model_dir: Path, out: Path, names: list[str]) -> dict[str, Path]:
    from afm_mlx.adapters.lora import (
        LoRASettings,
        attach_lora,
        lora_layers,
        remove_lora,
        save_adapter,
    )
    from afm_mlx.models.io import load_model, model_fingerprint

    model, _, _ = load_model(model_dir)
    fingerprint = model_fingerprint(model)
    dirs = {}
    for i, name in enumerate(names):
        settings = LoRASettings(rank=16, scale=2.0)
        attach_lora(model, settings, seed=i)
        rng = np.random.default_rng(i)
        for _, layer in lora_layers(model):
            layer.lora_b = mx.array(rng.normal(0, 0.02, layer.lora_b.shape).astype(np.float32))
        dirs[name] = save_adapter(out / name, model, settings, fingerprint)
        remove_lora(model)
    return dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        select.select([], [], [], 0.5)
    raise SystemExit("server did not start in time")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_client(url: str, bodies: list[dict]) -> dict[str, float]:
    """Send ``bodies`` one at a time (streamed); requests/s, TTFT, tokens/s."""
    ttfts, tokens, start = [], 0, time.perf_counter()
    with httpx.Client(base_url=url, timeout=600) as http:
        for body in bodies:
            t0 = time.perf_counter()
            first = None
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                        first = time.perf_counter() - t0
                    tokens += 1 if chunk.get("choices") and chunk["choices"][0].get("text") else 0
            ttfts.append(first if first is not None else time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return {
        "req_s": len(bodies) / elapsed,
        "ttft_ms": 1000 * statistics.median(ttfts),
        "chunks_s": tokens / elapsed,
    }


def bench(name: str, cmd: list[str], port: int, bodies_for, names, args) -> dict[str, float]:
    from afm_mlx.core.blas import find_openblas

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    blas = find_openblas()
    if sys.platform.startswith("linux") and blas:  # both servers on the fast BLAS (like with like)
        env["LD_PRELOAD"] = ":".join(filter(None, [blas, env.get("LD_PRELOAD", "")]))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        run_client(url, [bodies_for(n, 4) for n in names])  # warm: each adapter once
        bodies = [bodies_for(names[i % len(names)], args.max_tokens) for i in range(args.requests)]
        result = run_client(url, bodies)
        result["peak_rss_mb"] = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(
        f"{name:<34} {result['req_s']:>7.2f} req/s  TTFT {result['ttft_ms']:>8.1f} ms  "
        f"{result['chunks_s']:>7.1f} tok/s  peak RSS {result['peak_rss_mb']:>7.1f} MB",
        flush=True,
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "runs/small"))
    p.add_argument("--palettized", default=None, help="also serve this palettized copy (ours)")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise SystemExit(f"--model {model}: no model; train one: python -m afm_mlx.train")
    from afm_mlx.core.blas import backend_report

    print(backend_report(), flush=True)
    prompt = "ROMEO.\nWhat light through yonder window breaks?\n"

    def serve_ours(label: str, model_dir: Path, adapters: dict, order: list) -> dict:
        port = free_port()
        cmd = [sys.executable, "-m", "afm_mlx.server", "--model", str(model_dir), "--port"]
        cmd += [str(port), *[f"--adapter={n}={d}" for n, d in adapters.items()]]
        return bench(
            label,
            cmd,
            port,
            lambda n, k: {"model": n, "prompt": prompt, "max_tokens": k, "temperature": 0.0},
            order,
            args,
        )

    with tempfile.TemporaryDirectory() as tmp:
        names = ["chat", "code"]
        dirs = make_adapters(model, Path(tmp), names)
        print(
            f"{args.requests} streamed requests, {args.max_tokens} tokens each, greedy, adapter "
            f"switched on every request ({', '.join(names)}); model {model}",
            flush=True,
        )
        for switch in (True, False):
            order = names if switch else names[:1]
            label = "adapter switched every request" if switch else "one adapter throughout"
            print(f"-- {label}", flush=True)
            port = free_port()
            peer = bench(
                "mlx_lm.server",
                [sys.executable, "-m", "mlx_lm", "server", "--model", str(model),
                 "--port", str(port)],
                port,
                lambda n, k: {
                    "model": str(model), "adapters": str(dirs[n]), "prompt": prompt,
                    "max_tokens": k, "temperature": 0.0,
                },
                order,
                args,
            )  # fmt: skip
            ours = serve_ours("afm_mlx.server", model, dirs, order)
            print(
                f"ours / mlx-lm ({label}): requests/s {ours['req_s'] / peer['req_s']:.2f}x, "
                f"time to first token {peer['ttft_ms'] / ours['ttft_ms']:.2f}x faster, peak RSS "
                f"{ours['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x",
                flush=True,
            )
        if args.palettized:
            pal = Path(args.palettized)
            pdirs = make_adapters(pal, Path(tmp) / "pal", names)
            serve_ours("afm_mlx.server, palettized base", pal, pdirs, names)


if __name__ == "__main__":
    main()
