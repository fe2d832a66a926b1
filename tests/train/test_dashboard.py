"""Dashboard output, metrics records, MFU peaks and the memory warning."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from darkhorse.config import load_run_config
from darkhorse.errors import DarkhorseError
from darkhorse.train.dashboard import Dashboard, ExternalLogger, format_duration, plain_line, sparkline
from darkhorse.train.memory import GIB, MemoryEstimate, fit_warning
from darkhorse.train.peak_flops import GPU_PEAKS, measured_peak, table_peak

RECORD = {"step": 120, "loss": 3.4121, "lr": 3e-4, "tokens_per_s": 12345.0, "mfu": 0.041, "memory_gib": 1.23,
          "tokens_seen": 61440, "bad_steps": 0, "expert_load_max": 0.31}  # fmt: skip


def test_plain_line_has_the_documented_shape():
    line = plain_line(RECORD, 1000, 192)
    assert line == "step 120/1000 | loss 3.412 | lr 3.0e-04 | 12.3k tok/s | MFU 4.1% | mem 1.2 GiB | ETA 3m12s"


def test_sparkline_and_durations():
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"
    assert sparkline([5.0, 1.0])[-1] == "▁" and len(sparkline(list(range(100)), width=40)) == 40
    assert sparkline([]) == "" and sparkline([float("nan")]) == ""
    assert [format_duration(s) for s in (5, 192, 7260)] == ["5s", "3m12s", "2h01m"]


def test_records_go_to_metrics_jsonl_and_plain_lines_to_stdout(tmp_path, capsys):
    with Dashboard(tmp_path, max_steps=1000, start_step=0, train_tokens=10**6, live=False) as dashboard:
        dashboard.log_step(RECORD)
        dashboard.log_eval({"step": 120, "val_loss": 3.5, "val_bpb": 1.25}, sample="hello")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 120/1000 | loss 3.412")
    assert out[1] == "eval step 120 | val loss 3.500 | val bpb 1.250" and out[2] == "sample: 'hello'"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == RECORD and records[1]["val_bpb"] == 1.25


def test_live_view_renders_every_field(tmp_path):
    dashboard = Dashboard(tmp_path, max_steps=1000, start_step=0, train_tokens=10**6, live=True)
    dashboard.losses = [4.0, 3.8, 3.41]
    dashboard.latest = RECORD
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(dashboard._render())
    text = console.file.getvalue()
    for expected in ("step 120/1000", "ETA", "3.4121", "3.00e-04", "12.3k", "4.1%", "1.23 GiB", "0.061",
                     "expert_load_max", "▁"):  # fmt: skip
        assert expected in text, expected


def test_quiet_dashboard_prints_nothing_but_records(tmp_path, capsys):
    with Dashboard(tmp_path, max_steps=10, start_step=0, train_tokens=10, verbose=False) as dashboard:
        dashboard.log_step(RECORD)
        dashboard.message("hi")
    assert capsys.readouterr().out == ""
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_missing_logger_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(DarkhorseError, match="pip install wandb"):
        ExternalLogger("wandb", tmp_path, {})


def test_peak_flops_table_and_cpu_measurement():
    assert table_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert table_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert table_peak("NVIDIA H200", "fp32") == 494e12
    assert table_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert table_peak("NVIDIA L40S", "bf16") == 362e12 and table_peak("NVIDIA L4", "bf16") == 121e12
    assert table_peak("Some Future GPU", "bf16") is None
    assert all(half >= full for _, half, full in GPU_PEAKS)
    peak = measured_peak("cpu", "fp32", size=64, repeats=2)
    assert peak > 1e6 and measured_peak("cpu", "fp32", size=64, repeats=2) == peak  # cached per process


def test_memory_warning_only_when_it_clearly_will_not_fit():
    estimate = MemoryEstimate(weights=4 * GIB, grads=4 * GIB, optimizer=8 * GIB, activations=4 * GIB)
    assert fit_warning(estimate, 64 * GIB) is None and fit_warning(estimate, None) is None
    assert fit_warning(estimate, 18 * GIB) is None  # within the margin: might fit, no noise
    assert "20.0 GiB" in fit_warning(estimate, 8 * GIB)


def test_params_memory_estimate_counts_lion_state_once():
    from darkhorse.train.memory import estimate_training_memory

    adamw = load_run_config("d20", overrides=["train.scalar_optimizer=adamw"])
    lion = load_run_config("d20", overrides=["train.scalar_optimizer=lion"])
    assert estimate_training_memory(lion, 100, 60).optimizer == 60 * 4 + 40 * 4
    assert estimate_training_memory(adamw, 100, 60).optimizer == 60 * 4 + 40 * 8
