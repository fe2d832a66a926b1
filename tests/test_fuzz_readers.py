"""Property-based fuzz of the readers of untrusted files: JSONL and JSON-array inputs, chat records,
meta.json, safetensors headers and HF config.json. Every generated input either parses or raises the clean
error (DarkhorseError; RecordError for one record), never anything else.

Seeded (`derandomize`) and bounded so the module runs in a few seconds in CI."""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from darkhorse.checkpoint import read_meta, save_model_checkpoint
from darkhorse.config import ModelConfig, RunConfig, TrainConfig
from darkhorse.data.prepared import open_prepared
from darkhorse.data.readers import InputReader, RecordError, record_to_document
from darkhorse.data.tokenizer import Tokenizer, declared_settings
from darkhorse.errors import DarkhorseError
from darkhorse.interop.safetensors_io import SafetensorsDir
from tests.conftest import write_prepared_dir

FUZZ = settings(
    derandomize=True, deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "human", "gpt", "tool", "", 3])
messages = st.lists(
    st.fixed_dictionaries({}, optional={"role": roles, "content": json_values | st.text(), "reasoning": json_values}),
    max_size=4,
)
turns = st.lists(st.fixed_dictionaries({}, optional={"from": roles, "value": json_values | st.text()}), max_size=4)
chat_records = st.fixed_dictionaries(
    {},
    optional={
        "text": json_values | st.text(max_size=30),
        "domain": json_values | st.text(max_size=5),
        "messages": messages | json_values,
        "conversations": turns | json_values,
        "instruction": json_values | st.text(max_size=10),
        "input": json_values,
        "output": json_values | st.text(max_size=10),
        "system": json_values,
        "reasoning": json_values,
    },
)
records = chat_records | json_values


def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="darkhorse-fuzz-"))


def _read_all(path: Path, skip_bad: bool) -> None:
    try:
        for _ in InputReader(path, skip_bad=skip_bad):
            pass
    except DarkhorseError:
        pass


@FUZZ
@given(record=records)
def test_chat_records_become_documents_or_record_errors(record):
    with contextlib.suppress(RecordError):
        record_to_document(record)


@FUZZ
@given(
    lines=st.lists(records.map(json.dumps).map(str.encode) | st.binary(max_size=40), max_size=6),
    skip_bad=st.booleans(),
)
def test_jsonl_files(lines, skip_bad):
    folder = _scratch()
    try:
        (folder / "data.jsonl").write_bytes(b"\n".join(lines))
        _read_all(folder / "data.jsonl", skip_bad)
    finally:
        shutil.rmtree(folder)


