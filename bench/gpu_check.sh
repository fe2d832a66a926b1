#!/usr/bin/env bash
# Issue 18's GPU check in one command, for a lent H100/H200 (about 8 minutes; nothing here runs on CPU).
#
#   1. the CUDA tests: liger's kernels against the torch path (tests/model/test_kernels.py) and the MoE
#      dispatch (tests/model/test_moe_cuda.py);
#   2. torch._dynamo.explain's graph breaks of genesis-tiny's forward + fused loss on CUDA, torch and liger;
#   3. bench_train rows as in docs/benchmarks.md's H100 sections: forge-nano 16 x 1024 against transformers,
#      eager / compiled x torch / liger kernels (with --profile), and genesis-1b 8 x 2048 alone, eager torch,
#      eager liger, compiled liger (its compiled torch row is in the docs: 28.2% on the H100).
#
# Everything lands in $OUT (default ./gpu-check-out): gpu_check.log, rows.jsonl (one JSON object per
# bench row), profile-forge-nano.txt. Stages stop at a shared deadline (GPU_CHECK_SECONDS, default 560 s)
# so the whole run fits one 10-minute device call; a stage that fails does not stop the next.
#
# The device image has torch, triton and transformers but not liger-kernel: carry its wheel (pure Python).
# Once, in the repo root:
#     echo /.whl/ >> .git/info/exclude && python3 -m pip download --no-deps -d .whl liger-kernel==0.8.5
# then: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
DEADLINE=${GPU_CHECK_SECONDS:-560}
export PYTHONPATH=$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger-site .whl/liger_kernel-*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/liger-site
else
    echo "no .whl/liger_kernel-*.whl: the liger rows fall back to torch (train.kernels=auto) or fail (liger)" | tee -a "$LOG"
fi

stage() {  # stage CAP_SECONDS DESCRIPTION COMMAND...: run it under min(CAP, time left), logged
    local cap=$1 what=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if ((left < 20)); then
        echo "== SKIPPED (deadline): $what" | tee -a "$LOG"
        return
    fi
    ((cap > left)) && cap=$left
    echo "== $what (at ${SECONDS} s, limit ${cap} s)" | tee -a "$LOG"
    timeout "$cap" "$@" 2>&1 | tee -a "$LOG"
    echo "== exit ${PIPESTATUS[0]}: $what" | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"
$PY -c "from darkhorse.model.kernels import liger_available as a; print('liger:', a() or 'imports')" 2>&1 | tee -a "$LOG"

stage 150 "CUDA tests" $PY -m pytest -q -p no:cacheprovider -rs tests/model/test_kernels.py tests/model/test_moe_cuda.py

stage 90 "graph breaks on CUDA (genesis-tiny, bf16 autocast, forward + fused loss)" $PY - <<'EOF'
import torch
from darkhorse.config import load_run_config
from darkhorse.model import Transformer
from darkhorse.model.kernels import liger_available, use_kernels

config = load_run_config("genesis-tiny").model
model = Transformer(config).cuda().train()
tokens = torch.randint(0, config.vocab_size, (4, 128), device="cuda")
for kernels in ("torch", "liger") if liger_available() is None else ("torch",):
    use_kernels(model, kernels)
    torch._dynamo.reset()

    def loss(tokens, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(tokens, targets, mtp_weight=0.3, return_logits=False).loss

    explanation = torch._dynamo.explain(loss)(tokens, tokens.roll(-1, 1))
    print(f"{kernels}: {explanation.graph_break_count} graph breaks")
    for reason in explanation.break_reasons:
        print("  ", reason.reason.splitlines()[0], reason.user_stack[-1] if reason.user_stack else "")
EOF

BENCH=($PY bench/bench_train.py --device cuda --dtypes bf16 --steps 10 --warmup 3 --json "$OUT/rows.jsonl")
FORGE=(--presets forge-nano --batch-size 16 --seq-len 1024)
GENESIS=(--presets genesis-1b --batch-size 8 --seq-len 2048 --ours-only)
stage 240 "forge-nano eager + compiled, torch + liger kernels, vs transformers" \
    "${BENCH[@]}" "${FORGE[@]}" --compile --kernels torch liger --profile "$OUT/profile-forge-nano.txt"
stage 90 "genesis-1b eager, torch + liger kernels" "${BENCH[@]}" "${GENESIS[@]}" --kernels torch liger
stage 200 "genesis-1b compiled, liger kernels" "${BENCH[@]}" "${GENESIS[@]}" --kernels liger --compile-only
echo "== done at ${SECONDS} s; results in $OUT" | tee -a "$LOG"
