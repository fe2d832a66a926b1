"""Config layering, type coercion and the errors a typo gets."""

from __future__ import annotations

import pytest

from darkhorse.config import list_presets, load_run_config, parse_overrides
from darkhorse.errors import ConfigError


def test_overrides_are_coerced_by_field_type():
    config = load_run_config("tiny-cpu", overrides=["train.lr=3e-4", "model.n_layers=4", "train.compile=true"])
    assert config.train.lr == pytest.approx(3e-4) and isinstance(config.train.lr, float)
    assert config.model.n_layers == 4
    assert config.train.compile is True


def test_layers_apply_in_order(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("train:\n  lr: 1.0e-3\n  batch_size: 2\n")
    config = load_run_config("tiny-cpu", config_file=user, overrides=["train.batch_size=3"])
    assert config.train.lr == pytest.approx(1e-3)
    assert config.train.batch_size == 3
    assert config.model.dim == 192  # from the preset


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [("train.lrr=1", "train.lr"), ("model.n_layer=2", "model.n_layers"), ("modle.dim=4", "model.dim")],
)
def test_unknown_key_names_closest_valid_keys(override, suggestion):
    with pytest.raises(ConfigError, match=f"unknown config key .*{suggestion}"):
        load_run_config("tiny-cpu", overrides=[override])


def test_bad_values_and_presets_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="expects int"):
        load_run_config("tiny-cpu", overrides=["model.n_layers=two"])
    with pytest.raises(ConfigError, match="divisible"):
        load_run_config("tiny-cpu", overrides=["model.n_heads=5"])
    with pytest.raises(ConfigError, match="unknown preset 'tiny-gpu'.*tiny-cpu"):
        load_run_config("tiny-gpu")
    with pytest.raises(ConfigError, match="key=value|section.key=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(config_file=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
        load_run_config("tiny-cpu", overrides=["train.seq_len=4096"])


def test_every_preset_loads():
    names = list_presets()
    assert {"tiny-cpu", "d20", "forge-nano", "forge-mini"} <= set(names)
    for name in names:
        assert load_run_config(name).name == name


def test_one_override_restores_the_classic_recipe_and_user_settings_still_win(tmp_path):
    tuned = load_run_config("tiny-cpu")
    assert (tuned.train.optimizer, tuned.train.schedule, tuned.model.qk_norm) == ("muon", "wsd", True)
    classic = load_run_config("tiny-cpu", overrides=["train.recipe=classic"])
    assert (classic.train.optimizer, classic.train.schedule, classic.train.embedding_lr, classic.train.head_lr) == (
        "adamw", "cosine", 0, 0,
    )  # fmt: skip
    assert (classic.model.qk_norm, classic.model.tie_embeddings) == (False, True)
    assert classic.model.dim == tuned.model.dim and classic.train.lr == tuned.train.lr  # the shape stays
    user = tmp_path / "user.yaml"
    user.write_text("train:\n  recipe: classic\n  schedule: wsd\n")
    mixed = load_run_config("tiny-cpu", config_file=user, overrides=["model.qk_norm=true"])
    assert (mixed.train.optimizer, mixed.train.schedule, mixed.model.qk_norm) == ("adamw", "wsd", True)
    assert load_run_config("tiny-cpu", config_file=user, overrides=["train.recipe=tuned"]).train.optimizer == "muon"
    with pytest.raises(ConfigError, match="train.recipe must be one of tuned, classic"):
        load_run_config("tiny-cpu", overrides=["train.recipe=old"])
