"""Starting a run: ``miles submit`` (Slurm), ``miles run`` (this machine), and the entry every rank runs."""
