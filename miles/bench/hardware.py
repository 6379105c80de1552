"""What the hardware can do at best: peak dense matmul FLOP/s and memory bandwidth per card.

MFU divides achieved model FLOP/s by the card's peak; the decode roofline divides
the card's memory bandwidth by the bytes read per step. Both come from a flag
(``--peak-tflops``, ``--mem-bw-gbs``) or from the table below, matched on
``torch.cuda.get_device_name()``. Where neither applies (a CPU), the benchmark
measures a reference in the same run instead (a matmul, a memory copy) and
says so in the ``*_source`` field.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    name: str
    match: tuple[str, ...]
    """Lower-case substrings that must all occur in ``torch.cuda.get_device_name()``."""
    bf16_tflops: float
    """Dense (no sparsity) BF16 tensor-core peak, TFLOP/s, from the vendor's datasheet."""
    mem_bw_gbs: float
    """HBM/GDDR bandwidth, GB/s (10^9 bytes), from the vendor's datasheet."""


CARDS: tuple[Card, ...] = (
    Card("H200", ("h200",), 989.0, 4800.0),
    Card("GH200", ("gh200",), 989.0, 4000.0),
    Card("H100 PCIe", ("h100", "pcie"), 756.0, 2000.0),
    Card("H100 NVL", ("h100", "nvl"), 835.0, 3900.0),
    Card("H100 SXM", ("h100",), 989.0, 3350.0),
    Card("B200", ("b200",), 2250.0, 8000.0),
    Card("A100 40GB", ("a100", "40gb"), 312.0, 1555.0),
    Card("A100 80GB PCIe", ("a100", "80gb", "pcie"), 312.0, 1935.0),
    Card("A100 80GB SXM", ("a100",), 312.0, 2039.0),
    Card("L40S", ("l40s",), 362.0, 864.0),
    Card("A10G", ("a10g",), 70.0, 600.0),
    Card("A10", ("a10",), 125.0, 600.0),
    Card("L4", ("l4",), 121.0, 300.0),
)
"""Known cards, most specific first (the first whose substrings all match wins)."""


def card_for(device_name: str) -> Card | None:
    low = device_name.lower()
    for card in CARDS:
        if all(m in low for m in card.match):
            return card
    return None


def device_name(device: str) -> str:
    """``NVIDIA H100 80GB HBM3`` on a GPU, the CPU model (or ``cpu``) otherwise."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return str(torch.cuda.get_device_name(dev))
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def synchronize(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def measured_matmul_tflops(device: str, dtype: str, size: int = 2048, seconds: float = 0.5) -> float:
    """Achieved TFLOP/s of square ``size`` matmuls in ``dtype`` on ``device`` (a same-run reference)."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(size, size, device=device).to(dt)
    b = torch.randn(size, size, device=device).to(dt)
    torch.matmul(a, b)
    synchronize(device)
    n, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        n += 1
        if n % 4 == 0:
            synchronize(device)
            if time.perf_counter() - start >= seconds:
                break
    elapsed = time.perf_counter() - start
    return 2.0 * size**3 * n / elapsed / 1e12


def measured_copy_gbs(device: str, nbytes: int = 256 << 20, iters: int = 5) -> float:
    """Achieved memory bandwidth of a device-to-device copy, GB/s counting read + write (best of ``iters``)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(iters):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * nbytes / best / 1e9


def peak_tflops(device: str, dtype: str, flag: float | None) -> tuple[float | None, str]:
    """Peak dense TFLOP/s and where it came from (``flag``, ``table:<card>``, or None on an unknown device)."""
    if flag is not None:
        return flag, "flag"
    card = card_for(device_name(device)) if device.startswith("cuda") else None
    if card is None:
        return None, "unknown (pass --peak-tflops)"
    if dtype == "float32":  # TF32 tensor cores: half the BF16 rate on Ampere/Hopper
        return card.bf16_tflops / 2, f"table:{card.name} (tf32)"
    return card.bf16_tflops, f"table:{card.name}"


def memory_bandwidth_gbs(device: str, flag: float | None) -> tuple[float, str]:
    """Memory bandwidth and its source: the flag, the card table, else a copy measured now."""
    if flag is not None:
        return flag, "flag"
    card = card_for(device_name(device)) if device.startswith("cuda") else None
    if card is not None:
        return card.mem_bw_gbs, f"table:{card.name}"
    return measured_copy_gbs(device), "measured copy (read+write)"
