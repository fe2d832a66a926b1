"""Export a darkhorse checkpoint: a Hugging Face directory, a plain state dict, or GGUF.

    hf           config.json, generation_config.json, model.safetensors (or model-0000k-of-0000n shards
                 with model.safetensors.index.json), tokenizer.json, tokenizer_config.json (with a chat
                 template rendering darkhorse's chat format) and special_tokens_map.json: a directory
                 that `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` read (see interop/hf/
                 for the architectures)
    safetensors  model.safetensors with our own tensor names, config.json, tokenizer.json
    pt           the same with model.pt (`torch.save` of tensors only: `torch.load(weights_only=True)`)
    gguf         one .gguf file for llama.cpp (interop/gguf.py)

Weights stream from the checkpoint's safetensors file one tensor at a time into shards that are
written as they fill, so peak memory stays near one shard (by default one copy of the model at most).
Everything is written into a hidden temp dir beside `--out` and renamed into place at the end: an
interrupted export leaves nothing half-written, and an existing `--out` is replaced only with force.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from darkhorse.checkpoint import MODEL_FILE, TOKENIZER_FILE, CheckpointTensors
from darkhorse.config import RunConfig, run_config_from_dict
from darkhorse.errors import ConfigError, DarkhorseError, naming
from darkhorse.files import atomic_dir, check_fields, contained, read_json_object
from darkhorse.interop.capabilities import warn_darkhorse_only_routing
from darkhorse.interop.hf import adapter_for_export
from darkhorse.interop.hf.base import HFAdapter, SpecialTokens
from darkhorse.interop.safetensors_io import ShardWriter

FORMATS = ("hf", "safetensors", "pt", "gguf")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
STATE_DICT_FORMAT = "darkhorse-state-dict-v1"  # config.json marker of --format safetensors|pt
PT_FILE = "model.pt"
CONFIG_FILE = "config.json"


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (HF's --max-shard-size spelling)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise DarkhorseError(f"--max-shard-size: cannot read '{text}' (use e.g. 5GB, 500MB)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit[0] != "B" else 0
    size = int(number * base**power)
    if size <= 0:
        raise DarkhorseError("--max-shard-size must be positive")
    return size


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


# ---------------------------------------------------------------------------------------------
# Hugging Face


def hf_tokenizer_settings(source: CheckpointTensors) -> tuple[SpecialTokens, dict[str, str], str | None]:
    """Special-token ids (config.json), their strings and the chat template (tokenizer_config.json).

    darkhorse tokenizers get darkhorse's chat template; a foreign tokenizer (an imported model's) keeps
    the special tokens and template it declares (see `Tokenizer.from_file`)."""
    from darkhorse.data.chat_format import jinja_chat_template
    from darkhorse.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(source.tokenizer_file)
    template = jinja_chat_template() if tokenizer.has_chat_tokens else tokenizer.chat_template
    strings = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token}
    strings = {name: token for name, token in strings.items() if token is not None}
    ids = SpecialTokens(tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    return ids, strings, template


def write_hf_tokenizer(
    folder: Path, tokenizer_file: Path, special: dict[str, str], template: str | None, max_len: int
) -> None:
    """tokenizer.json plus the two small files transformers reads next to it."""
    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    if template:
        tokenizer_config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def write_hf_weights(
    source: CheckpointTensors, adapter: HFAdapter, folder: Path, dtype: torch.dtype | None, max_bytes: int
) -> list[Path]:
    """Stream every tensor through the adapter's maps into shards; returns the shard files."""
    config = source.config.model
    maps = adapter.tensor_maps(config)
    mapped = {m.ours for m in maps}
    skipped = {n for n in source.expected if not adapter.exports_mtp and n.startswith("mtp.")}
    if config.tie_embeddings:
        skipped.add("lm_head.weight")
    unmapped = sorted(set(source.expected) - mapped - skipped)
    if unmapped:
        raise DarkhorseError(f"{adapter.architecture} export has no place for these tensors: {', '.join(unmapped)}")
    writer = ShardWriter(folder, max_bytes)
    for tensor_map in maps:
        tensor = source.get(tensor_map.ours)
        for name, piece in tensor_map.to_hf(tensor):
            keep = name.endswith(adapter.keep_fp32)
            writer.add(name, piece.float() if keep else _cast(piece, dtype))
        del tensor
    return writer.close()


