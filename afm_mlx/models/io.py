"""Finding and loading checkpoints in the Hugging Face layout (``models.files`` writes them).

Checkpoints are ``config.json`` + ``model.safetensors`` (sharded with an index when large) +
tokenizer files, which ``mlx_lm.load`` and ``transformers.AutoModelForCausalLM`` open unchanged; a
palettized checkpoint records its layers' settings under ``palettization`` in ``config.json``.
``--model`` may also name a ``.gguf`` file or a known model (``smollm2``): see
``resolve_model_path``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from afm_mlx.core.errors import UserError
from afm_mlx.core.fileio import load_safetensors, read_json
from afm_mlx.models.catalog import KNOWN_MODELS, known_model_file
from afm_mlx.models.files import weight_files
from afm_mlx.models.gguf import GGUF_SUFFIX, imported
from afm_mlx.models.presets import build_model, validate_config


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's stored weights (names, shapes, dtypes, bytes).

    Adapters record the fingerprint of the base they were trained on, so loading them onto a
    different base (another checkpoint, or the same one palettized differently) is refused.
    """
    h = hashlib.sha256()
    for name, p in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(memoryview(mx.contiguous(p).reshape(-1).view(mx.uint8)))  # raw bytes, any dtype
    return h.hexdigest()[:16]


def resolve_model_path(path_or_repo: str | Path) -> Path:
    """The checkpoint folder ``--model`` names, in this order: an existing folder; an existing
    ``.gguf`` file (imported once into the cache, ``models.gguf``); a known model's name
    (``models.catalog``: ``smollm2``); a Hugging Face repo id fetched with huggingface-hub."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == GGUF_SUFFIX:
            return imported(path)
        if not path.is_dir():
            raise UserError(
                f"{path}: expected a model folder (config.json + *.safetensors) or a .gguf file"
            )
        return path
    if str(path_or_repo) in KNOWN_MODELS:
        return imported(known_model_file(str(path_or_repo)))
    repo = str(path_or_repo)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise UserError(
            f"{repo}: no such model folder or .gguf file (and not a known model: "
            f"{', '.join(KNOWN_MODELS)}, nor a Hugging Face repo id)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo,
                allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"],
            )
        )
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{repo}: not a local folder and could not be fetched ({msg})") from e


def checkpoint_digest(path_or_repo: str | Path) -> str:
    """A cheap digest of a checkpoint: its config.json bytes and each weight file's name and
    size (ranks of one run compare these before they start)."""
    path = resolve_model_path(path_or_repo)
    h = hashlib.sha256(
        (path / "config.json").read_bytes() if (path / "config.json").is_file() else b""
    )
    for f in weight_files(path):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    return h.hexdigest()


def check_weights_match(
    model: nn.Module, shapes: dict[str, tuple[tuple[int, ...], str]], source: str
) -> None:
    """Compare checkpoint names/shapes with the model's; list every mismatch in one error."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    problems = [f"missing {k}" for k in sorted(set(expected) - set(shapes))]
    problems += [f"unexpected {k}" for k in sorted(set(shapes) - set(expected))]
    problems += [
        f"{k} has shape {shapes[k][0]}, expected {expected[k]}"
        for k in sorted(set(expected) & set(shapes))
        if shapes[k][0] != expected[k]
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (
            f"; ... {len(problems) - 8} more" if len(problems) > 8 else ""
        )
        raise UserError(f"{source}: weights do not match config.json: {shown}")


def load_model(
    path_or_repo: str | Path, lazy: bool = False
) -> tuple[nn.Module, dict[str, Any], Path]:
    """Load a checkpoint folder or hub repo; returns (model, config, resolved path)."""
    path = resolve_model_path(path_or_repo)
    config = read_json(path / "config.json", "model config (config.json)")
    validate_config(config, str(path / "config.json"))
    model = build_model(config)
    if "palettization" in config:
        from afm_mlx.palettization.layers import apply_palettization_config

        try:
            apply_palettization_config(model, config["palettization"])
        except ValueError as e:
            raise UserError(f"{path / 'config.json'}: {e}") from e
    files = weight_files(path)
    if not files:
        raise UserError(f"{path}: no model*.safetensors weights found")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(load_safetensors(f))  # lazy: nothing is read before the checks pass
    if hasattr(model, "sanitize"):
        # Once: some families' sanitize changes the model too (Gemma drops its untied head).
        weights = model.sanitize(weights)
    shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in weights.items()}
    check_weights_match(model, shapes, str(path))
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config, path


def load(path_or_repo: str | Path, lazy: bool = False):
    """Open any afm_mlx (or qwen3/llama-family) checkpoint: returns (model, tokenizer).

    The tokenizer is mlx-lm's ``TokenizerWrapper`` (streaming detokenizer included).
    """
    from mlx_lm.utils import load_tokenizer

    model, config, path = load_model(path_or_repo, lazy=lazy)
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:
        raise UserError(f"{path}: could not load the tokenizer ({e})") from e
    return model, tokenizer


def load_base(path_or_repo: str | Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer, config) of a base for adapters: afm_mlx checkpoints of any kind, and
    mlx-lm affine-quantized ones (for QLoRA comparisons)."""
    from mlx_lm.utils import load_tokenizer

    path = resolve_model_path(path_or_repo)
    config = read_json(path / "config.json", "model config (config.json)")
    try:
        model, config, path = load_model(path)
    except UserError:
        # afm_mlx's loader is authoritative; an mlx-lm affine-quantized checkpoint it does not
        # know is opened by mlx-lm itself.
        if "quantization" not in config:
            raise
        from mlx_lm.utils import load_model as mlx_lm_load_model

        model, config = mlx_lm_load_model(path)
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:
        raise UserError(f"{path}: could not load the tokenizer ({e})") from e
    model.eval()
    return model, tokenizer, config
