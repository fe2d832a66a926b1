"""Write a darkhorse checkpoint as a GGUF file that llama.cpp loads and runs.

Dense GQA models become the `llama` architecture. llama.cpp's llama graph applies RoPE to adjacent
channel pairs (the original Meta layout) while darkhorse, like HF Llama, rotates channel i with
i + head_dim/2, so the q and k rows are permuted per head on the way out (the same permutation
llama.cpp's own `convert_hf_to_gguf.py` applies to HF Llama weights); nothing else changes.
MLA + MoE models become `deepseek2` (see `deepseek2_plan`). YaRN settings are written as llama.cpp's
rope-scaling keys when llama.cpp computes the same thing (`_check_yarn`); mHC residual streams, ungated
MLPs, learned positions, soft-capped logits, value embeddings and the embedding smear
(`capabilities.architecture_refusals`) are refused.

The file is written with the `gguf` package in two passes: first every tensor's name, shape and
type (computed from the config, no weights loaded), then the weights one tensor at a time, so peak
memory is about one tensor, never a second copy of the model. It goes to a temporary file beside
`out_path` and is renamed only when complete, so an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import MODEL_TENSOR as T
from gguf import GGMLQuantizationType as QType

from darkhorse.checkpoint import CheckpointTensors
from darkhorse.config import ModelConfig
from darkhorse.data.tokenizer import (
    ASSISTANT_END,
    BOS,
    EOS,
    LLAMA_CPP_PRE,
    PAD,
    PRE_TOKENIZER_REGEX,
    SPECIAL_TOKENS,
)
from darkhorse.errors import DarkhorseError
from darkhorse.files import atomic_file
from darkhorse.interop import capabilities
from darkhorse.model.layers import yarn_mscale

OUTTYPES = {
    "f32": (QType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# HF `tokenizers` Split regexes that llama.cpp re-implements, by the `tokenizer.ggml.pre` name it
# knows them under (llama-vocab.cpp): darkhorse's own (Qwen2's) and those of imported Llama models.
# ByteLevel(use_regex=True) alone is GPT-2's regex.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_PRE_TOKENIZERS = {PRE_TOKENIZER_REGEX: LLAMA_CPP_PRE, GPT2_REGEX: "gpt-2", LLAMA3_REGEX: "llama-bpe"}

# Special tokens (data/tokenizer.py) and the GGUF keys that point at them.
SPECIAL_TOKEN_KEYS = {
    BOS: gguf.Keys.Tokenizer.BOS_ID,
    EOS: gguf.Keys.Tokenizer.EOS_ID,
    PAD: gguf.Keys.Tokenizer.PAD_ID,
    ASSISTANT_END: gguf.Keys.Tokenizer.EOT_ID,  # end of an assistant turn: llama.cpp chat stops here
}

# Checkpoint tensors llama.cpp has no use for: MTP modules (it does not run them), the MoE
# domain-prior annealing state (training only) and the group context (darkhorse inference only).
NOT_EXPORTED = re.compile(r"^mtp\.|\.domain_prior_scale$|\.group_context\.weight$")


# -------------------------------------------------------------------------------------------------
# The tensor plan: what goes into the file, in order, and how to make each tensor


@dataclass
class PlannedTensor:
    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # torch order ([out, in]); gguf reverses it into ggml's ne order
    make: Callable[[], torch.Tensor]
    keep_f32: bool = False  # routers stay F32 whatever the outtype (1-D tensors always do)


def gguf_name(tensor: T, layer: int | None = None, suffix: str = "weight") -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=layer) + f".{suffix}"


def rope_interleave_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from the half-split RoPE layout to llama.cpp's adjacent pairs.

    Row j of a head's first half and row j of its second half rotate together; llama.cpp expects
    them as rows 2j and 2j+1.
    """
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(weight.shape)


