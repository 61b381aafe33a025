"""The palettized weight: grouped k-means LUTs, bit-packed indices, the layers that compute with
them (``PalettizedLinear``, ``PalettizedEmbedding``, ``palettize_model``), and the LUT-matmul
kernels (CPU extension in ``csrc/``, Metal and CUDA). Knows nothing of models or data; the
calibration passes that choose bits sit in ``afm_mlx.calibration``."""
