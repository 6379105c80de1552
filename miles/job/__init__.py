"""What a rank knows of its job: its role and torch.distributed settings, the host list, the run directory.

Every runtime package below the launcher reads the job through these modules,
whether the job is a Slurm allocation or ``miles run`` on one machine.
"""
