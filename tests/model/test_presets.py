"""Presets count what their names say; bad Genesis configs fail at config time with the knob named."""

from __future__ import annotations

import re

import pytest
import torch

from darkhorse.cli import main
from darkhorse.config import list_presets, load_run_config
from darkhorse.errors import ConfigError, DarkhorseError
from darkhorse.interop.capabilities import architecture_refusals
from darkhorse.model import Transformer

NAMED_SIZES = {"tiny-cpu": 2.8e6, "d20": 18e6, "forge-nano": 125e6, "forge-mini": 350e6,
               "genesis-1b": 1e9, "genesis-5b": 5e9, "genesis-30b": 30e9, "genesis-500b": 500e9}  # fmt: skip


def on_meta(preset: str) -> Transformer:
    with torch.device("meta"):
        return Transformer(load_run_config(preset).model)


@pytest.mark.parametrize("preset", sorted(NAMED_SIZES))
def test_preset_size_matches_its_name(preset):
    """Dense presets within 5%; Genesis within 10% (main model, as DeepSeek counts: MTP excluded)."""
    model = on_meta(preset)
    counted = model.num_params() - sum(p.numel() for p in model.mtp.parameters())
    tolerance = 0.10 if preset.startswith("genesis") else 0.05
    assert abs(counted / NAMED_SIZES[preset] - 1) <= tolerance, f"{preset}: {counted:,}"


def test_genesis_5b_activates_about_1_2b():
    model = on_meta("genesis-5b")
    assert abs(model.num_active_params() / 1.2e9 - 1) <= 0.10


@pytest.mark.parametrize(
    "preset", ["genesis-tiny", "genesis-512", "genesis-1b", "genesis-5b", "genesis-30b", "genesis-500b"]
)
def test_genesis_presets_are_the_headline_architecture_with_k_quant_sizes(preset):
    config = load_run_config(preset).model
    assert (config.attention, config.ffn, config.residual) == ("mla", "moe", "plain")
    assert config.mtp_depth >= 1 and config.moe.bias_update_rate > 0
    assert config.mla.q_lora_rank > 0  # llama.cpp's deepseek2 takes uncompressed queries only in the Lite shape
    for size in (
        config.dim,
        config.ffn_dim,
        config.moe.moe_intermediate_size,
        config.mla.q_lora_rank,
        config.mla.kv_lora_rank,
        config.n_heads * config.mla.v_head_dim,
    ):
        assert size < 256 or size % 256 == 0, (preset, size)
    if config.max_seq_len > 4096:
        assert config.rope_scaling.type == "yarn"
        assert config.rope_scaling.factor * config.rope_scaling.original_max_seq_len >= config.max_seq_len


def test_params_alias_prints_total_active_and_mla_cache(capsys):
    assert main(["params", "--params", "5b"]) == 0
    out = capsys.readouterr().out
    assert "genesis-5b" in out
    for row in (
        "total parameters",
        "active parameters per token",
        "training FLOPs per token",
        "KV cache per token",
        "GQA of the same width",
        "training memory per device",
    ):
        assert row in out
    assert re.search(r"active parameters per token.*\(1\.2\dB\)", out)


@pytest.mark.parametrize(
    ("override", "knob"),
    [
        ("model.moe.experts_per_token=9", "model.moe.experts_per_token"),
        ("model.mla.qk_rope_head_dim=15", "model.mla.qk_rope_head_dim"),
        ("model.n_heads=5", "model.n_heads"),
        ("model.moe.n_groups=3", "model.moe.n_groups"),
        ("model.moe.topk_groups=2", "model.moe.topk_groups"),
        ("model.moe.first_k_dense=9", "model.moe.first_k_dense"),
        ("model.moe.scoring=relu", "model.moe.scoring"),
        ("model.moe.n_domains=300", "model.moe.n_domains"),
        ("model.moe.bias_update_rate=-1", "model.moe.bias_update_rate"),
        ("model.mhc.expansion=0", "model.mhc.expansion"),
    ],
)
def test_bad_genesis_config_is_a_config_error_naming_the_knob(override, knob, monkeypatch):
    allocations = []
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda *a, **k: allocations.append(1))
    with pytest.raises(ConfigError, match=re.escape(knob)):
        load_run_config("genesis-tiny", overrides=[override])
    assert allocations == []  # nothing was built


def test_domain_prior_without_domain_count_is_refused():
    config = load_run_config("genesis-tiny", overrides=["model.moe.domain_prior=true"])
    with pytest.raises(DarkhorseError, match="model.moe.n_domains"):
        Transformer(config.model)


def test_cli_reports_bad_config_as_one_line(capsys):
    assert main(["params", "--preset", "genesis-tiny", "model.moe.experts_per_token=99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("darkhorse: error: ") and "experts_per_token" in err and err.count("\n") == 1


# presets whose measured winner is a block no export target computes, and the one override that exports
DARKHORSE_ONLY = {"genesis-demo": "model.smear=none"}  # the CPU demo: the smear wins its goals (issue 17)


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_exports_and_restores_its_classic_recipe_with_one_override(preset):
    """Issue 17: a preset's defaults are the measured winners that its export target can hold (or, for the
    demo, one override away), and train.recipe=classic brings back its recipe from before (same shape, same size)."""
    tuned = load_run_config(preset)
    classic = load_run_config(preset, overrides=["train.recipe=classic"])
    if preset in DARKHORSE_ONLY:
        assert architecture_refusals(tuned.model)
        tuned = load_run_config(preset, overrides=[DARKHORSE_ONLY[preset]])
        classic = load_run_config(preset, overrides=["train.recipe=classic", DARKHORSE_ONLY[preset]])
    assert architecture_refusals(tuned.model) == [] == architecture_refusals(classic.model)
    assert (classic.model.dim, classic.model.n_layers, classic.model.vocab_size) == (
        tuned.model.dim, tuned.model.n_layers, tuned.model.vocab_size,
    )  # fmt: skip
    assert classic.train.optimizer in (tuned.train.optimizer, "adamw")
    assert classic.train.schedule in (tuned.train.schedule, "cosine")
