"""LoRA adapters: attach, save, load, swap, fuse; over dense, palettized and affine-quantized
layers alike."""
