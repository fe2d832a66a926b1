"""Run llama.cpp work in a child process, so a crash in llama.cpp cannot take a darkhorse command down.

llama.cpp's CPU kernels can fault on some processors (its AMX path on AVX-512/AMX Xeons segfaults or
aborts on Q8_0 and K-quant files: docs/experiments.md, 2026-11-30). In-process, that kills the
command with no message. Here the work runs in `python -m darkhorse.interop.llama_cpp_child`: the
request goes in as JSON on stdin, the answer comes back as JSON on stdout, and a child that dies by
a signal becomes one DarkhorseError naming the file, the llama.cpp version and the workaround.

Tasks (the only code that touches llama_cpp in darkhorse's library):
- `quantize`: `llama_model_quantize` from an f32/f16/bf16 GGUF to a llama_ftype.
- `perplexity`: summed next-token NLL of token windows, from llama.cpp's own logits.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from darkhorse.errors import DarkhorseError

LLAMA_CPP_MISSING = "llama-cpp-python is not installed: `make install-test` builds it (or pip install llama-cpp-python)"
WORKAROUND = (
    "on AVX-512/AMX CPUs reinstall llama-cpp-python built without llama.cpp's AMX path: "
    "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install --force-reinstall --no-cache-dir llama-cpp-python "
    "(make install-test builds it that way)"
)


def llama_cpp_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return "not installed"


def run_llama_cpp(task: str, path: str | Path, **request: Any) -> dict[str, Any]:
    """Run `task` on the GGUF file `path` in a child process and return its JSON answer."""
    if llama_cpp_version() == "not installed":
        raise DarkhorseError(LLAMA_CPP_MISSING)
    payload = json.dumps({"task": task, "path": str(path), **request})
    child = subprocess.run(
        [sys.executable, "-m", "darkhorse.interop.llama_cpp_child"],
        input=payload,
        capture_output=True,
        text=True,
    )
    last_log_line = (child.stderr.strip().splitlines() or ["no output"])[-1].strip()
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        detail = next((line.strip() for line in child.stderr.splitlines() if "GGML_ASSERT" in line), "")
        where = f" ({detail.rsplit('/', 1)[-1]})" if detail else ""
        raise DarkhorseError(
            f"llama.cpp (llama-cpp-python {llama_cpp_version()}) crashed with {name}{where} during {task} of {path}; "
            f"the file may be fine: {WORKAROUND}"
        )
    answer = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else ""
    try:
        result = json.loads(answer)
    except json.JSONDecodeError:
        raise DarkhorseError(f"llama.cpp {task} of {path} failed (exit {child.returncode}): {last_log_line}") from None
    if "error" in result:
        raise DarkhorseError(f"{result['error']}: {last_log_line}")
    return result


# -- the child side ------------------------------------------------------------------------------


def _quantize(llama_cpp, request: dict) -> dict:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = request["ftype"]
    params.nthread = request["threads"]
    status = llama_cpp.llama_model_quantize(request["path"].encode(), request["out"].encode(), params)
    if status != 0:
        return {"error": f"llama.cpp could not quantize {request['path']} (status {status})"}
    return {}


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    return log_norm - logits[np.arange(len(targets)), targets]


def _perplexity(llama_cpp, request: dict) -> dict:
    context = request["context"]
    llm = llama_cpp.Llama(
        request["path"], n_ctx=context, n_batch=context, n_ubatch=context, logits_all=True,
        n_threads=request["threads"], verbose=False,
    )  # fmt: skip
    total, count = 0.0, 0
    try:
        for window in request["windows"]:
            llm.reset()
            llm.eval(window)
            nll = _log_softmax_nll(np.asarray(llm.scores[: len(window) - 1]), np.asarray(window[1:]))
            total, count = total + float(nll.sum()), count + len(nll)
    finally:
        llm.close()
    return {"nll_sum": total, "count": count}


TASKS = {"quantize": _quantize, "perplexity": _perplexity}


def main() -> None:
    import logging

    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # libllama's per-tensor log lines
    request = json.loads(sys.stdin.read())
    print(json.dumps(TASKS[request["task"]](llama_cpp, request)), flush=True)


if __name__ == "__main__":
    main()
