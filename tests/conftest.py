"""Shared fixtures. Tests build everything they need locally: no hub, no network."""

from __future__ import annotations

import torch

torch.set_num_threads(1)  # tests run in parallel workers on 2 cores; one thread each avoids thrashing