def llama_plan(ckpt: CheckpointTensors) -> list[PlannedTensor]:
    """GQA models: dense or Mixtral-style MoE (llama.cpp's `llama`), with q/k/v biases (`qwen2`) or
    q/k norms (`qwen3`). llama.cpp runs qwen2/qwen3 with half-split RoPE, so only `llama` permutes rows."""
    cfg, moe = ckpt.model, ckpt.model.moe
    dim, vocab = cfg.dim, cfg.padded_vocab_size
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    permute = gqa_architecture(cfg) == "llama"

    def tensor(
        kind: T,
        layer: int | None,
        source: str,
        shape: tuple[int, ...],
        rope_heads: int = 0,
        keep_f32: bool = False,
        suffix: str = "weight",
    ) -> PlannedTensor:
        def make() -> torch.Tensor:
            weight = ckpt.get(source)
            return rope_interleave_rows(weight, rope_heads) if rope_heads and permute else weight

        return PlannedTensor(gguf_name(kind, layer, suffix), shape, make, keep_f32)

    plan = [tensor(T.TOKEN_EMBD, None, "embed.weight", (vocab, dim))]
    for i in range(cfg.n_layers):
        src = f"layers.{i}."
        plan += [
            tensor(T.ATTN_NORM, i, src + "attn_norm.weight", (dim,)),
            tensor(T.ATTN_Q, i, src + "attn.q_proj.weight", (q_rows, dim), rope_heads=cfg.n_heads),
            tensor(T.ATTN_K, i, src + "attn.k_proj.weight", (kv_rows, dim), rope_heads=cfg.n_kv_heads),
            tensor(T.ATTN_V, i, src + "attn.v_proj.weight", (kv_rows, dim)),
        ]
        if cfg.attention_bias:
            plan += [
                tensor(T.ATTN_Q, i, src + "attn.q_proj.bias", (q_rows,), rope_heads=cfg.n_heads, suffix="bias"),
                tensor(T.ATTN_K, i, src + "attn.k_proj.bias", (kv_rows,), rope_heads=cfg.n_kv_heads, suffix="bias"),
                tensor(T.ATTN_V, i, src + "attn.v_proj.bias", (kv_rows,), suffix="bias"),
            ]
        if cfg.qk_norm:
            plan += [
                tensor(T.ATTN_Q_NORM, i, src + "attn.q_norm.weight", (cfg.head_dim,)),
                tensor(T.ATTN_K_NORM, i, src + "attn.k_norm.weight", (cfg.head_dim,)),
            ]
        plan += [
            tensor(T.ATTN_OUT, i, src + "attn.o_proj.weight", (dim, q_rows)),
            tensor(T.FFN_NORM, i, src + "ffn_norm.weight", (dim,)),
        ]
        if cfg.ffn == "moe":
            experts, hidden = moe.n_routed_experts, moe.moe_intermediate_size
            plan += [
                tensor(T.FFN_GATE_INP, i, src + "ffn.gate.weight", (experts, dim), keep_f32=True),
                tensor(T.FFN_GATE_EXP, i, src + "ffn.experts.gate_proj", (experts, hidden, dim)),
                tensor(T.FFN_UP_EXP, i, src + "ffn.experts.up_proj", (experts, hidden, dim)),
                tensor(T.FFN_DOWN_EXP, i, src + "ffn.experts.down_proj", (experts, dim, hidden)),
            ]
            continue
        plan += [
            tensor(T.FFN_GATE, i, src + "ffn.gate_proj.weight", (cfg.ffn_dim, dim)),
            tensor(T.FFN_UP, i, src + "ffn.up_proj.weight", (cfg.ffn_dim, dim)),
            tensor(T.FFN_DOWN, i, src + "ffn.down_proj.weight", (dim, cfg.ffn_dim)),
        ]
    plan.append(tensor(T.OUTPUT_NORM, None, "norm.weight", (dim,)))
    if not cfg.tie_embeddings:  # tied: llama.cpp reuses token_embd as the output head
        plan.append(tensor(T.OUTPUT, None, "lm_head.weight", (vocab, dim)))
    return plan


