"""Routing statistics: mutual information, counting through hooks, reports, measurement on a stream."""

from __future__ import annotations

import json
import math

import pytest
import torch

from darkhorse.config import load_run_config
from darkhorse.model import Transformer
from darkhorse.train.reports import write_routing_reports
from darkhorse.train.routing import (
    RoutingCounter,
    document_rows,
    group_accuracy,
    held_out_isolation,
    isolation_lines,
    moe_layers,
    mutual_information,
    route_windows,
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
    counter = RoutingCounter(model, training_only=True)
    tokens = torch.randint(0, 128, (2, 16))
    domains = torch.tensor([[0] * 16, [2] * 16], dtype=torch.uint8)
    for step in (1, 2):
        model(tokens, tokens, domains=domains).loss.backward()
        model.after_optimizer_step(step)
    model.eval()(tokens, domains=domains)  # evaluation forwards are not training statistics
    written = write_routing_reports(tmp_path, counter, ["code", "math", "legal"])
    assert sorted(p.name for p in written) == ["domain_routing.json", "domain_routing.png", "expert_utilization.png"]
    report = json.loads((tmp_path / "domain_routing.json").read_text())
    assert report["domains"] == ["code", "legal"] and report["domain_ids"] == [0, 2]
    assert [layer["layer"] for layer in report["layers"]] == [1]
    assert sum(map(sum, report["layers"][0]["counts"])) == 2 * 2 * 16 * 2  # 2 steps x 32 tokens x top-2
    assert 0 <= report["layers"][0]["mutual_information_bits"] <= 1
    assert int(counter.load[1].sum()) == 2 * 2 * 16 * 2


def test_mtp_layers_count_the_domains_of_the_positions_they_route():
    model = tiny_moe("model.mtp_depth=1").train()
    counter = RoutingCounter(model)
    tokens = torch.randint(0, 128, (1, 16))
    domains = torch.tensor([[0] * 4 + [1] * 12], dtype=torch.uint8)
    model(tokens, tokens, domains=domains)
    top_k = model.config.moe.experts_per_token
    assert counter.domain_counts[1][:2].sum(1).tolist() == [4 * top_k, 12 * top_k]
    assert counter.domain_counts[2][:2].sum(1).tolist() == [3 * top_k, 12 * top_k]  # depth 1: positions 1..15


def test_dense_models_write_no_routing_reports(tmp_path):
    model = Transformer(load_run_config("tiny-cpu").model)
    assert write_routing_reports(tmp_path, RoutingCounter(model)) == []


def test_route_windows_measures_eval_routing_and_leaves_the_model_as_it_was():
    model = tiny_moe("model.moe.domain_prior=true", "model.moe.n_domains=2").train()
    tokens = torch.randint(0, 128, (64,))
    domains = torch.tensor([0] * 32 + [1] * 32)
    counter = route_windows(model, tokens, domains, seq_len=16)
    bits = counter.mutual_information_by_layer()
    assert set(bits) == {1} and 0 <= bits[1] <= 1
    assert int(counter.domain_counts[1].sum()) == 64 * model.config.moe.experts_per_token
    assert model.training
    layer = moe_layers(model)[0]
    assert not layer.gate._forward_hooks and not model._forward_pre_hooks  # the hooks are gone


def test_group_accuracy_per_token_and_per_document():
    groups = torch.tensor([0, 0, 1, 1, 1, 0, 2, 2, 2, 0, 1])
    domains = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 255, 1])  # 255: untagged, left out
    starts = torch.tensor([1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    result = group_accuracy(groups, domains, starts, n_groups=3)
    assert result["token_group_accuracy"] == pytest.approx(8 / 10)
    assert result == {**result, "documents": 4, "document_group_accuracy": 1.0}  # majorities: 0, 1, 2; and 1
    result = group_accuracy(torch.tensor([1, 1, 0]), torch.tensor([0, 0, 0]), torch.tensor([1, 0, 0]).bool(), 3)
    assert (result["document_group_accuracy"], result["token_group_accuracy"]) == (0.0, pytest.approx(1 / 3))


def test_document_rows_read_each_document_from_its_start():
    tokens, domains = torch.arange(10, 20), torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
    starts = torch.tensor([1, 0, 0, 0, 0, 1, 0, 1, 0, 0], dtype=torch.bool)
    rows, row_domains, real = document_rows(tokens, domains, starts, seq_len=3)
    assert rows.tolist() == [[10, 11, 12], [13, 14, 0], [15, 16, 0], [17, 18, 19]]
    assert row_domains.tolist() == [[0, 0, 0], [0, 0, 255], [1, 1, 255], [2, 2, 2]]  # padding: untagged
    assert torch.equal(rows[real], tokens)  # the real tokens, in order


def test_sliding_document_rows_count_each_token_once_with_context_before_it():
    tokens, domains = torch.arange(10, 20), torch.tensor([0] * 7 + [1] * 3)
    starts = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
    rows, row_domains, real = document_rows(tokens, domains, starts, seq_len=4, stride=2)
    assert rows.tolist() == [[10, 11, 12, 13], [12, 13, 14, 15], [14, 15, 16, 0], [17, 18, 19, 0]]
    # a later row's first seq_len - stride tokens are context only: untagged, not counted again
    assert row_domains.tolist() == [[0, 0, 0, 0], [255, 255, 0, 0], [255, 255, 0, 255], [1, 1, 1, 255]]
    assert torch.equal(rows[real], tokens)
    assert torch.equal(
        document_rows(tokens, domains, starts, 4, stride=4)[0], document_rows(tokens, domains, starts, 4)[0]
    )
    with pytest.raises(ValueError, match="stride 5"):
        document_rows(tokens, domains, starts, 4, stride=5)


def test_held_out_isolation_with_sliding_rows_counts_every_token_once():
    isolated = ["model.moe.domain_routing=isolated", "model.moe.n_domains=3", "model.moe.n_routed_experts=6"]
    model = tiny_moe("model.moe.first_k_dense=0", *isolated).eval()
    tokens, domains = torch.randint(0, 128, (96,)), torch.tensor([0] * 40 + [1] * 40 + [2] * 16)
    rows = held_out_isolation(model, tokens, domains, 16, None, ["a", "b", "c"])
    sliding = held_out_isolation(model, tokens, domains, 16, None, ["a", "b", "c"], stride=4)
    assert (sliding["rows"], sliding["stride"], rows["stride"]) == (16, 4, 16)
    for plain, slid in zip(rows["layers"], sliding["layers"], strict=True):
        assert slid["documents"] == plain["documents"] == 3
        assert slid["domain_entropy_bits"] == pytest.approx(plain["domain_entropy_bits"])  # same tokens, once each
    assert "rows of 16 sliding by 4, layer 0" in isolation_lines(sliding)[0]
    assert "sliding" not in isolation_lines(rows)[0]


def test_held_out_group_accuracy_is_only_reported_where_groups_are_domains():
    """A layer before isolated_from_layer routes freely: its groups are not domains, so no group accuracy."""
    isolated = ["model.moe.domain_routing=isolated", "model.moe.n_domains=3", "model.moe.n_routed_experts=6"]
    model = tiny_moe("model.moe.first_k_dense=0", "model.moe.isolated_from_layer=1", *isolated).eval()
    tokens, domains = torch.randint(0, 128, (48,)), torch.tensor([0] * 16 + [1] * 16 + [2] * 16)
    report = held_out_isolation(model, tokens, domains, 16, None, ["a", "b", "c"])
    assert [layer["layer"] for layer in report["layers"]] == [0, 1]
    assert ["token_group_accuracy" in layer for layer in report["layers"]] == [False, True]


def test_held_out_group_accuracy_reads_each_experts_domain_with_unequal_groups():
    """Domains owning 4, 2 and 3 experts: every token sent to expert 3 is predicted as domain 0 (code 0-3)."""
    isolated = ["model.moe.domain_routing=isolated", "model.moe.n_domains=3", "model.moe.n_routed_experts=9"]
    model = tiny_moe("model.moe.first_k_dense=0", "model.moe.domain_experts=[4, 2, 3]", *isolated).eval()
    for layer in moe_layers(model):
        layer.gate.e_score_correction_bias[3] = 100.0
    tokens, domains = torch.randint(0, 128, (48,)), torch.tensor([0] * 32 + [1] * 16)
    report = held_out_isolation(model, tokens, domains, 16, None, ["a", "b", "c"])
    for row in report["layers"]:
        assert row["token_group_accuracy"] == pytest.approx(2 / 3)
        assert row["document_group_accuracy"] == pytest.approx(1 / 2)
