"""Training: token caches, data order (streams, random windows), checkpoints, and the
backbone pretraining loop. The adaptation trainer reuses `state`, `streams` and `tokens`."""
