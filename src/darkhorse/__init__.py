"""darkhorse: from raw text to a language model you can train, fine-tune, chat with and export."""

__version__ = "0.1.0"
