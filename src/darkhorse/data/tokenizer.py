"""Byte-level BPE tokenizer: trained with HF `tokenizers`, saved as one `tokenizer.json`.

Pre-tokenization is the Qwen2 regex (the Llama-3 regex with `\\p{N}` instead of `\\p{N}{1,3}`) followed by
ByteLevel without its own regex. Two reasons for this choice:

* every digit is its own pre-token, so a number is always spelled digit by digit; arithmetic skills
  (carry, comparison, sorting) see the same units whatever the number, which small models need;
* llama.cpp knows this exact regex as the `qwen2` pre-tokenizer type (`LLAMA_CPP_PRE`), so a GGUF
  export tokenizes identically in llama.cpp (`tokenizer.ggml.model = "gpt2"` + our merges).

The 12 special tokens take the fixed ids 0..11 in `SPECIAL_TOKENS` order. Any special-token string inside
text encodes to its id (so rendered chat text encodes right); `encode` never adds tokens of its own.
`sha256` is the hash of the canonical serialization, which is exactly what `save` writes, so the hash of a
saved `tokenizer.json` file equals `Tokenizer.sha256`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer

from darkhorse.errors import DarkhorseError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, SYSTEM_END = "<|system|>", "<|/system|>"
USER, USER_END = "<|user|>", "<|/user|>"
ASSISTANT, ASSISTANT_END = "<|assistant|>", "<|/assistant|>"
THINK, THINK_END, NO_THINK = "<|think|>", "<|/think|>", "<|no_think|>"
SPECIAL_TOKENS = (
    BOS, EOS, PAD, SYSTEM, SYSTEM_END, USER, USER_END, ASSISTANT, ASSISTANT_END, THINK, THINK_END, NO_THINK,
)  # fmt: skip

# Qwen2's split regex; llama.cpp's `qwen2` pre-tokenizer type implements exactly this.
PRE_TOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA_CPP_PRE = "qwen2"  # value for GGUF `tokenizer.ggml.pre`
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # specials + one token per byte
_SPECIALS_PATTERN = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


class Tokenizer:
    """darkhorse's tokenizer: a thin, typed wrapper over a HF `tokenizers.Tokenizer`."""

    def __init__(self, backend: BackendTokenizer, path: Path | None = None) -> None:
        self.backend = backend
        self.path = path

    def require_special_tokens(self) -> None:
        """Training data and chat need all 12 special tokens; a foreign tokenizer (e.g. an imported
        model's) still encodes and decodes plain text without them."""
        missing = [token for token in SPECIAL_TOKENS if self.backend.token_to_id(token) is None]
        if missing:
            raise DarkhorseError(
                f"{self.path or 'tokenizer'}: lacks the darkhorse special tokens {', '.join(missing)} "
                "(train one with `darkhorse prepare` or pass a tokenizer it wrote)"
            )

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DarkhorseError(f"tokenizer file not found: {path}")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for any parse problem
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DarkhorseError(f"{path}: not a valid tokenizer.json ({first_line})") from None
        return cls(backend, path)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
        """Train byte-level BPE from a stream of texts (never held in memory all at once)."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise DarkhorseError(f"--vocab-size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
        backend = BackendTokenizer(models.BPE())
        backend.pre_tokenizer = _pre_tokenizer()
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(_without_specials(texts), trainer=trainer)
        return cls(backend)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once, in parallel on all cores (Rust threads, GIL released)."""
        return [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @cached_property
    def special_tokens(self) -> dict[str, int]:
        """The darkhorse special tokens this tokenizer has, by id."""
        ids = {token: self.backend.token_to_id(token) for token in SPECIAL_TOKENS}
        return {token: id_ for token, id_ in ids.items() if id_ is not None}

    def _special_id(self, token: str) -> int:
        if token not in self.special_tokens:
            self.require_special_tokens()
        return self.special_tokens[token]

    @property
    def bos_id(self) -> int:
        return self._special_id(BOS)

    @property
    def eos_id(self) -> int:
        return self._special_id(EOS)

    @property
    def pad_id(self) -> int:
        return self._special_id(PAD)

    def to_json(self) -> str:
        return self.backend.to_str()

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json(), encoding="utf-8")
        self.path = path
        return path


def _without_specials(texts: Iterable[str]) -> Iterator[str]:
    """Cut special-token strings out of training text: the BPE trainer would otherwise learn merges
    such as `<|` and `|><|` that encoding never uses (specials are matched before BPE runs)."""
    for text in texts:
        if "<|" in text:
            yield from (piece for piece in _SPECIALS_PATTERN.split(text) if piece)
        else:
            yield text
