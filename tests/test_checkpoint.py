"""Checkpoint format: atomic saves, keep-last-N, safe loading, RNG state."""

from __future__ import annotations

import json
import random

import pytest
import torch

from darkhorse import checkpoint as ckpt
from darkhorse.config import load_run_config
from darkhorse.errors import DarkhorseError
from darkhorse.files import PARTIAL_MARK
from darkhorse.model import Transformer

TINY = ["model.n_layers=1", "model.dim=32", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=64",
        "model.vocab_size=64", "model.tie_embeddings=true"]  # fmt: skip


@pytest.fixture
def model_and_config():
    config = load_run_config("tiny-cpu", overrides=TINY)
    torch.manual_seed(0)
    return Transformer(config.model), config


def save(folder, model, config, step):
    return ckpt.save_training_checkpoint(folder, model, config, None, {"step": step}, {"step": step})


def test_tied_weights_are_stored_once_and_load_back(tmp_path, model_and_config):
    model, config = model_and_config
    folder = ckpt.save_model_checkpoint(tmp_path / "ckpt", model, config, None, {"step": 7})
    from safetensors import safe_open

    with safe_open(str(folder / ckpt.MODEL_FILE), "pt") as handle:
        keys = set(handle.keys())
    assert ("embed.weight" in keys) != ("lm_head.weight" in keys)
    loaded, loaded_config, meta = ckpt.load_model(folder)
    assert loaded_config == config and meta["step"] == 7 and "darkhorse_version" in meta
    assert loaded.lm_head.weight is loaded.embed.weight
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    assert not (folder / ckpt.STATE_FILE).exists()  # no trainer state: fine-tuning starts fresh


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path, model_and_config, monkeypatch):
    model, config = model_and_config
    save(tmp_path / ckpt.step_name(1), model, config, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash)  # dies after model.safetensors and meta.json are written
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path / ckpt.step_name(2), model, config, 2)
    assert not (tmp_path / ckpt.step_name(2)).exists()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / ckpt.step_name(1)
    loaded, _, meta = ckpt.load_model(ckpt.latest_checkpoint(tmp_path))
    assert meta["step"] == 1 and not torch.equal(loaded.embed.weight, model.embed.weight)


def test_a_process_killed_mid_save_leaves_only_a_hidden_temp_dir(tmp_path, model_and_config):
    model, config = model_and_config
    save(tmp_path / ckpt.step_name(1), model, config, 1)
    # what a SIGKILL between writing files and the rename leaves behind
    half = tmp_path / f".{ckpt.step_name(2)}{PARTIAL_MARK}99999999-x"  # a pid no process has
    (half / ckpt.step_name(2)).mkdir(parents=True)
    (half / ckpt.step_name(2) / ckpt.META_FILE).write_text(json.dumps({"config": config.to_dict(), "step": 2}))
    assert ckpt.training_checkpoints(tmp_path) == [tmp_path / ckpt.step_name(1)]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / ckpt.step_name(1)
    ckpt.remove_stale_temp_dirs(tmp_path)
    assert not half.exists() and (tmp_path / ckpt.step_name(1)).exists()


def test_keep_last_n_and_final_survives(tmp_path, model_and_config):
    model, config = model_and_config
    for step in (1, 2, 3, 4, 5):
        save(tmp_path / ckpt.step_name(step), model, config, step)
    save(tmp_path / ckpt.FINAL_NAME, model, config, 6)
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in removed] == [ckpt.step_name(s) for s in (1, 2, 3)]
    assert [p.name for p in ckpt.training_checkpoints(tmp_path)] == [ckpt.step_name(4), ckpt.step_name(5)]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / ckpt.FINAL_NAME


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path, model_and_config):
    model, config = model_and_config
    save(tmp_path / "final", model, config, 1)
    save(tmp_path / "final", model, config, 2)
    assert ckpt.read_meta(tmp_path / "final")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_loading_errors_are_one_clear_line(tmp_path, model_and_config):
    model, config = model_and_config
    with pytest.raises(DarkhorseError, match="not found"):
        ckpt.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DarkhorseError, match="no meta.json"):
        ckpt.load_model(tmp_path / "empty")
    folder = ckpt.save_model_checkpoint(tmp_path / "ckpt", model, config, None, {})
    meta = json.loads((folder / ckpt.META_FILE).read_text())
    meta["config"]["model"]["n_layers"] = 2
    (folder / ckpt.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DarkhorseError, match="does not match"):
        ckpt.load_model(folder)
    with pytest.raises(DarkhorseError, match="cannot be resumed"):
        ckpt.load_trainer_state(folder)


def test_rng_state_round_trips_through_weights_only_loading(tmp_path):
    import numpy as np

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save({"rng": ckpt.capture_rng_state()}, tmp_path / "state.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.restore_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_streaming_safetensors_writer_reads_back_in_safetensors(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    tensors = [
        ("f32", torch.randn(3, 5)),
        ("bf16", torch.randn(4, 2).to(torch.bfloat16)),
        ("f16", torch.randn(7).to(torch.float16)),
        ("transposed", torch.randn(4, 6).t()),  # not contiguous
        ("i64", torch.arange(5)),
        ("flags", torch.tensor([True, False, True])),
        ("scalar", torch.tensor(2.5)),
        ("empty", torch.zeros(0, 3)),
    ]
    path = tmp_path / "w.safetensors"
    ckpt.write_safetensors(path, tensors, {"format": "pt", "note": "x"})
    assert path.read_bytes()[8:].index(b"{") == 0 and int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "x"}
        assert list(handle.keys()) == sorted(name for name, _ in tensors)
        for name, tensor in tensors:
            loaded = handle.get_tensor(name)
            assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape
            assert torch.equal(loaded, tensor), name


