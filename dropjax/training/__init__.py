"""Training: state, the pure train step, device parallelism, checkpoints, loop."""
