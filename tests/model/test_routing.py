"""Routing statistics: mutual information, reports, measurement without touching training counts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from darkhorse.config import load_run_config
from darkhorse.errors import DarkhorseError
from darkhorse.model import Transformer
from darkhorse.model.routing import (
    compare_domain_prior,
    measure_domain_routing,
    moe_layers,
    mutual_information,
    write_routing_reports,
)


def test_mutual_information_bounds():
    assert mutual_information(torch.tensor([[5.0, 5.0], [5.0, 5.0]])) == pytest.approx(0.0)
    assert mutual_information(torch.tensor([[7.0, 0.0], [0.0, 7.0]])) == pytest.approx(1.0)
    four = torch.eye(4) * 3
    assert mutual_information(four) == pytest.approx(math.log2(4))
    assert mutual_information(torch.zeros(3, 3)) == 0.0


def tiny_moe(*overrides: str) -> Transformer:
    config = load_run_config(
        "genesis-tiny", overrides=["model.n_layers=2", "model.vocab_size=128", "model.mtp_depth=0", *overrides]
    )
    torch.manual_seed(0)
    return Transformer(config.model)


def test_reports_after_training_steps(tmp_path):
    model = tiny_moe().train()
    tokens = torch.randint(0, 128, (2, 16))
    domains = torch.tensor([[0] * 16, [2] * 16], dtype=torch.uint8)
    for step in (1, 2):
        model(tokens, tokens, domains=domains).loss.backward()
        model.after_optimizer_step(step)
    written = write_routing_reports(tmp_path, model, ["code", "math", "legal"])
    assert sorted(p.name for p in written) == ["domain_routing.json", "domain_routing.png", "expert_utilization.png"]
    report = json.loads((tmp_path / "domain_routing.json").read_text())
    assert report["domains"] == ["code", "legal"] and report["domain_ids"] == [0, 2]
    assert [layer["layer"] for layer in report["layers"]] == [1]
    assert sum(map(sum, report["layers"][0]["counts"])) == 2 * 2 * 16 * 2  # 2 steps x 32 tokens x top-2
    assert 0 <= report["layers"][0]["mutual_information_bits"] <= 1


def test_dense_models_write_no_routing_reports(tmp_path):
    model = Transformer(load_run_config("tiny-cpu").model)
    assert write_routing_reports(tmp_path, model) == []


def test_measure_domain_routing_leaves_training_counts_alone():
    model = tiny_moe("model.moe.domain_prior=true", "model.moe.n_domains=2")
    layer = moe_layers(model)[0]
    layer.domain_counts[0, 0] = 42.0
    tokens = torch.randint(0, 128, (64,))
    domains = torch.tensor([0] * 32 + [1] * 32)
    bits = measure_domain_routing(model.train(), tokens, domains, seq_len=16)
    assert set(bits) == {1} and 0 <= bits[1] <= 1
    assert layer.domain_counts[0, 0] == 42.0 and layer.domain_counts.sum() == 42.0
    assert model.training and not layer.count_domains_in_eval


@pytest.mark.slow
def test_compare_domain_prior_trains_both_ways_and_measures_untagged_routing(tmp_path, make_prepared):
    data = make_prepared(tmp_path / "prepared", domains=True)
    config = load_run_config("genesis-tiny", overrides=[
        "model.n_layers=2", "model.mtp_depth=0", "train.seq_len=32", "train.batch_size=4", "train.max_steps=3",
        "train.eval_interval=0", "train.warmup_steps=0", "model.moe.domain_prior_anneal_steps=2",
    ])  # fmt: skip
    result = compare_domain_prior(config, data, tmp_path / "runs", verbose=False)
    assert result["domains"] == ["a", "b", "c"] and result["max_bits"] == pytest.approx(math.log2(3))
    for label in ("without_prior", "with_prior"):
        assert set(result[label]) == {1}
        assert 0 <= result[label][1] <= result["max_bits"]
    assert (tmp_path / "runs" / "with_prior" / "domain_routing.json").exists()


def test_compare_domain_prior_needs_tagged_data(tmp_path, make_prepared):
    data = make_prepared(tmp_path / "plain")
    with pytest.raises(DarkhorseError, match="no domain tags"):
        compare_domain_prior(load_run_config("genesis-tiny"), data, tmp_path / "runs")
