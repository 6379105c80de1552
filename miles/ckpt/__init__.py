"""Checkpoints on disk: atomic commits of the whole RL state, and which spec changes a resume accepts."""
