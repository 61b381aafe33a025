"""afm_mlx: Apple's on-device foundation-model recipe, in MLX."""

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def load(path_or_repo, lazy: bool = False):
    """Open an afm_mlx checkpoint (folder or HF repo id): returns (model, tokenizer)."""
    from afm_mlx.models.io import load as _load

    return _load(path_or_repo, lazy=lazy)
