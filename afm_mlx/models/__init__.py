"""Models: presets and building, checkpoints in and out, half precision on the CPU, and passes
that stream blocks from disk."""
