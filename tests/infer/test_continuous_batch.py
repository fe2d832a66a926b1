"""Continuous batching in the decode engine: rows join and leave between steps, each at its own cache
position with its own sampling, and every row decodes exactly as it would alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from darkhorse.config import MLAConfig, ModelConfig, MoEConfig
from darkhorse.errors import DarkhorseError
from darkhorse.infer.dense_forward import DenseForward, ModelForward
from darkhorse.infer.engine import ContinuousBatch, Engine, Row
from darkhorse.infer.sampling import SamplingOptions
from darkhorse.model import Transformer

PROMPTS = [[5, 17, 42, 8], [1, 2], [60, 2, 2, 2, 2, 2, 2], [7], [4, 5, 6], [9, 9], [30, 31, 32, 33, 34]]


def build(**overrides) -> Transformer:
    torch.manual_seed(0)
    shape = dict(vocab_size=100, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
    model = Transformer(ModelConfig(**{**shape, **overrides}))
    with torch.no_grad():  # sharper logits so greedy choices are not near-ties
        model.embed.weight.mul_(8)
    return model.eval()


def smeared(model: Transformer) -> Transformer:
    """The smear starts at zero (as the model without it): give it values."""
    with torch.no_grad():
        model.smear.gate.normal_()
        model.smear.scale.normal_()
    return model


MODELS = {
    "gqa": lambda: build(),
    "mla-moe": lambda: build(
        attention="mla",
        ffn="moe",
        mla=MLAConfig(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
        moe=MoEConfig(n_routed_experts=4, experts_per_token=2, moe_intermediate_size=64, capacity_factor=0.0),
    ),  # fmt: skip
    "gqa-smear": lambda: smeared(build(smear="embed")),  # the tokens so far are cached too, and move with their row
}


def run(batch: ContinuousBatch, rows: list[Row], cancel: dict[int, int] | None = None) -> int:
    """Feed `rows` in as slots free up, step until all are done; `cancel` maps a step to a row to remove."""
    pending, steps = list(rows), 0
    while pending or batch.rows:
        while pending and not batch.full:
            batch.add(pending.pop(0))
        batch.step()
        steps += 1
        if cancel and steps in cancel:
            batch.remove(rows[cancel[steps]])
    return steps


@pytest.mark.parametrize("max_rows", [3, 1])  # 1: `serve --max-batch 1`, where a plain decode of one row
@pytest.mark.parametrize("kind", MODELS)  # would take the native step, which has no per-row positions
def test_rows_joining_and_leaving_decode_as_alone(kind, max_rows):
    model = MODELS[kind]()
    engine = Engine(model, 100)
    alone = [engine.generate([prompt], max_new_tokens=3 + 2 * i)[0] for i, prompt in enumerate(PROMPTS)]
    rows = [Row(prompt, max_new_tokens=3 + 2 * i) for i, prompt in enumerate(PROMPTS)]
    cancelled = 2 if max_rows > 1 else None  # row 2 leaves early, while others decode beside it
    run(ContinuousBatch(engine, max_rows), rows, cancel={4: cancelled} if cancelled else None)
    for index, (row, expected) in enumerate(zip(rows, alone, strict=True)):
        if index == cancelled:
            assert row.finish_reason == "cancelled" and row.tokens == expected[: len(row.tokens)]
        else:
            assert (row.tokens, row.finish_reason) == (expected, "length")


def test_each_row_samples_with_its_own_settings_and_seed():
    engine = Engine(build(), 100)
    options = dict(max_new_tokens=12, temperature=1.3, top_p=0.9, top_k=30, repetition_penalty=1.2, seed=11)

    def sampled(neighbours: int) -> list[int]:
        rows = [Row([3, 1, 4], **options)] + [Row([i + 1], max_new_tokens=5 + i) for i in range(neighbours)]
        run(ContinuousBatch(engine, 4), rows)
        return rows[0].tokens

    first = sampled(0)
    assert first == sampled(3)  # the neighbours do not change a seeded row's draws
    assert first == engine.generate([[3, 1, 4]], **options)[0]  # nor does the batch: as Engine.steps alone


def test_stop_ids_budget_and_context_end():
    engine = Engine(build(), 100)
    free = engine.generate([PROMPTS[0]], max_new_tokens=10)[0]
    stop = free.index(free[-1])  # where the last token first appears
    rows = [Row(PROMPTS[0], max_new_tokens=10, stop_ids={free[-1]}), Row(list(range(60)), max_new_tokens=50),
            Row([1, 2], max_new_tokens=0)]  # fmt: skip
    run(ContinuousBatch(engine, 3), rows)
    assert (rows[0].tokens, rows[0].finish_reason) == (free[: stop + 1], "stop")
    assert (len(rows[1].tokens), rows[1].finish_reason) == (4, "length")  # the context ends at 64
    assert (rows[2].tokens, rows[2].finish_reason) == ([], "length")
    batch = ContinuousBatch(engine, 1)
    with pytest.raises(DarkhorseError):
        batch.add(Row(list(range(64)), max_new_tokens=1))
    with pytest.raises(DarkhorseError):
        batch.add(Row([], max_new_tokens=1))
    batch.add(Row([1], max_new_tokens=1))
    with pytest.raises(DarkhorseError):
        batch.add(Row([2], max_new_tokens=1))


def test_logprobs_of_prompt_and_new_tokens_are_the_models():
    model = build()
    row = Row(PROMPTS[2], max_new_tokens=3, logprobs=2, prompt_logprobs=True)
    run(ContinuousBatch(Engine(model, 100), 2), [row])
    ids = PROMPTS[2] + row.tokens
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    expected = [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert row.prompt_token_logprobs[0] is None
    assert row.prompt_token_logprobs[1:] + row.token_logprobs == pytest.approx(expected, abs=1e-4)
    top = logprobs[len(PROMPTS[2]) - 1].topk(2)
    assert [token for token, _ in row.top_logprobs[0]] == top.indices.tolist()
    assert row.tokens[0] == top.indices[0]  # greedy takes the likeliest


def test_the_batch_decodes_dense_models_through_the_dense_step_at_ragged_positions():
    """Serving's batched step is `DenseForward` with per-row positions (other models keep their forward), and
    each row's logprobs, rows at different positions decoding together, are `Transformer.forward`'s."""
    assert isinstance(ContinuousBatch(Engine(MODELS["mla-moe"](), 100), 2).decoder.step, ModelForward)
    model = build()
    batch = ContinuousBatch(Engine(model, 100), 4)
    assert isinstance(batch.decoder.step, DenseForward)
    rows = [Row(prompt, SamplingOptions(max_new_tokens=6), logprobs=1) for prompt in PROMPTS[:4]]
    run(batch, rows)
    for row in rows:
        ids = row.prompt + row.tokens
        with torch.no_grad():
            logprobs = F.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
        expected = [float(logprobs[i - 1, ids[i]]) for i in range(len(row.prompt), len(ids))]
        assert row.token_logprobs == pytest.approx(expected, abs=1e-4)
        assert row.tokens == Engine(model, 100).generate([row.prompt], max_new_tokens=6)[0]
