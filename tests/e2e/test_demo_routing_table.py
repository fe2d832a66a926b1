"""The demo's routing table names each isolated expert's domain, so the isolation shows."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console

from darkhorse.commands.demo import _routing_table
from darkhorse.config import load_run_config
from darkhorse.model import Transformer


@pytest.mark.parametrize("free_layers", [0, 1])
def test_isolated_experts_are_headed_by_their_groups_domain(free_layers):
    overrides = ["model.n_layers=2", "model.dim=32", "model.n_heads=4", "model.ffn=moe", "model.vocab_size=64"]
    overrides += ["model.moe.n_routed_experts=6", "model.moe.n_domains=3", "model.moe.domain_routing=isolated"]
    overrides += [f"model.moe.isolated_from_layer={free_layers}"]
    overrides += ["model.moe.moe_intermediate_size=16", "model.moe.first_k_dense=0"]
    torch.manual_seed(0)
    model = Transformer(load_run_config("genesis-tiny", overrides=overrides).model).eval()
    tokens, domains = np.arange(64, dtype=np.uint16), np.repeat(np.arange(3, dtype=np.uint8), [22, 21, 21])
    prepared = SimpleNamespace(
        tokens=lambda split: tokens, domains=lambda split: domains, domain_names=["lists", "math", "code"]
    )
    table, report = _routing_table(model, prepared, seq_len=16)
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    header = next(line for line in text.splitlines() if "layer / domain" in line)
    assert [cell.strip() for cell in header.split("┃")[2:-1]] == ["lists"] * 2 + ["math"] * 2 + ["code"] * 2
    assert report["domains"] == ["lists", "math", "code"]
    # a layer before isolated_from_layer has groups that are not domains: its row says so
    assert ("layer 0 (routes freely)" in text) == bool(free_layers) and "layer 1 (routes freely)" not in text