def add_yarn_metadata(writer: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    """YaRN context extension keys; llama.cpp derives the same frequency ramp from them."""
    scaling = cfg.rope_scaling
    if scaling.type != "yarn":
        return
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(scaling.factor)
    writer.add_rope_scaling_orig_ctx_len(scaling.original_max_seq_len)
    writer.add_rope_scaling_yarn_beta_fast(scaling.beta_fast)
    writer.add_rope_scaling_yarn_beta_slow(scaling.beta_slow)


def gqa_architecture(cfg: ModelConfig) -> str:
    if cfg.qk_norm:
        return "qwen3"
    return "qwen2" if cfg.attention_bias else "llama"


def add_llama_metadata(writer: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.padded_vocab_size)
    add_yarn_metadata(writer, cfg)
    if cfg.ffn == "moe":
        writer.add_feed_forward_length(cfg.moe.moe_intermediate_size)
        writer.add_expert_count(cfg.moe.n_routed_experts)
        writer.add_expert_used_count(cfg.moe.experts_per_token)
    else:
        writer.add_feed_forward_length(cfg.ffn_dim)


def deepseek2_plan(ckpt: CheckpointTensors) -> list[PlannedTensor]:
    """MLA + MoE as llama.cpp's `deepseek2`: kv_b split for absorbed attention, experts stacked [E, out, in].

    darkhorse already stores the rope rows interleaved and the experts stacked (model/attention.py,
    model/moe.py), so only kv_b changes shape. MTP modules are left out: llama.cpp does not run them.
    """
    cfg, mla, moe = ckpt.model, ckpt.model.mla, ckpt.model.moe
    dim, vocab, heads = cfg.dim, cfg.padded_vocab_size, cfg.n_heads
    q_rows, latent = heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim), mla.kv_lora_rank
    experts, expert_dim = moe.n_routed_experts, moe.moe_intermediate_size
    shared_dim = moe.n_shared_experts * moe.moe_intermediate_size
    nope, v_dim = mla.qk_nope_head_dim, mla.v_head_dim

    def copy(
        kind: T, layer: int | None, source: str, shape: tuple[int, ...], suffix: str = "weight", keep_f32: bool = False
    ) -> PlannedTensor:
        return PlannedTensor(gguf_name(kind, layer, suffix), shape, lambda: ckpt.get(source), keep_f32)

    def kv_b_part(layer: int, part: str) -> PlannedTensor:
        """W_UK as [heads, latent, nope] (applied to queries) or W_UV as [heads, v, latent]."""

        def make() -> torch.Tensor:
            per_head = ckpt.get(f"layers.{layer}.attn.kv_b_proj.weight").view(heads, nope + v_dim, latent)
            k_b, v_b = per_head.split([nope, v_dim], dim=1)
            return k_b.transpose(1, 2).contiguous() if part == "k" else v_b.contiguous()

        if part == "k":
            return PlannedTensor(gguf_name(T.ATTN_K_B, layer), (heads, latent, nope), make)
        return PlannedTensor(gguf_name(T.ATTN_V_B, layer), (heads, v_dim, latent), make)

    plan = [copy(T.TOKEN_EMBD, None, "embed.weight", (vocab, dim))]
    for i in range(cfg.n_layers):
        attn, ffn = f"layers.{i}.attn.", f"layers.{i}.ffn."
        plan.append(copy(T.ATTN_NORM, i, f"layers.{i}.attn_norm.weight", (dim,)))
        if mla.q_lora_rank:
            plan += [
                copy(T.ATTN_Q_A, i, attn + "q_a_proj.weight", (mla.q_lora_rank, dim)),
                copy(T.ATTN_Q_A_NORM, i, attn + "q_a_layernorm.weight", (mla.q_lora_rank,)),
                copy(T.ATTN_Q_B, i, attn + "q_b_proj.weight", (q_rows, mla.q_lora_rank)),
            ]
        else:
            plan.append(copy(T.ATTN_Q, i, attn + "q_proj.weight", (q_rows, dim)))
        plan += [
            copy(T.ATTN_KV_A_MQA, i, attn + "kv_a_proj_with_mqa.weight", (latent + mla.qk_rope_head_dim, dim)),
            copy(T.ATTN_KV_A_NORM, i, attn + "kv_a_layernorm.weight", (latent,)),
            kv_b_part(i, "k"),
            kv_b_part(i, "v"),
            copy(T.ATTN_OUT, i, attn + "o_proj.weight", (dim, heads * v_dim)),
            copy(T.FFN_NORM, i, f"layers.{i}.ffn_norm.weight", (dim,)),
        ]
        if i < moe.first_k_dense:
            plan += [
                copy(T.FFN_GATE, i, ffn + "gate_proj.weight", (cfg.ffn_dim, dim)),
                copy(T.FFN_UP, i, ffn + "up_proj.weight", (cfg.ffn_dim, dim)),
                copy(T.FFN_DOWN, i, ffn + "down_proj.weight", (dim, cfg.ffn_dim)),
            ]
            continue
        plan += [
            copy(T.FFN_GATE_INP, i, ffn + "gate.weight", (experts, dim), keep_f32=True),
            copy(T.FFN_EXP_PROBS_B, i, ffn + "gate.e_score_correction_bias", (experts,), suffix="bias"),
            copy(T.FFN_GATE_EXP, i, ffn + "experts.gate_proj", (experts, expert_dim, dim)),
            copy(T.FFN_UP_EXP, i, ffn + "experts.up_proj", (experts, expert_dim, dim)),
            copy(T.FFN_DOWN_EXP, i, ffn + "experts.down_proj", (experts, dim, expert_dim)),
            copy(T.FFN_GATE_SHEXP, i, ffn + "shared_experts.gate_proj.weight", (shared_dim, dim)),
            copy(T.FFN_UP_SHEXP, i, ffn + "shared_experts.up_proj.weight", (shared_dim, dim)),
            copy(T.FFN_DOWN_SHEXP, i, ffn + "shared_experts.down_proj.weight", (dim, shared_dim)),
        ]
    plan.append(copy(T.OUTPUT_NORM, None, "norm.weight", (dim,)))
    if not cfg.tie_embeddings:
        plan.append(copy(T.OUTPUT, None, "lm_head.weight", (vocab, dim)))
    return plan


