"""The CLI's one error boundary: every command, given a broken input of each kind, ends in one
`darkhorse: error:` line (or argparse's usage error), a non-zero exit and never a traceback.

Everything runs in-process through `darkhorse.cli.main` on a tiny random checkpoint built here, so the
whole module takes a few seconds."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess

import pytest
import torch

from darkhorse.cli import EXIT_CODES, describe_error, main
from darkhorse.errors import DarkhorseError
from darkhorse.files import atomic_dir
from tests.conftest import write_prepared_dir

INPUT, FILE, OS, LIBRARY = (EXIT_CODES[k] for k in ("input", "file", "os", "library"))
USAGE = "usage"  # argparse refuses the arguments (exit 2, usage + one error line)


class Payload:
    """A pickle that would run a command if it were ever unpickled."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A good tiny checkpoint and one broken input of each kind, by name."""
    from darkhorse.checkpoint import save_model_checkpoint
    from darkhorse.config import ModelConfig, RunConfig, TrainConfig
    from darkhorse.data.tokenizer import Tokenizer
    from darkhorse.interop.export import export_checkpoint
    from darkhorse.model import Transformer

    root = tmp_path_factory.mktemp("broken")
    tokenizer = Tokenizer.train(["the cat sat on the mat, the dog ran"] * 20, vocab_size=300)
    tokenizer_file = tokenizer.save(root / "tokenizer.json")
    model = ModelConfig(vocab_size=tokenizer.vocab_size, n_layers=1, dim=32, n_heads=2, n_kv_heads=2, ffn_dim=64,
                        max_seq_len=64)  # fmt: skip
    config = RunConfig(name="tiny", model=model, train=TrainConfig(seq_len=32, batch_size=2))
    torch.manual_seed(0)
    good = save_model_checkpoint(root / "good", Transformer(model).eval(), config, tokenizer_file, {"step": 1})
    paths = {
        "good": good,
        "prepared": write_prepared_dir(
            root / "prepared", vocab_size=tokenizer.vocab_size, tokenizer_sha256=tokenizer.sha256
        ),
    }

    paths["truncated"] = shutil.copytree(good, root / "truncated")
    os.truncate(paths["truncated"] / "model.safetensors", 200)
    paths["bad-meta"] = shutil.copytree(good, root / "bad-meta")
    meta = json.loads((good / "meta.json").read_text())
    meta["config"]["model"]["vocab_size"] = "many"
    (paths["bad-meta"] / "meta.json").write_text(json.dumps(meta))
    paths["garbage-meta"] = shutil.copytree(good, root / "garbage-meta")
    (paths["garbage-meta"] / "meta.json").write_bytes(b"\xff\xfe{not json")
    paths["garbage-adapter"] = root / "garbage-adapter"
    paths["garbage-adapter"].mkdir()
    (paths["garbage-adapter"] / "adapter_config.json").write_text('{"r": 8, "target_modules": [')
    (paths["garbage-adapter"] / "adapter_model.safetensors").write_bytes(b"\x00" * 12)

    paths["hf"] = export_checkpoint(good, root / "hf", "hf")
    paths["hf-truncated"] = shutil.copytree(paths["hf"], root / "hf-truncated")
    os.truncate(paths["hf-truncated"] / "model.safetensors", 300)
    paths["hf-arch"] = shutil.copytree(paths["hf"], root / "hf-arch")
    hf_config = json.loads((paths["hf"] / "config.json").read_text())
    (paths["hf-arch"] / "config.json").write_text(json.dumps({**hf_config, "architectures": 5}))
    paths["hf-escape"] = shutil.copytree(paths["hf"], root / "hf-escape")
    (root / "outside").mkdir()
    (paths["hf-escape"] / "model.safetensors").rename(root / "outside" / "secret.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "../outside/secret.safetensors"}}
    (paths["hf-escape"] / "model.safetensors.index.json").write_text(json.dumps(index))

    paths["pickle-export"] = export_checkpoint(good, root / "pickle-export", "pt")
    (paths["pickle-export"] / "model.pt").write_bytes(pickle.dumps({"x": Payload()}))

    paths["a-file"] = root / "a-file"
    paths["a-file"].write_text("not a directory\n")
    paths["not-utf8"] = root / "not-utf8.jsonl"
    paths["not-utf8"].write_bytes(b'{"prompt": "\xff\xfe", "answer": "x"}\n')
    paths["gguf"] = root / "garbage.gguf"
    paths["gguf"].write_bytes(b"GGUF" + b"\x00" * 40)
    return paths


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `darkhorse ARGV`, whether it returns or argparse exits."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


# (name, argv with {placeholders} from `files`, expected exit code, words the error line must contain)
CASES = [
    ("generate truncated weights", "generate --checkpoint {truncated} --prompt hi", FILE, ["safetensors", "truncated"]),
    ("chat truncated weights", "chat --checkpoint {truncated}", FILE, ["safetensors"]),
    ("eval truncated weights", "eval --checkpoint {truncated} --suite --suite-per-skill 0", FILE, ["safetensors"]),
    ("export truncated weights", "export --checkpoint {truncated} --format hf --out {tmp}/x", FILE, ["safetensors"]),
    ("gguf truncated weights", "export --checkpoint {truncated} --format gguf --out {tmp}/x.gguf", FILE, []),
    ("import truncated weights", "import {hf-truncated} --out {tmp}/x", FILE, ["safetensors", "hf-truncated"]),
    ("init-from truncated", "train --init-from {truncated} --data {prepared} --out {tmp}/run", FILE, []),
    ("finetune truncated base", "finetune --base {truncated} --data {prepared} --out {tmp}/run", FILE, []),
    ("meta.json wrong type", "generate --checkpoint {bad-meta} --prompt hi", INPUT, ["meta.json", "vocab_size"]),
    ("meta.json not UTF-8", "export --checkpoint {garbage-meta} --format pt --out {tmp}/x", INPUT, ["meta.json"]),
    ("merge garbage adapter", "merge --adapter {garbage-adapter} --out {tmp}/x", INPUT, ["adapter_config.json"]),
    ("HF architectures: 5", "import {hf-arch} --out {tmp}/x", INPUT, ["config.json", "architectures"]),
    ("weight_map escapes", "import {hf-escape} --out {tmp}/x", INPUT, ["outside"]),
    ("pickle in a .pt export", "import {pickle-export} --out {tmp}/x", FILE, ["model.pt"]),
    ("--config is a directory", "train --config {tmp} --data {prepared} --out {tmp}/run", OS, ["directory"]),
    ("train.seed=-1", "train --preset tiny-cpu --data {prepared} --out {tmp}/run train.seed=-1", INPUT, ["train.seed"]),
    (
        "grad_clip nan",
        "train --preset tiny-cpu --data {prepared} --out {tmp}/run train.grad_clip=nan",
        INPUT,
        ["train.grad_clip"],
    ),
    (
        "eval_steps -1",
        "train --preset tiny-cpu --data {prepared} --out {tmp}/run train.eval_steps=-1",
        INPUT,
        ["train.eval_steps"],
    ),
    ("warmup -5", "params --preset tiny-cpu train.warmup_steps=-5", INPUT, ["train.warmup_steps"]),
    ("out under a file", "export --checkpoint {good} --format hf --out {a-file}/x", OS, ["a-file"]),
    ("prepare out under a file", "prepare --input {a-file} --out {a-file}/x", OS, ["a-file"]),
    ("demo out under a file", "demo --quick --out {a-file}/x", OS, ["a-file"]),
    ("download from a directory", "download open-platypus --from-file {tmp} --out {tmp}/dl", INPUT, []),
    ("eval tasks not UTF-8", "eval --checkpoint {good} --tasks {not-utf8}", INPUT, ["not-utf8"]),
    ("quantize garbage gguf", "quantize {gguf} --type Q8_0 --out {tmp}/q.gguf", INPUT, []),
    ("--device bogus", "generate --checkpoint {good} --prompt hi --device bogus", USAGE, ["--device"]),
    ("--top-k -3", "generate --checkpoint {good} --prompt hi --top-k -3", USAGE, ["--top-k"]),
    ("--repetition-penalty nan", "chat --checkpoint {good} --repetition-penalty nan", USAGE, ["finite"]),
    ("--tokenizer-sample-mb -1", "prepare --input x --out y --tokenizer-sample-mb -1", USAGE, ["sample-mb"]),
    ("params --context -1", "params --preset tiny-cpu --context -1", USAGE, ["--context"]),
]


def _fill(part: str, names: dict) -> str:
    for name, path in names.items():
        part = part.replace("{" + name + "}", str(path))
    return part


@pytest.mark.parametrize(("name", "command", "code", "words"), CASES, ids=[case[0] for case in CASES])
def test_every_command_fails_in_one_line(files, tmp_path, capsys, name, command, code, words):
    names = {**files, "tmp": tmp_path}
    argv = [_fill(part, names) for part in command.split()]
    actual, err = run_cli(argv, capsys)
    assert "Traceback" not in err and "weights_only" not in err
    lines = err.strip().splitlines()
    if code == USAGE:
        assert actual == 2 and lines[-1].startswith("darkhorse ") and ": error: argument" in lines[-1], err
    else:
        assert actual == code and len(lines) >= 1 and lines[-1].startswith("darkhorse: error: "), err
        assert not any(line.startswith("darkhorse: error: ") for line in lines[:-1]), err
    for word in words:
        assert word in lines[-1], lines[-1]


def test_debug_shows_the_traceback(files, capsys, monkeypatch):
    argv = ["generate", "--checkpoint", str(files["truncated"]), "--prompt", "hi"]
    with pytest.raises(Exception, match="incomplete metadata|header"):
        main(["--debug", *argv])
    with pytest.raises(Exception, match="incomplete metadata|header"):
        main([*argv, "--debug"])
    monkeypatch.setenv("DARKHORSE_DEBUG", "1")
    with pytest.raises(Exception, match="incomplete metadata|header"):
        main(argv)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no one may write into: mode 0555, or for root (whom permissions do not stop) a read-only
    tmpfs; skipped where root cannot mount one."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o555)
        yield locked, "Permission denied"
        return
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(locked)], capture_output=True
        )
    except OSError as exc:
        pytest.skip(f"root, and cannot mount a read-only tmpfs here: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"root, and cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield locked, os.strerror(errno.EROFS)
    finally:
        subprocess.run(["umount", str(locked)], check=True)


def test_read_only_output_is_one_line(files, read_only_dir, capsys):
    locked, reason = read_only_dir
    code, err = run_cli(
        ["export", "--checkpoint", str(files["good"]), "--format", "hf", "--out", f"{locked}/x"], capsys
    )
    assert code == OS and reason in err and str(locked) in err and len(err.strip().splitlines()) == 1


def test_full_disk_mid_write_names_the_output(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OSError) as caught, atomic_dir(target, force=False):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    message, code = describe_error(caught.value)
    assert code == OS and message == f"{os.strerror(errno.ENOSPC)} ({target})"
    assert not target.exists()


def test_torch_unpickling_advice_never_shows(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(Exception) as caught:
        torch.load(path, weights_only=True)
    assert "weights_only" in str(caught.value)  # what torch says ...
    message, code = describe_error(caught.value)
    assert code == FILE and "weights_only" not in message  # ... and what the user sees


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (DarkhorseError("x"), INPUT),
        (RecursionError("maximum recursion depth exceeded"), FILE),
        (json.JSONDecodeError("Expecting value", "{", 1), FILE),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), FILE),
        (RuntimeError("CUDA error: out of memory\nmore"), LIBRARY),
        (AttributeError("'NoneType' object has no attribute 'x'"), EXIT_CODES["internal"]),
    ],
)
def test_every_kind_has_its_exit_code(exc, code):
    message, actual = describe_error(exc)
    assert actual == code and "\n" not in message


