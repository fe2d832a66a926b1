"""Import a Hugging Face model directory (or a darkhorse state-dict export) as a darkhorse checkpoint.

The architecture's adapter (interop/hf/) turns config.json into a darkhorse config and names, for
each of our tensors, the HF tensor(s) to read. The model is allocated once, uninitialised, and each
tensor is read from the (possibly sharded) safetensors files straight into its place, so peak memory
is one copy of the model. The result is an ordinary checkpoint (model.safetensors, meta.json,
tokenizer.json): generate, chat, eval, export and `train --init-from`-style fine-tuning read it like
one of ours. A foreign tokenizer is copied as it is, with its tokenizer_config.json / chat_template.jinja;
meta.json's "import" record says which of darkhorse's chat tokens it lacks and which bos/eos/pad tokens and
chat template it resolved to.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from darkhorse.checkpoint import load_for_inference, save_model_checkpoint
from darkhorse.config import RunConfig, TrainConfig, run_config_from_dict
from darkhorse.data.tokenizer import SIDECAR_FILES
from darkhorse.errors import ConfigError, DarkhorseError
from darkhorse.files import atomic_dir, check_fields, read_json_object
from darkhorse.interop.export import is_state_dict_export, load_state_dict_export
from darkhorse.interop.hf import adapter_for_import
from darkhorse.interop.hf.base import HF_CONFIG_TYPES, HF_ROPE_TYPES
from darkhorse.interop.safetensors_io import SafetensorsDir


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DarkhorseError(f"{path.parent}: no {path.name} (is this a Hugging Face model directory?)")
    return read_json_object(path)


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """config.json, every field an adapter reads checked for its JSON type (naming the field)."""
    path = hf_dir / "config.json"
    hf_config = _read_json(path)
    check_fields(path, hf_config, HF_CONFIG_TYPES)
    if not all(isinstance(name, str) for name in hf_config.get("architectures") or []):
        raise DarkhorseError(f"{path}: field 'architectures' must be a list of class names")
    for key in ("rope_parameters", "rope_scaling"):
        check_fields(f"{path} ({key})", hf_config.get(key) or {}, HF_ROPE_TYPES)
    return hf_config


def _tokenizer_record(tokenizer_file: Path) -> dict[str, Any]:
    """What chat and generation need to know about a foreign tokenizer (read from the files beside it)."""
    from darkhorse.data.tokenizer import SPECIAL_TOKENS, Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_file)
    record: dict[str, Any] = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "missing_chat_tokens": [t for t in SPECIAL_TOKENS if t not in tokenizer.special_tokens],
    }
    if tokenizer.chat_template:
        record["chat_template"] = tokenizer.chat_template
    return record


def _tokenizer_file(hf_dir: Path, staging: Path) -> Path:
    """tokenizer.json of the source; converted by transformers when only slow-tokenizer files exist."""
    if (hf_dir / "tokenizer.json").exists():
        return hf_dir / "tokenizer.json"
    try:
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(str(hf_dir), use_fast=True)
        converted = staging / "tokenizer.json"
        fast.backend_tokenizer.save(str(converted))
    except Exception as exc:  # any loader failure means: no usable tokenizer in this directory
        raise DarkhorseError(
            f"{hf_dir}: no tokenizer.json, and transformers could not build one ({type(exc).__name__})"
        ) from None
    for name in SIDECAR_FILES:  # bos/eos and the chat template stay beside the converted file
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, staging / name)
    return converted


def load_hf_state(hf_dir: Path, model: torch.nn.Module, adapter, source: SafetensorsDir) -> None:
    """Fill `model`'s persistent tensors from `source`, one at a time; list every problem at once."""
    hf_config = read_hf_config(hf_dir)
    maps = adapter.tensor_maps(model.config)
    missing = [name for m in maps for name in m.missing(source)]
    known = {name for m in maps for name in m.known()}
    unexpected = [n for n in source.names() if n not in known and not adapter.ignored_on_import(n, hf_config)]
    if missing or unexpected:
        raise DarkhorseError(
            f"{hf_dir}: tensors do not match {adapter.architecture} with this config.json; "
            f"missing: {', '.join(missing) or 'none'}; unexpected: {', '.join(unexpected) or 'none'}"
        )
    state = model.state_dict()
    mismatched = []
    with torch.no_grad():
        for tensor_map in maps:
            target = state[tensor_map.ours]
            tensor = tensor_map.from_hf(source, target)
            if tensor.shape != target.shape:
                shapes = f"{tuple(tensor.shape)} != {tuple(target.shape)}"
                mismatched.append(f"{tensor_map.ours} <- {tensor_map.hf[0]}: {shapes}")
                continue
            target.copy_(tensor)
    if mismatched:
        raise DarkhorseError(f"{hf_dir}: tensor shapes do not match config.json: {'; '.join(mismatched)}")


