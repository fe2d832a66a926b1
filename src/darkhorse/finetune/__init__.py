"""LoRA fine-tuning and merging adapters into their base (layer 6: above train, beside interop)."""
