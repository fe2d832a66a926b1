"""LoRA fine-tuning end to end on tiny local bases: router freeze + aux loss + an 80/20 mix on a Mixtral base,
adapters that PEFT loads with the same logits, exact resume, small checkpoints, keep-last-N, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from darkhorse import checkpoint as ckpt
from darkhorse.cli import main
from darkhorse.errors import DarkhorseError
from darkhorse.finetune.lora import LoRASpec
from darkhorse.finetune.merge import merge_adapter
from darkhorse.finetune.run import RouterOptions, finetune, load_adapted_model
from darkhorse.interop.hf_import import import_hf
from tests.finetune.conftest import SMALL_RUN, VOCAB, build_hf_base

TOKENS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 100, 11, 64, 2, 150]])


def peft_logits(hf_dir, adapter_dir) -> torch.Tensor:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    adapted = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        return adapted(TOKENS).logits


def darkhorse_logits(adapter_dir, vocab: int) -> torch.Tensor:
    model, _ = load_adapted_model(adapter_dir)
    with torch.no_grad():
        return model(TOKENS).logits[..., :vocab]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def seed_run(base, chats, out, steps: int, **extra):
    """The seed's recipe at toy scale: expert r > router r, router frozen first, aux loss, 80/20 mix."""
    chat, memory = chats
    return finetune(
        base,
        [f"{chat}:0.8", f"{memory}:0.2"],
        out,
        spec=LoRASpec(expert_r=8, router_r=4, r=4),
        router=RouterOptions(freeze_steps=2, aux_loss_coef=0.01),
        overrides=[*SMALL_RUN, f"train.max_steps={steps}", "train.save_interval=2", "train.eval_interval=2"],
        verbose=False,
        **extra,
    )


def short_run(base, data, out, *overrides: str, **options):
    """A few-step LoRA run on one data source with the toy train settings (`options` go to finetune)."""
    return finetune(base, [str(data)], out, overrides=[*SMALL_RUN, *overrides], verbose=False, **options)


@pytest.fixture(scope="module")
def mixtral_run(mixtral_base, chat_files, tmp_path_factory):
    return seed_run(mixtral_base, chat_files, tmp_path_factory.mktemp("lora") / "run", 4)


