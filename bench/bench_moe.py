"""MoE layer and Genesis training speed against transformers' DeepseekV3, plus MLA cache sizes.

1. One MoE layer (64 routed experts, top-4, one shared expert, sigmoid routing), forward + backward:
   our `MoE` (sorted dispatch, grouped matmuls) against transformers' `DeepseekV3MoE` holding the
   very same weights (checked equal before timing). transformers is timed with its default expert
   loop and with its own `grouped_mm` experts implementation. Goal: >= 2x the default.
2. Training steps (forward, backward, fused AdamW) of a Genesis preset against
   `DeepseekV3ForCausalLM` of the same shape (transformers has no MTP, so ours runs MTP depth 0
   here; the preset's own MTP cost shows in the "ours with MTP" column). Tokens/s and MFU with
   active-parameter FLOPs and the measured matmul peak of this device.
3. MLA KV-cache bytes per token per preset against GQA of the same width.

Runs alternate between the contenders so machine load hits both alike. On the CPU each figure is
the best of `--repeats` runs (the run least disturbed by other load on a shared machine), on
`--threads` threads; on a GPU (`--device cuda`) every run is bracketed by device synchronisations and
the figure is the median, after `--warmup` untimed rounds. `--profile FILE` writes torch.profiler's
table of each contender's forward + backward at the first `--layers` shape.

    .venv/bin/python bench/bench_moe.py --dtypes fp32 bf16 --presets genesis-tiny genesis-512
    python bench/bench_moe.py --device cuda --dtypes bf16 --layers 1024x512x16384 2560x512x16384 \
        --presets --warmup 3 --repeats 20 --profile out/moe-profile.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING, DeepseekV3ForCausalLM, PretrainedConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from darkhorse.config import ModelConfig, load_run_config
from darkhorse.interop.hf import adapter_for_export
from darkhorse.interop.hf.base import SpecialTokens
from darkhorse.model import Transformer
from darkhorse.model.moe import MoE, grouped_mm_supported
from darkhorse.train.peak_flops import peak_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_config(model: ModelConfig, **extra) -> PretrainedConfig:
    """transformers' config for exactly our model's shape: the one `darkhorse export --format hf` writes
    (Llama for dense presets, DeepseekV3 for Genesis), so the twin is the model the export tests match."""
    fields = adapter_for_export(model).config_to_hf(model, SpecialTokens(), "float32")
    return CONFIG_MAPPING[fields["model_type"]](**fields, attn_implementation="sdpa", **extra)


def copy_into_hf(ours: MoE, theirs: DeepseekV3MoE) -> None:
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.gate.weight)
        theirs.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
        theirs.experts.gate_up_proj.copy_(torch.cat([ours.experts.gate_proj, ours.experts.up_proj], dim=1))
        theirs.experts.down_proj.copy_(ours.experts.down_proj)
        theirs.shared_experts.load_state_dict(ours.shared_experts.state_dict())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    contenders: dict[str, Callable[[], None]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, float]:
    """Seconds per run: best of `repeats` on the CPU (least disturbed by load), median on a GPU."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(warmup + repeats):
        for name, run in contenders.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    pick = min if device.type == "cpu" else statistics.median
    return {name: pick(values) for name, values in times.items()}


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference.float()).norm() / reference.float().norm())


