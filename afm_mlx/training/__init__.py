"""Training: the loop, optimizer and checkpoints every training command shares, the distributed
world, memory planning, the blockwise step, losses, adapter training and the run report."""
