"""Training: state, losses, optimizers, sharded steps, checkpoints, metrics, and one module per
mode of the main job (train, evaluate, predict, lr_find)."""
