"""launcher: one training recipe from a laptop CPU to many GPUs and Slurm, with an exact LR recipe."""

__version__ = "0.1.0"
