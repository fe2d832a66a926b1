"""Serve a checkpoint (or a Hugging Face model directory) over an OpenAI-compatible HTTP API.

  darkhorse serve --checkpoint runs/mine/final
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hello"}]}'

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streams with
"stream": true), and /tokenize, /detokenize, /tokenizer_info for lm-eval's local-completions. The schema
is at /openapi.json. Concurrent requests decode together (continuous batching, up to
--max-batch at once; more wait their turn). Binds to 127.0.0.1 unless --host says otherwise."""

from __future__ import annotations

import argparse
from pathlib import Path

from darkhorse.errors import DarkhorseError

HELP = "serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint dir, or a Hugging Face model dir")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most (default 16)")
    parser.add_argument(
        "--api-key", help="require `Authorization: Bearer KEY` on every request but /health (and the page at /)"
    )
    parser.add_argument(
        "--model-name", help="the model's id in the API (default: RUN for RUN/final, else the checkpoint's folder name)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps (default cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for decoding (default: torch's count minus one, leaving a core to the HTTP event loop)",
    )


def run(args: argparse.Namespace) -> int:
    if args.max_batch <= 0:
        raise DarkhorseError("--max-batch must be > 0")
    if not 1 <= args.port <= 65535:
        raise DarkhorseError("--port must be between 1 and 65535")
    if args.threads is not None and args.threads <= 0:
        raise DarkhorseError("--threads must be > 0")
    import torch
    import uvicorn

    from darkhorse.interop.hf_import import load_checkpoint_or_hf
    from darkhorse.serve.app import create_app

    model, tokenizer, _ = load_checkpoint_or_hf(args.checkpoint, args.device)
    # The event loop (HTTP, detokenizing, SSE) runs beside the decode thread: torch's workers busy-wait
    # between ops, so on every core they would starve it and stall each token (2 cores: 7 ms a token, not 3).
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads() - 1))
    folder = args.checkpoint.resolve()
    name = args.model_name or (folder.parent.name if folder.name == "final" else folder.name)
    app = create_app(model, tokenizer, model_name=name, max_batch=args.max_batch, api_key=args.api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
