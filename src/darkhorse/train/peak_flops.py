"""Peak FLOP/s of the training device, the denominator of MFU (model FLOPs utilisation).

GPUs come from a table of dense (no-sparsity) tensor-core peaks by device name; on a CPU, or a
GPU not in the table, a short matmul benchmark at the training dtype stands in, once per process.
"""

from __future__ import annotations

import time
from functools import cache

import torch

TERA = 1e12

# (substring of the device name, peak for 16-bit training, peak for fp32 training), dense.
# fp32 training uses TF32 tensor cores where the GPU has them, as torch does with high matmul precision.
GPU_PEAKS: list[tuple[str, float, float]] = [
    ("H200", 989 * TERA, 494 * TERA),
    ("H100 PCIe", 756 * TERA, 378 * TERA),
    ("H100", 989 * TERA, 494 * TERA),  # SXM and NVL
    ("A100", 312 * TERA, 156 * TERA),
    ("L40S", 362 * TERA, 183 * TERA),
    ("L4", 121 * TERA, 60 * TERA),
    ("A10G", 70 * TERA, 35 * TERA),
    ("RTX 4090", 165 * TERA, 83 * TERA),
    ("RTX 3090", 71 * TERA, 36 * TERA),
    ("MI300X", 1307 * TERA, 654 * TERA),
]

# Apple GPUs (MPS), matched only on MPS: no 16-bit speed-up in practice, so one figure serves both.
APPLE_PEAKS: list[tuple[str, float, float]] = [
    ("M3 Max", 16 * TERA, 16 * TERA),
    ("M2 Ultra", 27 * TERA, 27 * TERA),
    ("M2 Max", 14 * TERA, 14 * TERA),
    ("M1 Ultra", 21 * TERA, 21 * TERA),
    ("M1 Max", 10 * TERA, 10 * TERA),
    ("M3", 4 * TERA, 4 * TERA),
    ("M2", 3.6 * TERA, 3.6 * TERA),
    ("M1", 2.6 * TERA, 2.6 * TERA),
]


def _dtype_of(dtype: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        import platform

        return platform.processor() or "Apple GPU"
    return "cpu"


def table_peak(name: str, dtype: str, table: list[tuple[str, float, float]] = GPU_PEAKS) -> float | None:
    """Peak FLOP/s for a device name from the table, or None when it is not listed."""
    for key, half, full in table:
        if key.lower() in name.lower():
            return half if dtype in ("bf16", "fp16") else full
    return None


@cache
def measured_peak(device_type: str, dtype: str, size: int = 512, repeats: int = 8) -> float:
    """Best-of FLOP/s of a square matmul at the training dtype (once per process and dtype)."""
    device = torch.device(device_type)
    torch_dtype = _dtype_of(dtype)
    generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG (training's) untouched
    a = torch.randn(size, size, device=device, dtype=torch_dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=torch_dtype, generator=generator)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, dtype: str) -> float:
    if device.type == "cpu":
        return measured_peak("cpu", dtype)
    table = APPLE_PEAKS if device.type == "mps" else GPU_PEAKS
    return table_peak(device_name(device), dtype, table) or measured_peak(device.type, dtype)
