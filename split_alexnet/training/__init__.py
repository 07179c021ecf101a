"""Training: the config, the paper's optimizer and schedule, the trainer, checkpoints, DDP, metrics."""
