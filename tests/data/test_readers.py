"""Input readers: every schema becomes the right document; bad input names file and line."""

from __future__ import annotations

import json

import pytest

from darkhorse.data import readers
from darkhorse.data.chat_format import render_conversation
from darkhorse.data.readers import Document, InputReader, detect_format, expand_inputs, split_thought
from darkhorse.errors import DarkhorseError

USER, ASSISTANT = {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}


def _read(path, **options) -> list[Document]:
    return list(InputReader(path, **options))


def _jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_text_and_domain_records(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"text": "plain"}, {"domain": "code", "text": "x = 1"}])
    assert _read(tmp_path / "a.jsonl") == [Document("plain", "general"), Document("x = 1", "code")]


def test_messages_with_reasoning_on_the_record(tmp_path):
    _jsonl(tmp_path / "m.jsonl", [{"messages": [USER, ASSISTANT], "reasoning": "because"}])
    expected = render_conversation([USER, ASSISTANT], reasoning="because")
    assert _read(tmp_path / "m.jsonl") == [Document(expected, chat=True)]


def test_sharegpt_openhermes_record(tmp_path):
    record = {
        "conversations": [
            {"from": "system", "value": "Sys.", "weight": None},
            {"from": "human", "value": "Q?", "weight": None},
            {"from": "gpt", "value": "A.", "weight": None},
        ],
        "source": "airoboros",
    }
    _jsonl(tmp_path / "h.jsonl", [record])
    expected = render_conversation([{"role": "system", "content": "Sys."}, USER, ASSISTANT])
    assert _read(tmp_path / "h.jsonl") == [Document(expected, chat=True)]


def test_openthoughts_record_splits_thought_from_solution(tmp_path):
    value = (
        "<|begin_of_thought|>\n\nLet me add.\n\n<|end_of_thought|>\n\n"
        "<|begin_of_solution|>\n\nA.\n\n<|end_of_solution|>"
    )
    record = {
        "system": "Think first.",
        "conversations": [{"from": "user", "value": "Q?"}, {"from": "assistant", "value": value}],
    }
    _jsonl(tmp_path / "t.jsonl", [record])
    expected = render_conversation([{"role": "system", "content": "Think first."}, USER, ASSISTANT], "Let me add.")
    assert _read(tmp_path / "t.jsonl") == [Document(expected, chat=True)]


def test_split_thought_passes_plain_answers_and_keeps_unfinished_thoughts():
    assert split_thought("just an answer") == (None, "just an answer")
    assert split_thought("<|begin_of_thought|> hmm <|end_of_thought|> final") == ("hmm", "final")


def test_instruction_output_platypus_record(tmp_path):
    _jsonl(
        tmp_path / "p.jsonl",
        [{"instruction": "Q?", "input": "", "output": "A."}, {"instruction": "Do", "input": "this", "output": "A."}],
    )
    first, second = _read(tmp_path / "p.jsonl")
    assert first.text == render_conversation([USER, ASSISTANT])
    assert "<|user|>Do\n\nthis<|/user|>" in second.text


def test_txt_paragraphs_or_whole_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("one\nline two\n\n\ntwo\n  \nthree")
    assert [d.text for d in _read(path)] == ["one\nline two", "two", "three"]
    assert [d.text for d in _read(path, txt_split="file")] == ["one\nline two\n\n\ntwo\n  \nthree"]


def test_json_array_streams_across_small_reads(tmp_path, monkeypatch):
    records = [{"text": f"doc {i} é🙂", "domain": "d"} for i in range(50)]
    path = tmp_path / "arr.json"
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False))
    monkeypatch.setattr(readers, "_READ_CHUNK", 7)  # forces refills mid-object and mid-character
    assert [d.text for d in _read(path)] == [r["text"] for r in records]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"text": "a"} {"text": "b"}]', "element 1: expected ','"),
        ('[{"text": "a"},', "ends early"),
        ('[{"text": 1x}]', "element 0: malformed JSON"),
    ],
)
def test_broken_json_arrays_are_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DarkhorseError, match=message):
        _read(path)


def test_parquet_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "row one", "domain": "a"}, {"text": "row two", "domain": "b"}]), path)
    reader = InputReader(path)
    assert list(reader) == [Document("row one", "a"), Document("row two", "b")]
    assert reader.bytes_read == reader.size


def test_format_detection_uses_content_for_unknown_extensions(tmp_path):
    cases = {
        "a.data": '{"text": "x"}\n',
        "b.data": '[{"text": "x"}]',
        "c.data": "plain words",
        "d.json": '[{"text": 1}]',
        "e.json": '{"text": "x"}\n',
    }
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
    detected = {name: detect_format(tmp_path / name) for name in cases}
    assert detected == {
        "a.data": "jsonl",
        "b.data": "json-array",
        "c.data": "txt",
        "d.json": "json-array",
        "e.json": "jsonl",
    }


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DarkhorseError, match=r"bad\.jsonl:3: malformed JSON .*--skip-bad"):
        _read(path)


def test_skip_bad_counts_and_skips(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n{"other": 1}\n[1, 2]\n{"text": "fine"}\n')
    reader = InputReader(path, skip_bad=True)
    assert [d.text for d in reader] == ["ok", "fine"]
    assert reader.skipped == 3
    assert [example.split(": ")[0] for example in reader.skip_examples] == [f"{path}:{n}" for n in (2, 3, 4)]
    assert [d.text for d in reader] == ["ok", "fine"] and reader.skipped == 3  # a second pass counts afresh


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"other": 1}, r"record has no text: expected 'text'.*\(its keys: other\)"),
        ({"text": "   "}, "empty or non-string 'text'"),
        ({"text": "x", "domain": ""}, "'domain' must be a non-empty string"),
        ({"messages": [USER]}, "must end with an assistant message"),
        ({"conversations": [{"from": "tool", "value": "x"}]}, "from='tool'"),
        ({"instruction": "Q", "output": None}, "must both be strings"),
    ],
)
def test_records_without_usable_text_name_file_and_line(tmp_path, record, message):
    path = tmp_path / "r.jsonl"
    _jsonl(path, [{"text": "fine"}, record])
    with pytest.raises(DarkhorseError, match=rf"r\.jsonl:2: .*{message}"):
        _read(path)


def test_non_utf8_text_names_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(DarkhorseError, match=r"latin1\.txt:2: not UTF-8"):
        _read(path)


def test_expand_inputs_checks_existence_and_walks_directories(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / "a.jsonl").write_text("{}")
    (tmp_path / "notes.md").write_text("ignored")
    assert expand_inputs([tmp_path]) == [tmp_path / "a.jsonl", tmp_path / "sub" / "b.txt"]
    with pytest.raises(DarkhorseError, match="input file not found: .*nope.jsonl"):
        expand_inputs([tmp_path / "nope.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DarkhorseError, match="holds no"):
        expand_inputs([tmp_path / "empty"])