def test_mixtral_seed_recipe_trains_only_adapters_and_peft_loads_them(mixtral_run, mixtral_base):
    run = mixtral_run.run_dir
    records = metrics(run)
    trainable = next(r for r in records if "lora_trainable" in r)["lora_trainable"]
    assert set(trainable) == {"attention", "router", "routed_experts"} and all(trainable.values())
    steps = [r for r in records if "loss" in r]
    assert all("router_aux_loss" in r and r["router_aux_loss"] > 0 for r in steps)
    # the router LoRA stays at its zero B through the freeze and moves after it
    frozen = ckpt.load_trainer_state(run / "step-000002")["adapter"]
    final = ckpt.load_trainer_state(run / "final")["adapter"]
    router_b = [name for name in final if name.endswith("ffn.gate.lora_B")]
    assert router_b and all(frozen[name].abs().max() == 0 for name in router_b)
    assert all(final[name].abs().max() > 0 for name in router_b)
    assert all(final[n].abs().max() > 0 for n in final if n.endswith("experts.down_proj_lora_B"))
    # only adapters are saved, under the base's Hugging Face names; PEFT loads them and agrees
    assert not (run / "final" / ckpt.MODEL_FILE).exists()
    keys = load_file(run / "final" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.gate.lora_B.weight" in keys
    sidecar = json.loads((run / "final" / "darkhorse_adapter.json").read_text())
    assert sidecar["base"]["fingerprint"].startswith("sha256:") and sidecar["base"]["kind"] == "hf"
    ours, theirs = darkhorse_logits(run / "final", VOCAB), peft_logits(mixtral_base, run / "final")
    assert (ours - theirs).abs().max() < 1e-4
    plain = torch.zeros_like(ours)  # and the adapter is not a no-op
    import transformers

    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(str(mixtral_base)).eval()(TOKENS).logits
    assert (ours - plain).abs().max() > 1e-3


def test_routing_drift_is_reported(mixtral_run):
    run = mixtral_run.run_dir
    drift = next(r for r in metrics(run) if "routing_drift" in r)["routing_drift"]
    assert [layer["layer"] for layer in drift["layers"]] == [0, 1]
    assert all(layer["kl_vs_base"] >= 0 and 0 < layer["entropy"] <= 1 for layer in drift["layers"])
    assert (run / "routing_drift.png").stat().st_size > 0


def test_merge_reads_the_run_and_gives_base_plus_adapter(mixtral_run, mixtral_base, tmp_path, capsys):
    """`darkhorse merge` of finetune's output: the base comes from darkhorse_adapter.json (the HF dir), its
    fingerprint is the one finetune recorded (an HF dir and its import hash alike), every adapted tensor
    changes (fused gate+up of rank 2r, down, router, attention), and the merged model computes darkhorse's
    base + adapter (fp32, 1e-5). A different base is refused, naming both, with nothing written."""
    final = mixtral_run.run_dir / "final"
    sidecar = json.loads((final / "darkhorse_adapter.json").read_text())
    assert main(["merge", "--adapter", str(final), "--out", str(tmp_path / "merged")]) == 0
    printed = capsys.readouterr().out
    assert f"weights {sidecar['base']['fingerprint'][:19]}" in printed and "mlp.experts.gate_up_proj" in printed
    assert "did not change" not in printed
    merged, _, _ = ckpt.load_model(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(
            merged(TOKENS).logits, load_adapted_model(final)[0](TOKENS).logits, atol=1e-5, rtol=0
        )

    result = merge_adapter(final, tmp_path / "from-import", base=import_hf(mixtral_base, tmp_path / "imported"))
    assert result.fingerprint == sidecar["base"]["fingerprint"]
    assert len(result.targets) == 2 * (4 + 3) and all(t.changed > 0 for t in result.targets)

    other = build_hf_base(tmp_path / "other", "mixtral", seed=7)
    out = tmp_path / "wrong"
    capsys.readouterr()
    assert main(["merge", "--adapter", str(final), "--base", str(other), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "different base" in error
    assert str(mixtral_base.resolve()) in error and str(other) in error
    assert not out.exists()


def test_resume_keeps_the_runs_lora_and_router_settings(mixtral_run, capsys, tmp_path):
    """Repeating the run's own flags resumes; a changed LoRA or router flag is refused in one line."""
    import shutil

    run = shutil.copytree(mixtral_run.run_dir, tmp_path / "run")
    same = ["--lora-r", "4", "--expert-lora-r", "8", "--router-lora-r", "4", "--router-freeze-steps", "2",
            "--router-aux-loss-coef", "0.01"]  # fmt: skip
    for flags, message in [
        (["--expert-lora-r", "16"], "--expert-lora-r 16 (the run has 8)"),
        (["--router-freeze-steps", "0"], "--router-freeze-steps 0 (the run has 2)"),
        (["--base-dtype", "bf16"], "--base-dtype 'bf16' (the run has 'fp32')"),
    ]:
        assert message in run_cli(capsys, "--out", run, "--resume", *flags)
    assert main(["finetune", "--out", str(run), "--resume", *same, "--quiet", "train.max_steps=5"]) == 0
    assert ckpt.read_meta(run / "final")["step"] == 5
    spent = ckpt.load_trainer_state(run / "final")["spent_seconds"]
    # a time budget on resume (shared with train): the clock goes on from the time spent; --max-steps caps it
    budget = ["--minutes", "60", "--max-steps", "6"]
    assert main(["finetune", "--out", str(run), "--resume", *same, "--quiet", *budget]) == 0
    meta = ckpt.read_meta(run / "final")
    assert meta["config"]["train"]["minutes"] == 60 and meta["step"] == 6
    assert ckpt.load_trainer_state(run / "final")["spent_seconds"] > spent


def test_lora_checkpoints_are_small_and_resume_exactly(mixtral_run, mixtral_base, chat_files, tmp_path):
    full_losses = [r["loss"] for r in metrics(mixtral_run.run_dir) if "loss" in r]
    out = tmp_path / "run"
    seed_run(mixtral_base, chat_files, out, 2)
    finetune(None, [], out, resume=True, overrides=["train.max_steps=4"], verbose=False)
    assert [r["loss"] for r in metrics(out) if "loss" in r] == full_losses
    # adapters (fp32; gate_up's block-diagonal B doubles its B) + 2 AdamW moments + resume copy, no base
    trainable = next(r for r in metrics(out) if "lora_total" in r)["lora_total"]
    files = {p.name: p.stat().st_size for p in (out / "final").iterdir()}
    assert ckpt.MODEL_FILE not in files
    assert files["adapter_model.safetensors"] < 4 * trainable * 1.5 + 16_384
    assert files[ckpt.STATE_FILE] < 3 * 4 * trainable + 65_536


def test_keep_last_applies(mixtral_base, chat_files, tmp_path):
    out = tmp_path / "run"
    short_run(mixtral_base, chat_files[0], out, "train.max_steps=3", "train.save_interval=1", "train.keep_last=1")
    assert [p.name for p in ckpt.training_checkpoints(out)] == ["step-000003"]


def test_dense_llama_base_with_dropout(llama_base, chat_files, tmp_path):
    out = tmp_path / "run"
    short_run(llama_base, chat_files[0], out, "train.max_steps=2", spec=LoRASpec(r=4, dropout=0.1))
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert "model.layers.0.mlp.gate_proj" in config["target_modules"] and not config["target_parameters"]
    assert (darkhorse_logits(out / "final", VOCAB) - peft_logits(llama_base, out / "final")).abs().max() < 1e-4


def test_genesis_base_keeps_its_bias_updating_and_peft_agrees(tiny_genesis_checkpoint, tmp_path):
    """MLA + DeepSeek MoE (darkhorse-native): PEFT reads the adapter on the `export --format hf` of the base;
    the router whose selection bias kept updating is saved whole (modules_to_save)."""
    from darkhorse.interop.export import export_checkpoint

    chats = tmp_path / "chats.jsonl"
    with open(chats, "w") as handle:
        for word, after in zip(
            ["one", "two", "red", "blue"] * 5, ["two", "three", "orange", "indigo"] * 5, strict=True
        ):
            handle.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"after {word}?"},
                            {"role": "assistant", "content": after},
                        ]
                    }
                )
                + "\n"
            )
    out = tmp_path / "run"
    short_run(tiny_genesis_checkpoint, chats, out, "train.max_steps=2", spec=LoRASpec(r=4, expert_r=4, router_r=4))
    with pytest.raises(DarkhorseError, match="add router to --lora-targets, or pass --no-bias-update"):
        finetune(tiny_genesis_checkpoint, [str(chats)], tmp_path / "other", spec=LoRASpec(targets=("attention",)))
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.layers.1.mlp.gate"]  # layer 0 is dense (first_k_dense)
    before = load_file(tiny_genesis_checkpoint / ckpt.MODEL_FILE)["layers.1.ffn.gate.e_score_correction_bias"]
    after = load_file(out / "final" / "adapter_model.safetensors")
    assert not torch.equal(after["base_model.model.model.layers.1.mlp.gate.e_score_correction_bias"], before)
    hf_dir = export_checkpoint(tiny_genesis_checkpoint, tmp_path / "hf", "hf")
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    assert (darkhorse_logits(out / "final", vocab) - peft_logits(hf_dir, out / "final")).abs().max() < 1e-4


