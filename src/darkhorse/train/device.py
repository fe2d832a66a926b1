"""Which device to train on, how much memory the run used, and what to do when it runs out."""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator

import torch

from darkhorse.config import RunConfig
from darkhorse.errors import DarkhorseError
from darkhorse.train.memory import GIB


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda > mps > cpu; an explicit device that is missing is an error."""
    has_mps = torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DarkhorseError(f"--device {name}: no CUDA GPU is visible to torch; use --device cpu or auto")
    if name == "mps" and not has_mps:
        raise DarkhorseError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DarkhorseError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None


def memory_in_use(device: torch.device) -> float:
    """GiB: peak allocated on a GPU, peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    if device.type == "mps":
        return torch.mps.current_allocated_memory() / GIB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / GIB


def out_of_memory_advice(config: RunConfig, device: torch.device) -> str:
    train = config.train
    knobs = [
        f"train.batch_size (now {train.batch_size})",
        f"train.seq_len (now {train.seq_len})",
        f"train.grad_checkpointing=true (now {str(train.grad_checkpointing).lower()})",
        f"train.dtype=bf16 (now {train.dtype})",
        f"train.grad_accum to keep tokens per step while shrinking the micro-batch (now {train.grad_accum})",
        "a smaller preset",
    ]
    return f"out of memory on {device}; turn these knobs, in order: " + ", ".join(knobs)


def is_out_of_memory(exc: BaseException) -> bool:
    """A GPU out-of-memory error, or the plain RuntimeError torch raises when CPU memory runs out."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("DefaultCPUAllocator" in text or "not enough memory" in text)


@contextlib.contextmanager
def out_of_memory_as_advice(config: RunConfig, device: torch.device) -> Iterator[None]:
    """Turn running out of memory (GPU or CPU) into a DarkhorseError with `out_of_memory_advice`."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise DarkhorseError(out_of_memory_advice(config, device)) from None
