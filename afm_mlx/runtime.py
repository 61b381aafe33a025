"""Print the backend: ``python -m afm_mlx.runtime``.

The MLX device, the BLAS in use and its matmul speed (``afm_mlx.core.blas``), and the path
palettized layers take (``afm_mlx.palettization.kernels``).
"""

from __future__ import annotations

from afm_mlx.core.blas import backend_report, ensure_fast_blas


def main(argv: list[str] | None = None) -> None:
    """``python -m afm_mlx.runtime``: print the backend, the BLAS in use and its speed, and the
    path palettized layers take (the LUT kernel, or dequantize + matmul and why)."""
    ensure_fast_blas(argv, module="afm_mlx.runtime")
    from afm_mlx.palettization.kernels import describe

    print(backend_report())
    print(describe())


if __name__ == "__main__":
    main()
