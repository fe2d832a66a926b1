"""Dataset downloads: converters run on local files with each hub dataset's schema (the hub is unreachable)."""

from __future__ import annotations

import json

import pytest

from darkhorse.data import sources
from darkhorse.data.chat_format import render_conversation
from darkhorse.data.prepare import prepare
from darkhorse.data.sources import download, find_source
from darkhorse.errors import DarkhorseError

OPENHERMES = [
    {
        "conversations": [
            {"from": "system", "value": "You are helpful.", "weight": None},
            {"from": "human", "value": f"Say {i}.", "weight": None},
            {"from": "gpt", "value": f"{i}.", "weight": None},
        ],
        "source": "airoboros2.2",
        "category": "general",
    }
    for i in range(5)
]
PLATYPUS = [
    {"input": "", "output": "4", "instruction": "What is 2 + 2?", "data_source": "MATH/PRM-800K"},
    {"input": "[3, 1, 2]", "output": "[1, 2, 3]", "instruction": "Sort the list.", "data_source": "airoboros"},
]
THOUGHT = "<|begin_of_thought|>\n\nTwo and two make four.\n\n<|end_of_thought|>\n\n"
OPENTHOUGHTS = [
    {
        "system": "Your role as an assistant involves thoroughly exploring questions.",
        "conversations": [
            {"from": "user", "value": "What is 2 + 2?"},
            {"from": "assistant", "value": THOUGHT + "<|begin_of_solution|>\n\n4\n\n<|end_of_solution|>"},
        ],
    }
]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_openhermes_sharegpt_becomes_messages(tmp_path):
    local = _jsonl(tmp_path / "hermes.jsonl", OPENHERMES)
    path, written, skipped = download("openhermes-2.5", tmp_path / "out", data_files=[str(local)])
    assert (path.name, written, skipped) == ("openhermes-2.5.jsonl", 5, [])
    assert _lines(path)[1] == {
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Say 1."},
            {"role": "assistant", "content": "1."},
        ]
    }


def test_platypus_instruction_output_with_max_samples(tmp_path):
    local = _jsonl(tmp_path / "platypus.jsonl", PLATYPUS)
    path, written, _ = download("garage-bAInd/Open-Platypus", tmp_path / "out", max_samples=1, data_files=[str(local)])
    assert written == 1
    assert _lines(path) == [
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}
    ]


def test_openthoughts_parquet_keeps_reasoning_apart(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = tmp_path / "train-00000.parquet"
    pq.write_table(pa.Table.from_pylist(OPENTHOUGHTS), local)
    path, written, _ = download("OpenThoughts-114k", tmp_path / "out", data_files=[str(local)])
    [record] = _lines(path)
    assert record["reasoning"] == "Two and two make four."
    assert record["messages"][0]["role"] == "system" and record["messages"][-1] == {"role": "assistant", "content": "4"}


def test_downloaded_file_prepares_like_the_raw_dump(tmp_path):
    local = _jsonl(tmp_path / "thoughts.jsonl", OPENTHOUGHTS)
    path, _, _ = download("openthoughts-114k", tmp_path / "out", data_files=[str(local)])
    converted = prepare([path], tmp_path / "a", vocab_size=300, val_fraction=0.0, progress=False)
    raw = prepare([local], tmp_path / "b", tokenizer=converted.tokenizer_path, val_fraction=0.0, progress=False)
    assert converted.tokens("train").tolist() == raw.tokens("train").tolist()
    messages = [
        {"role": "system", "content": OPENTHOUGHTS[0]["system"]},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert converted.meta["splits"]["train"]["bytes"] == len(
        render_conversation(messages, "Two and two make four.").encode()
    )


def test_records_that_are_not_conversations_are_skipped(tmp_path):
    local = _jsonl(tmp_path / "mixed.jsonl", [PLATYPUS[0], {"unrelated": 1}])
    _, written, skipped = download("open-platypus", tmp_path / "out", data_files=[str(local)])
    assert written == 1 and len(skipped) == 1 and skipped[0].startswith("record 1: ")


def test_network_failure_is_one_line(tmp_path, monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'teknium/OpenHermes-2.5' on the Hub (LocalEntryNotFoundError)\ndetails")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DarkhorseError) as caught:
        download("openhermes-2.5", tmp_path / "out", max_samples=10)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("could not read teknium/OpenHermes-2.5 on the Hugging Face Hub")
    assert message.endswith("convert them with --from-file FILE (JSON Lines or parquet)")  # the offline way
    assert not list((tmp_path / "out").iterdir())


def test_existing_output_needs_force(tmp_path):
    local = _jsonl(tmp_path / "platypus.jsonl", PLATYPUS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "open-platypus.jsonl").write_text("mine\n")
    with pytest.raises(DarkhorseError, match="already exists; pass --force"):
        download("open-platypus", out, data_files=[str(local)])
    assert (out / "open-platypus.jsonl").read_text() == "mine\n"
    download("open-platypus", out, data_files=[str(local)], force=True)
    assert len(_lines(out / "open-platypus.jsonl")) == 2


def test_names_and_bad_arguments(tmp_path):
    assert find_source("OpenHermes-2.5").repo == "teknium/OpenHermes-2.5"
    assert set(sources.SOURCES) == {"openhermes-2.5", "open-platypus", "openthoughts-114k"}
    with pytest.raises(DarkhorseError, match="unknown dataset 'alpaca'; choose one of"):
        find_source("alpaca")
    with pytest.raises(DarkhorseError, match="--max-samples must be >= 1"):
        download("open-platypus", tmp_path, max_samples=0)
    with pytest.raises(DarkhorseError, match="file not found"):
        download("open-platypus", tmp_path, data_files=[str(tmp_path / "nope.jsonl")])
