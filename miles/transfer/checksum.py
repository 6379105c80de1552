"""SGLang's weight checksum, shared by the side that sends weights and the side that checks them.

The trainer records the checksum of every tensor it sends and asks each engine
for its own (``/weights_checker``), so a weight sync can be verified bit for bit.
"""

from __future__ import annotations

import hashlib

import torch


def tensor_checksum(t: torch.Tensor) -> str:
    """SGLang's weight checksum of one tensor (``weights_checker`` action ``checksum``).

    The first 8 bytes of the SHA-256 of the raw bytes, as 16 hex digits: equal
    checksums mean bit-equal tensors of equal dtype, which is what the weight-sync
    test asserts between the actor and the engines.
    """
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{int.from_bytes(hashlib.sha256(raw.tobytes()).digest()[:8], 'big'):016x}"
