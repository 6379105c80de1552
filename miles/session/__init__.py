"""One trainer rank's run: its components, run state and checkpoints, stop control, metrics and phase timing."""
