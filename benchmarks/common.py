"""Helpers shared by the benchmarks: machine ceilings and load reporting."""

from __future__ import annotations

import os
import time

import torch


def measured_copy_bandwidth(nbytes: int = 256 << 20, rounds: int = 5) -> float:
    """This machine's copy bandwidth in bytes/s (bytes read + bytes written per second)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def measured_gemm_rate(n: int = 2048, rounds: int = 3) -> float:
    """fp32 GEMM rate in FLOP/s with torch's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def load_note() -> str:
    """One-minute load average against the core count, to flag a busy machine in the results."""
    load1 = os.getloadavg()[0]
    return f"load1={load1:.2f} on {os.cpu_count()} cores"