def hf_run_config(hf_dir: Path) -> tuple[Any, RunConfig, SafetensorsDir]:
    """(adapter, darkhorse RunConfig, its tensors) for an HF directory; a config.json field that cannot be
    translated is a DarkhorseError naming config.json."""
    hf_config = read_hf_config(hf_dir)
    where = hf_dir / "config.json"
    adapter = adapter_for_import(hf_config, str(where))
    source = SafetensorsDir(hf_dir)
    try:
        model_dict = adapter.config_from_hf(hf_config, str(where), source)
        run_config = run_config_from_dict(
            {
                "name": f"import-{hf_dir.resolve().name}",
                "description": f"{adapter.architecture} imported from {hf_dir}",
                "model": model_dict,
                "train": {"seq_len": min(TrainConfig().seq_len, model_dict["max_seq_len"])},
            }
        )
    except KeyError as exc:
        raise DarkhorseError(f"{where}: missing field {exc.args[0]!r}") from None
    except ConfigError as exc:
        raise DarkhorseError(f"{where}: gives a model darkhorse cannot build: {exc}") from None
    except (TypeError, ValueError, ArithmeticError) as exc:  # e.g. num_attention_heads: 0
        raise DarkhorseError(f"{where}: fields darkhorse cannot translate ({exc})") from None
    return adapter, run_config, source


def import_hf(hf_dir: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Convert `hf_dir` into a darkhorse checkpoint at `out`; returns `out`."""
    from darkhorse.model import Transformer

    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise DarkhorseError(f"model directory not found: {hf_dir}")
    if is_state_dict_export(hf_dir):
        return _import_state_dict_export(hf_dir, out, force)
    adapter, run_config, source = hf_run_config(hf_dir)
    with torch.device("meta"):
        model = Transformer(run_config.model)
    model.to_empty(device="cpu")  # allocates without initialising; every tensor is read below
    if run_config.model.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # to_empty made them two tensors
    load_hf_state(hf_dir, model, adapter, source)
    model.init_rope_buffers()
    with atomic_dir(out, force=force) as staging:
        staging.parent.joinpath("tokenizer").mkdir()
        tokenizer_file = _tokenizer_file(hf_dir, staging.parent / "tokenizer")
        meta = {
            "step": 0,
            "tokens_seen": 0,
            "loss": None,
            "import": {
                "format": "hf",
                "architecture": adapter.architecture,
                "source": str(hf_dir.resolve()),
                "tokenizer": _tokenizer_record(tokenizer_file),
            },
        }
        save_model_checkpoint(staging, model, run_config, tokenizer_file, meta)
    return out


def _import_state_dict_export(folder: Path, out: Path, force: bool) -> Path:
    """An `export --format safetensors|pt` directory back into a checkpoint."""
    model, config, record = load_state_dict_export(folder)
    meta = {k: v for k, v in record.items() if k not in ("format", "weights", "config", "darkhorse_version")}
    meta["import"] = {"format": record["weights"], "source": str(folder.resolve())}
    with atomic_dir(out, force=force) as staging:
        save_model_checkpoint(staging, model, config, folder / "tokenizer.json", meta)
    return out


def load_checkpoint_or_hf(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, dict]:
    """`load_for_inference` of a darkhorse checkpoint, or of a Hugging Face model directory (or state-dict
    export) imported on the fly into a temporary checkpoint that is gone once the model is in memory."""
    path = Path(path)
    if (path / "config.json").is_file() and not (path / "meta.json").is_file():
        with tempfile.TemporaryDirectory(prefix="darkhorse-import-") as work:
            return load_for_inference(import_hf(path, Path(work) / "checkpoint"), device)
    return load_for_inference(path, device)