def test_a_wrapped_library_message_is_still_one_line_without_the_unpickling_advice(capsys, monkeypatch):
    def fail(args):
        raise DarkhorseError(
            "state.pt: cannot load it (Weights only load failed.\n(1) retry with weights_only=False\nx)"
        )

    monkeypatch.setattr("darkhorse.commands.params.run", fail)
    monkeypatch.setattr("darkhorse.cli.SUBCOMMANDS", {"params": "params"})
    code, err = run_cli(["params"], capsys)
    assert code == INPUT and err == "darkhorse: error: state.pt: cannot load it (Weights only load failed. x)\n"


def test_another_rank_says_a_refusal_only_if_rank_0_has_not_ended_the_run(capsys, monkeypatch):
    """Under torchrun rank 0 says a refusal every rank meets, and torchrun stops the others when it exits;
    a rank still running after the grace period met it alone and says it, with its rank."""
    import darkhorse.cli as cli

    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    monkeypatch.setenv("RANK", "1")
    assert cli.report_failure(DarkhorseError("no such data")) == INPUT
    assert slept == [cli.REFUSAL_GRACE_S]
    assert capsys.readouterr().err == "darkhorse: error: rank 1: no such data\n"
    assert cli.report_failure(RuntimeError("boom")) == LIBRARY  # its own failure: said at once
    assert slept == [cli.REFUSAL_GRACE_S]
    assert capsys.readouterr().err == "darkhorse: error: rank 1: boom\n"
    monkeypatch.setenv("RANK", "0")
    assert cli.report_failure(DarkhorseError("no such data")) == INPUT
    assert capsys.readouterr().err == "darkhorse: error: no such data\n"
