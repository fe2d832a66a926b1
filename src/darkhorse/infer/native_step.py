"""The batch-1 decode step in native code: a dense GQA fp32 model's whole token in one C++ call.

At batch 1 a token of a small model is 25 matrix-vector products and about a hundred tiny ops (norms and QK-norm,
RoPE, cache writes, attention, SiLU). In eager PyTorch (`DenseForward`) the tiny ones cost as much as
the products (per-op dispatch and allocation), which is why it ran at ~0.45x llama.cpp. native_step.cpp
does the token as plain loops over the model's own weights, read in place, with the KV cache and every
scratch vector allocated once per decode: nothing is dispatched or allocated per token.

The library is compiled once per machine (g++ -O3 -march=native, so it is built where it runs, never
shipped) into the cache dir ($DARKHORSE_CACHE or ~/.cache/darkhorse, under native/), keyed by the
source, the compiler and the CPU. Without a compiler or a C++ source, or when the build fails, `library`
returns None and the engine keeps the eager step. Only a row at a time. A prompt (several tokens at
position 0) goes through the model's own batched forward and its keys and values are copied over; other
multi-token steps are fed token by token.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from darkhorse.model import Transformer

SOURCE = Path(__file__).with_name("native_step.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_float_p = ctypes.POINTER(ctypes.c_float)


class _Layer(ctypes.Structure):
    _fields_ = [
        *((name, _float_p) for name in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")),
        ("keys", _float_p),
        ("values", _float_p),
        ("q_norm", _float_p),  # null without QK-norm
        ("k_norm", _float_p),
        ("attn_eps", ctypes.c_float),
        ("ffn_eps", ctypes.c_float),
        ("qk_eps", ctypes.c_float),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int64) for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")),
        ("vocab", ctypes.c_int64),
        ("max_len", ctypes.c_int64),
        ("embed_rows", ctypes.c_int64),
        ("norm_eps", ctypes.c_float),
        *((name, _float_p) for name in ("embed", "norm", "head", "cos", "sin")),
        ("layers", ctypes.POINTER(_Layer)),
        *((name, _float_p) for name in ("x", "h", "q", "k", "v", "att", "scores", "gate", "up")),
    ]


def _cache_dir() -> Path:
    root = os.environ.get("DARKHORSE_CACHE") or Path.home() / ".cache" / "darkhorse"
    return Path(root) / "native"


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled step (built on first use, then loaded from the cache dir), or None where it cannot be
    (no compiler, no source, a failed build, or DARKHORSE_NATIVE=0)."""
    if os.environ.get("DARKHORSE_NATIVE", "1") == "0":
        return None
    return build(_cache_dir())


