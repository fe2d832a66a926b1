"""Exact-match scoring: normalisation, tallies, and the batched greedy path end to end with a scripted model,
in darkhorse's chat format and in a foreign tokenizer's own template."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from darkhorse.data.chat_format import render_conversation, render_prompt
from darkhorse.data.demo_corpus import addition_problem, sort_problem
from darkhorse.data.tokenizer import Tokenizer
from darkhorse.errors import DarkhorseError
from darkhorse.eval.exact_match import (
    ExactMatchReport,
    Outcome,
    evaluate_exact_match,
    is_exact_match,
    normalize_answer,
    split_record,
)
from darkhorse.infer.prompting import render_chat_prompt


def test_normalisation_forgives_spacing_and_a_full_stop_only():
    assert normalize_answer("  1,  2,\n3. ") == "1, 2, 3"
    assert is_exact_match("85.", "85") and is_exact_match(" 85 ", "85")
    assert not is_exact_match("58", "85")
    assert not is_exact_match("85 apples", "85")
    assert not is_exact_match("", "85")


def test_report_tallies_per_skill_domain_and_overall():
    outcomes = [
        Outcome("math", "addition", "q1", "85", "85"),
        Outcome("math", "addition", "q2", "12", "21"),
        Outcome("math", "compare", "q3", "7", "7."),
        Outcome("lists", "sort", "q4", "1, 2", "1, 2"),
    ]
    report = ExactMatchReport(outcomes)
    skills, domains = report.by_skill(), report.by_domain()
    assert (skills["addition"].correct, skills["addition"].total) == (1, 2)
    assert skills["addition"].accuracy == 0.5 and skills["compare"].accuracy == 1.0
    assert (domains["math"].correct, domains["math"].total, domains["lists"].accuracy) == (2, 3, 1.0)
    assert (report.overall().correct, report.overall().total) == (3, 4)
    data = report.to_dict()
    assert data["by_skill"]["sort"] == {"correct": 1, "total": 1, "accuracy": 1.0}
    assert [o["correct"] for o in data["outcomes"]] == [True, False, True, True]


def test_split_record_needs_a_final_assistant_answer():
    record = addition_problem(12, 30).to_record()
    prompt, expected = split_record(record)
    assert expected == "42" and prompt == [{"role": "user", "content": "What is 12 + 30?"}]
    with pytest.raises(DarkhorseError, match="messages"):
        split_record({"domain": "math"})
    with pytest.raises(DarkhorseError, match="assistant"):
        split_record({"messages": [{"role": "user", "content": "hi"}]})


class ScriptedModel(nn.Module):
    """Stands in for a Transformer: greedy decoding of a known prompt yields a scripted continuation.

    Each prompt (by token ids) maps to the ids the 'model' should write; after the script runs out it
    keeps writing id 0 (which would corrupt the answer if the evaluator did not stop at the stop ids).
    It follows each row's tokens as the engine feeds them (prompts of a batch may differ in length).
    """

    def __init__(self, scripts: dict[tuple[int, ...], list[int]], vocab_size: int) -> None:
        super().__init__()
        self.scripts, self.vocab_size = scripts, vocab_size
        self.embed = nn.Embedding(vocab_size, 4)
        self.config = SimpleNamespace(max_seq_len=256, padded_vocab_size=vocab_size)

    def new_cache(self, batch: int, max_len: int) -> list[list[int]]:
        return [[] for _ in range(batch)]

    def next_id(self, fed: list[int]) -> int:
        for prompt, script in self.scripts.items():
            step = len(fed) - len(prompt)
            if tuple(fed[: len(prompt)]) == prompt and 0 <= step < len(script):
                return script[step]
        return 0

    def forward(self, tokens, *, cache, start_pos):
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], self.vocab_size)
        for row, fed in enumerate(cache):
            assert len(fed) == start_pos
            fed += tokens[row].tolist()
            logits[row, -1, self.next_id(fed)] = 1.0
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def tokenizer():
    examples = [addition_problem(a, b) for a in range(10, 40, 3) for b in range(50, 90, 7)]
    examples += [sort_problem([a, 15, 77, 42, 30]) for a in range(10, 99, 5)]
    texts = [render_conversation(e.to_record()["messages"], e.reasoning) for e in examples]
    return Tokenizer.train(texts, vocab_size=300)


def _reply(tokenizer, reasoning, answer):
    """The continuation of a think prompt (reasoning first) or a no-think prompt, then junk past the stop."""
    head = f"{reasoning}<|/think|><|assistant|>" if reasoning else ""
    return tokenizer.encode(f"{head}{answer}<|/assistant|>") + tokenizer.encode("<|assistant|>0 junk 99")


def test_batched_greedy_eval_scores_right_and_wrong_answers(tokenizer):
    right_add, wrong_add = addition_problem(47, 38), addition_problem(23, 51)
    right_sort, wrong_sort = sort_problem([42, 17, 93, 15, 60]), sort_problem([11, 22, 33, 55, 44])
    scripts = {}
    replies = {
        right_add: (right_add.reasoning, "85"),
        wrong_add: ("3+1=4, 2+5=7, so 47", "47"),
        right_sort: (None, "15, 17, 42, 60, 93"),
        wrong_sort: (None, "11, 22, 33, 55, 44"),
    }
    for example, (reasoning, answer) in replies.items():
        think = example.reasoning is not None
        prompt = tokenizer.encode(render_prompt(example.to_record()["messages"][:1], think=think))
        scripts[tuple(prompt)] = _reply(tokenizer, reasoning, answer)
    model = ScriptedModel(scripts, tokenizer.vocab_size)
    records = [e.to_record() for e in replies]
    seen = []
    report = evaluate_exact_match(model, tokenizer, records, batch_size=2, on_outcome=seen.append)
    assert [o.correct for o in report.outcomes] == [True, False, True, False]
    assert [o.predicted for o in report.outcomes] == ["85", "47", "15, 17, 42, 60, 93", "11, 22, 33, 55, 44"]
    assert report.outcomes[0].reasoning == right_add.reasoning and report.outcomes[2].reasoning is None
    assert report.outcomes[0].question == "What is 47 + 38?"
    assert report.by_skill()["addition"].accuracy == 0.5 and report.by_domain()["lists"].accuracy == 0.5
    assert len(seen) == 4
    assert model.training  # the evaluator restores the mode it found


def test_foreign_tokenizer_is_prompted_by_its_template_and_stops_at_its_end_of_turn(tmp_path, foreign_tokenizer):
    """An imported model's tokenizer: the prompt is its own chat template, the reply ends at <|eot_id|>."""
    tok = Tokenizer.from_file(foreign_tokenizer(tmp_path))
    examples = [addition_problem(12, 30), addition_problem(47, 38)]
    replies = ["42", "58"]
    scripts = {}
    for example, reply in zip(examples, replies, strict=True):
        prompt = render_chat_prompt(tok, example.to_record()["messages"][:1])
        assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
        script = tok.encode(reply) + [tok.token_to_id("<|eot_id|>")] + tok.encode(" junk 99")
        scripts[tuple(tok.encode(prompt))] = script
    model = ScriptedModel(scripts, tok.vocab_size)
    report = evaluate_exact_match(model, tok, [e.to_record() for e in examples])
    assert [o.predicted for o in report.outcomes] == ["42", "58"]
    assert [o.correct for o in report.outcomes] == [True, False]