@FUZZ
@given(
    elements=st.lists(records, max_size=5),
    cut=st.none() | st.integers(1, 400),
    tail=st.binary(max_size=8),
    depth=st.sampled_from([0, 5000]),
    skip_bad=st.booleans(),
)
def test_json_array_files(elements, cut, tail, depth, skip_bad):
    """A JSON array, cut short or with bytes after it, or nested far past Python's recursion limit."""
    text = ("[" * depth + json.dumps(elements) + "]" * depth).encode()
    folder = _scratch()
    try:
        (folder / "data.json").write_bytes(b"[" + text[:cut] + tail)
        _read_all(folder / "data.json", skip_bad)
    finally:
        shutil.rmtree(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny checkpoint (its meta.json is what the meta fuzz mutates) and its HF export."""
    from darkhorse.interop.export import export_checkpoint
    from darkhorse.model import Transformer

    root = tmp_path_factory.mktemp("fuzz")
    tokenizer_file = Tokenizer.train(["a b c d e"] * 10, vocab_size=280).save(root / "tokenizer.json")
    model = ModelConfig(vocab_size=280, n_layers=1, dim=32, n_heads=2, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    config = RunConfig(model=model, train=TrainConfig(seq_len=32, batch_size=2))
    torch.manual_seed(0)
    checkpoint = save_model_checkpoint(root / "ckpt", Transformer(model), config, tokenizer_file, {"step": 3})
    hf = export_checkpoint(checkpoint, root / "hf", "hf")
    return {"meta": json.loads((checkpoint / "meta.json").read_text()), "hf": hf}


def _mutate(data: dict, path: list[str], value) -> dict:
    """`data` with the value at `path` (keys that exist, followed as far as they go) replaced."""
    data = json.loads(json.dumps(data))
    node = data
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            break
        node = node[key]
    node[path[-1]] = value
    return data


meta_paths = st.sampled_from(
    [["config"], ["step"], ["loss"], ["import"], ["import", "tokenizer"], ["config", "model"], ["config", "train"],
     ["config", "model", "vocab_size"], ["config", "model", "dim"], ["config", "model", "moe"],
     ["config", "model", "rope_scaling"], ["config", "train", "lr"], ["config", "train", "seed"],
     ["config", "model", "attention"], ["config", "name"]]
)  # fmt: skip


@FUZZ
@given(path=meta_paths, value=json_values, garbage=st.none() | st.binary(max_size=30))
def test_meta_json(tiny, path, value, garbage):
    """A checkpoint's meta.json, read as resume and a tokenizer's settings read it."""
    folder = _scratch()
    try:
        text = json.dumps(_mutate(tiny["meta"], path, value)).encode() if garbage is None else garbage
        (folder / "meta.json").write_bytes(text)
        with contextlib.suppress(DarkhorseError):
            int(read_meta(folder).get("step", 0))
            declared_settings(folder)
    finally:
        shutil.rmtree(folder)


@FUZZ
@given(config=st.dictionaries(st.sampled_from(["bos_token", "eos_token", "pad_token", "chat_template"]), json_values))
def test_tokenizer_config_json(config):
    folder = _scratch()
    try:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        with contextlib.suppress(DarkhorseError):
            declared_settings(folder)
    finally:
        shutil.rmtree(folder)


prepared_paths = st.sampled_from(
    [["vocab_size"], ["splits"], ["splits", "train"], ["splits", "train", "tokens"], ["splits", "val", "bytes"],
     ["domains"], ["format"], ["loss_mask"], ["tokenizer_sha256"]]
)  # fmt: skip


@FUZZ
@given(path=prepared_paths, value=json_values)
def test_prepared_meta_json(path, value):
    folder = _scratch()
    try:
        write_prepared_dir(folder, train_tokens=64, val_tokens=32, loss_mask=True)
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps(_mutate(meta, path, value)))
        with contextlib.suppress(DarkhorseError):
            data = open_prepared(folder)
            data.tokens("train"), data.domain_names, data.split_info("val"), data.bytes_per_token("val")
    finally:
        shutil.rmtree(folder)


dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Q4", "", 7])
tensor_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": dtypes,
        "shape": st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-1, 2**62), min_size=0, max_size=3) | json_values,
    },
)


@FUZZ
@given(
    header=st.dictionaries(st.text(max_size=6), tensor_entries | json_values, max_size=3),
    metadata=st.none() | json_values,
    declared=st.none() | st.integers(0, 2**64 - 1),
    data=st.binary(max_size=64),
)
def test_safetensors_headers(header, metadata, declared, data):
    if metadata is not None:
        header = {**header, "__metadata__": metadata}
    encoded = json.dumps(header).encode()
    folder = _scratch()
    try:
        size = len(encoded) if declared is None else declared
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", size) + encoded + data)
        try:
            tensors = SafetensorsDir(folder)
            for name in tensors.names():
                tensors.shape(name)
                tensors.get(name)
        except DarkhorseError:
            pass
    finally:
        shutil.rmtree(folder)


hf_keys = st.sampled_from(
    ["architectures", "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
     "intermediate_size", "num_hidden_layers", "max_position_embeddings", "rope_theta", "rope_scaling",
     "rope_parameters", "rms_norm_eps", "tie_word_embeddings", "hidden_act", "sliding_window", "model_type"]
)  # fmt: skip
hf_values = json_values | st.integers(-3, 300) | st.sampled_from(["MixtralForCausalLM", "DeepseekV3ForCausalLM"])


@FUZZ
@given(
    changes=st.lists(st.tuples(hf_keys, hf_values), min_size=1, max_size=3), garbage=st.none() | st.binary(max_size=30)
)
def test_hf_config_json(tiny, changes, garbage):
    from darkhorse.interop.hf_import import hf_run_config

    folder = _scratch()
    try:
        shutil.copytree(tiny["hf"], folder, dirs_exist_ok=True)
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes:
            config[key] = value
        (folder / "config.json").write_bytes(json.dumps(config).encode() if garbage is None else garbage)
        with contextlib.suppress(DarkhorseError):
            hf_run_config(folder)
    finally:
        shutil.rmtree(folder)
