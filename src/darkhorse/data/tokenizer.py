"""Byte-level BPE tokenizer: trained with HF `tokenizers`, saved as one `tokenizer.json`.

Pre-tokenization is the Qwen2 regex (the Llama-3 regex with `\\p{N}` instead of `\\p{N}{1,3}`) followed by
ByteLevel without its own regex. Two reasons for this choice:

* every digit is its own pre-token, so a number is always spelled digit by digit; arithmetic skills
  (carry, comparison, sorting) see the same units whatever the number, which small models need;
* llama.cpp knows this exact regex as the `qwen2` pre-tokenizer type (`LLAMA_CPP_PRE`), so a GGUF
  export tokenizes identically in llama.cpp (`tokenizer.ggml.model = "gpt2"` + our merges).

The 12 special tokens take the fixed ids 0..11 in `SPECIAL_TOKENS` order. Any special-token string inside
text encodes to its id with `encode` (markup we rendered); `encode_text` reads them as plain characters
(text from outside: a user's message, a plain document), and `encode_parts` encodes rendered chat with
its markup as tokens and its message text as characters. None of them adds tokens of its own.
`sha256` is the hash of the canonical serialization, which is exactly what `save` writes, so the hash of a
saved `tokenizer.json` file equals `Tokenizer.sha256`.

Any other HF `tokenizers` file (an imported Llama or Qwen model's) loads too, for plain text: its
bos/eos/pad tokens come from what sits beside a `tokenizer.json` (HF's `tokenizer_config.json`, or the
"import" record in a checkpoint's `meta.json`), else from the names models commonly use (`<s>`,
`<|begin_of_text|>`, `<|endoftext|>`, ...); its own chat template comes from `tokenizer_config.json` or
`chat_template.jinja`. Saving such a tokenizer writes a `tokenizer_config.json` beside it, so prepared
data dirs and checkpoints carry these settings along. Chat records and darkhorse's chat format need the
darkhorse special tokens.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer

from darkhorse.errors import DarkhorseError
from darkhorse.files import read_json_object

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

TOKENIZER_FILE = "tokenizer.json"
SETTINGS_FILE = "tokenizer_config.json"  # HF's name; bos/eos/pad tokens and chat_template
TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a chat template
SIDECAR_FILES = (SETTINGS_FILE, TEMPLATE_FILE)  # travel with a tokenizer.json (prepare, checkpoints)
# Names other models give these roles, tried in order when nothing beside the file declares them.
COMMON_NAMES = {
    "bos_token": ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[BOS]"),
    "eos_token": ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|im_end|>", "[EOS]"),
    "pad_token": ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "<|endoftext|>", "[PAD]"),
}
OWN_NAMES = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _token_text(value: object) -> str | None:
    """A token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def declared_settings(folder: Path) -> dict[str, str]:
    """bos/eos/pad token strings and chat template declared beside a tokenizer.json (empty if none).

    Read from HF's tokenizer_config.json and chat_template.jinja, then from a checkpoint meta.json's
    "import" record (checkpoints imported before they carried tokenizer_config.json)."""
    settings: dict[str, str] = {}
    meta = folder / "meta.json"
    if meta.is_file():
        record = read_json_object(meta).get("import")
        record = record.get("tokenizer") if isinstance(record, dict) else None
        if isinstance(record, dict):
            settings.update({key: value for key, value in record.items() if isinstance(value, str) and value})
    if (folder / SETTINGS_FILE).is_file():
        config = read_json_object(folder / SETTINGS_FILE)
        for key in OWN_NAMES:
            if _token_text(config.get(key)):
                settings[key] = _token_text(config[key])
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next(
                (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
            )
        if isinstance(template, str) and template:
            settings["chat_template"] = template
    if (folder / TEMPLATE_FILE).is_file():
        settings["chat_template"] = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    return {key: value for key, value in settings.items() if key in (*OWN_NAMES, "chat_template")}


class Tokenizer:
    """darkhorse's tokenizer: a thin, typed wrapper over a HF `tokenizers.Tokenizer`.

    `settings` holds what a foreign tokenizer's files declare (see `declared_settings`)."""

    def __init__(
        self, backend: BackendTokenizer, path: Path | None = None, settings: dict[str, str] | None = None
    ) -> None:
        self.backend = backend
        self.path = path
        self.settings = settings or {}

    @property
    def has_chat_tokens(self) -> bool:
        return len(self.special_tokens) == len(SPECIAL_TOKENS)

    def require_special_tokens(self, purpose: str = "") -> None:
        """Training on chat records and darkhorse's chat format need all 12 special tokens; a foreign
        tokenizer (e.g. an imported model's) still encodes and decodes plain text without them."""
        missing = [token for token in SPECIAL_TOKENS if token not in self.special_tokens]
        if missing:
            raise DarkhorseError(
                f"{self.path or 'tokenizer'}: lacks the darkhorse special tokens {', '.join(missing)}"
                + (f", which {purpose} need" if purpose else " (train one with `darkhorse prepare`)")
            )

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Any HF `tokenizers` file; a file named tokenizer.json also reads the settings beside it."""
        path = Path(path)
        if not path.is_file():
            raise DarkhorseError(f"tokenizer file not found: {path}")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for any parse problem
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DarkhorseError(f"{path}: not a valid tokenizer.json ({first_line})") from None
        settings = declared_settings(path.parent) if path.name == TOKENIZER_FILE else {}
        return cls(backend, path, settings)

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

    @cached_property
    def _text_backend(self) -> BackendTokenizer:
        """A copy of the backend that reads special-token strings in text as the characters they are."""
        backend = BackendTokenizer.from_str(self.backend.to_str())
        backend.encode_special_tokens = True
        return backend

    def encode_text(self, text: str) -> list[int]:
        """Text from outside (a user's message, a plain document): `<|user|>` written in it stays
        characters and can never become a control token. `encode` is for markup we rendered."""
        return self._text_backend.encode(text, add_special_tokens=False).ids

    def encode_text_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode_text` of many texts, in parallel like `encode_batch`."""
        return [e.ids for e in self._text_backend.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_parts(self, parts: Sequence[tuple[str, bool]]) -> list[int]:
        """Rendered chat given as (text, is markup) parts (data/chat_format.py): see `encode_parts_batch`."""
        return self.encode_parts_batch([parts])[0]

    def encode_parts_batch(
        self,
        documents: Sequence[Sequence[tuple[str, bool]]],
        run: Callable[[Callable[[list[str]], list[list[int]]], list[str]], list[Any]] | None = None,
    ) -> list[list[int] | np.ndarray]:
        """Encode rendered documents: markup parts as written (special tokens included), every other
        part with `encode_text`, so only the renderer can put control tokens into a document.

        A document whose text parts hold no special-token string encodes the same either way, so it is
        encoded whole, in one batch (the common case: as fast as `encode_batch`). `run(encode, texts)`
        applies an encoder to texts (default: directly; prepare passes one that cuts long texts into
        pieces to bound memory); a document that came back as an array stays one array."""
        run = run or (lambda encode, texts: encode(texts))
        search = self._specials_in_text.search
        forged = [any(not markup and search(text) for text, markup in parts) for parts in documents]
        plain = ["".join(text for text, _ in parts) for parts, bad in zip(documents, forged, strict=True) if not bad]
        whole = iter(run(self.encode_batch, plain))
        risky = [parts for parts, bad in zip(documents, forged, strict=True) if bad]
        markup = {text: self.encode(text) for parts in risky for text, is_markup in parts if is_markup}
        texts = iter(
            run(self.encode_text_batch, [text for parts in risky for text, is_markup in parts if not is_markup])
        )
        return [
            next(whole)
            if not bad
            else _joined([markup[text] if is_markup else next(texts) for text, is_markup in parts])
            for parts, bad in zip(documents, forged, strict=True)
        ]

    @cached_property
    def _specials_in_text(self) -> re.Pattern:
        """Matches any special token's string (darkhorse's or a foreign tokenizer's own)."""
        tokens = sorted((t.content for t in self.backend.get_added_tokens_decoder().values() if t.special), key=len)
        return re.compile("|".join(re.escape(t) for t in reversed(tokens)) or "(?!)")

    def encode_offsets(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Each token's [start, end) character range in its text (the fast batch path skips these)."""
        return [encoding.offsets for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]

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

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of every special token (darkhorse's or a foreign tokenizer's own): markup, never text to show."""
        return frozenset(i for i, token in self.backend.get_added_tokens_decoder().items() if token.special)

    def _role_token(self, role: str) -> str | None:
        """The token playing `role` (bos_token, eos_token, pad_token): ours, declared, or a common name."""
        candidates = (OWN_NAMES[role], self.settings.get(role), *COMMON_NAMES[role])
        return next((t for t in candidates if t and self.backend.token_to_id(t) is not None), None)

    @cached_property
    def bos_token(self) -> str | None:
        """None for tokenizers without one (Qwen's): documents are then only ended by eos."""
        return self._role_token("bos_token")

    @cached_property
    def eos_token(self) -> str:
        token = self._role_token("eos_token")
        if token is None:
            raise DarkhorseError(
                f"{self.path or 'tokenizer'}: no end-of-sequence token found (tried {EOS}, tokenizer_config.json's "
                f"eos_token, {', '.join(COMMON_NAMES['eos_token'])}); declare eos_token in {SETTINGS_FILE} beside it"
            )
        return token

    @cached_property
    def pad_token(self) -> str:
        """Padding only fills unused positions, so without a pad token eos serves (as HF recipes do)."""
        return self._role_token("pad_token") or self.eos_token

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.backend.token_to_id(self.pad_token)

    @property
    def chat_template(self) -> str | None:
        """The foreign tokenizer's own Jinja chat template, if its files declare one."""
        return self.settings.get("chat_template")

    def to_json(self) -> str:
        return self.backend.to_str()

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer; a foreign one also gets its resolved settings in tokenizer_config.json
        beside it (darkhorse's own tokenizers need none)."""
        path = Path(path)
        path.write_text(self.to_json(), encoding="utf-8")
        if not self.has_chat_tokens and path.name == TOKENIZER_FILE:
            settings = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
            if self.chat_template:
                settings["chat_template"] = self.chat_template
            path.with_name(SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
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


def _joined(pieces: list[Sequence[int]]) -> list[int] | np.ndarray:
    """One document's ids from its parts' ids: a list, or one uint32 array when a part is an array."""
    if any(isinstance(piece, np.ndarray) for piece in pieces):
        return np.concatenate([np.asarray(piece, dtype=np.uint32) for piece in pieces])
    return [i for piece in pieces for i in piece]
