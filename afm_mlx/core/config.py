"""Shared CLI plumbing: one config dataclass per stage is the single source of truth.

``build_parser`` derives the flags from the dataclass fields (help text from field metadata),
``parse_config`` merges ``--config file.yaml`` with the flags given on the command line,
``run_main`` turns a ``UserError`` into one line on stderr and exit code 2, and ``stage_main`` is
the ``main()`` of every pipeline stage (fast BLAS, flags -> config, run).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from afm_mlx.core.errors import UserError

__all__ = ["UserError", "build_parser", "parse_config", "run_main", "stage_main"]

T = TypeVar("T")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """Strip Optional[...] so argparse gets the concrete type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of dataclass ``cls`` plus ``--config``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=str, help="YAML file with any of the options below")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = _base_type(hints[field.name])
        default = (
            field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        )
        help_text = field.metadata.get("help", "")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": field.name}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = f"{help_text} (default: {default})"
        elif typing.get_origin(tp) is list:
            # Repeating a list flag adds to it (``--adapter a --adapter b`` is both), as
            # ``--adapter a b`` does.
            kwargs["action"] = "extend"
            kwargs["nargs"] = "+"
            kwargs["type"] = typing.get_args(tp)[0]
            kwargs["help"] = f"{help_text} (default: {default})"
        else:
            kwargs["type"] = tp
            choices = field.metadata.get("choices")
            shown = f"; one of {', '.join(map(str, choices))}" if choices else ""
            kwargs["help"] = f"{help_text} (default: {default}{shown})"
        parser.add_argument(_flag(field.name), **kwargs)
    return parser


def config_from_dict(cls: type[T], values: dict[str, Any], source: str) -> T:
    """Build ``cls`` from a dict, refusing unknown keys (``source`` names where they came from)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"{source}: unknown option(s) {', '.join(unknown)}")
    # Choices are checked here rather than by argparse so YAML and flags get the same one-line error.
    for name, value in values.items():
        choices = fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise UserError(
                f"{_flag(name)} {value!r} is not valid; choose one of: {', '.join(map(str, choices))}"
            )
    return cls(**values)


def parse_config(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """Defaults < YAML file (``--config``) < flags given on the command line."""
    parser = build_parser(cls, prog, description)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    values: dict[str, Any] = {}
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise UserError(f"--config {path}: file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from e
        if not isinstance(loaded, dict):
            raise UserError(f"--config {path}: expected a mapping of option: value")
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        translate = getattr(cls, "translate_config", None)  # e.g. mlx-lm's LoRA YAML keys
        values.update(translate(loaded, f"--config {path}") if translate else loaded)
    values.update(args)
    return config_from_dict(cls, values, f"--config {config_path}" if config_path else prog)


def run_main(fn: Callable[[], Any]) -> None:
    """Run a CLI body; a ``UserError`` becomes one line on stderr and exit status 2."""
    try:
        fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def stage_main(
    cls: type[T],
    run: Callable[[T], Any],
    prog: str,
    doc: str | None,
    argv: list[str] | None = None,
    fast_blas: bool = True,
) -> None:
    """``python -m afm_mlx.<stage>`` (``prog``) and its console script: re-exec with the fast BLAS
    (Linux) when ``fast_blas``, parse
    ``cls`` from the flags / ``--config`` (description: the first line of ``doc``), then
    ``run(config)``; bad input is one line and exit status 2."""
    if fast_blas:
        from afm_mlx.core import blas

        # The module to re-run is named explicitly: a console script (``afm-train``) has no
        # ``python -m`` spec to recover it from.
        blas.ensure_fast_blas(argv, module=prog.removeprefix("python -m ").split()[0])
    description = (doc or prog).strip().splitlines()[0]
    run_main(lambda: run(parse_config(cls, argv, prog, description)))
