"""Export/import time and peak memory of the HF interop, next to transformers doing the same job.

For each preset a random-init checkpoint is written once; then, each step in a fresh process (so its
peak RSS is its own):

    darkhorse export --format hf          vs  transformers from_pretrained + save_pretrained of that dir
    darkhorse import                      vs  transformers AutoModelForCausalLM.from_pretrained

Seconds count the operation only (imports and, for the transformers save, its load excluded). Peak
RSS is the whole process (python + torch alone is ~0.3 GiB; it counts the pages of mmapped source
files too) divided by the fp32 model size: the goal is about 1x, never 2x.

Usage: python bench/bench_interop.py [--presets forge-nano genesis-1b] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = {
    "make": """
import torch
from darkhorse.config import load_run_config
from darkhorse.data.tokenizer import Tokenizer
from darkhorse.model import Transformer
from darkhorse.checkpoint import save_model_checkpoint
config = load_run_config(preset=PRESET)
tok = Tokenizer.train(["alpha beta gamma delta"] * 10, vocab_size=300).save(WORK / "tokenizer.json")
model = Transformer(config.model)
save_model_checkpoint(WORK / "ckpt", model, config, tok, {"step": 0})
RESULT = sum(p.numel() for p in model.parameters()) * 4
""",
    "darkhorse export": """
from darkhorse.interop.export import export_hf
START()
export_hf(WORK / "ckpt", WORK / "hf", force=True)
""",
    "transformers save": """
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(str(WORK / "hf"), dtype=torch.float32)
START()
model.save_pretrained(str(WORK / "hf-peer"))
""",
    "darkhorse import": """
from darkhorse.interop.hf_import import import_hf
START()
import_hf(WORK / "hf", WORK / "imported", force=True)
""",
    "transformers load": """
import torch, transformers
START()
transformers.AutoModelForCausalLM.from_pretrained(str(WORK / "hf"), dtype=torch.float32)
""",
}


def run_step(name: str, preset: str, work: Path) -> dict:
    """Run one step in a child process: seconds from START() (after imports), peak RSS, optional RESULT."""
    code = (
        "import time, json, resource, sys\nfrom pathlib import Path\n"
        f"PRESET, WORK, RESULT = {preset!r}, Path({str(work)!r}), None\n"
        "start = time.perf_counter()\n"
        "def START():\n    global start\n    start = time.perf_counter()\n" + STEPS[name] + "\n"
        "elapsed = time.perf_counter() - start\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(json.dumps({'seconds': elapsed, 'peak_bytes': peak, 'result': RESULT}))\n"
    )
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def bench(preset: str, work: Path) -> list[str]:
    made = run_step("make", preset, work)
    model_bytes = made["result"]
    rows = [f"### {preset}: {model_bytes / 4e6:,.0f}M parameters, {model_bytes / 2**30:.2f} GiB fp32", ""]
    rows += ["| step | seconds | peak RSS GiB | peak RSS / model size |", "|---|---|---|---|"]
    results = {}
    for name in ("darkhorse export", "transformers save", "darkhorse import", "transformers load"):
        result = run_step(name, preset, work)
        seconds = results[name] = result["seconds"]
        peak = result["peak_bytes"]
        rows.append(f"| {name} | {seconds:.2f} | {peak / 2**30:.2f} | {peak / model_bytes:.2f} |")
    rows.append("")
    rows.append(
        f"time ratios: export / transformers save = {results['darkhorse export'] / results['transformers save']:.2f}; "
        f"import / transformers load = {results['darkhorse import'] / results['transformers load']:.2f}"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["forge-nano", "genesis-1b"])
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir, removed)")
    args = parser.parse_args()
    work_root = args.work or Path(tempfile.mkdtemp(prefix="bench-interop-"))
    try:
        for preset in args.presets:
            work = work_root / preset
            work.mkdir(parents=True, exist_ok=True)
            print("\n".join(bench(preset, work)), flush=True)
            shutil.rmtree(work)
    finally:
        if args.work is None:
            shutil.rmtree(work_root, ignore_errors=True)
    print(f"(parent peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; {time.ctime()})")


if __name__ == "__main__":
    main()
