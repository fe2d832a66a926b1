"""The training loop through its Python API: learning, exact resume, NaN skipping, run-dir rules."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch

from darkhorse import checkpoint as ckpt
from darkhorse.commands.eval import _held_out_routing
from darkhorse.config import load_run_config
from darkhorse.errors import DarkhorseError
from darkhorse.eval.report import ModelEval
from darkhorse.train.device import out_of_memory_advice
from darkhorse.train.run_dir import plan_run
from darkhorse.train.trainer import Trainer, train

SMALL = [
    "model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
    "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=4", "train.warmup_steps=2",
    "train.eval_steps=2", "train.log_interval=1",
]  # fmt: skip


def small_config(*overrides: str):
    return load_run_config("tiny-cpu", overrides=[*SMALL, *overrides])


def losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_loss_falls_on_a_fixed_corpus(tmp_path, prepared_dir):
    config = small_config("train.max_steps=40", "train.lr=1e-2", "train.eval_interval=40", "train.save_interval=0")
    result = train(config, [(prepared_dir, 1.0)], tmp_path / "run", verbose=False)
    curve = losses(tmp_path / "run")
    assert curve[40] < 0.5 * curve[1]
    assert result.val_loss is not None and result.val_loss < 0.5 * math.log(64)
    # bytes per token is 3 in the fixture, so bits per byte is the loss in bits over 3
    assert result.val_bpb == pytest.approx(result.val_loss / math.log(2) / 3)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    model, loaded_config, meta = ckpt.load_model(tmp_path / "run" / "final")
    assert meta["step"] == 40 and loaded_config.model.vocab_size == 64  # vocab comes from the data


@pytest.mark.parametrize(("optimizer", "loss_mask"), [("adamw", False), ("muon", False), ("adamw", True)])
def test_resume_repeats_the_uninterrupted_losses_exactly(tmp_path, make_prepared, optimizer, loss_mask):
    prepared_dir = make_prepared(tmp_path / "data", loss_mask=loss_mask)
    settings = ["train.schedule=constant", "train.save_interval=3", f"train.optimizer={optimizer}",
                "train.eval_interval=3"]  # fmt: skip
    train(small_config("train.max_steps=6", *settings), [(prepared_dir, 1.0)], tmp_path / "whole", verbose=False)
    train(small_config("train.max_steps=3", *settings), [(prepared_dir, 1.0)], tmp_path / "split", verbose=False)
    resumed = train(small_config("train.max_steps=6", *settings), [], tmp_path / "split", resume=True, verbose=False)
    assert resumed.step == 6
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert list(split) == [1, 2, 3, 4, 5, 6]
    assert split == whole  # bit-identical floats, not approximately equal
    for name in ("model.safetensors",):
        a = (tmp_path / "whole" / "final" / name).read_bytes()
        assert a == (tmp_path / "split" / "final" / name).read_bytes()


def test_masked_data_trains_on_marked_targets_and_reports_no_bits_per_byte(tmp_path, make_prepared):
    data = make_prepared(tmp_path / "data", loss_mask=True)
    settings = ["train.max_steps=2", "train.eval_interval=2", "train.save_interval=0"]
    masked = train(small_config(*settings), [(data, 1.0)], tmp_path / "masked", verbose=False)
    assert masked.val_bpb is None  # the bytes behind the masked tokens are unknown
    unmasked = train(small_config(*settings, "train.loss_mask=false"), [(data, 1.0)], tmp_path / "all", verbose=False)
    assert unmasked.val_bpb == pytest.approx(unmasked.val_loss / math.log(2) / 3)
    assert masked.val_loss != unmasked.val_loss


def test_resume_refuses_a_changed_model_or_optimizer_setting(tmp_path, prepared_dir):
    config = small_config("train.max_steps=2", "train.save_interval=0", "train.eval_interval=0")
    train(config, [(prepared_dir, 1.0)], tmp_path / "run", verbose=False)
    with pytest.raises(DarkhorseError, match="train.lr"):
        train(small_config("train.max_steps=4", "train.lr=1e-4"), [], tmp_path / "run", resume=True, verbose=False)


def test_existing_run_is_never_clobbered_without_force(tmp_path, prepared_dir):
    config = small_config("train.max_steps=2", "train.save_interval=0", "train.eval_interval=0")
    train(config, [(prepared_dir, 1.0)], tmp_path / "run", verbose=False)
    with pytest.raises(DarkhorseError, match="--resume.*--force"):
        train(config, [(prepared_dir, 1.0)], tmp_path / "run", verbose=False)
    result = train(config, [(prepared_dir, 1.0)], tmp_path / "run", force=True, verbose=False)
    assert result.step == 2
    assert len(losses(tmp_path / "run")) == 2  # the old metrics went with the old run


def test_nan_losses_are_skipped_counted_and_stop_training(tmp_path, prepared_dir, monkeypatch):
    from darkhorse.model import Transformer

    original = Transformer.forward
    calls = {"n": 0}

    def sometimes_nan(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if out.loss is not None and calls["n"] in (2, 3):  # steps 2 and 3 (grad_accum 1)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", sometimes_nan)
    config = small_config("train.max_steps=5", "train.save_interval=0", "train.eval_interval=0")
    result = train(config, [(prepared_dir, 1.0)], tmp_path / "run", verbose=False)
    assert result.bad_steps == 2 and result.step == 5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in records] == [0, 1, 2, 2, 2]
    assert records[1]["grad_norm"] is None and records[3]["grad_norm"] is not None

    calls["n"] = -100  # from now on every step is NaN
    monkeypatch.setattr(Transformer, "forward", lambda self, *a, **k: _all_nan(original(self, *a, **k)))
    config = small_config("train.max_steps=20", "train.max_bad_steps=3", "train.save_interval=0")
    with pytest.raises(DarkhorseError, match="3 non-finite losses in a row"):
        train(config, [(prepared_dir, 1.0)], tmp_path / "run2", verbose=False)


def _all_nan(out):
    if out.loss is not None:
        out.loss = out.loss * float("nan")
    return out


def test_skipped_step_leaves_the_weights_alone(tmp_path, prepared_dir, monkeypatch):
    from darkhorse.model import Transformer

    original = Transformer.forward
    monkeypatch.setattr(Transformer, "forward", lambda self, *a, **k: _all_nan(original(self, *a, **k)))
    torch.manual_seed(small_config().train.seed)
    untouched = Transformer(dataclasses.replace(small_config().model, vocab_size=64))
    config = small_config("train.max_steps=2", "train.max_bad_steps=5", "train.save_interval=0")
    trainer = Trainer(plan_run(config, [(prepared_dir, 1.0)], tmp_path / "run"), verbose=False)
    with pytest.raises(DarkhorseError, match="diverged"):  # a model whose last loss is NaN is never saved
        trainer.run()
    assert not (tmp_path / "run" / ckpt.FINAL_NAME).exists()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, untouched.state_dict()[name]), name


def test_model_hooks_and_loss_terms_are_logged(tmp_path, prepared_dir, monkeypatch):
    from darkhorse.model import Transformer

    seen_steps = []
    monkeypatch.setattr(Transformer, "after_optimizer_step", lambda self, step: seen_steps.append(step))
    monkeypatch.setattr(Transformer, "training_metrics", lambda self: {"expert_load_max": 0.5})
    config = small_config("train.max_steps=3", "train.save_interval=0", "train.eval_interval=0")
    train(config, [(prepared_dir, 1.0)], tmp_path / "run", verbose=False)
    assert seen_steps == [1, 2, 3]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["expert_load_max"] == 0.5
    assert record["lm_loss"] == pytest.approx(record["loss"])
    assert {"step", "loss", "lr", "tokens_per_s", "mfu", "memory_gib", "epoch"} <= set(record)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, prepared_dir):
    # windows are numbered across the step, so 2 micro-batches of 2 rows see the 4 rows of one batch;
    # AdamW, as Muon's Newton-Schulz iterations (bf16) magnify the summation-order difference past 1e-5
    common = ["train.max_steps=2", "train.save_interval=0", "train.eval_interval=0", "train.grad_clip=0",
              "train.optimizer=adamw"]  # fmt: skip
    one = train(small_config(*common, "train.batch_size=4"), [(prepared_dir, 1.0)], tmp_path / "a", verbose=False)
    accumulated = train(
        small_config(*common, "train.batch_size=2", "train.grad_accum=2"),
        [(prepared_dir, 1.0)],
        tmp_path / "b",
        verbose=False,
    )
    assert accumulated.last_loss == pytest.approx(one.last_loss, rel=1e-5)
    a, _, _ = ckpt.load_model(one.checkpoint)
    b, _, _ = ckpt.load_model(accumulated.checkpoint)
    for name, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def test_out_of_memory_advice_lists_the_knobs_in_order():
    advice = out_of_memory_advice(small_config(), torch.device("cpu"))
    order = ["train.batch_size", "train.seq_len", "train.grad_checkpointing=true", "train.dtype=bf16",
             "train.grad_accum", "smaller preset"]  # fmt: skip
    positions = [advice.index(knob) for knob in order]
    assert positions == sorted(positions)
    assert "(now 4)" in advice


def test_mixed_sources_must_share_a_tokenizer(tmp_path, make_prepared):
    a = make_prepared(tmp_path / "a")
    b = make_prepared(tmp_path / "b", tokenizer_sha256="another")
    with pytest.raises(DarkhorseError, match="different tokenizer"):
        train(small_config("train.max_steps=1"), [(a, 1.0), (b, 1.0)], tmp_path / "run", verbose=False)


def test_bf16_and_grad_checkpointing_train(tmp_path, prepared_dir):
    config = small_config("train.max_steps=2", "train.dtype=bf16", "train.grad_checkpointing=true",
                          "train.grad_accum=2", "train.save_interval=0", "train.eval_interval=2")  # fmt: skip
    result = train(config, [(prepared_dir, 1.0)], tmp_path / "run", verbose=False)
    assert result.step == 2 and math.isfinite(result.last_loss) and math.isfinite(result.val_loss)


def test_raw_text_file_is_prepared_and_evals_print_a_sample(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DARKHORSE_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.jsonl"
    texts = (f"doc {i}: the quick brown fox jumps over the lazy dog {i % 7} times." for i in range(600))
    lines = (json.dumps({"text": text}) for text in texts)
    corpus.write_text("\n".join(lines) + "\n")
    config = small_config("model.vocab_size=300", "train.max_steps=2", "train.eval_interval=2", "train.save_interval=0")
    result = train(config, [(corpus, 1.0)], tmp_path / "run", verbose=True, live=False)
    out = capsys.readouterr().out
    assert "eval step 2 | val loss" in out and "sample: '" in out
    assert f"data: {corpus} is prepared in {tmp_path / 'cache' / 'prepared' / 'corpus-'}" in out  # where it went
    assert result.val_bpb is not None
    model, saved_config, _ = ckpt.load_model(result.checkpoint)
    assert (result.checkpoint / "tokenizer.json").exists()  # generate and export need it
    assert saved_config.model.vocab_size <= 300


def test_domain_prior_takes_its_domain_count_from_the_data(tmp_path, make_prepared, capsys):
    data = make_prepared(tmp_path / "tagged", domains=True)
    config = small_config(
        "train.max_steps=1", "model.ffn=moe", "model.moe.n_routed_experts=4", "model.moe.moe_intermediate_size=32",
        "model.moe.domain_prior=true", "model.moe.first_k_dense=0",
    )  # fmt: skip
    train(config, [(data, 1.0)], tmp_path / "run", verbose=True, live=False)
    _, saved, _ = ckpt.load_model(tmp_path / "run" / "final")
    assert saved.model.moe.n_domains == len(json.loads((data / "meta.json").read_text())["domains"]) > 0
    # the end of the run names every report it wrote, the routing plots too, with the data's domain names
    reports = "loss.png, expert_utilization.png, domain_routing.json, domain_routing.png"
    assert f"reports in {tmp_path / 'run'}: {reports}" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "domain_routing.json").read_text())["domains"] == ["a", "b", "c"]


def isolated_config(*overrides: str):
    return small_config(
        "model.ffn=moe", "model.moe.moe_intermediate_size=32", "model.moe.domain_routing=isolated",
        "model.moe.first_k_dense=0", "model.moe.n_routed_experts=6", *overrides,
    )  # fmt: skip


def test_a_resumed_group_loss_warmup_goes_on_where_it_was(tmp_path, make_prepared):
    data = make_prepared(tmp_path / "tagged", domains=True)
    settings = ["model.moe.group_loss_warmup=4", "model.moe.group_loss_weight=1.0", "train.schedule=constant",
                "train.save_interval=2", "train.eval_interval=2"]  # fmt: skip
    train(isolated_config("train.max_steps=4", *settings), [(data, 1.0)], tmp_path / "whole", verbose=False)
    train(isolated_config("train.max_steps=2", *settings), [(data, 1.0)], tmp_path / "split", verbose=False)
    train(isolated_config("train.max_steps=4", *settings), [], tmp_path / "split", resume=True, verbose=False)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


def test_a_group_context_leaves_the_rest_of_the_model_trained_exactly_as_without_it(tmp_path, make_prepared):
    """The head reads detached hidden states, starts at zero and is clipped apart: switching it on adds the
    head and changes nothing else (it redrew every seed's weights before)."""
    data = make_prepared(tmp_path / "tagged", domains=True)
    settings = ["train.max_steps=3", "train.grad_clip=0.05", "model.moe.group_loss_weight=1.0"]  # clipping on
    weights = {}
    for context in (False, True):
        run = train(isolated_config(*settings, f"model.moe.group_context={context}"), [(data, 1.0)],
                    tmp_path / str(context), verbose=False).checkpoint  # fmt: skip
        weights[context] = dict(ckpt.load_model(run)[0].named_parameters())
    heads = {name for name in weights[True] if name.endswith("group_context.weight")}
    assert heads and all(weights[True][name].abs().sum() > 0 for name in heads)  # it learned
    assert set(weights[True]) - heads == set(weights[False])
    for name, param in weights[False].items():
        assert torch.equal(weights[True][name], param), name


def test_isolated_routing_says_its_partition_and_reports_held_out_isolation(tmp_path, make_prepared, capsys):
    data = make_prepared(tmp_path / "tagged", domains=True)
    train(isolated_config("train.max_steps=2"), [(data, 1.0)], tmp_path / "run", verbose=True, live=False)
    out = capsys.readouterr().out
    assert "isolated routing: 6 routed experts in 3 groups of 2 (experts a 0-1, b 2-3, c 4-5) + 1 shared" in out
    seq_len = isolated_config().train.seq_len  # rows sliding by half a row: no restart every row
    assert f"held-out routing, tags withheld, rows of {seq_len} sliding by {seq_len // 2}, layer 0: " in out
    _, saved, _ = ckpt.load_model(tmp_path / "run" / "final")
    assert (saved.model.moe.n_domains, saved.model.moe.n_groups, saved.model.moe.topk_groups) == (3, 3, 1)
    report = json.loads((tmp_path / "run" / "domain_routing.json").read_text())
    held_out = report["held_out"]
    assert held_out["domains"] == ["a", "b", "c"] and held_out["tags"] == "withheld"
    layer = held_out["layers"][0]
    assert 0 <= layer["share_of_domain_entropy"] <= 1 and 0 <= layer["token_group_accuracy"] <= 1
    assert layer["domain_entropy_bits"] == pytest.approx(math.log2(3), abs=1e-3)
    assert layer["documents"] > 1
    # `darkhorse eval --text` on the tagged dir reads the same figures, in its summary rows and JSON
    model, _, _ = ckpt.load_model(tmp_path / "run" / "final")
    result = ModelEval(label="run", routing=_held_out_routing(model, SimpleNamespace(bos_id=None), data, "val"))
    rows = result.metrics()
    assert "bits (" in rows["routing layer 0: I(domain; expert)"] and "routing layer 1: I(domain; expert)" in rows
    assert "% / " in rows["routing layer 0: group accuracy tokens / documents"]
    seq_len = model.config.max_seq_len  # eval's rows slide by half a row: no restart every row
    assert rows["routing read"] == f"documents in rows of {seq_len} sliding by {seq_len // 2}"
    assert result.to_dict()["routing"]["tags"] == "withheld"


def test_isolated_routing_refuses_untagged_data_and_too_few_experts(tmp_path, make_prepared, prepared_dir):
    with pytest.raises(DarkhorseError, match="routes by domain tags, but --data .* has none"):
        plan_run(isolated_config(), [(prepared_dir, 1.0)], tmp_path / "run")
    tagged = make_prepared(tmp_path / "tagged", domains=True)
    config = isolated_config("model.moe.n_routed_experts=2", "model.moe.experts_per_token=1")
    with pytest.raises(DarkhorseError, match="2 routed experts for 3 domains"):
        plan_run(config, [(tagged, 1.0)], tmp_path / "run2")
    config = isolated_config("model.moe.domain_experts=[4, 2]")  # the data has 3 domains
    with pytest.raises(DarkhorseError, match=r"domain_experts=\[4, 2\] must give each of the 3 domains"):
        plan_run(config, [(tagged, 1.0)], tmp_path / "run3")


def test_unequal_domain_groups_train_and_say_their_partition(tmp_path, make_prepared, capsys):
    data = make_prepared(tmp_path / "tagged", domains=True)
    config = isolated_config("train.max_steps=2", "model.moe.domain_experts=[3, 2, 1]")
    train(config, [(data, 1.0)], tmp_path / "run", verbose=True, live=False)
    assert "6 routed experts in 6 groups of 1 (experts a 0-2, b 3-4, c 5)" in capsys.readouterr().out
    _, saved, _ = ckpt.load_model(tmp_path / "run" / "final")
    assert (saved.model.moe.domain_experts, saved.model.moe.n_groups, saved.model.moe.topk_groups) == ([3, 2, 1], 6, 2)


def test_resumed_dashboard_continues_the_loss_sparkline(tmp_path, prepared_dir):
    run = tmp_path / "run"
    train(small_config("train.max_steps=3", "train.save_interval=0"), [(prepared_dir, 1.0)], run, verbose=False)
    plan = plan_run(small_config("train.max_steps=5"), [], run, resume=True)
    dashboard = Trainer(plan, verbose=False).dashboard
    assert dashboard.losses == list(losses(run).values()) and len(dashboard.losses) == 3
