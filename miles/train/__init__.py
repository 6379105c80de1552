"""The training half of the loop: the actor interface, its batches and the FSDP2 backend."""
