"""LoRA fine-tuning on a frozen base with the one trainer, adapters in PEFT's layout, and merging them back.

Layer 6 (above train, beside interop). `lora` (the LoRA modules, applied from outside), `peft_format` (the
adapter files), `chat_data` (data in the base's own chat template), `run` (`finetune()` and the trainer
hooks), `merge` (an adapter folded into its base as a standalone checkpoint).
"""
