"""The training engine: trainers, strategies, distributed ranks, checkpoints, run directories\nand the flows that tie them into a run."""
