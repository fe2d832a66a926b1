"""What a decode is asked to do: `SamplingOptions`, the one object every caller of the decode engine builds
(`generate`, `chat`, `eval`, `serve`, the trainer's samples) and the one place its values are checked.

Plain Python (no torch), so command-line parsers and the server's request schema can read `BOUNDS`, the
valid range of each number, without importing the engine: argparse and pydantic then reject a bad value
with their own message (a usage error, a 400), and whatever reaches the engine is checked again here."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from numbers import Integral, Real

from darkhorse.config import range_problem
from darkhorse.errors import DarkhorseError

BOUNDS: dict[str, dict[str, float]] = {
    "max_new_tokens": {"ge": 0},
    "temperature": {"ge": 0},  # 0: greedy
    "top_k": {"ge": 0},  # 0: off
    "top_p": {"gt": 0, "le": 1},  # 1: off
    "repetition_penalty": {"gt": 0},  # 1: off
    "seed": {"ge": 0},
}
SPECULATIVE = ("mtp",)  # the speculative decodings there are


@dataclass(frozen=True)
class SamplingOptions:
    """How to decode one request (or one batch of prompts): at most `max_new_tokens` new tokens (fewer at
    the end of the model's context), temperature 0 for greedy, else sampling with top-k, top-p (nucleus)
    and a CTRL-style repetition penalty, reproducible with `seed`; a row ends after writing one of
    `stop_ids`. `speculative`: None, or "mtp" (greedy only; see infer/speculative.py)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    speculative: str | None = None

    def __post_init__(self) -> None:
        for name, bounds in BOUNDS.items():
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            whole = name in ("max_new_tokens", "top_k", "seed")
            if isinstance(value, bool) or not isinstance(value, Integral if whole else Real):
                raise DarkhorseError(f"{name} must be {'an integer' if whole else 'a number'}, got {value!r}")
            problem = range_problem(value, **bounds)
            if problem:
                raise DarkhorseError(f"{name} {problem}, got {value!r}")
        stop_ids = frozenset(self.stop_ids)
        if not all(isinstance(i, Integral) and not isinstance(i, bool) and i >= 0 for i in stop_ids):
            raise DarkhorseError(f"stop_ids must be token ids (integers >= 0), got {sorted(stop_ids, key=str)}")
        object.__setattr__(self, "stop_ids", stop_ids)
        if self.speculative is not None and self.speculative not in SPECULATIVE:
            raise DarkhorseError(f"unknown speculative decoding {self.speculative!r}; the one there is: mtp")
        if self.speculative and not self.greedy:
            raise DarkhorseError(
                "--speculative mtp decodes greedily only (--temperature 0, no --repetition-penalty): "
                "speculative sampling is not implemented"
            )

    @property
    def greedy(self) -> bool:
        """Whether each token is the likeliest one (no sampler, no penalty)."""
        return self.temperature == 0 and self.repetition_penalty == 1.0

    @classmethod
    def of(cls, options: SamplingOptions | None, **changes) -> SamplingOptions:
        """`options` with `changes` (keyword spellings of its fields), or new options from `changes` alone."""
        return replace(options, **changes) if options is not None else cls(**changes)