# -- bad input: one line, exit 2, nothing written -------------------------------------------------------


def run_cli(capsys, *argv) -> str:
    code = main(["finetune", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("darkhorse: error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora-r", "0"], "--lora-r must be a positive integer"),
        (["--expert-lora-r", "-2"], "--expert-lora-r must be a positive integer"),
        (["--lora-alpha", "0"], "--lora-alpha must be > 0"),
        (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
        (["--lora-dropout", "0.1"], "PEFT's LoRA for parameters"),
        (["--lora-targets", "shared_experts"], "shared_experts matched nothing"),
        (["--lora-targets", "mlp"], "unknown group(s) mlp"),
        (["--router-freeze-steps", "-1"], "--router-freeze-steps must be >= 0"),
    ],
)
def test_bad_lora_settings(capsys, tmp_path, mixtral_base, chat_files, flags, message):
    out = tmp_path / "run"
    assert message in run_cli(capsys, "--base", mixtral_base, "--data", chat_files[0], "--out", out, *flags)
    assert not out.exists()


def test_base_without_weights(capsys, tmp_path, mixtral_base, chat_files):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((mixtral_base / "config.json").read_text())
    out = tmp_path / "run"
    assert "without weights" in run_cli(capsys, "--base", empty, "--data", chat_files[0], "--out", out)
    assert not out.exists()


def test_data_without_assistant_turns(capsys, tmp_path, mixtral_base):
    data = tmp_path / "users.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hello there"}]}) + "\n")
    out = tmp_path / "run"
    err = run_cli(capsys, "--base", mixtral_base, "--data", data, "--out", out)
    assert f"{data}:1" in err and "no assistant turn" in err
    assert not out.exists()


def test_malformed_records_are_named_and_skipped_with_skip_bad(capsys, tmp_path, mixtral_base, chat_files):
    data = tmp_path / "mixed.jsonl"
    data.write_text(chat_files[0].read_text() + "{not json\n")
    out = tmp_path / "run"
    err = run_cli(capsys, "--base", mixtral_base, "--data", data, "--out", out)
    assert f"{data}:41" in err and "--skip-bad" in err
    assert not out.exists()
    assert main(["finetune", "--base", str(mixtral_base), "--data", str(data), "--out", str(out), "--skip-bad",
                 "--quiet", *SMALL_RUN, "train.max_steps=1"]) == 0  # fmt: skip
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_template_that_cannot_render_a_record(capsys, tmp_path, mixtral_base, chat_files):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(mixtral_base, base)
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    (base / "tokenizer_config.json").write_text(json.dumps(settings))
    out = tmp_path / "run"
    err = run_cli(capsys, "--base", base, "--data", chat_files[0], "--out", out)
    assert f"{chat_files[0]}:1" in err and "no system role" in err
    assert not out.exists()


def test_bf16_base_trains_fp32_adapters(mixtral_base, chat_files, tmp_path):
    result = short_run(mixtral_base, chat_files[0], tmp_path / "run", "train.max_steps=2", "train.dtype=bf16",
                       base_dtype="bf16")  # fmt: skip
    assert result.last_loss is not None and result.last_loss == result.last_loss  # finite, not NaN
    adapters = load_file(result.run_dir / "final" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in adapters.values())
