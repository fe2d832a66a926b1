"""Tensor maps: one darkhorse tensor <-> the HF tensor(s) holding the same numbers.

An adapter lists one map per darkhorse tensor; export calls `to_hf` and import `from_hf` on the same
list, one tensor at a time. The helpers at the end build the maps that several families share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from darkhorse.config import ModelConfig
from darkhorse.errors import DarkhorseError
from darkhorse.interop.safetensors_io import SafetensorsDir
from darkhorse.model.moe import RANKING_ROLES, group_decision_role

Tensor = torch.Tensor


@dataclass(frozen=True)
class TensorMap:
    """Our tensor `ours` is HF's `hf[0]`, unchanged.

    Further `hf` names are copies that exports write too (DeepSeek's MTP layer repeats the embedding
    and head); `alt` lists other names under which other transformers versions store `hf[0]`.
    """

    ours: str
    hf: tuple[str, ...]
    alt: tuple[str, ...] = ()

    def to_hf(self, tensor: Tensor) -> list[tuple[str, Tensor]]:
        return [(name, tensor) for name in self.hf]

    def _stored_as(self, source: SafetensorsDir) -> str | None:
        return next((name for name in (self.hf[0], *self.alt) if name in source), None)

    def from_hf(self, source: SafetensorsDir, like: Tensor) -> Tensor:
        """Our tensor (shaped like `like`) read from `source`."""
        return source.get(self._stored_as(source))

    def missing(self, source: SafetensorsDir) -> list[str]:
        """HF names this map needs that `source` lacks."""
        return [] if self._stored_as(source) else [self.hf[0]]

    def known(self) -> tuple[str, ...]:
        """Every HF name this map accounts for (read, copies and alternatives)."""
        return self.hf + self.alt


@dataclass(frozen=True)
class PaddedRows(TensorMap):
    """Embedding / head rows: an HF vocabulary may be smaller than ours (padded to a multiple of 64)."""

    def from_hf(self, source: SafetensorsDir, like: Tensor) -> Tensor:
        tensor = super().from_hf(source, like)
        rows = like.shape[0] - tensor.shape[0]
        return torch.cat([tensor, tensor.new_zeros(rows, *tensor.shape[1:])]) if rows > 0 else tensor


@dataclass(frozen=True)
class PerExpert(TensorMap):
    """Our (experts, out, in) tensor is one HF matrix per expert (`...experts.{j}....weight`).

    transformers 5 may also save the fused layout (`mlp.experts.gate_up_proj` [E, 2I, H] with gate
    rows first, `mlp.experts.down_proj` [E, H, I]); `fused` names that tensor and `rows` the slice of
    its dim 1 that belongs to us, so imports read either layout. Exports always write per-expert
    keys, the only layout vLLM and llama.cpp's converter read.
    """

    fused: str = ""
    rows: tuple[int, int] | None = None

    def to_hf(self, tensor: Tensor) -> list[tuple[str, Tensor]]:
        return list(zip(self.hf, tensor.unbind(0), strict=True))

    def _use_fused(self, source: SafetensorsDir) -> bool:
        return bool(self.fused) and self.fused in source and any(name not in source for name in self.hf)

    def from_hf(self, source: SafetensorsDir, like: Tensor) -> Tensor:
        if self._use_fused(source):
            fused = source.get(self.fused)
            return fused if self.rows is None else fused[:, self.rows[0] : self.rows[1]].contiguous()
        return torch.stack([source.get(name) for name in self.hf])

    def missing(self, source: SafetensorsDir) -> list[str]:
        return [] if self._use_fused(source) else [name for name in self.hf if name not in source]

    def known(self) -> tuple[str, ...]:
        return self.hf + ((self.fused,) if self.fused else ())


@dataclass(frozen=True)
class OursOnly(TensorMap):
    """A darkhorse tensor with no HF counterpart: imports fill it with `fill`; exports drop it.

    With `refusal` set, exporting refuses when the tensor is not all `fill` (the target cannot
    represent what it holds) and says why."""

    fill: float = 0.0
    refusal: str = ""

    def to_hf(self, tensor: Tensor) -> list[tuple[str, Tensor]]:
        if self.refusal and not bool((tensor == self.fill).all()):
            raise DarkhorseError(f"{self.ours} is not all {self.fill:g}: {self.refusal}")
        return []

    def from_hf(self, source: SafetensorsDir, like: Tensor) -> Tensor:
        return torch.full(like.shape, self.fill, dtype=like.dtype)

    def missing(self, source: SafetensorsDir) -> list[str]:
        return []


def dense_mlp_maps(ours: str, theirs: str) -> list[TensorMap]:
    return [TensorMap(f"{ours}{p}_proj.weight", (f"{theirs}{p}_proj.weight",)) for p in ("gate", "up", "down")]


def moe_router_maps(config: ModelConfig, layer: int, ours: str, router: str, bias_refusal: str = "") -> list[TensorMap]:
    """Router weight, ALF selection bias, (training-only) domain-prior state and (darkhorse-only) group
    context of MoE layer `layer`."""
    maps: list[TensorMap] = [TensorMap(ours + "gate.weight", (router + ".weight",))]
    if bias_refusal:
        maps.append(OursOnly(ours + "gate.e_score_correction_bias", (), refusal=bias_refusal))
    else:
        maps.append(TensorMap(ours + "gate.e_score_correction_bias", (router + ".e_score_correction_bias",)))
    if config.moe.domain_prior:
        maps.append(OursOnly(ours + "domain_prior_scale", (), fill=1.0))
    if group_decision_role(config, layer) in RANKING_ROLES:  # darkhorse only: exports rank by own scores
        maps.append(OursOnly(ours + "group_context.weight", ()))
    return maps


def expert_maps(config: ModelConfig, ours: str, names: dict[str, str], fused_prefix: str) -> list[TensorMap]:
    """Our stacked expert weights <-> per-expert HF names (`names[proj]` has a `{j}` field)."""
    size = config.moe.moe_intermediate_size
    experts = range(config.moe.n_routed_experts)
    fused = {
        "gate_proj": (fused_prefix + "gate_up_proj", (0, size)),
        "up_proj": (fused_prefix + "gate_up_proj", (size, 2 * size)),
        "down_proj": (fused_prefix + "down_proj", None),
    }
    return [
        PerExpert(
            ours + "experts." + proj,
            tuple(names[proj].format(j=j) for j in experts),
            fused=fused[proj][0],
            rows=fused[proj][1],
        )
        for proj in ("gate_proj", "up_proj", "down_proj")
    ]
