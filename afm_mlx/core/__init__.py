"""The ground floor: the one error type, atomic file writes and locks, the command-line
plumbing every command shares, the fast BLAS, and the model families mlx-lm knows."""
