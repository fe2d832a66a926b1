"""Which llama.cpp build runs our GGUF files, and how fast: builds side by side in one run.

llama-cpp-python loads its libraries from LLAMA_CPP_LIB_PATH when set, so several builds of the same
llama.cpp version (one per set of CMake flags) can be compared without reinstalling. For each build
(`--build LABEL=LIB_DIR`, an empty LIB_DIR meaning the installed one) every file runs in its own child
process, so a crash is a result, not the end of the run:

* correctness: the trained tiny models of tests/conftest.py (dense llama, deepseek2 MLA+MoE, Mixtral-style
  llama MoE), exported with `export_gguf` as f32/f16/q8_0 and quantized by llama.cpp to Q8_0/Q4_K_M.
  Each file decodes 40 greedy tokens, compared with darkhorse's, and the largest logit difference on
  the whole sequence is reported (the tests' tolerances: f16 2e-2, q8_0 3e-1);
* speed: a random-init d20 model (dim 256) as f32/f16/Q8_0/Q4_K_M, 128 greedy decode steps on one
  thread, timed in process CPU time (less sensitive to a loaded machine than wall time), builds taking
  turns for --repeats rounds; the median and the ratio to the first build are reported.

Build a variant's CPU backend from llama-cpp-python's vendored llama.cpp, e.g. without AMX:
    cmake -S vendor/llama.cpp -B /tmp/b -G Ninja -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_AVX512=ON
    cmake --build /tmp/b --target ggml-cpu
then copy the installed llama_cpp/lib/ and replace libggml-cpu.so* with the new one.

Usage: python bench/bench_llama_cpp_builds.py --build installed= --build noamx=/tmp/lib-noamx [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD_CHECK = """
import json, sys
import numpy as np
import llama_cpp
entry = json.loads(sys.argv[1])
f32 = llama_cpp.GGML_TYPE_F32
llm = llama_cpp.Llama(entry["file"], n_ctx=256, logits_all=True, n_threads=1, type_k=f32, type_v=f32, verbose=False)
tokens = []
for token in llm.generate(entry["prompt"], top_k=1, temp=0.0, reset=True):
    tokens.append(token)
    if len(tokens) == len(entry["expected"]):
        break
sequence = entry["prompt"] + entry["expected"]
llm.reset()
llm.eval(sequence)
diff = np.abs(np.asarray(llm.scores[: len(sequence)]) - np.load(entry["logits"])).max()
print(json.dumps({"greedy_equal": tokens == entry["expected"], "max_logit_diff": float(diff)}))
"""

CHILD_SPEED = """
import json, sys, time
import llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=160, n_threads=1, verbose=False)
prompt = [(7 * i + 3) % 256 + 12 for i in range(16)]
llm.eval(prompt)
start, count = time.process_time(), 0
for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=False):
    count += 1
    if count == 128:
        break
print(count / (time.process_time() - start))
"""


def child(code: str, args: list[str], lib: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": lib} if lib else dict(os.environ)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)


def correctness_files(work: Path) -> dict[str, dict]:
    import conftest

    from darkhorse.checkpoint import load_for_inference
    from darkhorse.infer.engine import Engine
    from darkhorse.interop.gguf import export_gguf
    from darkhorse.interop.quantize import quantize_gguf

    checkpoints = {
        "llama": conftest.train_tiny_checkpoint(work / "llama"),
        "deepseek2": conftest.train_tiny_genesis(work / "genesis"),
        "llama MoE": conftest.train_tiny_mixtral(work / "mixtral"),
    }
    files = {}
    for arch, checkpoint in checkpoints.items():
        model, tokenizer, _ = load_for_inference(checkpoint)
        prompt = tokenizer.encode("three four five six")
        expected = list(Engine(model, tokenizer.vocab_size).stream(prompt, max_new_tokens=40))
        logits = work / f"{checkpoint.name}-logits.npy"
        with torch.no_grad():
            np.save(logits, model(torch.tensor([prompt + expected])).logits[0].numpy())
        entry = {"prompt": prompt, "expected": expected, "logits": str(logits)}
        for outtype in ("f32", "f16", "q8_0"):
            path = export_gguf(checkpoint, work / f"{checkpoint.name}-{outtype}.gguf", outtype)
            files[f"{arch} {outtype} (export_gguf)"] = {**entry, "file": str(path)}
        if arch == "llama":
            for qtype in ("Q8_0", "Q4_K_M"):
                report = quantize_gguf(work / "llama-f16.gguf", work / f"llama-{qtype}.gguf", qtype, threads=1)
                files[f"{arch} {qtype} (llama.cpp quantizer)"] = {**entry, "file": str(report.out_path)}
    return files


def speed_files(work: Path) -> dict[str, str]:
    from bench_gguf import make_checkpoint

    from darkhorse.interop.gguf import export_gguf
    from darkhorse.interop.quantize import quantize_gguf

    checkpoint = make_checkpoint("d20", work)
    files = {t: str(export_gguf(checkpoint, work / f"d20-{t}.gguf", t)) for t in ("f32", "f16")}
    for qtype in ("Q8_0", "Q4_K_M"):
        files[qtype] = str(quantize_gguf(work / "d20-f16.gguf", work / f"d20-{qtype}.gguf", qtype, threads=1).out_path)
    return files


def check(entry: dict, lib: str) -> str:
    result = child(CHILD_CHECK, [json.dumps(entry)], lib)
    if result.returncode != 0:
        assertion = next((line for line in result.stderr.splitlines() if "GGML_ASSERT" in line), "")
        return f"crash (exit {result.returncode}) {assertion.rsplit('/', 1)[-1]}".strip()
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    greedy = "greedy equal" if answer["greedy_equal"] else "greedy DIFFERS"
    return f"{greedy}, max logit diff {answer['max_logit_diff']:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="append", default=[], metavar="LABEL=LIB_DIR")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    builds = dict(spec.split("=", 1) for spec in args.build or ["installed="])
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-llama-builds-"))

    files = correctness_files(work)
    print("| file | " + " | ".join(builds) + " |")
    print("|---|" + "---|" * len(builds))
    for name, entry in files.items():
        print(f"| {name} | " + " | ".join(check(entry, lib) for lib in builds.values()) + " |", flush=True)
    if args.skip_speed:
        return

    speed = speed_files(work)
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for label, lib in builds.items():
            for qtype, path in speed.items():
                result = child(CHILD_SPEED, [path], lib)
                if result.returncode == 0:
                    rates.setdefault((label, qtype), []).append(float(result.stdout.split()[-1]))
    first = next(iter(builds))
    print("\n| d20 file | " + " | ".join(f"{label} tok/s (vs {first})" for label in builds) + " |")
    print("|---|" + "---|" * len(builds))
    for qtype in speed:
        base = statistics.median(rates[(first, qtype)]) if (first, qtype) in rates else None
        cells = []
        for label in builds:
            if (label, qtype) not in rates:
                cells.append("crash")
                continue
            rate = statistics.median(rates[(label, qtype)])
            cells.append(f"{rate:.0f} ({rate / base:.2f}x)" if base else f"{rate:.0f}")
        print(f"| {qtype} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