def add_deepseek2_metadata(writer: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    mla, moe = cfg.mla, cfg.moe
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(1)  # absorbed MLA runs as MQA over the latent cache
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(mla.qk_rope_head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.padded_vocab_size)
    if mla.q_lora_rank:
        writer.add_q_lora_rank(mla.q_lora_rank)
    writer.add_kv_lora_rank(mla.kv_lora_rank)
    writer.add_key_length(mla.kv_lora_rank + mla.qk_rope_head_dim)
    writer.add_value_length(mla.kv_lora_rank)
    writer.add_key_length_mla(mla.qk_nope_head_dim + mla.qk_rope_head_dim)
    writer.add_value_length_mla(mla.v_head_dim)
    writer.add_leading_dense_block_count(moe.first_k_dense)
    writer.add_expert_count(moe.n_routed_experts)
    writer.add_expert_used_count(moe.experts_per_token)
    writer.add_expert_shared_count(moe.n_shared_experts)
    writer.add_expert_feed_forward_length(moe.moe_intermediate_size)
    writer.add_expert_weights_scale(moe.routed_scaling_factor)
    writer.add_expert_weights_norm(moe.norm_topk_prob)
    # llama.cpp wants topk_groups < n_groups: a limit that changes nothing is written as one group
    n_groups, topk_groups = moe.limiting_groups()
    writer.add_expert_group_count(n_groups)
    writer.add_expert_group_used_count(topk_groups)
    gating = gguf.ExpertGatingFuncType.SIGMOID if moe.scoring == "sigmoid" else gguf.ExpertGatingFuncType.SOFTMAX
    writer.add_expert_gating_func(gating)
    add_yarn_metadata(writer, cfg)
    if cfg.rope_scaling.type == "yarn":
        writer.add_rope_scaling_yarn_log_mul(0.1 * cfg.rope_scaling.mscale_all_dim)


# -------------------------------------------------------------------------------------------------
# Tokenizer


def _pre_tokenizer_name(tokenizer_file: Path, spec: dict) -> str:
    """The llama.cpp `pre` type whose regex equals this tokenizer's byte-level pre-tokenizer."""
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    splits = [s for s in steps if s.get("type") == "Split"]
    if len(byte_level) != 1 or len(steps) != len(byte_level) + len(splits) or len(splits) > 1:
        raise DarkhorseError(
            f"{tokenizer_file}: GGUF export needs a byte-level BPE pre-tokenizer (ByteLevel, optionally after "
            f"one Split), got {json.dumps(spec)[:200]}"
        )
    if byte_level[0].get("add_prefix_space"):
        raise DarkhorseError(f"{tokenizer_file}: ByteLevel add_prefix_space=true has no llama.cpp equivalent")
    if byte_level[0].get("use_regex", True):
        regexes = [GPT2_REGEX] + [s["pattern"].get("Regex") for s in splits]
    else:
        regexes = [s["pattern"].get("Regex") for s in splits]
    if len(regexes) != 1 or regexes[0] not in KNOWN_PRE_TOKENIZERS:
        raise DarkhorseError(
            f"{tokenizer_file}: pre-tokenizer regex {regexes} is not one llama.cpp knows; "
            f"known: {', '.join(KNOWN_PRE_TOKENIZERS.values())} (see darkhorse.data.tokenizer)"
        )
    return KNOWN_PRE_TOKENIZERS[regexes[0]]


def add_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer_file: Path, n_vocab: int) -> None:
    """Embed the BPE vocab, merges, token types, special ids and chat template (`gpt2` tokenizer model).

    The token list is padded to the embedding's row count with unused `[PADi]` entries, as llama.cpp
    requires one token per row. The darkhorse chat template goes in only when the tokenizer has the
    darkhorse special tokens (an imported model's tokenizer may not). An NFC normalizer (Qwen2's) is
    accepted although llama.cpp does not apply it: both tokenize NFC text, nearly all text, the same.
    """
    from darkhorse.data.chat_format import jinja_chat_template

    spec = json.loads(tokenizer_file.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise DarkhorseError(f"{tokenizer_file}: GGUF export needs a BPE tokenizer, got {model.get('type')}")
    normalizer = spec.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise DarkhorseError(
            f"{tokenizer_file}: normalizer {normalizer.get('type')!r} has no llama.cpp `gpt2` equivalent"
        )
    pre = _pre_tokenizer_name(tokenizer_file, spec.get("pre_tokenizer") or {})

    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    entries = [(text, i, gguf.TokenType.NORMAL) for text, i in model["vocab"].items()]
    for added in spec.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        entries.append((added["content"], added["id"], kind))
    for text, token_id, kind in entries:
        if token_id >= n_vocab:
            raise DarkhorseError(
                f"{tokenizer_file}: token {text!r} has id {token_id} but the model has {n_vocab} embedding rows"
            )
        tokens[token_id], types[token_id] = text, kind
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {text: token_id for text, token_id, _ in entries}
    for text, key in SPECIAL_TOKEN_KEYS.items():
        if text in ids:
            writer.add_uint32(key, ids[text])
    # darkhorse's encode() adds no special tokens; prompts and the chat template carry <|bos|> themselves.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if all(token in ids for token in SPECIAL_TOKENS):
        writer.add_chat_template(jinja_chat_template())


# -------------------------------------------------------------------------------------------------
# Writing


def tensor_type(planned: PlannedTensor, outtype: str) -> QType:
    """GGML type for one tensor: 1-D and router tensors stay F32; Q8_0 needs rows of 32 (else F16)."""
    wanted = OUTTYPES[outtype][0]
    if planned.keep_f32 or len(planned.shape) == 1:
        return QType.F32
    if wanted == QType.Q8_0 and planned.shape[-1] % gguf.GGML_QUANT_SIZES[QType.Q8_0][0]:
        return QType.F16
    return wanted


def encode_tensor(tensor: torch.Tensor, qtype: QType) -> np.ndarray:
    return gguf.quants.quantize(tensor.float().numpy(), qtype)


MetadataWriter = Callable[[gguf.GGUFWriter, ModelConfig], None]


def _check_yarn(ckpt: CheckpointTensors) -> None:
    """llama.cpp fixes YaRN's cos/sin factor per architecture; refuse settings that would compute otherwise.

    Its llama graph scales cos/sin by 1 + 0.1 ln(factor) (our mscale=1, mscale_all_dim=0, as HF Llama);
    deepseek2 leaves them unscaled and puts mscale_all_dim's correction into the attention scale
    (our mscale == mscale_all_dim, as DeepSeek-V3).
    """
    cfg = ckpt.model
    scaling = cfg.rope_scaling
    if scaling.type == "llama3":
        raise DarkhorseError(
            f"{ckpt.path}: model.rope_scaling.type=llama3 is not written to GGUF yet (llama.cpp needs a "
            "rope_freqs tensor for it); export with --format hf and convert with llama.cpp's converter"
        )
    if scaling.type != "yarn":
        return
    ours = yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    theirs = 1.0 if cfg.attention == "mla" else yarn_mscale(scaling.factor)
    if not math.isclose(ours, theirs, rel_tol=1e-6):
        needed = "mscale == mscale_all_dim" if cfg.attention == "mla" else "mscale=1 and mscale_all_dim=0"
        raise DarkhorseError(
            f"{ckpt.path}: model.rope_scaling mscale={scaling.mscale}, mscale_all_dim={scaling.mscale_all_dim} "
            f"has no llama.cpp equivalent for this architecture; GGUF export needs {needed}"
        )


def _plan_for(ckpt: CheckpointTensors) -> tuple[str, list[PlannedTensor], MetadataWriter]:
    cfg = ckpt.model
    if reasons := capabilities.architecture_refusals(cfg):
        raise capabilities.refusal("GGUF", reasons, ckpt.path)
    _check_yarn(ckpt)
    if cfg.attention == "gqa" and cfg.attention_bias and cfg.qk_norm:
        raise DarkhorseError(f"{ckpt.path}: no llama.cpp architecture has both q/k/v biases and q/k norms")
    if cfg.attention == "gqa" and cfg.ffn == "dense":
        return gqa_architecture(cfg), llama_plan(ckpt), add_llama_metadata
    if cfg.attention == "gqa" and cfg.ffn == "moe" and gqa_architecture(cfg) == "llama":
        _check_mixtral(ckpt)
        return "llama", llama_plan(ckpt), add_llama_metadata
    if cfg.attention == "mla" and cfg.ffn == "moe":
        if reasons := capabilities.deepseek_moe_refusals(cfg.moe):
            raise capabilities.refusal("GGUF as llama.cpp's deepseek2", reasons, ckpt.path)
        if not cfg.mla.q_lora_rank and cfg.n_layers not in (26, 27):
            raise DarkhorseError(
                f"{ckpt.path}: llama.cpp's deepseek2 takes uncompressed queries (model.mla.q_lora_rank=0) only "
                "in its 26/27-layer Lite shape; GGUF export needs model.mla.q_lora_rank > 0"
            )
        if not cfg.mla.qk_nope_head_dim:  # llama.cpp aborts on the empty W_UK (checked with llama-cpp-python)
            raise DarkhorseError(
                f"{ckpt.path}: llama.cpp's deepseek2 needs a content (nope) part in each q/k head; GGUF export "
                "needs model.mla.qk_nope_head_dim > 0 (export --format hf takes this model)"
            )
        return "deepseek2", deepseek2_plan(ckpt), add_deepseek2_metadata
    raise DarkhorseError(
        f"{ckpt.path}: GGUF export supports GQA models, dense or Mixtral-style MoE (llama; dense only with "
        f"attention_bias/qk_norm: qwen2/qwen3), and MLA+MoE models (deepseek2); this one has "
        f"model.attention={cfg.attention!r}, model.ffn={cfg.ffn!r}"
    )


def _check_mixtral(ckpt: CheckpointTensors) -> None:
    """GQA + MoE goes to llama.cpp's llama MoE, which is Mixtral's; a selection bias is checked in the weights."""
    reasons = capabilities.mixtral_moe_refusals(ckpt.model.moe)
    for i in range(ckpt.model.n_layers):
        bias = f"layers.{i}.ffn.gate.e_score_correction_bias"
        if ckpt.get(bias).abs().max() > 0:
            reasons.append(f"{bias} is not all 0: {capabilities.MIXTRAL_SELECTION_BIAS}")
            break
    if reasons:
        target = "GGUF as llama.cpp's Mixtral-style llama MoE (the GQA + MoE one; MLA + MoE exports as deepseek2)"
        raise capabilities.refusal(target, reasons, ckpt.path)


def export_gguf(checkpoint_dir: str | Path, out_path: str | Path, outtype: str = "f16", *, force: bool = False) -> Path:
    """Write `checkpoint_dir` as one GGUF file at `out_path` with 2-D weights stored as `outtype`."""
    if outtype not in OUTTYPES:
        raise DarkhorseError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    ckpt = CheckpointTensors(checkpoint_dir)
    arch, plan, add_metadata = _plan_for(ckpt)
    capabilities.warn_darkhorse_only_routing(ckpt.model.moe, "GGUF")
    out_path = Path(out_path)
    with atomic_file(out_path, force=force) as temp:
        writer = gguf.GGUFWriter(temp, arch)
        writer.add_name(ckpt.config.name or ckpt.path.name)
        writer.add_file_type(OUTTYPES[outtype][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_metadata(writer, ckpt.model)
        add_tokenizer_metadata(writer, ckpt.tokenizer_file, ckpt.model.padded_vocab_size)
        types = [tensor_type(p, outtype) for p in plan]
        for planned, qtype in zip(plan, types, strict=True):
            nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(planned.shape, qtype)))
            writer.add_tensor_info(planned.name, planned.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for planned, qtype in zip(plan, types, strict=True):
            tensor = planned.make()
            if tuple(tensor.shape) != planned.shape:
                raise DarkhorseError(
                    f"{ckpt.path}: {planned.name} has shape {tuple(tensor.shape)}, the config implies {planned.shape}"
                )
            writer.write_tensor_data(encode_tensor(tensor, qtype))
        writer.close()
        if left_out := [name for name in ckpt.unread() if not NOT_EXPORTED.search(name)]:
            raise DarkhorseError(f"{ckpt.path}: GGUF export has no place for {', '.join(left_out)}")
    return out_path