def test_unsupported_dtype_is_named(tmp_path):
    with pytest.raises(DarkhorseError, match="complex64"):
        ckpt.write_safetensors(tmp_path / "w.safetensors", [("c", torch.zeros(2, dtype=torch.complex64))])


def test_meta_cannot_override_the_saved_config(tmp_path):
    config = load_run_config("tiny-cpu", overrides=["model.n_layers=1", "model.dim=48", "model.n_heads=4"])
    model = Transformer(config.model)
    stale = load_run_config("tiny-cpu").to_dict()
    folder = ckpt.save_model_checkpoint(tmp_path / "c", model, config, None, {"step": 3, "config": stale})
    _, loaded, meta = ckpt.load_model(folder)
    assert loaded.model.n_layers == 1 and meta["step"] == 3


# -- reading: the lazy tensor reader (export, GGUF) and load_for_inference (generate, chat, eval) -----


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from darkhorse.data.tokenizer import Tokenizer

    texts = ["one two three four five six seven eight nine ten"] * 4
    return Tokenizer.train(texts, vocab_size=300).save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.mark.parametrize("tied", [True, False])
def test_the_lazy_reader_gives_the_tensors_load_model_gives(tmp_path, tokenizer_file, tied):
    config = load_run_config("tiny-cpu", overrides=[*TINY, f"model.tie_embeddings={str(tied).lower()}"])
    torch.manual_seed(0)
    folder = ckpt.save_model_checkpoint(tmp_path / "c", Transformer(config.model), config, tokenizer_file, {"step": 1})
    model, loaded_config, meta = ckpt.load_model(folder)
    reader = ckpt.CheckpointTensors(folder)
    assert reader.config == loaded_config and reader.meta == meta and reader.tokenizer_file == folder / "tokenizer.json"
    assert ("lm_head.weight" in reader.names) != tied  # a tied head is stored once, read under either name
    for name, tensor in model.state_dict().items():
        assert torch.equal(reader.get(name), tensor), name
    assert reader.unread() == []


def test_the_lazy_reader_names_what_is_missing_or_wrong(tmp_path, model_and_config, tokenizer_file):
    from safetensors.torch import load_file

    model, config = model_and_config
    folder = ckpt.save_model_checkpoint(tmp_path / "c", model, config, None, {})
    with pytest.raises(DarkhorseError, match="has no tokenizer.json"):
        ckpt.CheckpointTensors(folder)
    folder = ckpt.save_model_checkpoint(tmp_path / "c", model, config, tokenizer_file, {})
    tensors = {name: t.clone() for name, t in load_file(folder / ckpt.MODEL_FILE).items()}  # unmapped: rewritten below
    ckpt.write_safetensors(folder / ckpt.MODEL_FILE, [(n, t) for n, t in tensors.items() if n != "norm.weight"])
    with pytest.raises(DarkhorseError, match="model.safetensors: tensor 'norm.weight' is missing"):
        ckpt.CheckpointTensors(folder).get("norm.weight")
    tensors["norm.weight"] = torch.ones(3)
    ckpt.write_safetensors(folder / ckpt.MODEL_FILE, list(tensors.items()))
    with pytest.raises(DarkhorseError, match=r"norm.weight has shape \(3,\), its config needs \(32,\)"):
        ckpt.CheckpointTensors(folder).get("norm.weight")
    (folder / ckpt.MODEL_FILE).unlink()
    with pytest.raises(DarkhorseError, match="is not a darkhorse checkpoint \\(no model.safetensors\\)"):
        ckpt.CheckpointTensors(folder)


def test_load_for_inference_gives_model_tokenizer_and_meta(tmp_path, model_and_config, tokenizer_file):
    from darkhorse.data.tokenizer import Tokenizer

    model, config = model_and_config
    folder = ckpt.save_model_checkpoint(tmp_path / "c", model, config, tokenizer_file, {"step": 5})
    loaded, tokenizer, meta = ckpt.load_for_inference(folder)
    assert not loaded.training and isinstance(tokenizer, Tokenizer)
    assert tokenizer.sha256 == Tokenizer.from_file(tokenizer_file).sha256
    assert meta["config"] == config and meta["step"] == 5
    assert torch.equal(loaded.embed.weight, model.embed.weight)


def test_load_for_inference_checks_every_file_first(tmp_path, model_and_config, monkeypatch):
    model, config = model_and_config
    with pytest.raises(DarkhorseError, match="checkpoint directory not found"):
        ckpt.load_for_inference(tmp_path / "missing")
    folder = ckpt.save_model_checkpoint(tmp_path / "c", model, config, None, {})
    monkeypatch.setattr(ckpt, "load_weights", lambda *args: pytest.fail("weights read before the files were checked"))
    with pytest.raises(DarkhorseError, match="has no tokenizer.json; copy the one from the prepared data dir"):
        ckpt.load_for_inference(folder)
    (folder / ckpt.META_FILE).write_text('{"config": {}\n,,')
    with pytest.raises(DarkhorseError, match=r"meta.json:2: invalid JSON"):
        ckpt.load_for_inference(folder)
