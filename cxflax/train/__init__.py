"""Training: state, losses, optimizers, sharded steps, checkpoints, metrics and the loop."""
