"""`darkhorse eval`'s parts as library calls: task files (and their bad lines), exact vs contains scoring, the
prompt suite on a darkhorse checkpoint and on an imported Hugging Face Llama in its own chat template, and
that model's bits per byte against transformers' own log-likelihoods."""

from __future__ import annotations

import json
import math

import pytest
import torch

from darkhorse.checkpoint import load_for_inference
from darkhorse.errors import DarkhorseError
from darkhorse.eval import suite as suite_module
from darkhorse.eval.exact_match import evaluate_exact_match, is_match
from darkhorse.eval.perplexity import score_text
from darkhorse.eval.suite import SUITE_PROMPTS, run_suite, skill_records, suite_score
from darkhorse.eval.tasks import read_tasks
from darkhorse.interop.hf_import import load_checkpoint_or_hf

transformers = pytest.importorskip("transformers")


def write_lines(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_task_files_are_read_whole_and_bad_lines_named(tmp_path):
    good = write_lines(tmp_path / "qa.jsonl", [
        json.dumps({"prompt": "What is 2 + 2?", "answer": 4}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
                    "answer": "Hello", "skill": "greet"}),
    ])  # fmt: skip
    records = read_tasks(good)
    assert records[0]["messages"] == [{"role": "user", "content": "What is 2 + 2?"},
                                      {"role": "assistant", "content": "4"}]  # fmt: skip
    assert records[1]["skill"] == "greet" and records[1]["messages"][0]["role"] == "system"
    cases = {
        "malformed JSON": [json.dumps({"prompt": "a", "answer": "b"}), '{"prompt": "x", "answer": '],
        "answer": [json.dumps({"prompt": "a"})],
        "prompt": [json.dumps({"answer": "b"})],
        "end with the user": [json.dumps({"messages": [{"role": "user", "content": "a"},
                                                       {"role": "assistant", "content": "b"}], "answer": "c"})],
        "JSON object": ["[1, 2]"],
    }  # fmt: skip
    for reason, lines in cases.items():
        path = write_lines(tmp_path / "bad.jsonl", lines)
        with pytest.raises(DarkhorseError, match=f"bad.jsonl:{len(lines)}: .*{reason}"):
            read_tasks(path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DarkhorseError, match="no task records"):
        read_tasks(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "answer": "x"}\n'.encode("latin-1"))
    with pytest.raises(DarkhorseError, match="latin1.jsonl:1: not UTF-8"):
        read_tasks(tmp_path / "latin1.jsonl")


def test_contains_accepts_a_reply_holding_the_answer():
    assert is_match("The capital is Paris.", "paris", "contains")
    assert not is_match("The capital is Paris.", "Paris", "exact")
    assert is_match(" Paris. ", "Paris", "exact") and not is_match("Lyon", "Paris", "contains")


def test_tasks_score_exact_and_contains_on_a_trained_checkpoint(tiny_dense_checkpoint):
    model, tokenizer, _ = load_for_inference(tiny_dense_checkpoint)
    probes = [{"messages": [{"role": "user", "content": f"after {w}?"}, {"role": "assistant", "content": "?"}]}
              for w in ("one", "red", "five")]  # fmt: skip
    answers = [
        o.predicted for o in evaluate_exact_match(model, tokenizer, probes, think=False, max_new_tokens=8).outcomes
    ]
    assert any(len(a) > 1 for a in answers)
    records = []
    for probe, answer in zip(probes, answers, strict=True):
        if len(answer) > 1:
            prompt = probe["messages"][:1]
            for skill, expected in (("whole", answer), ("part", answer[1:])):
                records.append({"messages": [*prompt, {"role": "assistant", "content": expected}], "skill": skill})
    exact = evaluate_exact_match(model, tokenizer, records, think=False, max_new_tokens=8, batch_size=2)
    contains = evaluate_exact_match(model, tokenizer, records, think=False, max_new_tokens=8, match="contains")
    assert exact.by_skill()["whole"].accuracy == 1.0 and exact.by_skill()["part"].accuracy == 0.0
    assert contains.overall().accuracy == 1.0
    assert all(o.tokens > 0 for o in exact.outcomes)
    with pytest.raises(DarkhorseError, match="match must be"):
        evaluate_exact_match(model, tokenizer, records, match="fuzzy")


def test_suite_on_a_checkpoint_has_the_seed_columns(tiny_dense_checkpoint):
    model, tokenizer, _ = load_for_inference(tiny_dense_checkpoint)
    rows = run_suite(model, tokenizer, max_new_tokens=6)
    assert [row.prompt for row in rows] == [p.prompt for p in SUITE_PROMPTS] and len(rows) == 8
    assert all(0 < row.tokens <= 6 and row.seconds > 0 for row in rows)
    assert all(isinstance(row.thinking_used, bool) and isinstance(row.answer, str) for row in rows)
    assert suite_score(rows)[1] == sum(p.expected is not None for p in SUITE_PROMPTS) == 6
    records = skill_records(2)
    assert len(records) == 12 and {r["skill"] for r in records} >= {"addition", "sort", "python"}


def test_imported_hf_model_is_evaluated_in_its_own_template(tmp_path, llama_dir, monkeypatch):
    hf_model = llama_dir(tmp_path / "llama")
    model, tokenizer, _ = load_checkpoint_or_hf(tmp_path / "llama")
    assert not list(tmp_path.glob("llama/meta.json"))  # imported into a temporary dir, not beside the source
    rendered = []

    def spy(tok, messages, think=True):
        rendered.append(encode(tok, messages, think=think))
        return rendered[-1]

    encode = suite_module.encode_chat_prompt
    monkeypatch.setattr(suite_module, "encode_chat_prompt", spy)
    rows = run_suite(model, tokenizer, max_new_tokens=4)
    assert len(rows) == 8 and all(row.tokens > 0 for row in rows)
    text, ids = rendered[0]
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 15 * 23?")
    assert ids == tokenizer.encode(text)  # message text encoded apart from the template's markup, same tokens

    # bits per byte of the imported model = transformers' own log-likelihood of the same documents
    docs = ["one two three four five six", "red orange yellow green blue indigo violet red orange"]
    (tmp_path / "docs.txt").write_text("\n\n".join(docs) + "\n")
    score = score_text(model, tokenizer, tmp_path / "docs.txt")
    nats = 0.0
    for doc in docs:
        ids = [tokenizer.bos_id, *tokenizer.encode(doc)]
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(torch.tensor([ids[:-1]])).logits.float(), -1)[0]
        nats -= float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    assert score.overall.bytes == sum(len(d.encode()) for d in docs)
    assert score.overall.bits_per_byte == pytest.approx(nats / math.log(2) / score.overall.bytes, rel=1e-5)
