"""Import a GGUF checkpoint: ``python -m afm_mlx.import_gguf --gguf FILE --out DIR [--dtype float32]``.

Writes the model in the Hugging Face layout (``config.json``, ``model.safetensors``, tokenizer
with its chat template) that mlx-lm, transformers and every afm_mlx stage read alike. ``--gguf``
also takes a known model's name (``smollm2``). Every stage's ``--model`` accepts a ``.gguf`` file
or a known name directly (imported once into the cache); this command is for a folder of your own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from afm_mlx.core.config import stage_main
from afm_mlx.core.errors import UserError
from afm_mlx.core.fileio import check_new_output, output_lock
from afm_mlx.models.catalog import KNOWN_MODELS, known_model_file
from afm_mlx.models.gguf import DTYPES, import_gguf


@dataclass
class ImportConfig:
    gguf: str = field(
        default="", metadata={"help": f"GGUF file, or a known model: {', '.join(KNOWN_MODELS)}"}
    )
    out: str = field(default="", metadata={"help": "output folder (new)"})
    dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the written weights", "choices": list(DTYPES)},
    )


def run(cfg: ImportConfig) -> Path:
    if not cfg.gguf or not cfg.out:
        raise UserError("--gguf and --out are required")
    source = known_model_file(cfg.gguf) if cfg.gguf in KNOWN_MODELS else Path(cfg.gguf)
    out = Path(cfg.out)
    check_new_output(out)
    with output_lock(out):
        check_new_output(out)
        import_gguf(source, out, cfg.dtype)
    print(f"imported {source.name} to {out} ({cfg.dtype})")
    return out


def main(argv: list[str] | None = None) -> None:
    stage_main(ImportConfig, run, "python -m afm_mlx.import_gguf", __doc__, argv)


if __name__ == "__main__":
    main()
