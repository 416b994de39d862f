"""Helpers for bench/ scripts: the machine description and the final ``RESULT`` line."""
from __future__ import annotations

import json
import os
import platform
import time

import torch


def machine_info() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    return info


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Print a list of dicts as an aligned plain-text table."""
    if not rows:
        print("(no rows)")
        return
    columns = columns or list(rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def print_result(figures: dict, settings: dict) -> None:
    """The benchmark's last line: ``RESULT {json}`` (see CONVENTIONS.md)."""
    payload = {"figures": figures, "settings": settings, "machine": machine_info()}
    print("RESULT " + json.dumps(payload, sort_keys=True, default=str))


def measure_matmul_peak_flops(n: int = 1024, repeats: int = 10, dtype=torch.float32, device="cpu") -> float:
    """Measured dense matmul FLOP/s on this device: the MFU denominator on a CPU."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return 2 * n**3 * repeats / dt