def bench_layer(
    dim: int,
    hidden: int,
    tokens: int,
    dtype: str,
    repeats: int,
    device: torch.device,
    warmup: int = 1,
    profile: Path | None = None,
) -> None:
    # MLA only so the HF config is DeepseekV3's; the layer timed here is the MoE block alone
    config = load_run_config(overrides=[
        f"model.dim={dim}", "model.n_heads=8", "model.attention=mla", "model.ffn=moe", "model.moe.n_routed_experts=64",
        "model.moe.experts_per_token=4", "model.moe.n_shared_experts=1", f"model.moe.moe_intermediate_size={hidden}",
        "model.moe.routed_scaling_factor=2.5", "model.moe.bias_update_rate=0",
    ]).model  # fmt: skip
    torch.manual_seed(0)
    ours = MoE(config, layer_idx=0).to(device, DTYPES[dtype])
    with torch.no_grad():
        ours.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    twins = {}
    for implementation in ("eager", "grouped_mm"):
        twin = DeepseekV3MoE(hf_config(config, experts_implementation=implementation)).to(device, DTYPES[dtype])
        copy_into_hf(ours, twin)
        twins[implementation] = twin
    x = torch.randn(1, tokens, dim, dtype=DTYPES[dtype], device=device)
    grad = torch.randn_like(x)
    # a norm-wise check: elementwise bf16 tolerances break on long sums in a different order
    tolerance = 1e-5 if dtype == "fp32" else 1e-2
    with torch.no_grad():
        expected = ours(x)
        for name, twin in twins.items():
            error = relative_error(twin(x), expected)
            assert error < tolerance, f"HF {name} differs from ours: relative error {error:.2e}"

    def step(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            module(x.detach().requires_grad_()).backward(grad)

        return run

    contenders = {"ours": step(ours), **{f"hf {k}": step(v) for k, v in twins.items()}}
    seconds = timed(contenders, repeats, device, warmup)
    dispatch = "grouped_mm" if grouped_mm_supported(x.device, x.dtype, hidden, dim) else "padded bmm"
    print(f"| {dim} x {hidden} | {tokens} | {dtype} | {dispatch} | {seconds['ours'] * 1e3:.2f} | "
          f"{seconds['hf eager'] * 1e3:.2f} | {seconds['hf grouped_mm'] * 1e3:.2f} | "
          f"{seconds['hf eager'] / seconds['ours']:.2f}x | {seconds['hf grouped_mm'] / seconds['ours']:.2f}x |",
          flush=True)  # fmt: skip
    if profile is not None:
        write_profile(profile, contenders, device, f"{dim} x {hidden}, {tokens} tokens, {dtype}, {device}")


def write_profile(path: Path, contenders: dict[str, Callable[[], None]], device: torch.device, title: str) -> None:
    """Operator table (self time, then total) of 5 forward + backward runs per contender."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for name, run in contenders.items():
            with torch.profiler.profile(activities=activities) as profiler:
                for _ in range(5):
                    run()
                synchronize(device)
            out.write(f"## {name}: {title}, 5 runs of forward + backward\n")
            out.write(profiler.key_averages().table(sort_by=sort, row_limit=30) + "\n\n")


def bench_training(preset: str, dtype: str, batch: int, seq_len: int, repeats: int) -> None:
    config = load_run_config(preset, overrides=[f"train.seq_len={seq_len}"])
    torch.manual_seed(0)
    no_mtp = dataclasses.replace(config.model, mtp_depth=0)
    models = {"ours": Transformer(no_mtp), "ours+mtp": Transformer(config.model),
              "hf": DeepseekV3ForCausalLM(hf_config(config.model))}  # fmt: skip
    tokens = torch.randint(0, config.model.vocab_size, (batch, seq_len + 1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step(name: str) -> Callable[[], None]:
        model = models[name].train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def run() -> None:
            with autocast:
                if name == "hf":
                    loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
                else:
                    loss = model(tokens[:, :-1], tokens[:, 1:], mtp_weight=0.3).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if name != "hf":
                model.after_optimizer_step(0)

        return run

    seconds = timed({name: step(name) for name in models}, repeats, torch.device("cpu"))
    peak = peak_flops(torch.device("cpu"), dtype)
    tok = batch * seq_len
    flops = models["ours"].flops_per_token(seq_len)
    mfu = tok / seconds["ours"] * flops / peak
    print(
        f"| {preset} | {dtype} | {batch}x{seq_len} | {tok / seconds['ours']:,.0f} | {100 * mfu:.1f}% | "
        f"{tok / seconds['ours+mtp']:,.0f} | {tok / seconds['hf']:,.0f} | {seconds['hf'] / seconds['ours']:.2f}x |"
    )


def cache_table(presets: list[str]) -> None:
    print("\n| preset | MLA bytes/token (bf16) | GQA same width | ratio | MLA at 128K | GQA at 128K |")
    print("|---|---|---|---|---|---|")
    for preset in presets:
        config = load_run_config(preset)
        with torch.device("meta"):
            model = Transformer(config.model)
        mla = 2 * model.kv_cache_values_per_token()
        full = 2 * sum(layer.attn.uncompressed_cache_values_per_token() for layer in model.layers)
        gib = 131072 / 1024**3
        print(f"| {preset} | {mla:,} | {full:,} | {full / mla:.1f}x | {mla * gib:.2f} GiB | {full * gib:.1f} GiB |")


def layer_shape(text: str) -> tuple[int, int, int]:
    dim, hidden, tokens = (int(part) for part in text.split("x"))
    return dim, hidden, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--presets", nargs="*", default=["genesis-tiny", "genesis-512"], help="training rows (CPU)")
    parser.add_argument(
        "--layers", nargs="+", type=layer_shape, default=[(512, 256, 2048), (1024, 512, 1024)],
        metavar="DIMxHIDDENxTOKENS", help="MoE layer shapes: model dim x expert hidden x tokens",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the MoE layer rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--profile", type=Path, help="write a torch.profiler table of the first layer shape here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, median of {args.repeats} runs")
    print("| layer (dim x expert hidden) | tokens | dtype | our dispatch | ours ms | HF eager ms | HF grouped_mm ms | "
          "vs eager | vs grouped_mm |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    profile = args.profile
    for dtype in args.dtypes:
        for dim, hidden, tokens in args.layers:
            bench_layer(dim, hidden, tokens, dtype, args.repeats, device, args.warmup, profile)
            profile = None
    if args.presets:
        print("\n| preset | dtype | batch | ours tok/s | MFU (active) | ours+MTP tok/s | HF DeepseekV3 tok/s | "
              "speedup |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for preset in args.presets:
        for dtype in args.dtypes:
            batch, seq = (8, 128) if preset == "genesis-tiny" else (4, 256)
            bench_training(preset, dtype, batch, seq, args.repeats)
    cache_table(["genesis-tiny", "genesis-512", "genesis-1b", "genesis-5b", "genesis-30b", "genesis-500b"])


if __name__ == "__main__":
    main()