def export_hf(
    checkpoint_dir: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write `checkpoint_dir` as a transformers model directory at `out`."""
    source = CheckpointTensors(checkpoint_dir)
    adapter = adapter_for_export(source.config.model)
    tokenizer_file = source.tokenizer_file
    max_bytes = parse_size(max_shard_size)
    torch_dtype = DTYPES[dtype] if dtype else None
    stored = source.get("norm.weight").dtype
    dtype_name = HF_DTYPE_NAMES.get(torch_dtype or stored, "float32")
    tokens, special, template = hf_tokenizer_settings(source)
    config = source.config.model
    warn_darkhorse_only_routing(config.moe, "Hugging Face")
    with atomic_dir(out, force=force) as folder:
        write_hf_weights(source, adapter, folder, torch_dtype, max_bytes)
        hf_config = adapter.config_to_hf(config, tokens, dtype_name)
        (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {"bos_token_id": tokens.bos_id, "eos_token_id": tokens.eos_id, "pad_token_id": tokens.pad_id}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_hf_tokenizer(folder, tokenizer_file, special, template, config.max_seq_len)
    return Path(out)


# ---------------------------------------------------------------------------------------------
# Plain state dicts (AetherMind-style): our own tensor names + config


def export_state_dict(
    checkpoint_dir: str | Path, out: str | Path, fmt: str, *, force: bool = False, dtype: str | None = None
) -> Path:
    """`fmt` 'safetensors' or 'pt': our tensors as they are, plus config.json and tokenizer.json."""
    source = CheckpointTensors(checkpoint_dir)
    torch_dtype = DTYPES[dtype] if dtype else None
    tokenizer_file = source.tokenizer_file
    names = [n for n in source.expected if not (source.config.model.tie_embeddings and n == "lm_head.weight")]
    record = {
        "format": STATE_DICT_FORMAT,
        "weights": MODEL_FILE if fmt == "safetensors" else PT_FILE,
        **{k: v for k, v in source.meta.items() if k != "format"},
    }
    with atomic_dir(out, force=force) as folder:
        if fmt == "safetensors":
            writer = ShardWriter(folder, max_bytes=2**63)
            for name in names:
                writer.add(name, _cast(source.get(name), torch_dtype))
            writer.close()
        else:
            torch.save({name: _cast(source.get(name), torch_dtype) for name in names}, folder / PT_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        shutil.copyfile(tokenizer_file, folder / TOKENIZER_FILE)
    return Path(out)


def is_state_dict_export(folder: Path) -> bool:
    try:
        return read_json_object(Path(folder) / CONFIG_FILE).get("format") == STATE_DICT_FORMAT
    except (OSError, DarkhorseError):
        return False


def load_state_dict_export(folder: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, RunConfig, dict]:
    """(model, RunConfig, record) from an `export --format safetensors|pt` directory."""
    from safetensors.torch import load_file

    from darkhorse.model import Transformer

    folder = Path(folder)
    record = read_json_object(folder / CONFIG_FILE)
    check_fields(folder / CONFIG_FILE, record, {"config": dict, "weights": str})
    try:
        config = run_config_from_dict(record.get("config") or {})
    except ConfigError as exc:
        raise DarkhorseError(f"{folder / CONFIG_FILE}: {exc}") from None
    weights = contained(folder, record.get("weights", MODEL_FILE), folder / CONFIG_FILE)
    if not weights.exists():
        raise DarkhorseError(f"{folder}: {weights.name} is missing")
    with naming(weights):
        if weights.suffix == ".pt":
            state = torch.load(weights, map_location=device, weights_only=True)
        else:
            state = load_file(str(weights), device=device)
    with torch.device(device):
        model = Transformer(config.model)
    result = model.load_state_dict(state, strict=False)
    missing = [n for n in result.missing_keys if not (config.model.tie_embeddings and n == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise DarkhorseError(
            f"{weights} does not match its config: missing {', '.join(missing) or 'none'}; "
            f"unexpected {', '.join(result.unexpected_keys) or 'none'}"
        )
    return model.eval(), config, record


# ---------------------------------------------------------------------------------------------
# One entry point for the CLI


def export_checkpoint(
    checkpoint_dir: str | Path,
    out: str | Path,
    fmt: str,
    *,
    force: bool = False,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    outtype: str = "f16",
) -> Path:
    if fmt == "hf":
        return export_hf(checkpoint_dir, out, force=force, dtype=dtype, max_shard_size=max_shard_size)
    if fmt in ("safetensors", "pt"):
        return export_state_dict(checkpoint_dir, out, fmt, force=force, dtype=dtype)
    if fmt == "gguf":
        from darkhorse.interop.gguf import export_gguf

        return export_gguf(checkpoint_dir, out, outtype, force=force)
    raise DarkhorseError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
