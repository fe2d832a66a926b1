"""The config-driven transformer and its blocks."""

from darkhorse.model.transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer"]