def build(cache_dir: Path) -> ctypes.CDLL | None:
    """Load the step's library from `cache_dir`, compiling it there first if this source, compiler and CPU
    have no build yet; None (with a warning when a build failed) where it cannot be had."""
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if not compiler or not SOURCE.is_file():
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        key = hashlib.sha256(
            "\0".join([SOURCE.read_text(), compiler, version, *FLAGS, platform.machine(), _cpu_flags()]).encode()
        ).hexdigest()[:16]
        path = cache_dir / f"native_step-{key}.so"
        if not path.is_file():
            cache_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache_dir) as work:  # built aside, then moved in whole
                built = Path(work) / path.name
                command = [compiler, *FLAGS, str(SOURCE), "-o", str(built)]
                if subprocess.run(command, capture_output=True, text=True).returncode:
                    command.remove("-fopenmp")  # a compiler without OpenMP (Apple's clang): one thread
                    subprocess.run(command, capture_output=True, text=True, check=True)
                os.replace(built, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
        warnings.warn(f"the native decode step did not build, decoding without it: {detail}", stacklevel=2)
        return None
    # pointers as plain addresses (tensor.data_ptr()): no ctypes object built per call
    lib.darkhorse_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.darkhorse_step.argtypes += [ctypes.c_void_p, ctypes.c_int]
    lib.darkhorse_step.restype = ctypes.c_int64
    return lib


def _ptr(tensor: torch.Tensor) -> ctypes._Pointer:
    return ctypes.cast(tensor.data_ptr(), _float_p)


class NativeStep:
    """The step of `DenseForward.supports` models for one row on CPU, in native code (see the module docstring)."""

    argmax: int | None = None  # the last call's greedy id (see __call__)

    @staticmethod
    def supports(model: Transformer, batch: int) -> bool:
        """Whether this step can run `model` (already known to be a plain dense GQA fp32 `Transformer`)."""
        cpu_fp32 = model.embed.weight.device.type == "cpu" and model.rope_cos.dtype == torch.float32
        return batch == 1 and cpu_fp32 and library() is not None

    def __init__(self, model: Transformer, batch: int, max_len: int, vocab_size: int) -> None:
        config = model.config
        if max_len > model.rope_cos.shape[0]:
            raise ValueError(f"RoPE tables hold {model.rope_cos.shape[0]} positions, the decode needs {max_len}")
        self.lib = library()
        kv_width = config.n_kv_heads * config.head_dim

        def weight(tensor: torch.Tensor) -> torch.Tensor:  # in place when it can be (it always is for Linear)
            return tensor.detach().contiguous()

        # every tensor the C side points at is kept alive here
        self.tensors = [weight(model.rope_cos), weight(model.rope_sin)]
        self.kv: list[list[torch.Tensor]] = []  # per layer: keys, values (max_len, n_kv_heads, head_dim)
        self.transformer, self.vocab_size = model, vocab_size
        layers = []
        for block in model.layers:
            attn, ffn = block.attn, block.ffn
            parts = [block.attn_norm.weight, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
            parts += [attn.o_proj.weight, block.ffn_norm.weight, ffn.gate_proj.weight, ffn.up_proj.weight]
            parts = [weight(p) for p in [*parts, ffn.down_proj.weight]]
            cache = [torch.zeros(max_len, config.n_kv_heads, config.head_dim) for _ in range(2)]
            self.kv.append(cache)
            self.tensors += parts + cache
            pointers = [_ptr(t) for t in parts + cache]
            qk_norm, qk_eps = [None, None], 0.0
            if hasattr(attn, "q_norm"):
                qk_norm, qk_eps = [weight(attn.q_norm.weight), weight(attn.k_norm.weight)], attn.q_norm.eps
                self.tensors += qk_norm
                qk_norm = [_ptr(t) for t in qk_norm]
            layers.append(_Layer(*pointers, *qk_norm, block.attn_norm.eps, block.ffn_norm.eps, qk_eps))
        self.layers = (_Layer * len(layers))(*layers)
        head = weight(model.lm_head.weight[:vocab_size])
        embed, norm = weight(model.embed.weight), weight(model.norm.weight)
        sizes = [config.dim, config.dim, config.n_heads * config.head_dim, kv_width, kv_width]
        sizes += [config.n_heads * config.head_dim, max_len, config.ffn_dim, config.ffn_dim]
        scratch = [torch.zeros(n) for n in sizes]
        self.tensors += [head, embed, norm, *scratch]
        self.logits = torch.empty(1, vocab_size)
        self.logits_address = self.logits.data_ptr()
        self.model = _Model(
            config.dim,
            config.n_layers,
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
            config.ffn_dim,
            vocab_size,
            max_len,
            embed.shape[0],
            model.norm.eps,
            _ptr(embed),
            _ptr(norm),
            _ptr(head),
            _ptr(self.tensors[0]),
            _ptr(self.tensors[1]),
            self.layers,
            *(_ptr(t) for t in scratch),
        )
        self.model_address = ctypes.addressof(self.model)
        self.max_len = max_len

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Logits (1, vocab_size) of the last position of `tokens` (1, seq) placed at `start_pos`: one
        buffer, overwritten by the next call (read it before stepping again). `argmax` is then their greedy
        id, computed in C while they are in cache (None after a prompt's prefill)."""
        if start_pos == 0 and tokens.shape[1] > 1:
            self.argmax = None
            return self._prefill(tokens)
        if tokens.dtype != torch.long or not tokens.is_contiguous():
            tokens = tokens.to(torch.long).contiguous()
        best = self.lib.darkhorse_step(
            self.model_address,
            tokens.data_ptr(),
            tokens.shape[1],
            start_pos,
            self.logits_address,
            torch.get_num_threads(),
        )
        self.argmax = best
        if best < 0:
            raise ValueError(f"{tokens.tolist()} at {start_pos}: an id outside the embedding or past {self.max_len}")
        return self.logits

    @torch.no_grad()
    def _prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """A prompt through the model's own forward, in one batched call (token by token would read every
        weight once per token), its keys and values then copied into the native cache."""
        seq = tokens.shape[1]
        if seq > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, the prompt has {seq}")
        cache = self.transformer.new_cache(1, seq)
        logits = self.transformer(tokens, cache=cache).logits[:, -1, : self.vocab_size]
        for (keys, values), layer_cache in zip(self.kv, cache, strict=True):
            keys[:seq] = layer_cache.keys[0].transpose(0, 1)
            values[:seq] = layer_cache.values[0].transpose(0, 1)
        return self.logits.copy_(logits)
